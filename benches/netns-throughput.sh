#!/usr/bin/env bash
# Throughput of userspace WireGuard implementations, side by side, in network namespaces.
#
# For every implementation it builds two namespaces joined by a veth pair (the underlay,
# 198.18.0.0/30 from the benchmarking range, living only inside the namespaces), starts
# the daemon in each namespace, configures both sides identically with the real `wg` tool,
# checks a ping through the tunnel, then runs iperf3 TCP (1 stream and -P 4) through it,
# or with --udp LEN unlimited-rate UDP of LEN-byte payloads (the rate the receiver got).
# With --rate GBIT the senders are paced to GBIT Gbit/s in all (split over the streams): at
# a rate every implementation carries, the daemons' CPU per Gbit/s is their own cost, not
# what is left of two cores that iperf3, the kernel and both daemons fight over.
# With --vxlan the traffic runs inside a VXLAN device on each side (flannel's
# encapsulation: VNI 1, port 8472, checksums on) laid over the tunnel, or over the veth
# for `veth`: what pod-to-pod traffic between clouds looks like to the tunnel.
# Runs are interleaved (repetition -> implementation -> streams) so that drift on the
# machine spreads over every implementation. Reports medians as a markdown table on
# stdout and in the generated section of docs/benchmarks.md.
#
#   bash benches/netns-throughput.sh [--reps N] [--seconds S] [--only a,b] [--out FILE|-]
#                                    [--streams 1,4] [--udp LEN] [--vxlan] [--rate GBIT]
#
# Implementations: veth (no tunnel, the ceiling), isthmus, wireguard-go-current,
# wireguard-go-debian, boringtun-cli. One whose binary is missing is skipped. With
# ISTHMUS_BASELINE_AGENT=path, `isthmus-baseline` (another isthmus-agent build, e.g. before
# a change) runs too, interleaved with the rest.
# Peers come from scripts/build-peers.sh (.cache/bin/); isthmus from target/release/.
# Needs root.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PEERS=$REPO/.cache/bin
ISTHMUS_AGENT=${ISTHMUS_AGENT:-$REPO/target/release/isthmus-agent}

REPS=${BENCH_REPS:-3}
DURATION=${BENCH_SECONDS:-5}
ONLY=${BENCH_ONLY:-}
OUT=${BENCH_OUT:-$REPO/docs/benchmarks.md}
STREAMS=${BENCH_STREAMS:-1,4}
UDP_LEN=${BENCH_UDP:-}
VXLAN=${BENCH_VXLAN:-}
RATE=${BENCH_RATE:-}
ISTHMUS_BASELINE_AGENT=${ISTHMUS_BASELINE_AGENT:-}
ALL_IMPLS=(veth isthmus ${ISTHMUS_BASELINE_AGENT:+isthmus-baseline} wireguard-go-current wireguard-go-debian boringtun-cli)
COMMAND_LINE="bash benches/netns-throughput.sh${*:+ $*}"

usage() { sed -n '2,25p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

while (($#)); do
  case $1 in
    --reps) REPS=$2; shift 2 ;;
    --seconds) DURATION=$2; shift 2 ;;
    --only) ONLY=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --streams) STREAMS=$2; shift 2 ;;
    --udp) UDP_LEN=$2; shift 2 ;;
    --vxlan) VXLAN=1; shift ;;
    --rate) RATE=$2; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done
[[ $REPS =~ ^[1-9][0-9]*$ ]] || { echo "--reps must be a positive integer" >&2; exit 2; }
[[ $DURATION =~ ^[1-9][0-9]*$ ]] || { echo "--seconds must be a positive integer" >&2; exit 2; }
[ -z "$UDP_LEN" ] || [[ $UDP_LEN =~ ^[1-9][0-9]*$ && $UDP_LEN -le 1372 ]] ||
  { echo "--udp takes a payload length of 1..1372 bytes (1400-byte IP packets fit the tunnel MTU)" >&2; exit 2; }
if [ -n "$RATE" ] && ! { [[ $RATE =~ ^[0-9]+(\.[0-9]+)?$ ]] && awk -v r="$RATE" 'BEGIN { exit !(r > 0) }'; }; then
  echo "--rate takes a rate in Gbit/s above 0, e.g. 2 or 0.5" >&2
  exit 2
fi
UDP_ARGS=()
[ -z "$UDP_LEN" ] || UDP_ARGS=(-u -b 0 -l "$UDP_LEN")
[ "$(id -u)" = 0 ] || { echo "needs root (network namespaces, TUN)" >&2; exit 1; }
for cmd in ip wg iperf3 ping ss python3 timeout; do
  command -v "$cmd" >/dev/null || { echo "missing $cmd: run scripts/install-deps.sh" >&2; exit 1; }
done
IFS=, read -r -a STREAM_COUNTS <<<"$STREAMS"

# Addresses. Underlay on the veth pair, tunnel addresses on the WireGuard interfaces.
# Side A is the iperf3 server (receiver), side B the client (sender).
UNDER_A=198.18.0.1 UNDER_B=198.18.0.2 UNDER_LEN=30
INNER_A=10.200.0.1 INNER_B=10.200.0.2 INNER_LEN=24
WG_PORT=51820 MTU=1420
# --vxlan: the overlay's addresses, and its MTU (the tunnel's less VXLAN's 50 bytes, on the
# veth too so that both carry the same inner packets).
VX_A=10.201.0.1 VX_B=10.201.0.2 VX_MTU=1370 VX_DEV=isbvx0
CLK_TCK=$(getconf CLK_TCK)

log() { echo "[netns-throughput] $*" >&2; }

# ------------------------------------------------------------------------------------
# State and cleanup. Everything created is recorded so the trap can remove it.
# ------------------------------------------------------------------------------------
WORK=$(mktemp -d /tmp/isb-bench.XXXXXX)
PREFIX=isb$$ # interface names: isb<pid><n><role>, at most 3+7+3+1 = 14 chars
TRIAL=0
declare -a LIVE_PIDS=() LIVE_NS=() LIVE_SOCKS=()

stop_pid() { # pid: SIGTERM, wait up to 5 s, then SIGKILL. Sets STOP_STATUS.
  local pid=$1 i
  STOP_STATUS=
  kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null && STOP_STATUS=0 || STOP_STATUS=$?; return 0; }
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 50; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    log "pid $pid ignored SIGTERM for 5 s, sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null && STOP_STATUS=0 || STOP_STATUS=$?
}

forget() { # array-name value: drop value from the array
  local -n arr=$1
  local v out=()
  for v in "${arr[@]}"; do [ "$v" = "$2" ] || out+=("$v"); done
  arr=("${out[@]}")
}

cleanup() {
  local pid ns sock
  for pid in "${LIVE_PIDS[@]}"; do stop_pid "$pid"; done
  for ns in "${LIVE_NS[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
  for sock in "${LIVE_SOCKS[@]}"; do rm -f "$sock"; done
  LIVE_PIDS=() LIVE_NS=() LIVE_SOCKS=()
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

# ------------------------------------------------------------------------------------
# Implementations
# ------------------------------------------------------------------------------------
impl_binary() {
  case $1 in
    veth) echo /bin/true ;;
    isthmus) echo "$ISTHMUS_AGENT" ;;
    isthmus-baseline) echo "${ISTHMUS_BASELINE_AGENT:-/nonexistent}" ;;
    wireguard-go-current) echo "$PEERS/wireguard-go-current" ;;
    wireguard-go-debian) echo /usr/bin/wireguard-go ;;
    boringtun-cli) echo "$PEERS/boringtun-cli" ;;
    *) return 1 ;;
  esac
}

impl_version() {
  local bin
  bin=$(impl_binary "$1")
  case $1 in
    veth) echo "kernel $(uname -r)" ;;
    isthmus) echo "isthmus-agent binary built $ISTHMUS_BUILT" \
      "(repo HEAD $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo none) at run time)" ;;
    isthmus-baseline) echo "isthmus-agent binary $ISTHMUS_BASELINE_DESC, built $ISTHMUS_BASELINE_BUILT" ;;
    wireguard-go-current)
      # The binary's --version is wireguard-go's own version string; the module pin is exact.
      echo "$("$bin" --version 2>&1 | head -n1), module $(go version -m "$bin" 2>/dev/null |
        awk '$1 == "mod" { print $3 }'), $(go version "$bin" 2>/dev/null | awk '{ print $2 }')"
      ;;
    *) "$bin" --version 2>&1 | head -n1 ;;
  esac
}

# Why an implementation can't run, or nothing if it can.
impl_unavailable() {
  local bin
  bin=$(impl_binary "$1") || { echo "unknown implementation"; return; }
  if [ ! -x "$bin" ]; then
    case $1 in
      isthmus) echo "$bin not built (cargo build --release -p isthmus-agent)" ;;
      wireguard-go-debian) echo "$bin missing (scripts/install-deps.sh)" ;;
      *) echo "$bin missing (scripts/build-peers.sh)" ;;
    esac
    return
  fi
  if [ "$1" = isthmus ] && ! "$bin" tunnel --help >/dev/null 2>&1; then
    echo "$bin has no working 'tunnel' subcommand"
  fi
}

# The daemon command line: each creates the TUN named $2 and serves the UAPI socket
# /var/run/wireguard/$2.sock in the foreground.
impl_command() { # impl iface port -> DAEMON_CMD
  local bin
  bin=$(impl_binary "$1")
  case $1 in
    # With --vxlan, isthmus is told the VXLAN devices' port, as the agent learns flannel's.
    # (A baseline build from before --vxlan-port existed needs a wrapper that drops it.)
    isthmus | isthmus-baseline)
      DAEMON_CMD=("$bin" tunnel --iface "$2" --listen-port "$3" ${VXLAN:+--vxlan-port 8472}) ;;
    wireguard-go-*) DAEMON_CMD=(env WG_PROCESS_FOREGROUND=1 "$bin" -f "$2") ;;
    # boringtun-cli drops privileges to the sudo user by default and exits when there is
    # none ("NULL from getlogin"); WG_SUDO / --disable-drop-privileges keep root.
    boringtun-cli) DAEMON_CMD=(env WG_SUDO=1 "$bin" -f --disable-drop-privileges "$2") ;;
  esac
}

# ------------------------------------------------------------------------------------
# One trial: two namespaces, a veth pair, a daemon on each side.
# ------------------------------------------------------------------------------------
netns_setup() { # sets NS_A NS_B VETH_A VETH_B IF_A IF_B
  TRIAL=$((TRIAL + 1))
  NS_A=isb-$$-$TRIAL-a NS_B=isb-$$-$TRIAL-b
  VETH_A=${PREFIX}v${TRIAL}a VETH_B=${PREFIX}v${TRIAL}b
  IF_A=${PREFIX}w${TRIAL}a IF_B=${PREFIX}w${TRIAL}b
  ip netns add "$NS_A" || return 1
  LIVE_NS+=("$NS_A")
  ip netns add "$NS_B" || return 1
  LIVE_NS+=("$NS_B")
  # Created inside NS_A with its peer directly in NS_B: the pair never exists in the
  # host namespace, and deleting the namespaces removes it.
  ip -n "$NS_A" link add "$VETH_A" type veth peer name "$VETH_B" netns "$NS_B" || return 1
  ip -n "$NS_A" addr add "$UNDER_A/$UNDER_LEN" dev "$VETH_A" || return 1
  ip -n "$NS_B" addr add "$UNDER_B/$UNDER_LEN" dev "$VETH_B" || return 1
  ip -n "$NS_A" link set lo up && ip -n "$NS_B" link set lo up || return 1
  ip -n "$NS_A" link set "$VETH_A" up && ip -n "$NS_B" link set "$VETH_B" up || return 1
}

start_impl() { # impl ns iface -> prints pid; daemon log in $WORK/<iface>.log
  local impl=$1 ns=$2 iface=$3 sock=/var/run/wireguard/$3.sock pid i
  impl_command "$impl" "$iface" "$WG_PORT"
  LIVE_SOCKS+=("$sock")
  ip netns exec "$ns" "${DAEMON_CMD[@]}" >"$WORK/$iface.log" 2>&1 &
  pid=$! # `ip netns exec` and `env` exec, so this is the daemon itself
  LIVE_PIDS+=("$pid")
  for ((i = 0; i < 50; i++)); do
    [ -S "$sock" ] && { START_PID=$pid; return 0; }
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  log "$impl: no UAPI socket $sock after 5 s"
  return 1
}

configure() { # ns iface own-key peer-pub peer-endpoint own-inner peer-inner
  local ns=$1 iface=$2 key=$3 peer=$4 endpoint=$5 inner=$6 peer_inner=$7
  ip netns exec "$ns" wg set "$iface" private-key "$key" listen-port "$WG_PORT" \
    peer "$peer" allowed-ips "$peer_inner/32" endpoint "$endpoint:$WG_PORT" || return 1
  ip -n "$ns" addr add "$inner/$INNER_LEN" dev "$iface" || return 1
  ip -n "$ns" link set "$iface" mtu "$MTU" up || return 1
}

check_ping() { # target: up to ~10 s, the first packets wait for the handshake
  local i
  for ((i = 0; i < 10; i++)); do
    ip netns exec "$NS_B" ping -c 1 -W 1 -q "$1" >/dev/null 2>&1 && return 0
  done
  log "no ping from $NS_B to $1"
  return 1
}

vxlan_setup() { # ns local remote address: a VXLAN device as flannel makes it (the netns goes with it)
  ip -n "$1" link add "$VX_DEV" type vxlan id 1 local "$2" remote "$3" dstport 8472 nolearning &&
    ip -n "$1" link set "$VX_DEV" mtu "$VX_MTU" up &&
    ip -n "$1" addr add "$4/24" dev "$VX_DEV"
}

cpu_ticks() { # pid -> utime+stime in clock ticks (all threads), or nothing
  local stat rest f
  [ -n "$1" ] && stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
  rest=${stat##*) } # after "pid (comm) ": field 3 (state) first, utime and stime are 14, 15
  read -r -a f <<<"$rest"
  echo $((f[11] + f[12]))
}

host_ticks() { # -> "busy total" jiffies over all CPUs, from the first line of /proc/stat
  awk '$1 == "cpu" { t = 0; for (i = 2; i <= NF; i++) t += $i; print t - $5 - $6, t; exit }' /proc/stat
}

host_busy() { # "busy total" before, "busy total" after -> % of the whole machine busy
  awk -v a="$1" -v b="$2" 'BEGIN { split(a, x, " "); split(b, y, " ");
    if (y[2] > x[2]) printf "%.0f", (y[1] - x[1]) / (y[2] - x[2]) * 100; else print "-" }'
}

cpu_percent() { # ticks-before ticks-after seconds -> % of one core, or "-"
  if [ -z "$1" ] || [ -z "$2" ]; then echo -; return; fi
  awk -v a="$1" -v b="$2" -v t="$3" -v hz="$CLK_TCK" 'BEGIN { printf "%.1f", (b - a) / hz / t * 100 }'
}

run_iperf() { # impl rep streams target -> appends a line to $WORK/results.tsv
  local impl=$1 rep=$2 streams=$3 target=$4 spid json=$WORK/iperf-$TRIAL-$3.json i
  local a0 b0 a1 b1 h0 h1 t0 t1 wall gbps host status=ok
  ip netns exec "$NS_A" iperf3 -s -1 >"$WORK/iperf-server-$TRIAL.log" 2>&1 &
  spid=$!
  LIVE_PIDS+=("$spid")
  for ((i = 0; i < 50; i++)); do
    [ -n "$(ip netns exec "$NS_A" ss -Hltn 'sport = :5201' 2>/dev/null)" ] && break
    sleep 0.1
  done
  local load=(${UDP_ARGS[@]+"${UDP_ARGS[@]}"})
  # iperf3's -b is per stream; a later -b replaces --udp's unlimited one.
  [ -z "$RATE" ] || load+=(-b "$(awk -v r="$RATE" -v n="$streams" 'BEGIN { printf "%.0f", r * 1e9 / n }')")
  a0=$(cpu_ticks "$PID_A") b0=$(cpu_ticks "$PID_B") h0=$(host_ticks) t0=$EPOCHREALTIME
  timeout $((DURATION + 30)) ip netns exec "$NS_B" \
    iperf3 -c "$target" -t "$DURATION" -P "$streams" ${load[@]+"${load[@]}"} -J \
    --connect-timeout 5000 >"$json" 2>"$json.err" || status=fail
  # Warnings (e.g. a UDP payload longer than the control connection's MSS) go to stderr,
  # kept out of the JSON.
  [ -s "$json.err" ] && log "$impl rep $rep P$streams: iperf3 said: $(head -c 300 "$json.err")"
  t1=$EPOCHREALTIME a1=$(cpu_ticks "$PID_A") b1=$(cpu_ticks "$PID_B") h1=$(host_ticks)
  stop_pid "$spid"
  forget LIVE_PIDS "$spid"
  wall=$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')
  host=$(host_busy "$h0" "$h1")
  gbps=$(python3 -c '
import json, sys
d = json.load(open(sys.argv[1]))
if "error" in d: sys.exit(d["error"])
# What the receiver got, TCP or UDP (iperf3 3.12, Debian 12, reports both the same way).
print("%.3f" % (d["end"]["sum_received"]["bits_per_second"] / 1e9))' "$json" 2>&1) || status=fail
  if [ $status = fail ]; then
    log "$impl rep $rep P$streams: iperf3 failed: $(head -c 300 <<<"$gbps")"
    gbps=-
  fi
  # receiver = side A (server), sender = side B (client)
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$rep" "$impl" "$streams" "$status" "$gbps" \
    "$(cpu_percent "$b0" "$b1" "$wall")" "$(cpu_percent "$a0" "$a1" "$wall")" "$host" >>"$WORK/results.tsv"
  log "$impl rep $rep P$streams: $gbps Gbit/s, daemon CPU sender $(cpu_percent "$b0" "$b1" "$wall")%," \
    "receiver $(cpu_percent "$a0" "$a1" "$wall")% of a core; host $host% busy"
}

teardown() { # stop the daemons by pid, then delete the namespaces
  local pid ns
  for pid in ${PID_A:+"$PID_A"} ${PID_B:+"$PID_B"}; do
    stop_pid "$pid"
    [ "$STOP_STATUS" = 0 ] || log "$CUR_IMPL: daemon $pid exited with status $STOP_STATUS on SIGTERM"
    forget LIVE_PIDS "$pid"
  done
  for ns in "$NS_A" "$NS_B"; do
    ip netns del "$ns" 2>/dev/null || true
    forget LIVE_NS "$ns"
  done
  rm -f "/var/run/wireguard/$IF_A.sock" "/var/run/wireguard/$IF_B.sock"
  forget LIVE_SOCKS "/var/run/wireguard/$IF_A.sock"
  forget LIVE_SOCKS "/var/run/wireguard/$IF_B.sock"
  PID_A='' PID_B=''
}

trial() { # impl rep: one setup, every stream count, one teardown
  local impl=$1 rep=$2 target source streams
  CUR_IMPL=$impl PID_A='' PID_B=''
  netns_setup || return 1
  if [ "$impl" = veth ]; then
    target=$UNDER_A source=$UNDER_B
  else
    target=$INNER_A source=$INNER_B
    start_impl "$impl" "$NS_A" "$IF_A" || return 1
    PID_A=$START_PID
    start_impl "$impl" "$NS_B" "$IF_B" || return 1
    PID_B=$START_PID
    configure "$NS_A" "$IF_A" "$WORK/a.key" "$(cat "$WORK/b.pub")" "$UNDER_B" "$INNER_A" "$INNER_B" || return 1
    configure "$NS_B" "$IF_B" "$WORK/b.key" "$(cat "$WORK/a.pub")" "$UNDER_A" "$INNER_B" "$INNER_A" || return 1
  fi
  check_ping "$target" || return 1
  if [ -n "$VXLAN" ]; then
    vxlan_setup "$NS_A" "$target" "$source" "$VX_A" || return 1
    vxlan_setup "$NS_B" "$source" "$target" "$VX_B" || return 1
    target=$VX_A
    check_ping "$target" || return 1
  fi
  for streams in "${STREAM_COUNTS[@]}"; do
    run_iperf "$impl" "$rep" "$streams" "$target"
  done
}

# ------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------
if [ -n "$ONLY" ]; then IFS=, read -r -a WANTED <<<"$ONLY"; else WANTED=("${ALL_IMPLS[@]}"); fi
IMPLS=() SKIPPED=()
for impl in "${WANTED[@]}"; do
  why=$(impl_unavailable "$impl")
  if [ -n "$why" ]; then
    log "skipping $impl: $why"
    SKIPPED+=("$impl: $why")
  else
    IMPLS+=("$impl")
  fi
done
((${#IMPLS[@]})) || { log "nothing to run"; exit 1; }

# Run a snapshot of the agent, so that a rebuild during the run can't mix two builds.
if [[ " ${IMPLS[*]} " == *" isthmus "* ]]; then
  ISTHMUS_BUILT=$(date -u -r "$ISTHMUS_AGENT" +%Y-%m-%dT%H:%MZ)
  cp "$ISTHMUS_AGENT" "$WORK/isthmus-agent"
  ISTHMUS_AGENT=$WORK/isthmus-agent
fi
if [[ " ${IMPLS[*]} " == *" isthmus-baseline "* ]]; then
  ISTHMUS_BASELINE_BUILT=$(date -u -r "$ISTHMUS_BASELINE_AGENT" +%Y-%m-%dT%H:%MZ)
  ISTHMUS_BASELINE_DESC=${ISTHMUS_BASELINE_DESC:-$ISTHMUS_BASELINE_AGENT}
  cp "$ISTHMUS_BASELINE_AGENT" "$WORK/isthmus-agent-baseline"
  ISTHMUS_BASELINE_AGENT=$WORK/isthmus-agent-baseline
fi

umask 077
wg genkey >"$WORK/a.key" && wg pubkey <"$WORK/a.key" >"$WORK/a.pub"
wg genkey >"$WORK/b.key" && wg pubkey <"$WORK/b.key" >"$WORK/b.pub"
umask 022
: >"$WORK/results.tsv"
: >"$WORK/versions.tsv"
for impl in "${IMPLS[@]}"; do
  printf '%s\t%s\n' "$impl" "$(impl_version "$impl")" >>"$WORK/versions.tsv"
done

log "implementations: ${IMPLS[*]}; ${REPS} repetitions of ${DURATION} s per stream count (${STREAM_COUNTS[*]})"
for ((rep = 1; rep <= REPS; rep++)); do
  for impl in "${IMPLS[@]}"; do
    log "rep $rep/$REPS: $impl"
    if ! trial "$impl" "$rep"; then
      log "$impl rep $rep: setup failed"
      for streams in "${STREAM_COUNTS[@]}"; do
        printf '%s\t%s\t%s\tfail\t-\t-\t-\t-\n' "$rep" "$impl" "$streams" >>"$WORK/results.tsv"
      done
      for f in "$WORK/$IF_A.log" "$WORK/$IF_B.log"; do
        [ -s "$f" ] && { log "$(basename "$f"):"; tail -n 10 "$f" | sed 's/^/    /' >&2; }
      done
    fi
    teardown
  done
done

# ------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------
cpu_model=$(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
os_name=$(sed -n 's/^PRETTY_NAME="\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' /etc/os-release 2>/dev/null)
REPORT_MACHINE="$(nproc) CPUs (${cpu_model:-unknown}), kernel $(uname -r), ${os_name:-unknown OS}"
REPORT_DATE=$(date -u +'%Y-%m-%d %H:%M UTC')
REPORT_SKIPPED=$(printf '%s\n' "${SKIPPED[@]+"${SKIPPED[@]}"}")
REPORT_COMMAND=$COMMAND_LINE REPORT_REPS=$REPS REPORT_SECONDS=$DURATION REPORT_MTU=$MTU
if [ -n "$UDP_LEN" ]; then REPORT_LOAD="UDP, $UDP_LEN-byte payloads,"; else REPORT_LOAD=TCP; fi
if [ -n "$RATE" ]; then
  REPORT_LOAD="$REPORT_LOAD paced at $RATE Gbit/s in all,"
elif [ -n "$UDP_LEN" ]; then
  REPORT_LOAD="UDP, unlimited rate, $UDP_LEN-byte payloads,"
fi
[ -z "$VXLAN" ] || REPORT_LOAD="$REPORT_LOAD inside VXLAN (MTU $VX_MTU),"
# Each kind of load has its own generated section: plain TCP's is `netns-throughput`.
REPORT_MODE=$(IFS=-; m=(${UDP_LEN:+udp} ${VXLAN:+vxlan} ${RATE:+paced}); echo "${m[*]}")
REPORT_IMPLS="${IMPLS[*]}"
export REPORT_MODE REPORT_MACHINE REPORT_DATE REPORT_SKIPPED REPORT_COMMAND REPORT_REPS REPORT_SECONDS REPORT_MTU REPORT_IMPLS REPORT_LOAD
python3 - "$WORK/results.tsv" "$WORK/versions.tsv" "$OUT" <<'PY'
import os, statistics, sys

results, versions, out = sys.argv[1:4]
env = os.environ
impls = env["REPORT_IMPLS"].split()
rows = [l.rstrip("\n").split("\t") for l in open(results) if l.strip()]
vers = dict(l.rstrip("\n").split("\t", 1) for l in open(versions) if l.strip())
streams = sorted({int(r[2]) for r in rows})

def fnum(v):
    return None if v == "-" else float(v)

def med(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None

stats = {}
for impl in impls:
    for s in streams:
        mine = [r for r in rows if r[1] == impl and int(r[2]) == s]
        ok = [r for r in mine if r[3] == "ok"]
        g = [float(r[4]) for r in ok]
        stats[impl, s] = dict(
            n=len(ok), total=len(mine),
            gbps=med(g), lo=min(g) if g else None, hi=max(g) if g else None,
            tx=med(fnum(r[5]) for r in ok), rx=med(fnum(r[6]) for r in ok),
            host=med(fnum(r[7]) for r in ok))

def f(v, fmt="%.2f"):
    return "–" if v is None else fmt % v

mode = env.get("REPORT_MODE", "")
parts = mode.split("-") if mode else []
title = "" if not parts else (", " + ("UDP" if "udp" in parts else "TCP")
                              + (" inside VXLAN" if "vxlan" in parts else "")
                              + (", paced" if "paced" in parts else ""))
lines = [
    f"## netns throughput{title} (generated)",
    "",
    f"- Machine: {env['REPORT_MACHINE']}",
    f"- Command: `{env['REPORT_COMMAND']}`",
    f"- Date: {env['REPORT_DATE']}",
    f"- Repetitions: {env['REPORT_REPS']} (interleaved), {env['REPORT_SECONDS']} s of iperf3 {env['REPORT_LOAD']} per run,"
    f" streams: {', '.join(map(str, streams))}; tunnel MTU {env['REPORT_MTU']}",
    "",
    "| Implementation | Streams | Gbit/s (median) | min–max | vs isthmus | CPU sender (% of a core) | CPU receiver (% of a core) | CPU per Gbit/s, sender / receiver | host busy | runs ok |",
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
]
for impl in impls:
    for s in streams:
        st = stats[impl, s]
        base = stats.get(("isthmus", s), {}).get("gbps")
        ratio = f"{st['gbps'] / base:.2f}×" if st["gbps"] is not None and base else "n/a"
        cpu = ("–", "–") if impl == "veth" else (f(st["tx"], "%.0f"), f(st["rx"], "%.0f"))
        per = lambda c: None if c is None or not st["gbps"] else c / st["gbps"]
        per_gbit = "–" if impl == "veth" else f"{f(per(st['tx']), '%.1f')} / {f(per(st['rx']), '%.1f')}"
        rng = f"{f(st['lo'])}–{f(st['hi'])}" if st["lo"] is not None else "–"
        lines.append(f"| {impl} | {s} | {f(st['gbps'])} | {rng} | {ratio} | {cpu[0]} | {cpu[1]} | {per_gbit} | {f(st['host'], '%.0f%%')} | {st['n']}/{st['total']} |")
lines += [
    "",
    "\"vs isthmus\" is the implementation's median divided by isthmus's median for the same stream count"
    " (above 1 = faster than isthmus). CPU is utime+stime of the daemon process (all threads) on the"
    " sending (iperf3 client) and receiving (iperf3 server) side over the run; kernel work done in softirq context is mostly"
    " charged elsewhere; CPU per Gbit/s is the median CPU over the median rate (% of a core per Gbit/s). veth has no daemon. \"host busy\" is the whole machine's CPU use"
    f" over the run ({os.cpu_count()} CPUs = 100%), including iperf3, the kernel and anything else running.",
    "",
    "Versions:",
    "",
]
lines += [f"- {impl}: {vers.get(impl, '?')}" for impl in impls]
skipped = [s for s in env.get("REPORT_SKIPPED", "").splitlines() if s]
if "isthmus" not in impls:
    lines += ["", "isthmus was not measured in this run, so there are no ratios."]
if skipped:
    lines += ["", "Skipped:", ""] + [f"- {s}" for s in skipped]
section = "\n".join(lines) + "\n"
print(section)

if out == "-":
    sys.exit(0)
def markers(mode):
    name = "netns-throughput" + (f"-{mode}" if mode else "")
    return (f"<!-- BEGIN {name}: generated by benches/netns-throughput.sh, do not edit -->",
            f"<!-- END {name} -->")
BEGIN, END = markers(mode)
block = f"{BEGIN}\n{section}{END}"
try:
    text = open(out).read()
except FileNotFoundError:
    text = ""
_, PLAIN_END = markers("")
if BEGIN in text and END in text:
    head, rest = text.split(BEGIN, 1)
    text = head + block + rest.split(END, 1)[1]
elif PLAIN_END in text:
    # A new kind of load goes right after plain TCP's table.
    head, rest = text.split(PLAIN_END, 1)
    text = head + PLAIN_END + "\n\n" + block + rest
else:
    text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + block + "\n"
open(out, "w").write(text)
print(f"[netns-throughput] wrote {out}", file=sys.stderr)
PY
