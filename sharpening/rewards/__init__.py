"""Self-rewards: what the model itself says about its own responses, one table of them.

A self-reward is a function of what one teacher-forced pass gives (the response's per-token log-probs,
statistics of the full next-token distribution in ``TokenStats``) and of the group's extracted answers.
Its :class:`SelfReward` entry states which model scores (``base``: the frozen verifier; ``policy``: the
model being trained, from the weights that drew the group) and whether it reads one sample or the group.
All rewards are "higher is better", [B, N] float32. EOS is part of the response and is scored.
``REWARDS`` is the table the training round, RL and ``sharpen evaluate`` read (method.md §2); a user adds
their own by import path (:func:`resolve_reward`).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

from sharpening.errors import ConfigError
from sharpening.rewards.functions import (
    length_normalized_reward,
    loglik_reward,
    majority_answer,
    majority_binary_reward,
    majority_vote_reward,
    neg_mean_token_entropy_reward,
    neg_token_entropy_reward,
    self_certainty_reward,
    soft_majority_reward,
)
from sharpening.types import TokenStats

__all__ = [
    "INPUTS",
    "REWARDS",
    "SelfReward",
    "combined_reward",
    "declaration_problems",
    "extract_answers",
    "length_normalized_reward",
    "loglik_reward",
    "majority_answer",
    "majority_binary_reward",
    "majority_vote_reward",
    "neg_mean_token_entropy_reward",
    "neg_token_entropy_reward",
    "resolve_reward",
    "resolve_task_reward",
    "score_samples",
    "self_certainty_reward",
    "self_reward",
    "soft_majority_reward",
    "task_reward_scores",
]

INPUTS = ("token_logprobs", "response_mask", "answers", "stats")
"""The arguments a reward function may name, as :func:`score_samples` passes them."""

# ---------------------------------------------------------------- the table


@dataclass(frozen=True)
class SelfReward:
    """A named self-reward and what it needs. ``fn`` takes some of :data:`INPUTS` by name and returns [B, N].

    ``scored_by`` says which model's teacher-forced pass gives its log-probs and statistics: ``base`` (the frozen
    verifier) or ``policy`` (the model being trained, from the weights that drew the group, never a stale copy).
    A reward of the answers alone runs no model; its ``scored_by`` names the draws it was designed for.
    ``per``: ``sample`` when a sample's score reads only that sample, ``group`` when it reads its prompt's N.
    """

    name: str
    fn: Callable[..., torch.Tensor] = field(repr=False)
    scored_by: Literal["base", "policy"]
    per: Literal["sample", "group"]
    needs_stats: bool  # reads ``stats`` (TokenStats): score with ``token_stats.sample_token_stats``
    needs_answers: bool  # reads ``answers`` [B][N], the extracted answers of the group
    description: str  # one line: the formula and its citation

    @property
    def inputs(self) -> tuple[str, ...]:
        """The arguments ``fn`` names, in its order."""
        return tuple(inspect.signature(self.fn).parameters)

    @property
    def needs_logprobs(self) -> bool:
        """True when ``fn`` reads the response's per-token log-probs."""
        return "token_logprobs" in self.inputs


def self_reward(
    scored_by: Literal["base", "policy"], per: Literal["sample", "group"], description: str, name: str | None = None
) -> Callable[[Callable[..., torch.Tensor]], SelfReward]:
    """Declare a function a self-reward (what :func:`resolve_reward` accepts by import path); the inputs it
    needs come from its parameter names.

    >>> @self_reward("policy", "sample", "minus the response length")
    ... def short(response_mask):
    ...     return -response_mask.sum(-1).float()
    >>> short.needs_stats, short.needs_logprobs, short.name
    (False, False, 'short')
    """

    def declare(fn: Callable[..., torch.Tensor]) -> SelfReward:
        parameters = inspect.signature(fn).parameters
        return SelfReward(
            name or fn.__name__, fn, scored_by, per, "stats" in parameters, "answers" in parameters, description
        )

    return declare


_BUILT_IN = [  # name, function, scored_by, per, description (method.md §2)
    ("loglik", loglik_reward, "base", "sample", "log pi_base(y|x) (Huang et al. 2025, arXiv 2412.01951)"),
    ("loglik_norm", length_normalized_reward, "base", "sample", "log pi_base(y|x) / |y| (arXiv 2412.01951)"),
    ("majority", majority_vote_reward, "base", "group", "the answer's share of the N (arXiv 2412.01951)"),
    ("majority_binary", majority_binary_reward, "policy", "group", "1[answer = majority] (TTRL, SRT)"),
    ("soft_majority", soft_majority_reward, "policy", "group", "answer cluster's frequency (EMPO 2504.05812)"),
    ("policy_loglik", loglik_reward, "policy", "sample", "log pi_theta(y|x) (EM-RL sequence, 2505.15134)"),
    ("neg_token_entropy", neg_token_entropy_reward, "policy", "sample", "-sum_t H_t (EM-RL token, 2505.15134)"),
    ("neg_mean_token_entropy", neg_mean_token_entropy_reward, "policy", "sample", "-mean_t H_t (RENT 2505.22660)"),
    ("self_certainty", self_certainty_reward, "policy", "sample", "mean_t KL(U || p_t) (Intuitor 2505.19590)"),
]
REWARDS: dict[str, SelfReward] = {n: self_reward(s, p, d, n)(f) for n, f, s, p, d in _BUILT_IN}
"""Built-in self-reward name -> :class:`SelfReward` (method.md §2 has the table with formulas)."""


def declaration_problems(reward: SelfReward) -> list[str]:
    """What is wrong with a reward's declaration (each a phrase), empty when nothing is."""
    problems = []
    if reward.scored_by not in ("base", "policy"):
        problems.append(f"scored_by={reward.scored_by!r} must be 'base' or 'policy'")
    if reward.per not in ("sample", "group"):
        problems.append(f"per={reward.per!r} must be 'sample' or 'group'")
    if not callable(reward.fn):
        return [*problems, f"fn is a {type(reward.fn).__name__}, not a function"]
    unknown = [p for p in reward.inputs if p not in INPUTS]
    if unknown:
        problems.append(f"fn takes {', '.join(unknown)}; a reward may take only {', '.join(INPUTS)}")
    if reward.needs_stats != ("stats" in reward.inputs) or reward.needs_answers != ("answers" in reward.inputs):
        problems.append("needs_stats / needs_answers disagree with fn's parameters (declare it with self_reward)")
    if not reward.description:
        problems.append("description is empty")
    return problems


def resolve_reward(name: str | SelfReward, option: str = "reward") -> SelfReward:
    """A built-in self-reward by name, or a :class:`SelfReward` by import path ('pkg.mod:name' or 'pkg.mod.name').

    Raises ConfigError naming ``option`` (the setting as the user types it, e.g. ``--verifier.selection.reward``).
    """
    if isinstance(name, SelfReward):
        found = name
    elif name in REWARDS:
        return REWARDS[name]
    else:
        found = _import(name, option)
    if not isinstance(found, SelfReward):
        what = f"{type(found).__name__} {getattr(found, '__qualname__', '')}".strip()
        fix = (
            "wrap it with @sharpening.rewards.self_reward(scored_by='base' or 'policy', per='sample' or 'group', "
            "description='...') so that it declares which model scores it and what it reads"
            if callable(found)
            else "point it at a function declared with @sharpening.rewards.self_reward(...)"
        )
        state = "declares no scored_by / per" if callable(found) else "is not callable"
        raise ConfigError([f"{option}={name!r}: {what} {state}; {fix}"])
    problems = declaration_problems(found)
    if problems:
        raise ConfigError([f"{option}={name!r}: {p}" for p in problems])
    return found


def _import(name: str, option: str):
    module_name, _, attr = name.rpartition(":") if ":" in name else name.rpartition(".")
    if not module_name:
        raise ConfigError(
            [
                f"{option}={name!r}: unknown self-reward; choose one of {', '.join(REWARDS)}, "
                "or give the import path 'package.module:function' of your own"
            ]
        )
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError([f"{option}={name!r}: cannot import it ({err})"]) from err


def score_samples(
    reward: str | SelfReward,
    token_logprobs: torch.Tensor | None = None,
    response_mask: torch.Tensor | None = None,
    answers: list[list[str | None]] | None = None,
    stats: TokenStats | None = None,
) -> torch.Tensor:
    """The self-reward ``reward`` (a name, an import path or a :class:`SelfReward`) of every sample: [B, N] float32.

    Pass what the reward reads (``resolve_reward(reward).inputs``): ``token_logprobs`` [B, N, T] and
    ``response_mask`` [B, N, T] of the model it is ``scored_by``, ``stats`` (TokenStats [B, N, T]) from the same
    pass, the extracted ``answers`` [B][N].

    >>> score_samples("loglik_norm", torch.tensor([[[-1.0, -0.5, 0.0]]]), torch.tensor([[[True, True, False]]]))
    tensor([[-0.7500]])
    """
    entry = resolve_reward(reward)
    given = {"token_logprobs": token_logprobs, "response_mask": response_mask, "answers": answers, "stats": stats}
    missing = [name for name in entry.inputs if given[name] is None]
    if missing:
        raise ValueError(f"self-reward {entry.name!r} reads {', '.join(missing)}; none was passed to score_samples")
    return entry.fn(**{name: given[name] for name in entry.inputs}).float()


# ---------------------------------------------------------------- task rewards


def resolve_task_reward(path: str, option: str = "task_reward") -> Callable[[str, str | None], float]:
    """A task reward ``(response text, reference answer or None) -> float`` by import path ('pkg.mod:function')."""
    found = _import(path, option)
    if not callable(found):
        raise ConfigError(
            [f"{option}={path!r}: {type(found).__name__} is not callable; give a function (text, answer)"]
        )
    return found


def task_reward_scores(
    texts: list[list[str]], reference_answers: list[str | None], task_reward: Callable[[str, str | None], float]
) -> torch.Tensor:
    """``task_reward`` of every response against its prompt's reference answer: [B][N] texts, B answers -> [B, N]."""
    rows = [[float(task_reward(text, answer)) for text in group] for group, answer in zip(texts, reference_answers)]
    return torch.tensor(rows, dtype=torch.float32)


def combined_reward(self_scores: torch.Tensor, task_scores: torch.Tensor, weight: float) -> torch.Tensor:
    """A self-reward plus ``weight`` times a task reward, both [B, N] -> [B, N] float32.

    >>> combined_reward(torch.tensor([[-2.0, -1.0]]), torch.tensor([[1.0, 0.0]]), 0.5)
    tensor([[-1.5000, -1.0000]])
    """
    return self_scores.float() + weight * task_scores.float()


def extract_answers(texts: list[list[str]], extractor: Callable[[str], str | None]) -> list[list[str | None]]:
    """Apply ``extractor`` to every response text, keeping the [B][N] shape."""
    return [[extractor(t) for t in group] for group in texts]
