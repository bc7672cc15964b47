#!/usr/bin/env python
"""RL-sharpening against the closed-form optimum, by enumeration (method.md §5).

Builds an enumerable toy (3 prompts, responses of at most 3 tokens over {a, b}, a tiny Llama distilled to
known tables), computes pi*_beta = pi_base^(1 + 1/beta) exactly, trains each algorithm through the real
RLSharpeningModule, and reports KL(pi_trained || pi*_beta) (pi_trained renormalized over the listed responses),
the mass on argmax pi_base, and the mass pi_trained puts outside the listed responses (unlisted).

Two more rows train online RL another way: ``online_alpha`` gives --model.rl.alpha = 1 + 1/beta instead of beta
(same target), ``online_tilted`` adds the task reward w r (toy.TOY_TASK_REWARD: 1 for a response starting with
"b") and is measured against the tilted target pi_base^(1 + 1/beta) exp(w r / beta) (``base_tilted``: the base
against it).

    python scripts/oracle.py [--algorithms online offline xpo online_alpha online_tilted] [--kl-coef 0.5]
                             [--cpu-linear torch] [--json]

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
    parser.add_argument("--algorithms", nargs="+", default=["online", "offline", "xpo", *VARIANTS])
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
    if "online_tilted" in args.algorithms:
        results["base_tilted"] = toy.measure(base, tokenizer, base, prompts, args.kl_coef, *_tilt())
        _print_row("base_tilted", results["base_tilted"])
    for row in args.algorithms:
        start = time.time()
        algorithm, settings = VARIANTS.get(row, (row, lambda beta: (beta, {})))
        kl_coef, rl_extra = settings(args.kl_coef)
        module = toy.train_on_toy(
            algorithm, work, kl_coef=kl_coef, seed=args.seed, cpu_linear=args.cpu_linear, rl_extra=rl_extra
        )
        tilt = _tilt() if rl_extra.get("task_reward") else ()
        result = toy.measure(module.policy.eval(), tokenizer, base, prompts, module.rl.kl_coef, *tilt)
        result["seconds"] = time.time() - start
        results[row] = result
        _print_row(row, result)
    if args.json:
        print(json.dumps(results))


VARIANTS = {  # row -> (algorithm, beta -> (the kl_coef given, further RLConfig fields))
    "online_alpha": ("online", lambda beta: (None, {"alpha": 1.0 + 1.0 / beta})),
    "online_tilted": (
        "online",
        lambda beta: (beta, {"task_reward": toy.TOY_TASK_REWARD, "task_reward_weight": toy.TOY_TASK_REWARD_WEIGHT}),
    ),
}


def _tilt() -> tuple:
    """``toy.measure``'s task-reward arguments for the tilted target."""
    return toy.starts_with_b, toy.TOY_TASK_REWARD_WEIGHT


def _print_row(name: str, result: dict) -> None:
    seconds = f"{result['seconds']:.1f}" if "seconds" in result else ""
    print(
        f"{name:<10} {result['kl_to_target']:>12.4f} {result['mass_on_argmax']:>15.3f} "
        f"{result['unlisted_mass']:>9.1e} {seconds:>8}"
    )


if __name__ == "__main__":
    main()
