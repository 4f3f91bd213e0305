#!/usr/bin/env bash
# Builds the sandbox's workload image, with no registry and no container daemon:
#   .cache/test-images/sandbox.oci.tar   (ref localhost/isthmus-sandbox:<version>)
# with etcd (from scripts/build-kube.sh), the etcd member entrypoint isthmus-etcd-member
# and the client isthmus-sandbox-client (both from the sandbox crate's release build).
#
#   bash scripts/build-sandbox-image.sh [--target-dir DIR]   (or CARGO_TARGET_DIR; default target)
#
# Needs `cargo build --release --workspace --bins`. Idempotent: an archive newer than its
# inputs is kept. Prints the archive's path on stdout (only that line).
set -euo pipefail

# shellcheck source=scripts/common.sh
source "$(dirname "$0")/common.sh"
parse_target_dir build-sandbox-image 2,10 "$@"
VERSION=$(workspace_version)
REF=localhost/isthmus-sandbox:$VERSION
OUT=$ROOT/.cache/test-images/sandbox.oci.tar
ETCD=$ROOT/.cache/kube/bin/etcd
MEMBER=$TARGET_DIR/release/isthmus-etcd-member
CLIENT=$TARGET_DIR/release/isthmus-sandbox-client

[[ -x $ETCD ]] || bash "$ROOT/scripts/build-kube.sh" >/dev/null
for bin in "$MEMBER" "$CLIENT"; do
  if [[ ! -x $bin ]]; then
    echo "build-sandbox-image: $bin is missing: cargo build --release --workspace --bins" >&2
    exit 1
  fi
done
mkdir -p "$(dirname "$OUT")"
fresh=1
for input in "$ETCD" "$MEMBER" "$CLIENT" "$0" "$ROOT/scripts/common.sh" "$ROOT/scripts/oci-image.py"; do
  [[ $OUT -nt $input ]] || fresh=0
done
if ((fresh)); then
  echo "build-sandbox-image: $OUT is up to date ($REF)" >&2
else
  echo "build-sandbox-image: building $REF" >&2
  python3 "$ROOT/scripts/oci-image.py" --name "$REF" --out "$OUT" \
    --bin "$ETCD:/usr/local/bin/etcd" \
    --bin "$MEMBER:/usr/local/bin/isthmus-etcd-member" \
    --bin "$CLIENT:/usr/local/bin/isthmus-sandbox-client" \
    --workdir / >&2
fi
echo "$OUT"
