#!/usr/bin/env python
"""RL-sharpening against the closed-form optimum, by enumeration (method.md §5).

Builds an enumerable toy (3 prompts, responses of at most 3 tokens over {a, b}, a tiny Llama distilled to
known tables), computes pi*_beta = pi_base^(1 + 1/beta) exactly, trains each algorithm through the real
RLSharpeningModule, and reports KL(pi_trained || pi*_beta) (pi_trained renormalized over the listed responses),
the mass on argmax pi_base, and the mass pi_trained puts outside the listed responses (unlisted).

    python scripts/oracle.py [--algorithms online offline xpo] [--kl-coef 0.5] [--cpu-linear torch] [--json]

With --json the last line is one JSON object keyed by algorithm.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time

import torch

from sharpening.tasks import toy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--algorithms", nargs="+", default=["online", "offline", "xpo"])
    parser.add_argument("--kl-coef", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--cpu-linear",
        choices=["auto", "onednn", "torch"],
        default="auto",
        help="the policy's CPU linear kernel (PolicyConfig.cpu_linear): the kernels round differently",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny models: one thread is fastest
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # one line per algorithm, not per round
    from transformers import AutoModelForCausalLM, AutoTokenizer

    work = tempfile.mkdtemp(prefix="sharpening-oracle-")
    base_dir = toy.build_toy_base(work, seed=args.seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    prompts = toy.toy_prompts(work)
    results = {"base": toy.measure(base, tokenizer, base, prompts, args.kl_coef)}
    print(f"{'algorithm':<10} {'KL(pi||pi*)':>12} {'mass on argmax':>15} {'unlisted':>9} {'seconds':>8}")
    _print_row("base", results["base"])
    for algorithm in args.algorithms:
        start = time.time()
        module = toy.train_on_toy(algorithm, work, kl_coef=args.kl_coef, seed=args.seed, cpu_linear=args.cpu_linear)
        result = toy.measure(module.policy.eval(), tokenizer, base, prompts, args.kl_coef)
        result["seconds"] = time.time() - start
        results[algorithm] = result
        _print_row(algorithm, result)
    if args.json:
        print(json.dumps(results))


def _print_row(name: str, result: dict) -> None:
    seconds = f"{result['seconds']:.1f}" if "seconds" in result else ""
    print(
        f"{name:<10} {result['kl_to_target']:>12.4f} {result['mass_on_argmax']:>15.3f} "
        f"{result['unlisted_mass']:>9.1e} {seconds:>8}"
    )


if __name__ == "__main__":
    main()
