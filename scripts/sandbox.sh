#!/usr/bin/env bash
# The data-plane demo `make sandbox` runs until the migration sandbox lands: isthmus in one
# network namespace, wireguard-go in another, configured with `wg`, then a ping and a TCP
# transfer through the tunnel both ways, and a short report. Everything it creates it
# removes, also on failure or Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."

AGENT=${AGENT:-target/release/isthmus-agent}
WGGO=${WGGO:-wireguard-go}
SECONDS_PER_TRANSFER=${SECONDS_PER_TRANSFER:-3}
tag="isd$$"
NS_OLD="$tag-old" NS_NEW="$tag-new"
IF_OLD="${tag}i" IF_NEW="${tag}g"
tmp=$(mktemp -d)
pids=()

cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  ip netns del "$NS_OLD" 2>/dev/null || true
  ip netns del "$NS_NEW" 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_for_socket() {
  for _ in $(seq 50); do [ -S "/var/run/wireguard/$1.sock" ] && return 0; sleep 0.1; done
  echo "sandbox: $1 never opened its UAPI socket" >&2; return 1
}

say() { printf '\n== %s\n' "$*"; }

say "two hosts: $NS_OLD (isthmus) and $NS_NEW (wireguard-go), one underlay link"
ip netns add "$NS_OLD"; ip netns add "$NS_NEW"
ip link add "${tag}a" netns "$NS_OLD" type veth peer name "${tag}b" netns "$NS_NEW"
ip -n "$NS_OLD" addr add 198.18.0.1/30 dev "${tag}a"
ip -n "$NS_NEW" addr add 198.18.0.2/30 dev "${tag}b"
for ns in "$NS_OLD" "$NS_NEW"; do ip -n "$ns" link set lo up; done
ip -n "$NS_OLD" link set "${tag}a" up; ip -n "$NS_NEW" link set "${tag}b" up

ip netns exec "$NS_OLD" "$AGENT" tunnel --iface "$IF_OLD" --listen-port 51820 2>"$tmp/isthmus.log" &
pids+=($!)
ip netns exec "$NS_NEW" env WG_PROCESS_FOREGROUND=1 "$WGGO" -f "$IF_NEW" >"$tmp/wggo.log" 2>&1 &
pids+=($!)
wait_for_socket "$IF_OLD"; wait_for_socket "$IF_NEW"

umask 077
wg genkey >"$tmp/old.key"; wg genkey >"$tmp/new.key"
ip netns exec "$NS_OLD" wg set "$IF_OLD" private-key "$tmp/old.key" \
  peer "$(wg pubkey <"$tmp/new.key")" allowed-ips 10.99.0.2/32,fd99::2/128 endpoint 198.18.0.2:51821
ip netns exec "$NS_NEW" wg set "$IF_NEW" private-key "$tmp/new.key" listen-port 51821 \
  peer "$(wg pubkey <"$tmp/old.key")" allowed-ips 10.99.0.1/32,fd99::1/128 endpoint 198.18.0.1:51820
ip -n "$NS_OLD" addr add 10.99.0.1/24 dev "$IF_OLD"; ip -n "$NS_OLD" addr add fd99::1/64 dev "$IF_OLD" nodad
ip -n "$NS_NEW" addr add 10.99.0.2/24 dev "$IF_NEW"; ip -n "$NS_NEW" addr add fd99::2/64 dev "$IF_NEW" nodad
ip -n "$NS_OLD" link set "$IF_OLD" up; ip -n "$NS_NEW" link set "$IF_NEW" up

say "ping through the tunnel (IPv4 and IPv6, both directions)"
ip netns exec "$NS_OLD" ping -c 3 -i 0.2 -W 2 10.99.0.2
ip netns exec "$NS_NEW" ping -c 3 -i 0.2 -W 2 fd99::1

transfer() { # from-ns to-ns server-addr label
  ip netns exec "$2" iperf3 -s -1 -B "$3" >/dev/null 2>&1 &
  local srv=$!; pids+=("$srv")
  sleep 0.5
  ip netns exec "$1" iperf3 -c "$3" -t "$SECONDS_PER_TRANSFER" -J >"$tmp/$4.json"
  wait "$srv" 2>/dev/null || true
  python3 -c 'import json,sys; e=json.load(open(sys.argv[1]))["end"]; print("%.2f Gbit/s, %d bytes received" % (e["sum_received"]["bits_per_second"]/1e9, e["sum_received"]["bytes"]))' "$tmp/$4.json"
}

say "TCP transfer isthmus -> wireguard-go"
up=$(transfer "$NS_OLD" "$NS_NEW" 10.99.0.2 up); echo "$up"
say "TCP transfer wireguard-go -> isthmus"
down=$(transfer "$NS_NEW" "$NS_OLD" 10.99.0.1 down); echo "$down"

say "wg show on the isthmus side"
ip netns exec "$NS_OLD" wg show "$IF_OLD"

say "report"
echo "ping v4 and v6: ok"
echo "isthmus -> wireguard-go: $up"
echo "wireguard-go -> isthmus: $down"
