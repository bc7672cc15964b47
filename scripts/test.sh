#!/usr/bin/env bash
# Run the test suite (installs what it needs first); with no arguments, every test. Extra arguments go to
# pytest, e.g.
#   ./scripts/test.sh -m "not slow"         the quick loop: no subprocesses, DDP/FSDP, convergence or builds
#   ./scripts/test.sh tests/unit -k sampler
#   SHARPENING_VLLM=1 ./scripts/test.sh -m vllm
#                                           the tests that need vLLM, in the venv with vLLM (.venv-vllm; set up
#                                           by setup.sh on first use, several minutes)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh"  # reads SHARPENING_VLLM and SHARPENING_VENV itself
default_venv="$root/.venv"
[ "${SHARPENING_VLLM:-0}" = 1 ] && default_venv="$root/.venv-vllm"
# shellcheck disable=SC1091
. "${SHARPENING_VENV:-$default_venv}/bin/activate"
cd "$root"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec python -m pytest -q -p no:cacheprovider "$@"
