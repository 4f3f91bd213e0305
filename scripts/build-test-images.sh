#!/usr/bin/env bash
# Builds, without any registry, the images the real-cluster tests and the sandbox import
# into every node's containerd:
#   .cache/test-images/pause.oci.tar    registry.k8s.io/pause:3.10 (Kubernetes' own pause.c)
#   .cache/test-images/agnhost.oci.tar  localhost/agnhost:v1.37.2 (upstream's e2e test image)
#   .cache/flannel/flannel-v0.28.10.oci.tar  (scripts/build-flannel.sh)
# from the binaries scripts/build-kube.sh and scripts/build-flannel.sh build. Idempotent:
# an archive newer than its inputs is kept. Progress on stderr; the archive paths on stdout.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$ROOT/.cache/test-images"
KUBE_BIN="$ROOT/.cache/kube/bin"
mkdir -p "$OUT"

bash "$ROOT/scripts/build-kube.sh" >/dev/null
bash "$ROOT/scripts/build-flannel.sh" >/dev/null

# image NAME REF ARCHIVE-INPUTS... -- BUILDER-ARGS...
image() {
  local archive="$OUT/$1.oci.tar" ref="$2"
  shift 2
  local inputs=() stale=0
  while [[ $1 != -- ]]; do inputs+=("$1"); shift; done
  shift
  [[ -f $archive ]] || stale=1
  for i in "${inputs[@]}" "$ROOT/scripts/oci-image.py" "${BASH_SOURCE[0]}"; do
    [[ $stale == 1 || $i -nt $archive ]] && stale=1
  done
  if [[ $stale == 1 ]]; then
    python3 "$ROOT/scripts/oci-image.py" --name "$ref" --out "$archive" "$@"
  else
    echo "build-test-images: $archive is up to date" >&2
  fi
  echo "$archive"
}

image pause registry.k8s.io/pause:3.10 "$KUBE_BIN/pause" -- \
  --bin "$KUBE_BIN/pause:/pause" --entrypoint '["/pause"]'
image agnhost localhost/agnhost:v1.37.2 "$KUBE_BIN/agnhost" -- \
  --bin "$KUBE_BIN/agnhost:/agnhost" --entrypoint '["/agnhost"]'
bash "$ROOT/scripts/build-flannel.sh" | sed -n "s/^FLANNEL_IMAGE_TAR=//p"
