#!/usr/bin/env bash
# One-step set-up + run. `bash run.sh demo` runs the main job on the embedded default;
# `bash run.sh test` runs the test suite. Both create .venv beside this script, install difftune into it
# first (once; again when pyproject.toml changes). Any other arguments go to `difftune`, run
# from the current folder (relative paths read from there); the venv lives beside this script.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")" && pwd)"
VENV="${DIFFTUNE_VENV:-.venv}"
case "$VENV" in /*) ;; *) VENV="$ROOT/$VENV" ;; esac
PY="${PYTHON:-python3}"
# A CPU machine gets the small CPU build where the package index has it; a GPU user who
# installed a CUDA torch into the venv keeps it (the pin is only used when torch is missing).
TORCH_SPEC="${DIFFTUNE_TORCH_SPEC:-torch==2.13.0}"

if [ ! -f "$VENV/.difftune-installed" ] || [ "$ROOT/pyproject.toml" -nt "$VENV/.difftune-installed" ]; then
  echo "setting up $VENV (first run only)..." >&2
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    "$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
  fi
  "$VENV/bin/python" -m pip install -q -e "$ROOT[dev]"
  touch "$VENV/.difftune-installed"
fi

cmd="${1:-demo}"
shift || true
case "$cmd" in
  test)
    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
    cd "$ROOT"
    exec "$VENV/bin/python" -m pytest -q "$@"
    ;;
  *)
    exec "$VENV/bin/difftune" "$cmd" "$@"
    ;;
esac
