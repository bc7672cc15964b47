"""Self-rewards: how much the frozen base model believes in its own response.

All rewards are "higher is better" and computed from the frozen base only (method.md §2, §4.1-4.3).
EOS is part of the response and is scored: it belongs to the response's probability.
``REWARDS`` is the one table of them: the training round and `sharpen evaluate` both score through
:func:`score_samples`.
"""

from __future__ import annotations

import inspect
from collections import Counter
from collections.abc import Callable

import torch


def loglik_reward(token_logprobs: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """log pi_base(y|x): the sum of response-token log-probs, in float32. [..., T] -> [...].

    >>> loglik_reward(torch.tensor([[-1.0, -0.5, 0.0]]), torch.tensor([[True, True, False]]))
    tensor([-1.5000])
    """
    return (token_logprobs.float() * response_mask).sum(-1)


def length_normalized_reward(token_logprobs: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """log pi_base(y|x) / |y|, |y| in tokens (EOS included); 0 for empty responses. [..., T] -> [...].

    >>> length_normalized_reward(torch.tensor([[-1.0, -0.5, 0.0]]), torch.tensor([[True, True, False]]))
    tensor([-0.7500])
    """
    lengths = response_mask.sum(-1).clamp(min=1)
    return loglik_reward(token_logprobs, response_mask) / lengths


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


REWARDS: dict[str, Callable[..., torch.Tensor]] = {
    "loglik": loglik_reward,
    "loglik_norm": length_normalized_reward,
    "majority": majority_vote_reward,
}
"""Self-reward name -> function. A function names the inputs it reads among :func:`score_samples`' arguments
(``token_logprobs``, ``response_mask``, ``answers``) and returns [B, N] scores, higher is better."""


def score_samples(
    reward: str,
    token_logprobs: torch.Tensor | None = None,
    response_mask: torch.Tensor | None = None,
    answers: list[list[str | None]] | None = None,
) -> torch.Tensor:
    """The self-reward named ``reward`` (a key of :data:`REWARDS`) for every sample: [B, N] float32.

    loglik / loglik_norm need the frozen base's ``token_logprobs`` [B, N, T] and ``response_mask``;
    majority needs the extracted ``answers`` [B][N].

    >>> score_samples("loglik_norm", torch.tensor([[[-1.0, -0.5, 0.0]]]), torch.tensor([[[True, True, False]]]))
    tensor([[-0.7500]])
    """
    if reward not in REWARDS:
        raise ValueError(f"unknown self-reward {reward!r}; choose one of {', '.join(REWARDS)}")
    function = REWARDS[reward]
    given = {"token_logprobs": token_logprobs, "response_mask": response_mask, "answers": answers}
    return function(**{name: given[name] for name in inspect.signature(function).parameters})


def extract_answers(texts: list[list[str]], extractor: Callable[[str], str | None]) -> list[list[str | None]]:
    """Apply ``extractor`` to every response text, keeping the [B][N] shape."""
    return [[extractor(t) for t in group] for group in texts]
