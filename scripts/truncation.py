#!/usr/bin/env python
"""RL-sharpening with responses cut short: --model.rl.truncated keep / drop / penalize, by enumeration (method.md §4.5).

The oracle toy of scripts/oracle.py (3 prompts over {a, b}, beta = 0.5) trained with max_new_tokens 2 instead
of 3: every two-letter response is cut before its EOS, so a truncated outcome's log-prob is that of its prefix
(e.g. pi_base("ab" cut) = 0.30 for "x=", above any complete response). Reports, averaged over prompts and
enumerated exactly: the mass the policy puts on truncated outcomes, on the best COMPLETE response of pi_base,
and KL to the closed-form optimum where there is one (keep: pi_base^(1 + 1/beta) over the outcomes;
penalize: that times exp(-penalty [truncated] / beta); online drop has none: cut samples get no gradient).
xpo with drop is refused: it collapsed here (docs/rl.md; the commit that added this script still runs it).

    python scripts/truncation.py [--algorithms online xpo] [--treatments keep drop penalize] [--json]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time

import torch

from sharpening.tasks import toy

MAX_NEW_TOKENS = 2


@torch.no_grad()
def measure(model, tokenizer, base_model, prompts: list[str], kl_coef: float, treatment: str, penalty: float) -> dict:
    outcomes = toy.toy_outcomes(max_new_tokens=MAX_NEW_TOKENS)
    cut = torch.tensor([truncated for _, truncated in outcomes])
    rows = []
    for prompt in prompts:
        base = toy.outcome_logprobs(base_model, tokenizer, prompt, outcomes)
        policy = toy.outcome_logprobs(model, tokenizer, prompt, outcomes)
        best_complete = torch.where(cut, float("-inf"), base).argmax()
        row = {
            "truncated_mass": float(policy[cut].exp().sum()),
            "mass_on_best_complete": float(policy[best_complete].exp()),
        }
        if treatment != "drop":
            scaled = (1 + 1 / kl_coef) * base - (penalty / kl_coef * cut if treatment == "penalize" else 0.0)
            row["kl_to_target"] = toy.kl_divergence(policy, scaled - scaled.logsumexp(-1))
        rows.append(row)
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--algorithms", nargs="+", default=["online", "xpo"], choices=["online", "xpo"])
    parser.add_argument("--treatments", nargs="+", default=["keep", "drop", "penalize"])
    parser.add_argument("--penalty", type=float, default=10.0)
    parser.add_argument("--kl-coef", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    work = tempfile.mkdtemp(prefix="sharpening-truncation-")
    base_dir = toy.build_toy_base(work, seed=args.seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    prompts = toy.toy_prompts(work)
    results = {"base": measure(base, tokenizer, base, prompts, args.kl_coef, "drop", args.penalty)}
    print(f"{'run':<18} {'truncated mass':>15} {'best complete':>14} {'KL(pi||pi*)':>12} {'seconds':>8}")
    for name, result in [("base", results["base"])]:
        print(f"{name:<18} {result['truncated_mass']:>15.3f} {result['mass_on_best_complete']:>14.3f}")
    for algorithm in args.algorithms:
        for treatment in args.treatments:
            if (algorithm, treatment) == ("xpo", "drop"):  # refused: it collapsed on this toy (docs/rl.md)
                print(f"{'xpo drop':<18} {'refused (RLConfig.truncated)':>30}")
                continue
            start = time.time()
            extra = {"truncated": treatment, "truncation_penalty": args.penalty}
            module = toy.train_on_toy(algorithm, work, kl_coef=args.kl_coef, seed=args.seed,
                                      max_new_tokens=MAX_NEW_TOKENS, rl_extra=extra)  # fmt: skip
            result = measure(module.policy.eval(), tokenizer, base, prompts, args.kl_coef, treatment, args.penalty)
            result["seconds"] = time.time() - start
            results[f"{algorithm}/{treatment}"] = result
            kl = f"{result['kl_to_target']:.4f}" if "kl_to_target" in result else "-"
            print(f"{algorithm + ' ' + treatment:<18} {result['truncated_mass']:>15.3f} "
                  f"{result['mass_on_best_complete']:>14.3f} {kl:>12} {result['seconds']:>8.1f}")  # fmt: skip
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
