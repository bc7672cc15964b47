"""The paper's inference-time protocol (method.md §3.3) as pure functions over per-sample tensors.

Per seed, N_max responses are drawn ONCE per prompt; best-of-N, majority vote and pass@N for a smaller N
use the FIRST N of those same draws (nested subsets), so a curve over N shows the effect of N, not of
fresh draws. Greedy decoding runs once. Numbers over seeds are reported as mean and standard error.

Choices (ours, where the paper is silent):
- single-sample accuracy is the mean correctness of ALL N_max draws of a seed (an unbiased estimate of
  one sample's accuracy, with less variance than the first draw alone);
- best-of-N breaks score ties towards the earlier draw; truncated draws follow ``truncated_policy``
  (drop / keep / penalize, as in training) and a prompt with no eligible draw falls back to draw 0;
- majority vote picks the most frequent extracted answer among the first N, ties to the answer that
  appears first; a prompt where no draw has an answer counts as wrong;
- percent lift over greedy is undefined (None) when greedy accuracy is 0: the lift in accuracy points
  is always reported beside it;
- tokens spent per returned answer count the response tokens the method decodes (EOS included): greedy and a
  single sample their own; BoN@N, maj@N and pass@N all N draws (the first N, summed per prompt), and best-of-N
  once more when its scores need a teacher-forced rescoring pass; a power-sampling row what its sampler reports
  (every proposed token). Prompt tokens count for no row.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch

from sharpening.selection import best_of_n

SELF_REWARDS = ("loglik", "loglik_norm")
"""Self-rewards that best-of-N ranks draws by unless ``--protocol.rewards`` names others (method.md §2): names in
``sharpening.rewards.REWARDS``, which scores them."""

METHODS = ("bon_loglik", "bon_loglik_norm", "maj", "pass")
"""Methods reported for every N by default: best-of-N per self-reward, majority vote, pass@N (an oracle bound)."""


@dataclass
class SeedDraws:
    """One seed's draws over all prompts, reduced to what the protocol needs (no text, no model)."""

    correct: torch.Tensor  # [P, N] bool, the draw's extracted answer matches the reference
    answer_codes: torch.Tensor  # [P, N] long, id of the extracted answer within its prompt; -1 when none
    scores: dict[str, torch.Tensor]  # self-reward name (loglik and --protocol.rewards) -> [P, N] float32
    lengths: torch.Tensor  # [P, N] long, response tokens (EOS included)
    truncated: torch.Tensor  # [P, N] bool, hit max_new_tokens before EOS

    @property
    def loglik(self) -> torch.Tensor:  # [P, N] float32, log-likelihood of the draw under the scoring model
        return self.scores["loglik"]

    @staticmethod
    def concat(parts: Sequence[SeedDraws]) -> SeedDraws:
        """Stack prompt batches of one seed along the prompt axis."""
        fields = ("correct", "answer_codes", "lengths", "truncated")
        scores = {name: torch.cat([p.scores[name] for p in parts]) for name in parts[0].scores}
        return SeedDraws(scores=scores, **{f: torch.cat([getattr(p, f) for p in parts]) for f in fields})


def answer_codes(answers: list[list[str | None]]) -> torch.Tensor:
    """Answers [P][N] -> [P, N] long codes; equal answers of one prompt share a code; None -> -1.

    >>> answer_codes([["4", "5", "4", None]])
    tensor([[ 0,  1,  0, -1]])
    """
    rows = []
    for group in answers:
        seen: dict[str, int] = {}
        rows.append([-1 if a is None else seen.setdefault(a, len(seen)) for a in group])
    return torch.tensor(rows, dtype=torch.long)


def nested_best_of_n(
    scores: torch.Tensor, truncated: torch.Tensor, n: int, truncated_policy: str = "drop"
) -> torch.Tensor:
    """Index of the best of the FIRST ``n`` draws per prompt: [P, N_max] -> [P] long (into N_max)."""
    return best_of_n(scores[:, :n], truncated[:, :n], truncated_policy)  # [P, N_max] -> [P, n] -> [P]


def majority_vote_indices(codes: torch.Tensor, n: int) -> torch.Tensor:
    """Index of the first draw carrying the most frequent answer among the first ``n``: [P, N] -> [P].

    Ties go to the answer that appears first; -1 where none of the ``n`` draws has an answer.

    >>> majority_vote_indices(torch.tensor([[3, 1, 1, 3, 2], [-1, -1, 0, 1, 1]]), 4)
    tensor([0, 2])
    """
    sub = codes[:, :n]  # [P, n]
    counts = (sub[:, :, None] == sub[:, None, :]).sum(-1)  # [P, n]: how often each draw's answer occurs
    counts = counts.masked_fill(sub < 0, -1)
    best = counts.argmax(-1)  # first maximum: the earliest draw of the winning answer
    return torch.where(counts.max(-1).values > 0, best, torch.full_like(best, -1))


def majority_vote_correct(codes: torch.Tensor, correct: torch.Tensor, n: int) -> torch.Tensor:
    """maj@n per prompt: whether the majority answer of the first ``n`` draws is right. [P, N] -> [P] bool."""
    idx = majority_vote_indices(codes, n)
    return correct.gather(-1, idx.clamp(min=0)[:, None]).squeeze(-1) & (idx >= 0)


def pass_at_n_correct(correct: torch.Tensor, n: int) -> torch.Tensor:
    """pass@n per prompt: whether any of the first ``n`` draws is right. [P, N] -> [P] bool."""
    return correct[:, :n].any(-1)


def percent_lift(accuracy: float, greedy_accuracy: float) -> float | None:
    """100 (acc - acc_greedy) / acc_greedy; None (undefined) when greedy accuracy is 0.

    >>> round(percent_lift(0.6, 0.5), 6), percent_lift(0.3, 0.0)
    (20.0, None)
    """
    if greedy_accuracy == 0:
        return None
    return 100.0 * (accuracy - greedy_accuracy) / greedy_accuracy


def points_lift(accuracy: float, greedy_accuracy: float) -> float:
    """Lift in accuracy points: 100 (acc - acc_greedy).

    >>> round(points_lift(0.6, 0.5), 6)
    10.0
    """
    return 100.0 * (accuracy - greedy_accuracy)


def mean_stderr(values: Sequence[float | None]) -> dict:
    """{'mean', 'stderr', 'per_seed'} over seeds; stderr = sample std (ddof 1) / sqrt(S).

    stderr is None for a single seed; both are None when any value is None (undefined).

    >>> mean_stderr([1.0, 3.0])
    {'mean': 2.0, 'stderr': 1.0, 'per_seed': [1.0, 3.0]}
    """
    values = list(values)
    if not values or any(v is None for v in values):
        return {"mean": None, "stderr": None, "per_seed": values}
    mean = sum(values) / len(values)
    if len(values) < 2:
        return {"mean": mean, "stderr": None, "per_seed": values}
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return {"mean": mean, "stderr": math.sqrt(var / len(values)), "per_seed": values}


def _mean(x: torch.Tensor) -> float | None:
    return float(x.float().mean()) if x.numel() else None


def drawn_tokens(lengths: torch.Tensor, n: int) -> float:
    """Response tokens of the first ``n`` draws, summed per prompt, mean over prompts: [P, N] -> one number.

    >>> drawn_tokens(torch.tensor([[3, 5, 9], [1, 1, 9]]), 2)
    5.0
    """
    return float(lengths[:, :n].sum(-1).float().mean())  # [P, N] -> [P, n] -> [P] -> mean


def seed_metrics(draws: SeedDraws, n_values: Sequence[int], truncated_policy: str = "drop",
                 rescored: bool | Collection[str] = False, rewards: Sequence[str] = SELF_REWARDS) -> dict:  # fmt: skip
    """One seed's numbers: {method: {n: {'accuracy', 'chosen_loglik', 'tokens'}}}, and 'sample': {...} for one draw.

    The methods: ``bon_<reward>`` for each of ``rewards`` (keys of ``draws.scores``), then maj and pass.
    chosen_loglik is the mean log-likelihood (under the scoring model) of the chosen draws (for 'sample',
    of all draws); None for pass@N, which chooses nothing. tokens is the mean response tokens spent per prompt
    (module docstring); ``rescored``: the rewards whose scores came from a teacher-forced pass over the N draws
    (True: all of them).
    """
    sample = {"accuracy": _mean(draws.correct), "chosen_loglik": _mean(draws.loglik), "tokens": _mean(draws.lengths)}
    out: dict = {"sample": sample, **{f"bon_{r}": {} for r in rewards}, "maj": {}, "pass": {}}
    for n in n_values:
        tokens = drawn_tokens(draws.lengths, n)
        for reward in rewards:
            idx = nested_best_of_n(draws.scores[reward], draws.truncated, n, truncated_policy)[:, None]
            twice = rescored is True or (not isinstance(rescored, bool) and reward in rescored)
            out[f"bon_{reward}"][n] = {
                "accuracy": _mean(draws.correct.gather(-1, idx)),
                "chosen_loglik": _mean(draws.loglik.gather(-1, idx)),
                "tokens": 2 * tokens if twice else tokens,
            }
        maj = majority_vote_indices(draws.answer_codes, n)
        voted = maj >= 0
        out["maj"][n] = {
            "accuracy": _mean(majority_vote_correct(draws.answer_codes, draws.correct, n)),
            "chosen_loglik": _mean(draws.loglik[voted].gather(-1, maj[voted][:, None])),
            "tokens": tokens,
        }
        out["pass"][n] = {"accuracy": _mean(pass_at_n_correct(draws.correct, n)), "chosen_loglik": None,
                          "tokens": tokens}  # fmt: skip
    return out


@dataclass
class PowerDraws:
    """One seed's power samples over all prompts (one per prompt), with what each cost."""

    draws: SeedDraws  # [P, 1] per field: the returned sample of each prompt
    tokens_spent: torch.Tensor  # [P] long, tokens the sampler decoded for the prompt (every proposal)
    acceptance_rate: torch.Tensor | None  # [P] float32, accepted share of MCMC proposals; None for SMC

    @staticmethod
    def concat(parts: Sequence[PowerDraws]) -> PowerDraws:
        """Stack prompt batches of one seed along the prompt axis."""
        rates = [p.acceptance_rate for p in parts]
        return PowerDraws(
            SeedDraws.concat([p.draws for p in parts]),
            torch.cat([p.tokens_spent for p in parts]),
            None if any(r is None for r in rates) else torch.cat(rates),
        )


def power_metrics(power: PowerDraws) -> dict:
    """One seed's power-sampling cell: {'accuracy', 'chosen_loglik', 'tokens', 'acceptance_rate'}."""
    rate = power.acceptance_rate
    return {
        "accuracy": _mean(power.draws.correct),
        "chosen_loglik": _mean(power.draws.loglik),
        "tokens": _mean(power.tokens_spent),
        "acceptance_rate": None if rate is None else _mean(rate),
    }


def _row(method: str, n: int, cells: Sequence[dict], greedy: float) -> dict:
    """One table row from per-seed cells ({'accuracy', 'chosen_loglik', 'tokens'}, and 'acceptance_rate' for power
    rows): accuracy, both lifts, the chosen log-likelihood and tokens, each as mean and stderr over seeds."""
    accuracies = [c["accuracy"] for c in cells]
    row: dict = {"method": method, "n": n}
    stats = {
        "accuracy": mean_stderr(accuracies),
        "lift_percent": mean_stderr([None if a is None else percent_lift(a, greedy) for a in accuracies]),
        "lift_points": mean_stderr([None if a is None else points_lift(a, greedy) for a in accuracies]),
        "chosen_loglik": mean_stderr([c["chosen_loglik"] for c in cells]),
        "tokens": mean_stderr([c.get("tokens") for c in cells]),
    }
    if "acceptance_rate" in cells[0]:
        stats["acceptance_rate"] = mean_stderr([c["acceptance_rate"] for c in cells])
    for name, stat in stats.items():
        row[name], row[f"{name}_stderr"] = stat["mean"], stat["stderr"]
    row["accuracy_per_seed"] = stats["accuracy"]["per_seed"]
    return row


def protocol_table(per_seed: Sequence[dict], greedy: dict, n_values: Sequence[int],
                   power: dict[str, Sequence[dict]] | None = None) -> list[dict]:  # fmt: skip
    """Rows for greedy, single sample, then every method and N, then one row per power-sampling setting.

    ``per_seed``: one :func:`seed_metrics` result per seed; ``greedy``: {'accuracy', 'chosen_loglik'} and
    optionally 'tokens' of the one greedy run (its lift is 0 by definition); ``power``: {row method name: one
    :func:`power_metrics` result per seed}, each reported at n = 1 (one returned sample per prompt).
    """
    g = greedy["accuracy"]
    rows = [_row("greedy", 1, [greedy], g), _row("sample", 1, [m["sample"] for m in per_seed], g)]
    methods = [m for m in per_seed[0] if m != "sample"] if per_seed else METHODS  # bon_<reward>..., maj, pass
    for method in methods:
        for n in n_values:
            rows.append(_row(method, n, [m[method][n] for m in per_seed], g))
    for method, cells in (power or {}).items():
        rows.append(_row(method, 1, cells, g))
    return rows


def loglik_histogram(per_seed: Sequence[SeedDraws], bins: int = 40, low_quantile: float = 0.005) -> dict:
    """Distribution of draws' log-likelihoods, correct vs incorrect, over all seeds (finite values only).

    The range runs from the ``low_quantile`` of all values to the maximum; values below it are counted in
    the first bin (a few very unlikely draws would otherwise squeeze every other bar into one).
    Returns {'edges': [bins+1], 'correct': [bins] counts, 'incorrect': [bins] counts, and per group
    'count' and 'mean' (of the unclipped values)}.
    """
    loglik = torch.cat([d.loglik.flatten() for d in per_seed]).float()  # [S*P*N]
    correct = torch.cat([d.correct.flatten() for d in per_seed])
    finite = torch.isfinite(loglik)
    loglik, correct = loglik[finite], correct[finite]
    lo, hi = (float(loglik.quantile(low_quantile)), float(loglik.max())) if loglik.numel() else (0.0, 1.0)
    hi = hi if hi > lo else lo + 1.0
    edges = torch.linspace(lo, hi, bins + 1)
    out: dict = {"edges": edges.tolist()}
    for name, mask in (("correct", correct), ("incorrect", ~correct)):
        values = loglik[mask]
        clipped = values.clamp(min=lo)
        out[name] = torch.histc(clipped, bins=bins, min=lo, max=hi).long().tolist() if values.numel() else [0] * bins
        out[f"{name}_count"] = int(values.numel())
        out[f"{name}_mean"] = _mean(values)
    return out
