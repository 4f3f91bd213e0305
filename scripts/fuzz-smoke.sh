#!/usr/bin/env bash
# `make test`'s fuzz smoke (docs/fuzzing.md): builds every cargo-fuzz target in fuzz/ with
# nightly and runs each for a few seconds over its committed corpus, failing on any crash.
# New inputs found on the way go to a scratch directory, never into fuzz/corpus/.
#
#   FUZZ_SECONDS=N  seconds per target (default 5); `make fuzz` sets it high for long runs
#   FUZZ_RUNS=N     a number of executions per target instead of a time
#   FUZZ_TARGETS    the targets to run (default: all, one after the other)
#   FUZZ_KEEP=1     keep what a run found in fuzz/corpus/ (long runs: then `cargo fuzz cmin`)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CARGO_FUZZ=$(bash "$ROOT/scripts/install-cargo-fuzz.sh")
export PATH="$(dirname "$CARGO_FUZZ"):$PATH"
cd "$ROOT/fuzz"

# No sanitizer: the code is safe Rust, and the build keeps debug assertions and overflow
# checks (cargo-fuzz's default), which is what catches offset arithmetic going wrong.
FLAGS=(--sanitizer none)
cargo +nightly fuzz build "${FLAGS[@]}"

limit=(-max_total_time="${FUZZ_SECONDS:-5}")
[ -n "${FUZZ_RUNS:-}" ] && limit=(-runs="$FUZZ_RUNS")
targets=${FUZZ_TARGETS:-$(cargo +nightly fuzz list)}
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for t in $targets; do
  mkdir -p "corpus/$t"
  if [ "${FUZZ_KEEP:-0}" = 1 ]; then
    dirs=("corpus/$t")
  else
    mkdir -p "$scratch/$t"
    dirs=("$scratch/$t" "corpus/$t")
  fi
  dict=()
  [ -f "dict/$t.dict" ] && dict=(-dict="dict/$t.dict")
  echo "fuzz-smoke: $t"
  # One process, one thread (libFuzzer's default; -jobs would fork workers logging to files).
  # libFuzzer exits non-zero on a crash, a leak, a timeout or running out of memory; the
  # input that did it lands in fuzz/artifacts/<target>/.
  status=0
  cargo +nightly fuzz run "${FLAGS[@]}" "$t" "${dirs[@]}" -- \
    "${limit[@]}" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    "${dict[@]}" >"$scratch/$t.log" 2>&1 || status=$?
  grep -E '^(stat::number_of_executed_units|stat::average_exec_per_sec)|^#[0-9]+.*DONE' \
    "$scratch/$t.log" || true
  if [ "$status" != 0 ]; then
    tail -n 40 "$scratch/$t.log" >&2
    echo "fuzz-smoke: $t FAILED (the input is in fuzz/artifacts/$t/)" >&2
    exit 1
  fi
done
echo "fuzz-smoke: every target ran clean"
