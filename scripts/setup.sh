# Sourced by scripts/dev and scripts/test: installs what is missing on a
# Debian or Ubuntu machine (with sudo when not root) and times each step.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# step NAME CMD...: runs CMD and prints how long it took.
step() {
  local name=$1 started=$SECONDS
  shift
  "$@"
  echo "setup: $name took $((SECONDS - started)) s"
}

# apt_install [PACKAGE:PROBE]...: installs each package whose probe (a
# command, or a path) is missing.
apt_install() {
  local missing=() pair package probe
  for pair in "$@"; do
    package=${pair%%:*} probe=${pair#*:}
    if [ "${probe#/}" != "$probe" ]; then
      # shellcheck disable=SC2086 # the probe may be a glob
      ls $probe >/dev/null 2>&1 || missing+=("$package")
    else
      command -v "$probe" >/dev/null || missing+=("$package")
    fi
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "setup: installing ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

require_toolchains() {
  command -v cargo >/dev/null || { echo "setup: the Rust toolchain is required (https://rustup.rs)"; exit 1; }
}
