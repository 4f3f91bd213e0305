#!/usr/bin/env bash
# Builds the benchmark's comparison peers into .cache/, each only when it is missing:
#   .cache/bin/wireguard-go-current  current wireguard-go, from the Go module proxy
#   .cache/bin/boringtun-cli         boringtun-cli, from crates.io
# The Debian wireguard-go (/usr/bin/wireguard-go) comes from scripts/install-deps.sh.
# Idempotent: a second run only checks that the binaries are there and run.
#
# Usage: build-peers.sh [wireguard-go] [boringtun-cli]   (no argument: both)
set -euo pipefail

want_wg=0 want_bt=0
[ $# -eq 0 ] && set -- wireguard-go boringtun-cli
for peer in "$@"; do
  case $peer in
    wireguard-go) want_wg=1 ;;
    boringtun-cli) want_bt=1 ;;
    *) echo "build-peers: unknown peer '$peer' (wireguard-go, boringtun-cli)" >&2; exit 2 ;;
  esac
done

# Exact pins: bump them on purpose, not by accident.
WIREGUARD_GO_MODULE=golang.zx2c4.com/wireguard
WIREGUARD_GO_VERSION=v0.0.0-20260522210424-ecfc5a8d5446
BORINGTUN_CLI_VERSION=0.7.1

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=$REPO/.cache
BIN=$CACHE/bin

say() { echo "build-peers: $*"; }

say "installing system packages (scripts/install-deps.sh)"
bash "$REPO/scripts/install-deps.sh"

mkdir -p "$BIN"

# --- wireguard-go (current) ------------------------------------------------------------
# The version is part of the directory name so that changing the pin rebuilds.
wg_dir=$CACHE/wireguard-go-current/$WIREGUARD_GO_VERSION
if [ $want_wg = 0 ]; then
  :
elif [ -x "$wg_dir/bin/wireguard" ]; then
  say "wireguard-go $WIREGUARD_GO_VERSION already built: $wg_dir/bin/wireguard"
else
  command -v go >/dev/null || { say "error: go toolchain not found"; exit 1; }
  say "building wireguard-go $WIREGUARD_GO_VERSION (go install)"
  start=$SECONDS
  GOBIN=$wg_dir/bin go install "$WIREGUARD_GO_MODULE@$WIREGUARD_GO_VERSION"
  say "wireguard-go built in $((SECONDS - start)) s"
fi
[ $want_wg = 1 ] && ln -sfn "$wg_dir/bin/wireguard" "$BIN/wireguard-go-current"

# --- boringtun-cli ---------------------------------------------------------------------
bt_root=$CACHE/boringtun-cli/$BORINGTUN_CLI_VERSION
if [ $want_bt = 0 ]; then
  :
elif [ -x "$bt_root/bin/boringtun-cli" ]; then
  say "boringtun-cli $BORINGTUN_CLI_VERSION already built: $bt_root/bin/boringtun-cli"
else
  command -v cargo >/dev/null || { say "error: cargo not found"; exit 1; }
  say "building boringtun-cli $BORINGTUN_CLI_VERSION (cargo install --locked)"
  start=$SECONDS
  # A private target dir keeps this build out of the workspace's target/.
  CARGO_TARGET_DIR=$CACHE/boringtun-cli/target \
    cargo install boringtun-cli --locked --version "$BORINGTUN_CLI_VERSION" --root "$bt_root"
  rm -rf "$CACHE/boringtun-cli/target"
  say "boringtun-cli built in $((SECONDS - start)) s"
fi
[ $want_bt = 1 ] && ln -sfn "$bt_root/bin/boringtun-cli" "$BIN/boringtun-cli"

# --- check they run ----------------------------------------------------------------------
# wireguard-go --version exits 0; boringtun-cli --version exits 0 (clap).
[ $want_wg = 1 ] && say "wireguard-go-current: $("$BIN/wireguard-go-current" --version 2>&1 | head -n1)"
[ $want_bt = 1 ] && say "boringtun-cli:        $("$BIN/boringtun-cli" --version 2>&1 | head -n1)"
say "wireguard-go-debian:  $(/usr/bin/wireguard-go --version 2>&1 | head -n1)"
say "done; peers in $BIN"
