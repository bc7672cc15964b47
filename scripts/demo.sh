#!/usr/bin/env bash
# The demo: build the built-in base model (once), SFT-sharpen it through the `sharpen` CLI, then
# evaluate base and sharpened model on held-out prompts. Ends with `summary: PATH` (a JSON file).
#   ./scripts/demo.sh            SFT-sharpening (configs/demo.yaml)
#   ./scripts/demo.sh --rl       RL-sharpening, online policy gradient (configs/rl.yaml)
#   ./scripts/demo.sh --power    power self-distillation: SFT on power samples (configs/power_distill.yaml)
# Each run writes to a new directory under artifacts/demo/runs/; nothing earlier is overwritten.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
config="configs/demo.yaml"
case "${1:-}" in
  "") ;;
  --rl) config="configs/rl.yaml" ;;
  --power) config="configs/power_distill.yaml" ;;
  -h|--help) sed -n '2,7s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; exit 0 ;;
  *) echo "demo.sh: unknown option '$1' (use --rl for RL-sharpening, --power for power self-distillation, or nothing for SFT-sharpening)" >&2; exit 2 ;;
esac
"$root/scripts/setup.sh"
# shellcheck disable=SC1091
. "${SHARPENING_VENV:-$root/.venv}/bin/activate"
cd "$root"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

run="artifacts/demo/runs/$(date +%Y%m%d-%H%M%S)-$$"
start=$(date +%s)
python -m sharpening.tasks.demo build --out artifacts/demo
python -m sharpening fit --config "$config" \
  --trainer.default_root_dir "$run" --model.init_args.output_dir "$run/sharpened"
python -m sharpening evaluate compare --base artifacts/demo/base --sharpened "$run/sharpened" \
  --prompts artifacts/demo/eval.jsonl --samples-per-prompt 8 --max-new-tokens 8 \
  --demo-checks --elapsed-since "$start" --summary "$run/summary.json"
