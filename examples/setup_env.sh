#!/usr/bin/env bash
# Create (or reuse) a Python 3.12 virtual environment, install requirements.txt (the tested versions)
# into it, then this repository as an editable package (`pip install -e .`: megatron_s2 importable
# from the tools, examples and tests).
#
#   bash examples/setup_env.sh [VENV_DIR]        (default: .venv in the repository)
#
# Finds Python 3.12 as `python3.12`, then pyenv's installs, then `PYENV_VERSION=3.12.x python3`
# (a pyenv shim named python3.12 may exist and still fail). Set PYTHON=/path/to/python3.12 to choose.
# On machines without a GPU, set TORCH_CPU=1 to take PyTorch's much smaller CPU-only wheel.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${1:-$ROOT/.venv}

is_python312() { "$@" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' >/dev/null 2>&1; }

find_python312() {
    if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return; fi
    if is_python312 python3.12; then command -v python3.12; return; fi
    for candidate in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 /root/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12 /usr/local/bin/python3.12; do
        if [ -x "$candidate" ] && is_python312 "$candidate"; then echo "$candidate"; return; fi
    done
    if command -v pyenv >/dev/null 2>&1; then
        version=$(pyenv versions --bare 2>/dev/null | grep '^3\.12' | tail -1 || true)
        if [ -n "$version" ] && PYENV_VERSION=$version is_python312 python3; then
            PYENV_VERSION=$version python3 -c 'import sys; print(sys.executable)'; return
        fi
    fi
    if is_python312 python3; then command -v python3; return; fi
    echo "error: Python 3.12 not found. Install it (e.g. 'pyenv install 3.12' or your package manager's python3.12) or set PYTHON=/path/to/python3.12" >&2
    exit 1
}

if [ ! -x "$VENV/bin/python" ] || ! is_python312 "$VENV/bin/python"; then
    PY=$(find_python312)
    echo "creating $VENV with $PY"
    "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
if [ "${TORCH_CPU:-0}" = "1" ] && ! "$VENV/bin/python" -c 'import torch' >/dev/null 2>&1; then
    "${PIP[@]}" --retries 1 --timeout 20 torch --index-url https://download.pytorch.org/whl/cpu \
        || echo "PyTorch's CPU wheel index is unreachable: installing the default torch wheel"
fi
"${PIP[@]}" -r "$ROOT/requirements.txt"
"${PIP[@]}" -e "$ROOT"
echo "environment ready: $VENV"
