#!/usr/bin/env bash
# GenServe launcher.
#   ./run.sh [--config PATH]     create/reuse .venv, install, serve on http://127.0.0.1:12411
#   ./run.sh test [PYTEST ARGS]  install the test extras too, run the test suite
#   ./run.sh lint                ruff (lint + format check) and mypy
# TORCH_SPEC overrides the torch requirement (default torch==2.13.0; e.g. a CUDA build on GPU hosts).
set -euo pipefail
cd "$(dirname "$0")"

VENV="${VENV:-.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
PYTHON="${PYTHON:-python3}"

ensure_env() {
  local extras="$1"
  if [ ! -x "$VENV/bin/python" ]; then
    echo "run.sh: creating virtualenv $VENV" >&2
    "$PYTHON" -m venv "$VENV"
  fi
  # Reinstall only when the requirements change: the stamp records what was installed.
  local stamp="$VENV/.genserve-install-${extras:-base}"
  local want
  want="$(cat pyproject.toml; echo "$TORCH_SPEC")"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "run.sh: installing dependencies ($TORCH_SPEC${extras:+, extras: $extras})" >&2
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    # torch first, pinned: an unpinned resolve would pull several GB of CUDA wheels on a CPU machine.
    "$VENV/bin/python" -m pip install --quiet "$TORCH_SPEC"
    "$VENV/bin/python" -m pip install --quiet -e ".${extras:+[$extras]}" "$TORCH_SPEC"
    printf '%s' "$want" > "$stamp"
  fi
}

case "${1:-serve}" in
  test)
    shift
    ensure_env test
    exec "$VENV/bin/python" -m pytest "$@"
    ;;
  lint)
    ensure_env test
    "$VENV/bin/ruff" check .
    "$VENV/bin/ruff" format --check .
    exec "$VENV/bin/mypy" genserve workers tools
    ;;
  serve)
    if [ $# -gt 0 ]; then shift; fi  # plain ./run.sh has no argument to drop
    ensure_env ""
    exec "$VENV/bin/python" -m genserve "$@"
    ;;
  *)
    ensure_env ""
    exec "$VENV/bin/python" -m genserve "$@"
    ;;
esac
