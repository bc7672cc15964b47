"""`sharpen evaluate compare`: a base model against its sharpened version, with one N (what the demo runs).

    sharpen evaluate compare --base DIR --sharpened DIR --prompts FILE --samples-per-prompt 8
    python -m sharpening.evaluate --base DIR --sharpened DIR --prompts FILE     (the same; older spelling)

Each model is measured with the protocol of sharpening.evaluate (one seed, N = --samples-per-prompt,
best-of-N by the model's OWN log-likelihood, truncated responses kept) and the summary's flat keys
(``base_greedy_accuracy``, ``sharpened_sample_accuracy``, ...) are printed and optionally written as JSON.
A sharpened PEFT adapter is put on --base, which must be the base its adapter_config.json names (or a copy).
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings

from sharpening.errors import ConfigError, raise_if_problems, unwritable_directory_problem
from sharpening.evaluate.command import measure
from sharpening.evaluate.config import (
    EvalModelConfig,
    ProtocolConfig,
    overlap_problem,
    read_directories,
    validate_data_args,
    validate_model_config,
    validate_protocol_config,
)
from sharpening.evaluate.report import find_row
from sharpening.evaluate.sources import adapter_base_check, is_adapter_dir

KEYS = {"greedy_accuracy": ("greedy", 1), "sample_accuracy": ("sample", 1), "bon_accuracy": ("bon_loglik", None),
        "pass_at_n": ("pass", None)}  # fmt: skip


# The evaluate options that compare's flags set, as the compare user types them.
FLAGS = {"--protocol.max_new_tokens": "--max-new-tokens", "--protocol.answer_extractor": "--answer-extractor",
         "--data.dataset": "--prompts", "--data.prompt_column": "--prompt-column",
         "--data.answer_column": "--answer-column", "--data.max_prompts": "--max-prompts",
         "--model.allow_adapter_base_mismatch true": "--allow-adapter-base-mismatch"}  # fmt: skip


def _as_typed(problems: list[str], flags: dict[str, str] | None = None) -> list[str]:
    """Problems found by sharpening.evaluate's checks, naming compare's flags instead of its options."""
    out = []
    for problem in problems:
        for option, flag in {**FLAGS, **(flags or {})}.items():
            problem = problem.replace(option, flag)
        out.append(problem)
    return out


def model_configs(args: argparse.Namespace) -> dict[str, tuple[EvalModelConfig, dict[str, str]]]:
    """{name: (its configuration, its options as compare's flags)} of the base and (when given) the sharpened
    model. A sharpened adapter goes on --base, so the two runs differ by the adapter alone."""
    models = {"base": (EvalModelConfig(args.base, dtype="float32"), {"--model.model_name_or_path": "--base"})}
    if args.sharpened and is_adapter_dir(args.sharpened) and not is_adapter_dir(args.base):
        sharpened = EvalModelConfig(args.base, adapter_path=args.sharpened, dtype="float32",
                                    allow_adapter_base_mismatch=args.allow_adapter_base_mismatch)  # fmt: skip
        flags = {"--model.adapter_path": "--sharpened", "--model.model_name_or_path": "--base"}
        models["sharpened"] = sharpened, flags
    elif args.sharpened:
        flags = {"--model.model_name_or_path": "--sharpened"}
        models["sharpened"] = EvalModelConfig(args.sharpened, dtype="float32"), flags
    return models


def compare(args: argparse.Namespace) -> dict:
    """Greedy, single-sample, best-of-N and pass@N accuracy of the base and (when given) the sharpened model."""
    problems = []
    if args.samples_per_prompt < 1:
        problems.append(f"--samples-per-prompt={args.samples_per_prompt}: must be >= 1 (N of best-of-N, e.g. 8)")
    if args.summary and os.path.exists(args.summary):
        problems.append(f"--summary={args.summary!r} already exists; choose a new path (it is never overwritten)")
    elif args.summary:
        folder = os.path.dirname(os.path.abspath(args.summary))
        if problem := unwritable_directory_problem("its folder", folder):
            problems.append(f"--summary={args.summary!r}: {problem} (the summary is written at the end)")
    protocol = ProtocolConfig(
        n_values=[max(1, args.samples_per_prompt)], seeds=1, seed=args.seed, max_new_tokens=args.max_new_tokens,
        prompts_per_batch=32, answer_extractor=args.answer_extractor, truncated="keep",
    )  # fmt: skip
    data = {"dataset": args.prompts, "prompt_column": args.prompt_column, "answer_column": args.answer_column,
            "max_prompts": args.max_prompts}  # fmt: skip
    models = model_configs(args)
    problems += _as_typed(validate_protocol_config(protocol) + validate_data_args(data))
    for cfg, flags in models.values():
        problems += [p for p in _as_typed(validate_model_config(cfg), flags) if p not in problems]
        if args.summary and (overlap := overlap_problem("--summary", args.summary, read_directories(cfg))):
            problems += [p for p in _as_typed([overlap], flags) if p not in problems]  # nothing among a model's files
    raise_if_problems(problems)  # both models and the prompts checked before either model loads
    for cfg, flags in models.values():
        for warning in _as_typed(adapter_base_check(cfg)[1], flags):
            warnings.warn(warning, stacklevel=2)
    summary: dict = {"samples_per_prompt": args.samples_per_prompt, "prompts_file": args.prompts}
    for name, (cfg, flags) in models.items():
        try:
            results = measure(cfg, protocol, data, cache_dir=None, show_progress=False)
        except ConfigError as err:  # the prompts file's problems (checked before any weights load)
            raise ConfigError(_as_typed(err.problems, flags)) from None
        summary[f"{name}_model"] = os.path.abspath(getattr(args, name))
        summary["eval_prompts"] = results["prompts"]["count"]
        for key, (method, n) in KEYS.items():
            summary[f"{name}_{key}"] = find_row(results, method, n or args.samples_per_prompt)["accuracy"]
    return summary


def format_table(summary: dict) -> str:
    """A small text table of the accuracies in ``summary``."""
    n = summary["samples_per_prompt"]
    lines = [f"{'model':<10} {'greedy':>8} {'sample':>8} {f'BoN@{n}':>8} {f'pass@{n}':>8}"]
    for name in ("base", "sharpened"):
        if f"{name}_greedy_accuracy" in summary:
            lines.append(f"{name:<10} " + " ".join(f"{summary[f'{name}_{k}']:>8.3f}" for k in KEYS))
    return "\n".join(lines)


def sharpening_checks(summary: dict) -> list[tuple[str, bool]]:
    """The demo's acceptance checks: best-of-N beats one sample by 0.2 and beats greedy, and the
    sharpened model's single sample closes at least 80% of the base sample-to-best-of-N gap."""
    gap = summary["base_bon_accuracy"] - summary["base_sample_accuracy"]
    closed = (summary["sharpened_sample_accuracy"] - summary["base_sample_accuracy"]) / gap if gap > 0 else 0.0
    summary["gap_closed"] = closed
    return [
        (f"base BoN - base sample = {gap:.3f} >= 0.2", gap >= 0.2),
        (
            f"base BoN {summary['base_bon_accuracy']:.3f} > base greedy {summary['base_greedy_accuracy']:.3f}",
            summary["base_bon_accuracy"] > summary["base_greedy_accuracy"],
        ),
        (f"sharpened sample closes {100 * closed:.1f}% of the gap >= 80%", closed >= 0.8),
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sharpen evaluate compare", description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="base model directory (or hub id)")
    parser.add_argument("--sharpened", default=None, help="sharpened model or PEFT adapter directory")
    parser.add_argument("--prompts", required=True, help="JSONL/JSON/CSV/Parquet file with prompt and answer columns")
    parser.add_argument("--samples-per-prompt", type=int, default=8, help="N of best-of-N and pass@N")
    parser.add_argument("--prompt-column", default="prompt", help="column of --prompts holding the prompt text")
    parser.add_argument("--answer-column", default="answer", help="column of --prompts holding the reference answer")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="longest response drawn, in tokens")
    parser.add_argument("--max-prompts", type=int, default=None, help="use the first this many prompts (all: unset)")
    parser.add_argument(
        "--answer-extractor",
        default="strip",
        help="how an answer is read from a response: a built-in name (sharpening.tasks.extractors."
        "EXTRACTORS) or a module:function path",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the draws")
    parser.add_argument(
        "--allow-adapter-base-mismatch",
        action="store_true",
        help="put a --sharpened adapter on a --base hub model other than the one its "
        "adapter_config.json names (e.g. a mirror); weight shapes must still agree",
    )
    parser.add_argument("--summary", default=None, help="write the JSON summary here (a new file: never overwritten)")
    parser.add_argument("--demo-checks", action="store_true", help="print the demo's acceptance checks")
    parser.add_argument("--elapsed-since", type=float, default=None, help="unix time the run started (reported)")
    return parser


def main(argv: list[str] | None = None) -> dict:
    """Parse the flags, compare, print the table (and checks), write the summary; ends with `summary: PATH`."""
    args = build_parser().parse_args(argv)
    summary = compare(args)
    print(format_table(summary))
    if args.demo_checks and args.sharpened:
        for text, ok in sharpening_checks(summary):
            print(f"  [{'ok' if ok else 'FAILED'}] {text}")
    if args.elapsed_since is not None:
        summary["run_seconds"] = time.time() - args.elapsed_since
        print(f"run time (after set-up): {summary['run_seconds']:.0f} s")
    if args.summary:
        os.makedirs(os.path.dirname(os.path.abspath(args.summary)), exist_ok=True)
        with open(args.summary, "w") as f:
            json.dump(summary, f, indent=2)
        print(f"summary: {args.summary}")
    return summary
