#!/usr/bin/env bash
# Run the test suite (installs what it needs first); with no arguments, every test. Extra arguments go to
# pytest, e.g.
#   ./scripts/test.sh -m "not slow"         the quick loop: no subprocesses, DDP/FSDP, convergence or builds
#   ./scripts/test.sh tests/unit -k sampler
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh"
# shellcheck disable=SC1091
. "${SHARPENING_VENV:-$root/.venv}/bin/activate"
cd "$root"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec python -m pytest -q -p no:cacheprovider "$@"
