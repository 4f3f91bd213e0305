#!/usr/bin/env bash
# Where isthmus-agent spends its CPU during a bulk TCP transfer through the tunnel.
#
# Two fresh network namespaces joined by a veth pair (addresses only inside them), the
# agent in each, configured with `wg`; iperf3 sends TCP from B to A through the tunnel
# while `perf record` samples each agent (user and kernel, all threads). Writes the flat
# profiles (self time per symbol) and the iperf3 rate into --out. Needs root and perf.
#
#   bash benches/netns-profile.sh [--seconds S] [--streams N] [--out DIR]
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
AGENT=${ISTHMUS_AGENT:-$REPO/target/release/isthmus-agent}
SECONDS_RUN=8 STREAMS=1 OUT=$REPO/target/profile
while (($#)); do
  case $1 in
    --seconds) SECONDS_RUN=$2; shift 2 ;;
    --streams) STREAMS=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    -h | --help) sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
[[ $SECONDS_RUN =~ ^[1-9][0-9]*$ && $SECONDS_RUN -ge 4 ]] || { echo "--seconds: 4 or more" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "needs root" >&2; exit 1; }
for cmd in perf iperf3 wg ip; do
  command -v $cmd >/dev/null || { echo "missing $cmd" >&2; exit 1; }
done
mkdir -p "$OUT"

NS_A=isp-$$-a NS_B=isp-$$-b VA=isp$$va VB=isp$$vb WA=isp$$wa WB=isp$$wb
WORK=$(mktemp -d /tmp/isp-prof.XXXXXX)
PIDS=()
cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  ip netns del "$NS_A" 2>/dev/null || true
  ip netns del "$NS_B" 2>/dev/null || true
  rm -f "/var/run/wireguard/$WA.sock" "/var/run/wireguard/$WB.sock"
  rm -rf "$WORK"
}
trap cleanup EXIT

ip netns add "$NS_A" && ip netns add "$NS_B"
ip -n "$NS_A" link add "$VA" type veth peer name "$VB" netns "$NS_B"
ip -n "$NS_A" addr add 198.18.0.1/30 dev "$VA" && ip -n "$NS_B" addr add 198.18.0.2/30 dev "$VB"
for ns in "$NS_A" "$NS_B"; do ip -n "$ns" link set lo up; done
ip -n "$NS_A" link set "$VA" up && ip -n "$NS_B" link set "$VB" up

start() { # ns iface -> PID
  ip netns exec "$1" "$AGENT" tunnel --iface "$2" --listen-port 51820 >"$WORK/$2.log" 2>&1 &
  PID=$!
  PIDS+=("$PID")
  for _ in $(seq 50); do [ -S "/var/run/wireguard/$2.sock" ] && return 0; sleep 0.1; done
  echo "agent in $1 did not start" >&2; cat "$WORK/$2.log" >&2; exit 1
}
start "$NS_A" "$WA"; PID_A=$PID
start "$NS_B" "$WB"; PID_B=$PID
umask 077
wg genkey >"$WORK/a.key"; wg genkey >"$WORK/b.key"
umask 022
ip netns exec "$NS_A" wg set "$WA" private-key "$WORK/a.key" listen-port 51820 \
  peer "$(wg pubkey <"$WORK/b.key")" allowed-ips 10.200.0.2/32 endpoint 198.18.0.2:51820
ip netns exec "$NS_B" wg set "$WB" private-key "$WORK/b.key" listen-port 51820 \
  peer "$(wg pubkey <"$WORK/a.key")" allowed-ips 10.200.0.1/32 endpoint 198.18.0.1:51820
ip -n "$NS_A" addr add 10.200.0.1/24 dev "$WA" && ip -n "$NS_A" link set "$WA" mtu 1420 up
ip -n "$NS_B" addr add 10.200.0.2/24 dev "$WB" && ip -n "$NS_B" link set "$WB" mtu 1420 up
for _ in $(seq 10); do ip netns exec "$NS_B" ping -c1 -W1 -q 10.200.0.1 >/dev/null 2>&1 && break; done

ip netns exec "$NS_A" iperf3 -s -1 >"$WORK/server.log" 2>&1 &
PIDS+=("$!")
sleep 0.5
ip netns exec "$NS_B" iperf3 -c 10.200.0.1 -t "$SECONDS_RUN" -P "$STREAMS" >"$OUT/iperf3.txt" 2>&1 &
CLIENT=$!
PIDS+=("$CLIENT")
sleep 1
perf record -q -o "$WORK/sender.data" -p "$PID_B" -- sleep $((SECONDS_RUN - 3)) 2>/dev/null &
PERF_B=$!
perf record -q -o "$WORK/receiver.data" -p "$PID_A" -- sleep $((SECONDS_RUN - 3)) 2>/dev/null &
PERF_A=$!
wait "$PERF_B" "$PERF_A" || true
wait "$CLIENT" || true
for side in sender receiver; do
  if ! perf report -i "$WORK/$side.data" --no-children --sort symbol --stdio \
    >"$WORK/$side.report" 2>"$WORK/$side.err"; then
    echo "perf report ($side) failed: $(tail -n 3 "$WORK/$side.err")" >&2
  fi
  { grep -E '^ +[0-9]' "$WORK/$side.report" || true; } | head -n 30 >"$OUT/$side.txt"
done
echo "iperf3 (B -> A, $STREAMS stream(s)): $(grep -E 'receiver$' "$OUT/iperf3.txt" | tail -1 | awk '{print $(NF-2), $(NF-1)}')"
for side in sender receiver; do
  echo "== $side (top 15 by self time) =="
  head -n 15 "$OUT/$side.txt"
done
