# Shared by the image scripts (source it): the workspace root, the release build's target
# directory from --target-dir / CARGO_TARGET_DIR, and the workspace version.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# parse_target_dir NAME HELP-LINES "$@": sets TARGET_DIR (absolute); -h prints the calling
# script's header lines HELP-LINES (e.g. 2,13) and exits.
parse_target_dir() {
  local name=$1 help=$2 script=$0
  shift 2
  TARGET_DIR=${CARGO_TARGET_DIR:-target}
  while (($#)); do
    case $1 in
      --target-dir) TARGET_DIR=${2:?--target-dir needs a directory}; shift 2 ;;
      --target-dir=*) TARGET_DIR=${1#--target-dir=}; shift ;;
      -h | --help) sed -n "${help}p" "$script" | sed 's/^# \{0,1\}//'; exit 0 ;;
      *) echo "$name: unknown argument $1 (usage: $script [--target-dir DIR])" >&2; exit 2 ;;
    esac
  done
  case $TARGET_DIR in /*) ;; *) TARGET_DIR=$ROOT/$TARGET_DIR ;; esac
}

# The workspace version from Cargo.toml.
workspace_version() {
  python3 - "$ROOT/Cargo.toml" <<'PY'
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    print(tomllib.load(f)["workspace"]["package"]["version"])
PY
}
