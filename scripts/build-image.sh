#!/usr/bin/env bash
# Builds the isthmus OCI image, with no registry and no container daemon: one image that
# carries both release binaries and `wg` (wireguard-tools, so `kubectl exec ds/isthmus-agent
# -- wg show` works), written by scripts/oci-image.py to
#   .cache/image/isthmus-<version>.oci.tar        (ref localhost/isthmus:<version>)
# where <version> is the workspace version in Cargo.toml. The image runs as root by default
# (the agent needs root + NET_ADMIN); deploy/ runs the coordinator as 65532 (nonroot).
#
#   bash scripts/build-image.sh [--target-dir DIR]     (or CARGO_TARGET_DIR; default target)
#
# Needs the release binaries (`make build`). Idempotent: does nothing when the archive is
# newer than the binaries, wg and the scripts. Prints the archive's path on stdout (only
# that line); progress goes to stderr.
set -euo pipefail

# shellcheck source=scripts/common.sh
source "$(dirname "$0")/common.sh"
parse_target_dir build-image 2,13 "$@"
VERSION=$(workspace_version)
REF=localhost/isthmus:$VERSION
OUT=$ROOT/.cache/image/isthmus-$VERSION.oci.tar

AGENT=$TARGET_DIR/release/isthmus-agent
COORDINATOR=$TARGET_DIR/release/isthmus-coordinator
WG=/usr/bin/wg
for bin in "$AGENT" "$COORDINATOR"; do
  if [ ! -x "$bin" ]; then
    echo "build-image: $bin is missing: build it first (make build, or" \
      "cargo build --release --workspace --bins)" >&2
    exit 1
  fi
done
if [ ! -x "$WG" ]; then
  echo "build-image: $WG is missing: apt-get install wireguard-tools (make deps)" >&2
  exit 1
fi

fresh=1
for input in "$AGENT" "$COORDINATOR" "$WG" "$0" "$ROOT/scripts/common.sh" "$ROOT/scripts/oci-image.py"; do
  [ "$OUT" -nt "$input" ] || fresh=0
done
if ((fresh)); then
  echo "build-image: $OUT is up to date ($REF)" >&2
  echo "$OUT"
  exit 0
fi

echo "build-image: building $REF from $TARGET_DIR/release" >&2
python3 "$ROOT/scripts/oci-image.py" \
  --name "$REF" \
  --out "$OUT" \
  --bin "$AGENT" \
  --bin "$COORDINATOR" \
  --bin "$WG" \
  --cmd '["isthmus-agent","--help"]' \
  --workdir / \
  --label "org.opencontainers.image.title=isthmus" \
  --label "org.opencontainers.image.description=Userspace WireGuard mesh for Kubernetes: isthmus-agent, isthmus-coordinator and wg" \
  --label "org.opencontainers.image.version=$VERSION" \
  --label "org.opencontainers.image.licenses=Apache-2.0" \
  >&2
echo "$OUT"
