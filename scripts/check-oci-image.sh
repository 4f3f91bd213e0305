#!/usr/bin/env bash
# Self-check of scripts/oci-image.py, no registry needed: builds a probe image of
# /usr/bin/true and checks that every consumer loads it and that it runs:
#   - the same inputs give the same archive, byte for byte;
#   - skopeo inspect / copy to docker-archive (what podman and docker load);
#   - skopeo copy to an OCI dir, umoci unpack, chroot runs it;
#   - a throwaway containerd (own root, state and socket in a temp dir, stopped by PID)
#     imports it with `ctr images import` and runs it with `ctr run` (runc).
# Needs root, python3, skopeo, umoci, containerd, ctr, runc. Prints one line per check.
#
#   bash scripts/check-oci-image.sh                      the probe image
#   bash scripts/check-oci-image.sh ARCHIVE REF CMD...   an archive built already, e.g.
#     bash scripts/check-oci-image.sh .cache/image/isthmus-0.1.0.oci.tar \
#       localhost/isthmus:0.1.0 isthmus-agent --version
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d /tmp/oci-image-check.XXXXXX)
CONTAINERD_PID=
cleanup() {
  set +e
  if [ -n "$CONTAINERD_PID" ] && kill -0 "$CONTAINERD_PID" 2>/dev/null; then
    kill "$CONTAINERD_PID"
    for _ in $(seq 50); do kill -0 "$CONTAINERD_PID" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$CONTAINERD_PID" 2>/dev/null || true
  fi
  # containerd's overlay snapshots may still be mounted under its root.
  if [ -d "$WORK/root" ]; then
    { grep -o " $WORK/root[^ ]*" /proc/self/mounts || true; } | sort -r | while read -r m; do
      umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
    done
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

ok() { echo "ok: $*"; }

if (($# >= 3)); then
  ARCHIVE=$(realpath "$1") REF=$2
  shift 2
  RUN=("$@")
else
  REF=localhost/probe:1
  ARCHIVE=$WORK/probe.oci.tar
  RUN=(/usr/local/bin/true)
  build() { python3 "$ROOT/scripts/oci-image.py" --name "$REF" --out "$1" --bin /usr/bin/true \
    --cmd '["/usr/local/bin/true"]' 2>/dev/null; }
  build "$ARCHIVE"
  build "$WORK/again.tar"
  cmp -s "$ARCHIVE" "$WORK/again.tar" || { echo "FAIL: two builds differ" >&2; exit 1; }
  ok "deterministic: $(sha256sum <"$ARCHIVE" | cut -c1-16)…, $(stat -c %s "$ARCHIVE") bytes"
fi

skopeo inspect "oci-archive:$ARCHIVE" >"$WORK/inspect.json"
python3 - "$WORK/inspect.json" <<'EOF'
import json, sys
doc = json.load(open(sys.argv[1]))
assert doc["Os"] == "linux" and doc["Architecture"], doc
EOF
ok "skopeo inspect oci-archive: $(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d["Os"], d["Architecture"])' "$WORK/inspect.json")"

skopeo copy -q "oci-archive:$ARCHIVE" "docker-archive:$WORK/docker.tar:$REF" >/dev/null
tar -xOf "$WORK/docker.tar" manifest.json | grep -q "\"$REF\"" \
  || { echo "FAIL: docker-archive lacks the tag $REF" >&2; exit 1; }
ok "skopeo copy to docker-archive (podman load / docker load format)"

skopeo copy -q "oci-archive:$ARCHIVE" "oci:$WORK/oci:1" >/dev/null
umoci unpack --image "$WORK/oci:1" "$WORK/bundle" >/dev/null
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  chroot "$WORK/bundle/rootfs" "${RUN[@]}"
ok "umoci unpack + chroot ${RUN[*]}"

# A containerd of our own: nothing shared with a containerd the machine may run.
mkdir -p "$WORK/root" "$WORK/state"
cat >"$WORK/config.toml" <<EOF
version = 2
root = "$WORK/root"
state = "$WORK/state"
# The opt plugin would create /opt/containerd on the host.
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.internal.v1.opt"]
[grpc]
  address = "$WORK/containerd.sock"
[ttrpc]
  address = "$WORK/containerd.sock.ttrpc"
[debug]
  address = "$WORK/debug.sock"
EOF
containerd --config "$WORK/config.toml" >"$WORK/containerd.log" 2>&1 &
CONTAINERD_PID=$!
CTR=(ctr --address "$WORK/containerd.sock" -n probe)
for _ in $(seq 100); do "${CTR[@]}" version >/dev/null 2>&1 && break; sleep 0.1; done
"${CTR[@]}" version >/dev/null || { cat "$WORK/containerd.log" >&2; exit 1; }

"${CTR[@]}" images import "$ARCHIVE" >/dev/null
"${CTR[@]}" images ls -q | grep -qx "$REF" \
  || { echo "FAIL: ctr images import did not name it $REF:" >&2; "${CTR[@]}" images ls >&2; exit 1; }
ok "ctr images import: $REF"

"${CTR[@]}" run --rm "$REF" probe-run "${RUN[@]}"
ok "ctr run --rm $REF ${RUN[*]}"
"${CTR[@]}" images rm "$REF" >/dev/null
