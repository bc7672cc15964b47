"""Scoring samples by a registered self-reward: the teacher-forced pass the reward needs, on the model that scores
it, and the weighted external task reward. The training round, RL's rollouts and `sharpen evaluate` score here.

Which model scores is the reward's ``scored_by`` and the caller's context: ``base`` rewards are scored by the
frozen base, ``policy`` rewards by the model that DREW the samples (its weights at the draw: never a later
update's). The pass computed is the least the reward reads: none for answer-only rewards, the sampler's own
log-probs when the scorer drew the samples exactly (method.md §4.4), a teacher-forced pass otherwise, and the
vocabulary statistics (``token_stats.sample_token_stats``) only for rewards that declare ``needs_stats``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from sharpening import logprobs, token_stats
from sharpening.rewards import SelfReward, combined_reward, score_samples, task_reward_scores
from sharpening.types import SampleBatch

ModelContext = Callable[[], contextlib.AbstractContextManager[torch.nn.Module]]
TaskReward = Callable[[str, "str | None"], float]  # (response text, the prompt's reference answer) -> float


def score_reward(
    reward: SelfReward,
    samples: SampleBatch,
    answers: list[list[str | None]] | None,
    scorer: ModelContext,
    chunk_size: int,
    scorer_drew: bool,
) -> torch.Tensor:
    """``reward`` of every sample, [B, N] float32. ``scorer``: the model that scores it, entered only when a pass
    is needed; ``scorer_drew``: the samples are that model's own draws, so exact draws' log-probs are reused.
    ``answers`` [B][N]: the extracted answers (read when ``reward.needs_answers``)."""
    token_logprobs = stats = None
    if reward.needs_stats:
        with scorer() as model, torch.no_grad():
            token_logprobs, stats = token_stats.sample_token_stats(model, samples, chunk_size)  # [B, N, T], TokenStats
    elif reward.needs_logprobs:
        if scorer_drew and samples.exact_draws:
            token_logprobs = samples.logprobs
        else:
            with scorer() as model, torch.no_grad():
                token_logprobs = logprobs.sample_logprobs(model, samples, chunk_size)  # [B, N, T]
    return score_samples(reward, token_logprobs, samples.response_mask, answers, stats)


def with_task_reward(
    scores: torch.Tensor, task_reward: TaskReward | None, weight: float, texts: list[list[str]], references
) -> torch.Tensor:
    """``scores`` [B, N] plus ``weight`` times the task reward of each response (``scores`` unchanged without one)."""
    if task_reward is None:
        return scores
    task = task_reward_scores(texts, references, task_reward).to(scores.device)  # [B, N]
    return combined_reward(scores, task, weight)
