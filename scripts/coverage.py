#!/usr/bin/env python
"""Samples SFT-sharpening and XPO need on a low-coverage toy, by enumeration (docs/rl.md).

Distils a tiny Llama to a table whose argmax y* holds ~4% of the base mass (C_cov ~ 25), then reports:
SFT-sharpening's exact need (smallest N with P(BoN@N = y*) >= 1/2) and a check of that formula through
the real SFT pipeline; and, for XPO and online policy gradient trained through the real
RLSharpeningModule, the samples drawn until the enumerated mass on y* first reaches 1/2 (per seed).

    python scripts/coverage.py [--seeds 0 1 2 3 4] [--no-online] [--json]

With --json the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import warnings

import torch

from sharpening.tasks import coverage


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="XPO seeds")
    parser.add_argument("--online-seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="online PG seeds")
    parser.add_argument("--online-group", type=int, default=16, help="online: samples per generation")
    parser.add_argument("--no-online", action="store_true", help="skip online policy gradient")
    parser.add_argument("--kl-coef", type=float, default=0.1, help="beta; pi*_beta(y*) must exceed 1/2")
    parser.add_argument("--xpo-alpha", type=float, default=0.01)
    parser.add_argument("--xpo-updates", type=int, default=32, help="optimizer steps per XPO round")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--max-rounds", type=int, default=300)
    parser.add_argument("--sft-n", type=int, nargs="+", default=[4, 17, 50], help="N for the real SFT check")
    parser.add_argument("--sft-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--distil-steps", type=int, default=2000)
    parser.add_argument("--json", action="store_true")
    return parser.parse_args()


def print_report(result: dict) -> None:
    """Human-readable tables of ``coverage_experiment``'s result."""
    t, sft = result["toy"], result["sft"]
    print(
        f"toy: y*={t['argmax']!r} pi_base(y*)={t['p_star']:.4f} C_cov={t['c_cov']:.1f} "
        f"runner-up={t['second_mass']:.4f} unlisted={t['unlisted_mass']:.1e} "
        f"pi*_beta(y*)={t['target_mass_on_argmax']:.3f} ({t['outcomes']} outcomes)"
    )
    print(
        f"SFT exact: smallest N with P(BoN@N = y*) >= 1/2: {sft['samples_needed']} "
        f"(closed form {sft['closed_form']}; first-hit 10%-90%: {sft['q10']}-{sft['q90']})"
    )
    print(f"{'SFT N':>6} {'P(BoN=y*)':>10} {'winner share':>14} {'pi(y*) after SFT':>18}")
    for run in result["sft_runs"]:
        share = sum(run["winner_share"]) / len(run["winner_share"])
        mass = sum(run["mass_on_argmax"]) / len(run["mass_on_argmax"])
        print(f"{run['n']:>6} {run['predicted']:>10.3f} {share:>14.3f} {mass:>18.3f}")
    print(f"{'method':<8} {'median':>7} {'range':>10} {'failed':>7}  samples until pi(y*) >= 1/2, per seed")
    sft_range = f"{sft['q10']}-{sft['q90']}"
    print(f"{'sft':<8} {sft['samples_needed']:>7} {sft_range:>10} {'':>7}  exact; range = 10%-90% of the first hit")
    for name, rl in result["rl"].items():
        per_seed = [r["samples_needed"] for r in rl["runs"]]
        span = f"{rl['min']}-{rl['max']}"
        print(f"{name:<8} {str(rl['median']):>7} {span:>10} {rl['failed']:>7}  {per_seed}")
    print(f"total seconds: {result['seconds']:.0f}")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)  # tiny models: one thread is fastest
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    xpo = coverage.RLSettings(
        "xpo", lr=args.lr, xpo_alpha=args.xpo_alpha, xpo_updates_per_round=args.xpo_updates, max_rounds=args.max_rounds
    )
    runs = {"xpo": (xpo, args.seeds)}
    if not args.no_online:
        online = coverage.RLSettings("online", lr=args.lr, group_size=args.online_group, max_rounds=args.max_rounds)
        runs["online"] = (online, args.online_seeds)
    result = coverage.coverage_experiment(
        tempfile.mkdtemp(prefix="sharpening-coverage-"),
        runs,
        args.sft_n,
        args.sft_seeds,
        distil_steps=args.distil_steps,
        kl_coef=args.kl_coef,
    )
    print_report(result)
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
