#!/usr/bin/env bash
# Installs, idempotently, the Debian packages the tests, the sandbox and the benchmarks use.
# Safe to run again and again: it only calls apt-get when something is missing.
set -euo pipefail

# command -> Debian package that provides it
declare -A wanted=(
  [ip]=iproute2
  [bridge]=iproute2
  [wg]=wireguard-tools
  [wireguard-go]=wireguard-go
  [iperf3]=iperf3
  [ping]=iputils-ping
  [nc]=netcat-openbsd
  [iptables]=iptables
  # the e2e tests set per-namespace sysctls (forwarding, conntrack timeouts, promote_secondaries)
  [sysctl]=procps
  [openssl]=openssl
  [curl]=curl
  # make image (scripts/build-image.sh) and its test (tests/tests/image.rs)
  [python3]=python3
  [strip]=binutils
  [skopeo]=skopeo
  [umoci]=umoci
  # the real cluster (tests/src/rig/): each node's container runtime and CNI plugins,
  # kube-proxy's conntrack, the node namespaces' tools
  [containerd]=containerd
  [runc]=runc
  [/usr/lib/cni/bridge]=containernetworking-plugins
  [conntrack]=conntrack
  [nsenter]=util-linux
  [gcc]=gcc
  # tests/tests/pmtu.rs turns the nodes' segmentation offloads off so eth0 drops what is too big
  [ethtool]=ethtool
)

missing=()
for cmd in "${!wanted[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${wanted[$cmd]}")
done

if ((${#missing[@]})); then
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
  echo "install-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -e /dev/net/tun ]; then
  mkdir -p /dev/net
  mknod /dev/net/tun c 10 200
  chmod 0666 /dev/net/tun
fi
