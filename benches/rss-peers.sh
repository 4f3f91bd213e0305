#!/usr/bin/env bash
# Resident memory of the agent with many configured peers.
#
# Starts isthmus-agent in a fresh network namespace, configures N peers (default 1000)
# through the real UAPI with `wg setconf` (each peer: a public key, an endpoint, one /32 of
# allowed IPs, like a mesh node), checks `wg show` lists them all, and prints the agent's
# VmRSS and VmHWM from /proc/<pid>/status. Needs root; removes everything it made.
#
#   bash benches/rss-peers.sh [--peers N]
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
AGENT=${ISTHMUS_AGENT:-$REPO/target/release/isthmus-agent}
PEERS=1000
while (($#)); do
  case $1 in
    --peers) PEERS=$2; shift 2 ;;
    -h | --help) sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
[[ $PEERS =~ ^[1-9][0-9]*$ ]] || { echo "--peers must be a positive integer" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "needs root (network namespace, TUN)" >&2; exit 1; }
[ -x "$AGENT" ] || { echo "$AGENT not built (cargo build --release -p isthmus-agent)" >&2; exit 1; }

NS=isr-$$ IFACE=isr$$w SOCK=/var/run/wireguard/isr$$w.sock
WORK=$(mktemp -d /tmp/isr-rss.XXXXXX)
PID=
cleanup() {
  if [ -n "$PID" ] && kill -0 "$PID" 2>/dev/null; then
    kill -TERM "$PID" 2>/dev/null || true
    wait "$PID" 2>/dev/null || true
  fi
  ip netns del "$NS" 2>/dev/null || true
  rm -f "$SOCK"
  rm -rf "$WORK"
}
trap cleanup EXIT

ip netns add "$NS"
ip -n "$NS" link set lo up
ip netns exec "$NS" "$AGENT" tunnel --iface "$IFACE" --listen-port 51820 >"$WORK/agent.log" 2>&1 &
PID=$!
for _ in $(seq 50); do [ -S "$SOCK" ] && break; sleep 0.1; done
[ -S "$SOCK" ] || { echo "no UAPI socket; agent log:" >&2; cat "$WORK/agent.log" >&2; exit 1; }

rss() { awk -v k="$1:" '$1 == k { print $2 }' "/proc/$PID/status"; }
before=$(rss VmRSS)

# Peer public keys only need to be 32 bytes; endpoints and allowed IPs exist only here.
umask 077
python3 - "$PEERS" "$(wg genkey)" >"$WORK/wg.conf" <<'PY'
import base64, os, sys
n, private = int(sys.argv[1]), sys.argv[2]
print(f"[Interface]\nPrivateKey = {private}\nListenPort = 51820\n")
for i in range(n):
    key = base64.b64encode(os.urandom(32)).decode()
    a, b = divmod(i + 1, 250)
    print(f"[Peer]\nPublicKey = {key}\nAllowedIPs = 10.{100 + a // 250}.{a % 250}.{b}/32\n"
          f"Endpoint = 198.18.{a % 250}.{b + 1}:51820\nPersistentKeepalive = 0\n")
PY
ip netns exec "$NS" wg setconf "$IFACE" "$WORK/wg.conf"
configured=$(ip netns exec "$NS" wg show "$IFACE" peers | wc -l)
sleep 1 # let the timer thread run over every peer a few times
after=$(rss VmRSS) hwm=$(rss VmHWM)
[ "$configured" = "$PEERS" ] || { echo "wg show lists $configured peers, wanted $PEERS" >&2; exit 1; }
awk -v n="$PEERS" -v b="$before" -v a="$after" -v h="$hwm" 'BEGIN {
  printf "isthmus-agent with %d peers (configured through the UAPI, listed by wg show):\n", n
  printf "  VmRSS before configuring: %.1f MiB\n", b / 1024
  printf "  VmRSS with %d peers:      %.1f MiB (%.1f KiB per peer)\n", n, a / 1024, (a - b) / n
  printf "  VmHWM (peak):            %.1f MiB\n", h / 1024
}'
