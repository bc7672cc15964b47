"""Label-free online RL on the built-in tasks: TTRL-style majority and self-certainty, with and without the guard.

For each task (``demo``, ``cot``) and recipe (``configs/ttrl.yaml``, ``configs/intuitor.yaml``), with and without
``CollapseGuardCallback`` on ``train/accuracy``, this runs ``sharpen fit`` on the task's prompts, reads the rollouts'
``train/accuracy`` per step from the CSV logger, and measures the sharpened policy on the held-out prompts with
``sharpen evaluate compare``. Answers are read by each task's extractor (the cot task's is the text after ``;``),
for the rollouts' accuracy, TTRL's vote and the evaluation alike. It prints one table (``--json``: one JSON object).

    python scripts/label_free.py --out /tmp/label_free            # builds artifacts/{demo,cot} when missing
    python scripts/label_free.py --tasks cot --recipes ttrl --steps 16 --json
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXTRACTORS = {"demo": "strip", "cot": "sharpening.tasks.cot:extract_answer"}
"""The answer extractor of each task, as --model.rl.answer_extractor and --answer-extractor take it."""
GUARD = [
    "--trainer.callbacks+=sharpening.guards.CollapseGuardCallback",
    "--trainer.callbacks.monitor=train/accuracy",
    "--trainer.callbacks.patience=2",
    "--trainer.callbacks.every_n_steps=4",
    "--trainer.callbacks.min_delta=0.02",
]
"""The guard as docs/self_rewards.md runs it."""


def _run(cmd: list[str], log_path: Path) -> None:
    """Run ``cmd`` from the repository root, its output to ``log_path``; raise with the log's tail on failure."""
    with open(log_path, "w") as log:
        code = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {code}; see {log_path}:\n{tail}")


def ensure_task(task: str) -> Path:
    """``artifacts/<task>``, built with ``python -m sharpening.tasks.<task> build`` (a no-op when up to date)."""
    out = ROOT / "artifacts" / task
    build = [sys.executable, "-m", f"sharpening.tasks.{task}", "build", "--out", str(out)]
    subprocess.run(build, cwd=ROOT, check=True, stdout=sys.stderr)  # stdout carries only the table or JSON
    return out


def accuracy_by_step(run_dir: Path) -> list[float]:
    """The rollouts' ``train/accuracy``, one per optimizer step, from the CSV logger's metrics.csv."""
    (metrics,) = sorted(run_dir.glob("lightning_logs/version_*/metrics.csv"))[-1:]
    with open(metrics) as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/accuracy")]
    return [float(r["train/accuracy"]) for r in rows]


def run_one(task_dir: Path, task: str, recipe: str, guard: bool, steps: int, out: Path, eval_prompts: int) -> dict:
    """One fit and its held-out comparison; returns the row of the table."""
    name = f"{task}-{recipe}" + ("-guard" if guard else "")
    run_dir = out / name
    run_dir.mkdir(parents=True, exist_ok=True)
    fit = [
        sys.executable, "-m", "sharpening", "fit", "--config", f"configs/{recipe}.yaml",
        f"--trainer.default_root_dir={run_dir}", f"--trainer.max_steps={steps}", "--trainer.log_every_n_steps=1",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={run_dir}",
        f"--model.init_args.output_dir={run_dir / 'sharpened'}",
        f"--model.init_args.policy.model_name_or_path={task_dir / 'base'}",
        f"--model.init_args.rl.answer_extractor={EXTRACTORS[task]}",
        f"--data.dataset={task_dir / 'train.jsonl'}",
        *(GUARD if guard else []),
    ]  # fmt: skip
    _run(fit, run_dir / "fit.log")
    summary_path = run_dir / "compare.json"
    summary_path.unlink(missing_ok=True)
    compare = [
        sys.executable, "-m", "sharpening", "evaluate", "compare", "--base", str(task_dir / "base"),
        "--sharpened", str(run_dir / "sharpened"), "--prompts", str(task_dir / "eval.jsonl"),
        "--samples-per-prompt", "8", "--max-new-tokens", "8", "--max-prompts", str(eval_prompts),
        "--answer-extractor", EXTRACTORS[task], "--summary", str(summary_path),
    ]  # fmt: skip
    _run(compare, run_dir / "compare.log")
    summary = json.loads(summary_path.read_text())
    return {"task": task, "recipe": recipe, "guard": guard, "train_accuracy": accuracy_by_step(run_dir), **summary}


KEYS = ("greedy_accuracy", "sample_accuracy", "bon_accuracy", "pass_at_n")


def format_table(rows: list[dict]) -> str:
    """One line per run (and one per task for its base): held-out accuracies and the rollouts' first/best/last."""
    head = f"{'run':<24} {'greedy':>7} {'sample':>7} {'bon@8':>7} {'pass@8':>7}  train/accuracy first best last steps"
    lines = [head]
    for task in dict.fromkeys(r["task"] for r in rows):
        base = next(r for r in rows if r["task"] == task)
        lines.append(f"{task + ' base':<24} " + " ".join(f"{base['base_' + k]:>7.3f}" for k in KEYS))
        for r in (r for r in rows if r["task"] == task):
            acc = r["train_accuracy"]
            name = f"{task} {r['recipe']}" + (" +guard" if r["guard"] else "")
            trend = f"{acc[0]:.2f} {max(acc):.2f} {acc[-1]:.2f} {len(acc)}" if acc else "-"
            lines.append(f"{name:<24} " + " ".join(f"{r['sharpened_' + k]:>7.3f}" for k in KEYS) + "  " + trend)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["demo", "cot"], choices=sorted(EXTRACTORS))
    parser.add_argument("--recipes", nargs="+", default=["ttrl", "intuitor"], help="names of configs/<name>.yaml")
    parser.add_argument("--guard", choices=["both", "off", "on"], default="both", help="runs without/with the guard")
    parser.add_argument("--steps", type=int, default=32, help="optimizer steps per run (16 prompts, G = 8 each)")
    parser.add_argument("--eval-prompts", type=int, default=200, help="held-out prompts evaluated (8 samples each)")
    parser.add_argument("--out", default="/tmp/label_free", help="folder of the runs (logs, CSV, policies)")
    parser.add_argument("--json", action="store_true", help="print the rows as one JSON object instead of a table")
    args = parser.parse_args(argv)
    guards = {"both": [False, True], "off": [False], "on": [True]}[args.guard]
    rows = []
    for task in args.tasks:
        task_dir = ensure_task(task)
        for recipe in args.recipes:
            for guard in guards:
                rows.append(run_one(task_dir, task, recipe, guard, args.steps, Path(args.out), args.eval_prompts))
                print(f"done: {task} {recipe} guard={guard}", file=sys.stderr, flush=True)
    print(json.dumps({"rows": rows}, indent=2) if args.json else format_table(rows))


if __name__ == "__main__":
    main()
