"""Inference-time evaluation: greedy, single-sample and best-of-N accuracy of a model on prompts.

``python -m sharpening.evaluate --base DIR [--sharpened DIR] --prompts FILE`` compares a base model with
its sharpened version and writes a JSON summary. Best-of-N scores each model's samples with that
model's OWN log-likelihood (draws at temperature 1 with no truncation, so the sampler's log-probs are
the exact self-reward, SPEC 4.4).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Callable, Iterable

import torch

from sharpening.rewards import extract_answers, score_samples
from sharpening.sampler import SamplingConfig, decode_responses, generate_samples
from sharpening.selection import best_of_n
from sharpening.tasks.extractors import answers_match, resolve_extractor
from sharpening.types import PromptBatch


def load_model_for_evaluation(path: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a save_pretrained directory or a PEFT adapter directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter_config = os.path.join(path, "adapter_config.json")
    if os.path.isfile(adapter_config):
        from peft import PeftModel

        with open(adapter_config) as f:
            base_path = json.load(f)["base_model_name_or_path"]
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype), path)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model.eval(), tokenizer


@torch.no_grad()
def evaluate_accuracy(
    model: torch.nn.Module,
    tokenizer,
    batches: Iterable[PromptBatch],
    extractor: Callable[[str], str | None],
    samples_per_prompt: int = 8,
    max_new_tokens: int = 64,
    reward: str = "loglik",
    seed: int = 0,
) -> dict[str, float]:
    """Accuracy of greedy decoding, of one sample (mean over the N draws) and of best-of-N by ``reward``."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    sampling = SamplingConfig(samples_per_prompt=samples_per_prompt, max_new_tokens=max_new_tokens)
    greedy_cfg = SamplingConfig(samples_per_prompt=1, max_new_tokens=max_new_tokens, temperature=0.0)
    totals = {"greedy": 0.0, "sample": 0.0, "bon": 0.0, "pass": 0.0, "prompts": 0}
    for prompts in batches:
        samples = generate_samples(model, prompts, sampling, eos, pad, seed=seed)
        answers = extract_answers(decode_responses(tokenizer, samples), extractor)
        correct = torch.tensor(
            [[answers_match(a, ref, extractor) for a in group] for group, ref in zip(answers, prompts.answers)]
        )  # [B, N]
        scores = score_samples(reward, samples.logprobs, samples.response_mask, answers)  # [B, N]
        best = best_of_n(scores.cpu())  # [B]
        greedy = decode_responses(tokenizer, generate_samples(model, prompts, greedy_cfg, eos, pad))
        totals["greedy"] += sum(answers_match(extractor(g[0]), r, extractor) for g, r in zip(greedy, prompts.answers))
        totals["sample"] += correct.float().mean(-1).sum().item()
        totals["bon"] += correct.gather(-1, best[:, None]).sum().item()
        totals["pass"] += correct.any(-1).sum().item()
        totals["prompts"] += len(prompts)
    n = max(totals["prompts"], 1)
    return {
        "greedy_accuracy": totals["greedy"] / n,
        "sample_accuracy": totals["sample"] / n,
        "bon_accuracy": totals["bon"] / n,
        "pass_at_n": totals["pass"] / n,
        "prompts": totals["prompts"],
        "samples_per_prompt": samples_per_prompt,
    }


def prompt_batches_from_file(path: str, tokenizer, batch_size: int = 32, max_prompts: int | None = None):
    """Left-padded PromptBatches from a prompt/answer file (the same templating as training)."""
    from sharpening.prompts import PromptDataModule

    data = PromptDataModule(dataset=path, answer_column="answer", max_prompts=max_prompts)
    data.load_prompts(tokenizer)
    return list(data.prompt_batches(batch_size))


def compare(args: argparse.Namespace) -> dict:
    """Evaluate the base (greedy, sample, best-of-N) and the sharpened model (greedy, sample)."""
    torch.manual_seed(args.seed)
    extractor = resolve_extractor(args.answer_extractor)
    summary: dict = {"samples_per_prompt": args.samples_per_prompt, "prompts_file": args.prompts}
    for name, path in (("base", args.base), ("sharpened", args.sharpened)):
        if not path:
            continue
        model, tokenizer = load_model_for_evaluation(path)
        batches = prompt_batches_from_file(args.prompts, tokenizer, max_prompts=args.max_prompts)
        result = evaluate_accuracy(
            model, tokenizer, batches, extractor, args.samples_per_prompt, args.max_new_tokens, seed=args.seed
        )
        summary[f"{name}_model"] = os.path.abspath(path)
        summary["eval_prompts"] = result["prompts"]
        for key in ("greedy_accuracy", "sample_accuracy", "bon_accuracy", "pass_at_n"):
            summary[f"{name}_{key}"] = result[key]
    return summary


def format_table(summary: dict) -> str:
    """A small text table of the accuracies in ``summary``."""
    n = summary["samples_per_prompt"]
    lines = [f"{'model':<10} {'greedy':>8} {'sample':>8} {f'BoN@{n}':>8} {f'pass@{n}':>8}"]
    for name in ("base", "sharpened"):
        if f"{name}_greedy_accuracy" in summary:
            row = [summary[f"{name}_{k}"] for k in ("greedy_accuracy", "sample_accuracy", "bon_accuracy", "pass_at_n")]
            lines.append(f"{name:<10} " + " ".join(f"{v:>8.3f}" for v in row))
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


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="base model directory (or hub id)")
    parser.add_argument("--sharpened", default=None, help="sharpened model or PEFT adapter directory")
    parser.add_argument("--prompts", required=True, help="JSONL/JSON/CSV/Parquet file with prompt and answer columns")
    parser.add_argument("--samples-per-prompt", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-prompts", type=int, default=None)
    parser.add_argument("--answer-extractor", default="strip")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--summary", default=None, help="write the JSON summary here")
    parser.add_argument("--demo-checks", action="store_true", help="print the demo's acceptance checks")
    parser.add_argument("--elapsed-since", type=float, default=None, help="unix time the run started (reported)")
    args = parser.parse_args(argv)
    summary = compare(args)
    print(format_table(summary))
    if args.demo_checks and args.sharpened:
        for text, ok in sharpening_checks(summary):
            print(f"  [{'ok' if ok else 'FAILED'}] {text}")
    if args.elapsed_since is not None:
        import time

        summary["run_seconds"] = time.time() - args.elapsed_since
        print(f"run time (after set-up): {summary['run_seconds']:.0f} s")
    if args.summary:
        os.makedirs(os.path.dirname(os.path.abspath(args.summary)), exist_ok=True)
        with open(args.summary, "w") as f:
            json.dump(summary, f, indent=2)
        print(f"summary: {args.summary}")
    return summary


if __name__ == "__main__":
    main()
