"""Which samples to keep, from their [B, N] scores, and the bound that lets the sampler stop a sample that can no
longer be kept. Pure and deterministic, ties included."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

TRUNCATED_POLICIES = ("drop", "keep", "penalize")


@dataclass
class SelectionConfig:
    """How samples are scored and kept."""

    reward: str = "loglik"
    """Self-reward: a name in ``sharpening.rewards.REWARDS`` (loglik = log pi_base(y|x), the paper's; loglik_norm =
    per token; majority = answer frequency; self_certainty, ...) or an import path 'pkg.mod:func' of your own."""
    keep_top_k: int = 1
    """Samples kept per prompt (1 = best-of-N)."""
    truncated: Literal["drop", "keep", "penalize"] = "drop"
    """Responses cut at max_new_tokens (no EOS) score unfairly high: drop them, keep them, or penalize them."""
    truncation_penalty: float = 10.0
    """Subtracted from a truncated response's score when truncated=penalize."""
    min_score: float | None = None
    """Samples scoring below this are never kept (None = no threshold)."""
    answer_extractor: str = "strip"
    """Answer extraction for majority vote and accuracy: a built-in name or a dotted import path."""
    task_reward: str | None = None
    """An external task reward added to the self-reward: import path of a function of (response text, the
    prompt's reference answer or None) -> float (null = none)."""
    task_reward_weight: float = 1.0
    """The weight w of the task reward: a sample's score is self-reward + w * task reward."""
    answer_entropy_band: tuple[float, float] | None = None
    """EMPO's filter: [low, high] nats; a prompt whose N answers' entropy is outside keeps nothing (below: too easy,
    above: too hard; ``diagnostics.answer_entropy``). null = every prompt."""


def validate_selection_config(cfg: SelectionConfig, samples_per_prompt: int, option: str) -> list[str]:
    """Every problem with ``cfg``, each naming ``option.<field>``."""
    problems = reward_problems(cfg.reward, cfg.task_reward, cfg.task_reward_weight, option)
    if not 1 <= cfg.keep_top_k <= max(samples_per_prompt, 1):
        problems.append(
            f"{option}.keep_top_k={cfg.keep_top_k}: must be between 1 and samples_per_prompt ({samples_per_prompt})"
        )
    if cfg.truncated not in TRUNCATED_POLICIES:
        problems.append(f"{option}.truncated={cfg.truncated!r}: must be one of {', '.join(TRUNCATED_POLICIES)}")
    band = cfg.answer_entropy_band
    if band is not None and not (len(band) == 2 and 0 <= band[0] <= band[1]):
        problems.append(f"{option}.answer_entropy_band={band}: must be [low, high] nats with 0 <= low <= high")
    return problems


def reward_problems(reward: str, task_reward: str | None, task_reward_weight: float, option: str) -> list[str]:
    """Whether ``reward`` names a registered self-reward or imports one, and ``task_reward`` a function, each
    problem naming ``option.<field>`` (shared by --verifier.selection and --model.rl)."""
    from sharpening.errors import ConfigError
    from sharpening.rewards import resolve_reward, resolve_task_reward  # rewards imports torch only

    problems = []
    try:
        resolve_reward(reward, f"{option}.reward")
    except ConfigError as err:
        problems += err.problems
    if task_reward is not None:
        try:
            resolve_task_reward(task_reward, f"{option}.task_reward")
        except ConfigError as err:
            problems += err.problems
    if not abs(task_reward_weight) < float("inf"):
        problems.append(f"{option}.task_reward_weight={task_reward_weight}: must be a finite number, e.g. 1.0")
    return problems


def select_top_k(
    scores: torch.Tensor,
    truncated: torch.Tensor,
    keep_top_k: int = 1,
    truncated_policy: str = "drop",
    truncation_penalty: float = 10.0,
    min_score: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``keep_top_k`` best samples per prompt, best first.

    scores [B, N] (higher is better), truncated [B, N] bool. Ties go to the lower sample index.
    Non-finite scores, dropped truncated samples and scores under ``min_score`` are ineligible.
    Returns (selected [B, K] long indices into N, selected_mask [B, K] bool: False where no eligible
    sample was left for that slot).
    """
    adjusted = scores.float().clone()
    eligible = torch.isfinite(adjusted)
    if truncated_policy == "drop":
        eligible &= ~truncated
    elif truncated_policy == "penalize":
        adjusted = adjusted - truncation_penalty * truncated.float()
    elif truncated_policy != "keep":
        raise ValueError(f"unknown truncated policy {truncated_policy!r}; choose one of {TRUNCATED_POLICIES}")
    if min_score is not None:
        eligible &= adjusted >= min_score
    ranked = torch.where(eligible, adjusted, torch.full_like(adjusted, float("-inf")))
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices[:, :keep_top_k]  # [B, K]
    return order, eligible.gather(-1, order)


def best_of_n(
    scores: torch.Tensor, truncated: torch.Tensor | None = None, truncated_policy: str = "keep"
) -> torch.Tensor:
    """Index of the best sample per prompt, [B, N] -> [B]; falls back to sample 0 when none is eligible."""
    truncated = torch.zeros_like(scores, dtype=torch.bool) if truncated is None else truncated
    selected, mask = select_top_k(scores, truncated, 1, truncated_policy)
    return torch.where(mask[:, 0], selected[:, 0], torch.zeros_like(selected[:, 0]))


def mark_unselectable(
    running_logprobs: torch.Tensor, row_ids: torch.Tensor, end_scores: torch.Tensor, keep_top_k: int
) -> torch.Tensor:
    """The rows that can no longer be among their prompt's ``keep_top_k`` best by log-likelihood, so the sampler
    may stop drawing them (``stop_unselectable``).

    A row's log-likelihood only falls as tokens are added (each log-prob is <= 0), so once its summed log-prob so
    far is below the k-th best response of its prompt that already ended by EOS, its final score is too, and
    ``select_top_k`` would not keep it. A margin of 1e-4 relative keeps float rounding of the final sum from
    turning a near-tie into a wrong stop; sample 0 is never stopped, so every prompt has one whole response.

    running_logprobs [A] per live row, row_ids [A] their original rows (row r is prompt r // N's sample r % N),
    end_scores [B, N] (-inf until a row ends by EOS). Returns [A] bool."""
    n = end_scores.shape[1]
    bound = end_scores.topk(min(keep_top_k, n), dim=-1).values[:, -1]  # [B]: -inf while fewer than k have ended
    bound = bound.index_select(0, row_ids // n)  # [B] -> [A]
    return (running_logprobs < bound - 1e-4 * (1.0 + bound.abs())) & (row_ids % n != 0)
