# The README's two commands: `make sandbox` (the main job) and `make test` (every test).
# Each installs what it needs first, idempotently.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: sandbox test deps lint bench build image test-images fuzz

deps:
	bash scripts/install-deps.sh

build: deps
	$(CARGO) build --release --workspace --bins

## The main job: the migration sandbox (sandbox/). A real cluster on this machine (API
## server, controller manager, scheduler; kubelet, containerd, kube-proxy and the real
## flannel on every node) moves from one cloud to the other over isthmus, installed from
## its image: workloads, a load-balancer switch, then the control plane (etcd 3 -> 5 -> 3),
## while clients call the Service and a writer writes to etcd; a report per phase; exit
## status non-zero if anything failed. Needs root. `make sandbox PROFILE=short` is the
## CI-sized run; SANDBOX_ARGS=--workers-only skips the etcd phase.
PROFILE ?= default
SANDBOX_ARGS ?=
TARGET_DIR := $(or $(CARGO_TARGET_DIR),target)
sandbox: build
	@if [ "$$(id -u)" != 0 ]; then \
	  echo "make sandbox needs root (network namespaces, TUN, iptables, containerd): run it as root" >&2; \
	  exit 1; \
	fi
	bash scripts/build-kube.sh >/dev/null
	bash scripts/build-image.sh --target-dir $(TARGET_DIR) >/dev/null
	bash scripts/build-test-images.sh >/dev/null
	bash scripts/build-sandbox-image.sh --target-dir $(TARGET_DIR) >/dev/null
	$(TARGET_DIR)/release/isthmus-sandbox --profile $(PROFILE) $(SANDBOX_ARGS)

## One OCI image with both binaries and wg, built without a registry or a daemon:
## .cache/image/isthmus-<version>.oci.tar (ref localhost/isthmus:<version>), see README.
image: build
	bash scripts/build-image.sh --target-dir $(TARGET_DIR)

## The images the real-cluster tests import into every node (pause, agnhost, flannel), built
## from Go modules and Debian packages, no registry: .cache/test-images/, .cache/flannel/.
test-images: deps
	bash scripts/build-test-images.sh >/dev/null

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## Every test: formatting and lints, a few seconds of every fuzz target over its corpus
## (scripts/fuzz-smoke.sh, nightly), unit tests, and the end-to-end tests in network
## namespaces (needs root, TUN and iproute2). The interop peer is the current wireguard-go,
## built once from Go modules into .cache/; Debian's older build is tested too. The
## control-plane tests run a real kube-apiserver and etcd, built once into .cache/kube; the
## real-cluster test (tests/tests/real_cluster.rs) adds the kubelet, kube-proxy, controller
## manager, scheduler, containerd and flannel, and installs isthmus from its image.
test: deps lint
	bash scripts/build-peers.sh wireguard-go
	bash scripts/build-kube.sh
	$(CARGO) build --release --workspace --bins
	bash scripts/build-image.sh --target-dir $(TARGET_DIR) >/dev/null
	bash scripts/build-test-images.sh >/dev/null
	bash scripts/build-sandbox-image.sh --target-dir $(TARGET_DIR) >/dev/null
	bash scripts/fuzz-smoke.sh
	ISTHMUS_WIREGUARD_GO=$(CURDIR)/.cache/bin/wireguard-go-current \
	  $(CARGO) test --release --workspace -- --test-threads=2

## Long fuzz runs (docs/fuzzing.md): every target in fuzz/ one after the other, each for
## FUZZ_SECONDS (default 600) or FUZZ_RUNS executions; FUZZ_TARGETS picks some. What the
## runs find is kept in fuzz/corpus/ (minimise it with `cargo fuzz cmin` before committing).
FUZZ_SECONDS ?= 600
fuzz:
	FUZZ_SECONDS=$(FUZZ_SECONDS) FUZZ_RUNS=$(FUZZ_RUNS) FUZZ_TARGETS="$(FUZZ_TARGETS)" \
	  FUZZ_KEEP=1 bash scripts/fuzz-smoke.sh

## Throughput side by side with wireguard-go and boringtun-cli, plain TCP and then TCP inside
## VXLAN (flannel's encapsulation, pod traffic between clouds); writes docs/benchmarks.md.
bench: build
	bash scripts/build-peers.sh
	bash benches/netns-throughput.sh
	bash benches/netns-throughput.sh --vxlan
	bash benches/netns-throughput.sh --rate 2 --streams 1
