#!/usr/bin/env bash
# Create (or reuse) the project virtual environment and install sharpening with its test extras
# (pytest, and ruff pinned in pyproject.toml for .ci/run's lint and format checks).
# Safe to run again: it reinstalls only when pyproject.toml changed.
#   SHARPENING_VENV   venv directory (default: .venv in the repository)
#   TORCH_SPEC        torch requirement installed FIRST when the venv has no torch (default torch==2.13.0).
#                     On a machine without CUDA, point pip at a CPU build, e.g.
#                     PIP_INDEX_URL=https://download.pytorch.org/whl/cpu ./scripts/setup.sh
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${SHARPENING_VENV:-$root/.venv}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating virtual environment $venv"
  "$python" -m venv "$venv"
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"

if ! python -c "import torch" >/dev/null 2>&1; then
  # torch goes first and pinned: an unpinned torch (or a dependency pulling one) would download
  # several GB of CUDA packages on a CPU machine.
  echo "setup: installing ${TORCH_SPEC:-torch==2.13.0}"
  python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi

stamp="$venv/.sharpening-installed"
want="$(cat "$root/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing sharpening and its dependencies"
  python -m pip install -q -e "$root[test]"
  echo "$want" > "$stamp"
fi
