#!/usr/bin/env bash
# Installs cargo-fuzz, idempotently, into .cache/cargo-fuzz/bin (CI starts from a fresh clone
# with an empty .cache/), and checks the nightly toolchain the fuzz targets build with
# (libFuzzer needs -Zsanitizer). Prints the cargo-fuzz binary's path.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VERSION=0.13.2
BIN=$ROOT/.cache/cargo-fuzz/bin/cargo-fuzz

if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  echo "install-cargo-fuzz: installing the nightly toolchain" >&2
  rustup toolchain install nightly --profile minimal >&2
fi

if [ ! -x "$BIN" ] || ! "$BIN" --version 2>/dev/null | grep -q "$VERSION"; then
  echo "install-cargo-fuzz: installing cargo-fuzz $VERSION into .cache/cargo-fuzz" >&2
  cargo install cargo-fuzz --version "$VERSION" --locked --root "$ROOT/.cache/cargo-fuzz" >&2
fi
echo "$BIN"
