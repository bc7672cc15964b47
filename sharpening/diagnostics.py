"""Collapse diagnostics of a group of responses: pure functions on hand-checkable inputs.

Label-free rewards are known to collapse: responses grow short or long, repeat themselves, the group agrees on
one answer whatever it is, and the token entropy falls. These functions measure each on one round's or one
rollout's samples; ``metrics.SharpeningMetric`` and ``rl.rollout.policy_estimates`` log them. None of them is
used for training, except ``entropy_band_mask`` (EMPO's filter of prompts by the group's answer entropy).
"""

from __future__ import annotations

import math
from collections import Counter

import torch

Answers = list[list[str | None]]  # [B][N] extracted answers, None where the extractor found none


def distinct_ngram_ratio(response_ids: torch.Tensor, response_mask: torch.Tensor, n: int) -> torch.Tensor:
    """Per prompt, distinct n-grams over all n-grams of its group's responses (1: no repetition within or
    across the group; near 0: the group repeats itself). NaN for a group with no n-gram (every response
    shorter than n). [B, N, T] -> [B] float32.

    >>> ids = torch.tensor([[[1, 2, 1, 2], [1, 2, 3, 0]]])
    >>> mask = torch.tensor([[[True, True, True, True], [True, True, True, False]]])
    >>> distinct_ngram_ratio(ids, mask, 2)  # (1,2) (2,1) (1,2) | (1,2) (2,3): 3 distinct of 5
    tensor([0.6000])
    """
    ratios = []
    for group_ids, group_mask in zip(response_ids.cpu(), response_mask.cpu()):  # [N, T]
        seen: set[tuple[int, ...]] = set()
        total = 0
        for ids, mask in zip(group_ids, group_mask):
            tokens = ids[mask].tolist()
            grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
            seen.update(grams)
            total += len(grams)
        ratios.append(len(seen) / total if total else float("nan"))
    return torch.tensor(ratios, dtype=torch.float32)


def majority_share(answers: Answers) -> torch.Tensor:
    """Per prompt, the share of its N samples whose answer is the group's most common one (no answer, None,
    never counts as one; a group without any answer has share 0). [B][N] -> [B] float32.

    >>> majority_share([["4", "4", "5", None], [None, None]])
    tensor([0.5000, 0.0000])
    """
    shares = []
    for group in answers:
        counts = Counter(a for a in group if a is not None)
        shares.append(max(counts.values()) / len(group) if counts else 0.0)
    return torch.tensor(shares, dtype=torch.float32)


def answer_entropy(answers: Answers) -> torch.Tensor:
    """Per prompt, the entropy (nats) of its group's empirical answer distribution, EMPO's semantic entropy with
    answers as the clusters. A sample without an answer (None) is a cluster of its own: unanswered samples make
    a prompt look hard, never easy. 0: all N agree; log N: all differ. [B][N] -> [B] float32.

    >>> answer_entropy([["4", "4", "4", "4"], ["1", "2", None, None]])
    tensor([0.0000, 1.3863])
    """
    entropies = []
    for group in answers:
        counts = Counter(a for a in group if a is not None)
        sizes = list(counts.values()) + [1] * sum(a is None for a in group)
        n = len(group)
        entropies.append(-sum(c / n * math.log(c / n) for c in sizes) + 0.0 if n else 0.0)
    return torch.tensor(entropies, dtype=torch.float32)


def entropy_band_mask(entropy: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Which prompts EMPO keeps: answer entropy within [low, high] (below: the group agrees, too easy to
    learn from; above: it does not agree at all, too hard). [B] -> [B] bool.

    >>> entropy_band_mask(torch.tensor([0.0, 0.5, 1.4]), 0.1, 1.0)
    tensor([False,  True, False])
    """
    return (entropy >= low) & (entropy <= high)


def within_entropy_band(
    selected_mask: torch.Tensor, answers: Answers, band: tuple[float, float] | None
) -> torch.Tensor:
    """The selection with every prompt outside the answer-entropy ``band`` [low, high] dropped (nothing of it
    kept); unchanged when ``band`` is None. [B, K] bool -> [B, K] bool.

    >>> within_entropy_band(torch.ones(2, 1, dtype=torch.bool), [["1", "1"], ["1", "2"]], (0.1, 1.0))
    tensor([[False],
            [ True]])
    """
    if band is None:
        return selected_mask
    inside = entropy_band_mask(answer_entropy(answers), *band).to(selected_mask.device)  # [B]
    return selected_mask & inside[:, None]


def mean_token_entropy(entropy: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Mean over all response tokens of the next-token entropy (nats; ``TokenStats.entropy``). [..., T] -> [].

    >>> mean_token_entropy(torch.tensor([[1.0, 3.0, 9.0]]), torch.tensor([[True, True, False]]))
    tensor(2.)
    """
    mask = response_mask.to(entropy.device)
    return (entropy * mask).sum() / mask.sum().clamp(min=1)


def group_diagnostics(response_ids: torch.Tensor, response_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The label-free diagnostics that need only the tokens, each per prompt [B] float32: mean response
    length (tokens, EOS included) and the distinct 2- and 3-gram ratios. [B, N, T] -> {name: [B]}."""
    return {
        "response_tokens": response_mask.sum(-1).float().mean(-1).cpu(),  # [B, N] -> [B]
        "distinct_2gram": distinct_ngram_ratio(response_ids, response_mask, 2),
        "distinct_3gram": distinct_ngram_ratio(response_ids, response_mask, 3),
    }
