#!/usr/bin/env python
"""Power samplers against the exact pi_base^alpha, by enumeration (docs/power.md).

Builds the oracle toy of scripts/oracle.py (3 prompts, responses of at most 3 tokens over {a, b}, a tiny Llama
distilled to known tables), computes pi_alpha proportional to pi_base^alpha exactly over every outcome (complete
and truncated responses), draws ``--draws`` power samples per prompt with MCMC and SMC, and the low-temperature
baseline (temperature 1/alpha token by token, which is NOT pi_alpha), and reports the total-variation distance
of each empirical distribution to pi_alpha, the mean tokens spent per returned sample, and the sampling noise:
the mean TV of ``--draws`` exact draws from pi_alpha itself (``--noise-repeats`` repetitions).

    python scripts/power_oracle.py [--alphas 2 4] [--draws 10000] [--out DIR] [--json]

With --json the last line is one JSON object: {alpha: {prompt: {method: {"tv", "tokens_per_sample"}}}}.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import Counter

import torch

from sharpening.engines import PowerSamplingConfig, SamplingConfig, generate_samples, power_sample
from sharpening.prompts import pad_prompts
from sharpening.tasks import toy

METHODS = ("mcmc", "smc", "low_temperature")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--alphas", nargs="+", type=float, default=[2.0, 4.0])
    parser.add_argument("--prompts", nargs="+", default=None, help="toy prompts to measure (default: all)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--draws", type=int, default=10000, help="returned samples per prompt, method and alpha")
    parser.add_argument("--block-tokens", type=int, default=1)
    parser.add_argument("--mcmc-steps", type=int, default=10)
    parser.add_argument("--particles", type=int, default=16)
    parser.add_argument("--resample-threshold", type=float, default=0.5)
    parser.add_argument("--noise-repeats", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="where the toy base is built (default: a temporary directory)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny model: one thread is fastest
    from transformers import AutoModelForCausalLM, AutoTokenizer

    work = args.out or tempfile.mkdtemp(prefix="sharpening-power-oracle-")
    base_dir = toy.build_toy_base(work, seed=args.seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    results = {}
    print(f"{'alpha':>5} {'prompt':<6} {'method':<16} {'TV':>7} {'noise TV':>9} {'tokens/sample':>14} {'seconds':>8}")
    for alpha in args.alphas:
        for prompt in args.prompts or toy.toy_prompts(work):
            results.setdefault(str(alpha), {})[prompt] = measure_prompt(model, tokenizer, prompt, alpha, args)
    if args.json:
        print(json.dumps({"draws": args.draws, "settings": _settings(args), "results": results}))


def measure_prompt(model, tokenizer, prompt: str, alpha: float, args) -> dict:
    """TV to the exact pi_alpha and tokens per sample of each method on one prompt, and the noise level."""
    outcomes = toy.toy_outcomes()
    with torch.no_grad():
        target = alpha * toy.outcome_logprobs(model, tokenizer, prompt, outcomes).double()
    target = (target - target.logsumexp(-1)).exp()  # [O] pi_alpha over the listed outcomes
    row = {"noise_tv": _noise_tv(target, args.draws, args.noise_repeats, args.seed)}
    for method in args.methods:
        start = time.time()
        drawn, tokens = _draw(model, tokenizer, prompt, alpha, method, args)
        row[method] = {"tv": total_variation(drawn, outcomes, target), "tokens_per_sample": tokens}
        print(
            f"{alpha:>5g} {prompt:<6} {method:<16} {row[method]['tv']:>7.4f} {row['noise_tv']:>9.4f} "
            f"{tokens:>14.1f} {time.time() - start:>8.1f}"
        )
    return row


def _draw(model, tokenizer, prompt: str, alpha: float, method: str, args) -> tuple[list[tuple[str, bool]], float]:
    """``args.draws`` outcomes of ``method`` for ``prompt`` (copies of the prompt with their own seeds), and the
    mean tokens spent per outcome."""
    prompt_ids = tokenizer(prompt).input_ids
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    prompts = pad_prompts([prompt_ids] * args.draws, list(range(args.draws)), [None] * args.draws, pad)
    if method == "low_temperature":
        cfg = SamplingConfig(
            samples_per_prompt=args.draws, max_new_tokens=toy.TOY_MAX_NEW_TOKENS, temperature=1 / alpha
        )
        one = pad_prompts([prompt_ids], [0], [None], pad)
        samples = generate_samples(model, one, cfg, eos, pad, seed=args.seed)
        response_ids, truncated = samples.response_ids[0], samples.truncated[0]  # [1, N, T] -> [N, T]
        tokens = float(samples.response_mask.sum()) / args.draws
    else:
        cfg = PowerSamplingConfig(
            method=method,
            alpha=alpha,
            block_tokens=args.block_tokens,
            mcmc_steps=args.mcmc_steps,
            particles=args.particles,
            resample_threshold=args.resample_threshold,
            max_new_tokens=toy.TOY_MAX_NEW_TOKENS,
            prompts_per_batch=min(args.draws, 2048),
        )
        out = power_sample(model, prompts, cfg, eos, pad, seed=args.seed)
        response_ids, truncated = out.samples.response_ids[:, 0], out.samples.truncated[:, 0]  # [B, 1, T] -> [B, T]
        tokens = float(out.tokens_spent.float().mean())
    texts = tokenizer.batch_decode(response_ids.tolist(), skip_special_tokens=True)
    return list(zip(texts, truncated.tolist())), tokens


def total_variation(drawn: list[tuple[str, bool]], outcomes: list[tuple[str, bool]], target: torch.Tensor) -> float:
    """TV between the empirical distribution of ``drawn`` and ``target`` [O] over ``outcomes``; draws outside
    the listed outcomes count fully."""
    counts = Counter(drawn)
    empirical = torch.tensor([counts.get(o, 0) for o in outcomes], dtype=torch.float64) / len(drawn)
    unlisted = 1.0 - float(empirical.sum())
    return 0.5 * (float((empirical - target).abs().sum()) + unlisted)


def _noise_tv(target: torch.Tensor, draws: int, repeats: int, seed: int) -> float:
    """Mean TV of ``draws`` exact draws from ``target`` [O] to ``target``: the floor any exact sampler sees."""
    generator = torch.Generator().manual_seed(seed)
    tvs = []
    for _ in range(repeats):
        picks = torch.multinomial(target, draws, replacement=True, generator=generator)
        empirical = torch.bincount(picks, minlength=target.shape[0]).double() / draws
        tvs.append(0.5 * float((empirical - target).abs().sum()))
    return sum(tvs) / len(tvs)


def _settings(args) -> dict:
    keys = ("methods", "block_tokens", "mcmc_steps", "particles", "resample_threshold", "seed", "noise_repeats")
    return {k: getattr(args, k) for k in keys}


if __name__ == "__main__":
    main()
