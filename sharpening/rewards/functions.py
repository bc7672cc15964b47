"""The self-rewards' maths: functions of a response's per-token log-probs, of the statistics of its
next-token distributions (``TokenStats``) or of its group's extracted answers. [B, N] float32, higher is
better; ``sharpening.rewards`` declares each one (which model scores it, per sample or group).
"""

from __future__ import annotations

import math
from collections import Counter

import torch

from sharpening.types import TokenStats

# ---------------------------------------------------------------- per-sample rewards of the log-probs


def loglik_reward(token_logprobs: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """log pi(y|x): the sum of response-token log-probs, in float32. [..., T] -> [...].

    >>> loglik_reward(torch.tensor([[-1.0, -0.5, 0.0]]), torch.tensor([[True, True, False]]))
    tensor([-1.5000])
    """
    return (token_logprobs.float() * response_mask).sum(-1)


def length_normalized_reward(token_logprobs: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """log pi(y|x) / |y|, |y| in tokens (EOS included); 0 for empty responses. [..., T] -> [...].

    >>> length_normalized_reward(torch.tensor([[-1.0, -0.5, 0.0]]), torch.tensor([[True, True, False]]))
    tensor([-0.7500])
    """
    lengths = response_mask.sum(-1).clamp(min=1)
    return loglik_reward(token_logprobs, response_mask) / lengths


# ---------------------------------------------------------------- per-sample rewards of the token statistics


def neg_token_entropy_reward(response_mask: torch.Tensor, stats: TokenStats) -> torch.Tensor:
    """-sum_t H_t: minus the summed next-token entropy over the response (EM-RL, token variant). [..., T] -> [...].

    >>> s = TokenStats(torch.tensor([[0.5, 0.25, 9.0]]), torch.zeros(1, 3), torch.zeros(1, 3), 4)
    >>> neg_token_entropy_reward(torch.tensor([[True, True, False]]), s)
    tensor([-0.7500])
    """
    return -(stats.entropy.float() * response_mask).sum(-1)


def neg_mean_token_entropy_reward(response_mask: torch.Tensor, stats: TokenStats) -> torch.Tensor:
    """-(1/|y|) sum_t H_t: minus the mean next-token entropy (RENT); 0 for empty responses. [..., T] -> [...].

    >>> s = TokenStats(torch.tensor([[0.5, 0.25, 9.0]]), torch.zeros(1, 3), torch.zeros(1, 3), 4)
    >>> neg_mean_token_entropy_reward(torch.tensor([[True, True, False]]), s)
    tensor([-0.3750])
    """
    return neg_token_entropy_reward(response_mask, stats) / response_mask.sum(-1).clamp(min=1)


def self_certainty_reward(response_mask: torch.Tensor, stats: TokenStats) -> torch.Tensor:
    """Self-certainty (Intuitor): (1/|y|) sum_t KL(U || p_t), U uniform over the V logits, 0 for empty responses.

    KL(U || p) = sum_v (1/V) log((1/V) / p_v) = -log V - (1/V) sum_v log p_v, and log p_v = z_v - logsumexp(z),
    so KL(U || p) = logsumexp(z) - mean_v z_v - log V: zero for a uniform p, large for a peaked one. [..., T] -> [...].

    >>> s = TokenStats(torch.zeros(1, 2), torch.tensor([[math.log(4.0), 3.0]]), torch.tensor([[0.0, 1.0]]), 4)
    >>> self_certainty_reward(torch.tensor([[True, False]]), s)  # one uniform position: KL 0
    tensor([0.])
    """
    per_token = stats.logsumexp.float() - stats.mean_logit.float() - math.log(stats.vocab_size)  # [..., T]
    return (per_token * response_mask).sum(-1) / response_mask.sum(-1).clamp(min=1)


# ---------------------------------------------------------------- per-group rewards of the answers


def majority_vote_reward(answers: list[list[str | None]]) -> torch.Tensor:
    """Share of a prompt's N samples whose extracted answer equals this sample's; 0 where none was found.

    >>> majority_vote_reward([["4", "4", "5", None]])
    tensor([[0.5000, 0.5000, 0.2500, 0.0000]])
    """
    rows = []
    for group in answers:
        counts = Counter(a for a in group if a is not None)
        rows.append([counts[a] / len(group) if a is not None else 0.0 for a in group])
    return torch.tensor(rows, dtype=torch.float32)


def majority_answer(group: list[str | None]) -> str | None:
    """The most frequent answer of a group; a tie goes to the answer reached first (lowest sample index).

    >>> majority_answer(["5", "4", "4", "5", None])
    '5'
    """
    counts = Counter(a for a in group if a is not None)  # insertion order: first reached first
    return max(counts, key=counts.__getitem__) if counts else None


def majority_binary_reward(answers: list[list[str | None]]) -> torch.Tensor:
    """1 where a sample's answer is its group's majority answer (``majority_answer``), else 0 (TTRL, SRT).

    >>> majority_binary_reward([["4", "5", "4", None], [None, None, None, None]])
    tensor([[1., 0., 1., 0.],
            [0., 0., 0., 0.]])
    """
    rows = []
    for group in answers:
        top = majority_answer(group)
        rows.append([float(a is not None and a == top) for a in group])
    return torch.tensor(rows, dtype=torch.float32)


def soft_majority_reward(answers: list[list[str | None]]) -> torch.Tensor:
    """Frequency of a sample's answer cluster among the group's ANSWERED samples (EMPO); 0 without an answer.

    Unanswered samples form no cluster: the clusters' frequencies are a distribution over meanings (the one
    EMPO's semantic entropy is of), so unlike ``majority_vote_reward`` they sum to 1 over a group with answers.

    >>> soft_majority_reward([["4", "4", "5", None]])
    tensor([[0.6667, 0.6667, 0.3333, 0.0000]])
    """
    rows = []
    for group in answers:
        counts = Counter(a for a in group if a is not None)
        answered = max(sum(counts.values()), 1)
        rows.append([counts[a] / answered if a is not None else 0.0 for a in group])
    return torch.tensor(rows, dtype=torch.float32)
