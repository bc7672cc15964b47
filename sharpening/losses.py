"""Pure losses over per-token log-probs. Shapes: [B, T] per-token tensors, masks bool."""

from __future__ import annotations

import torch

from sharpening.selection import TRUNCATED_POLICIES


def masked_nll(
    token_logprobs: torch.Tensor, response_mask: torch.Tensor, token_count: int | None = None
) -> torch.Tensor:
    """Negative log-likelihood of the response tokens (prompt and padding excluded), summed and divided by
    ``token_count``: by default the mask's own count (the batch's token mean); SFT passes the tokens of the
    whole optimizer step, so a batch's loss is its part of the step's token mean. [B, T] -> [].

    >>> masked_nll(torch.tensor([[-1.0, -3.0, 0.0]]), torch.tensor([[True, True, False]]))
    tensor(2.)
    >>> masked_nll(torch.tensor([[-1.0, -3.0, 0.0]]), torch.tensor([[True, True, False]]), token_count=8)
    tensor(0.5000)
    """
    count = response_mask.sum().clamp(min=1) if token_count is None else max(token_count, 1)
    return -(token_logprobs * response_mask).sum() / count


# ---- RL-sharpening (method.md §3.2): maximise E_pi[log pi_base(y|x)] - beta KL(pi || pi_base) ---------
# Shapes: R = B*G samples, T response positions; sequence quantities are sums over response tokens.


def kl_regularized_rewards(
    base_seq: torch.Tensor, policy_seq: torch.Tensor, kl_coef: float, tilt: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-sample signal with the exact sequence KL folded in: (1 + beta) log pi_base(y) - beta log pi(y) + tilt.

    Its expectation under pi is J_beta(pi) = E[log pi_base + tilt] - beta KL(pi || pi_base), maximised by
    pi_base^(1 + 1/beta) exp(tilt / beta); ``tilt`` [...] is the weighted task reward w r(y) (None: 0).
    [...] -> [...].

    >>> kl_regularized_rewards(torch.tensor([-2.0]), torch.tensor([-1.0]), 0.5, torch.tensor([1.0]))
    tensor([-1.5000])
    """
    signal = (1.0 + kl_coef) * base_seq - kl_coef * policy_seq
    return signal if tilt is None else signal + tilt


def apply_truncated_policy(
    rewards: torch.Tensor, truncated: torch.Tensor, policy: str = "keep", penalty: float = 10.0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Treatment of responses cut at max_new_tokens (no EOS), whose prefix log-prob is unfairly high.

    rewards [...] (the per-sample RL signal), truncated [...] bool -> (rewards [...], in_loss [...] bool or None).
    keep: ``rewards`` itself and None (every sample trains). drop: ``rewards`` and ``in_loss = ~truncated``
    (the caller leaves those samples out of the loss and of any baseline). penalize: ``rewards - penalty`` where
    truncated, and None. Apply it to the signal AFTER the KL is folded in (``kl_regularized_rewards``): the
    penalty belongs to the reward r, not to log pi_base inside the KL, where it would count (1 + beta) times.
    """
    if policy == "keep":
        return rewards, None
    if policy == "drop":
        return rewards, ~truncated
    if policy == "penalize":
        return rewards - penalty * truncated.to(rewards.dtype), None
    raise ValueError(f"unknown truncated policy {policy!r}; choose one of {', '.join(TRUNCATED_POLICIES)}")


def group_advantages(
    rewards: torch.Tensor,
    baseline: str = "leave_one_out",
    normalize_std: bool = False,
    in_loss: torch.Tensor | None = None,
) -> torch.Tensor:
    """Advantages within each prompt's group, [B, G] -> [B, G]; zero mean per group.

    leave_one_out: r_i - mean_{j != i} r_j (the baseline is independent of sample i, so the gradient
    estimate stays unbiased); mean: r_i - mean_j r_j. ``normalize_std`` divides by the group std.
    ``in_loss`` [B, G] bool (None = all): only those samples count, in the baseline and std too; the others
    get 0, and so does a group left with one sample (no baseline to compare it with) or none.
    """
    if in_loss is not None:
        return _masked_group_advantages(rewards, in_loss, baseline, normalize_std)
    g = rewards.shape[-1]
    centred = rewards - rewards.mean(-1, keepdim=True)
    if baseline == "leave_one_out":
        if g < 2:
            raise ValueError("a leave-one-out baseline needs at least 2 samples per prompt")
        advantages = centred * g / (g - 1)  # r_i - mean_{j != i} r_j = G/(G-1) * (r_i - mean_j r_j)
    elif baseline == "mean":
        advantages = centred
    else:
        raise ValueError(f"unknown baseline {baseline!r}: use leave_one_out or mean")
    if normalize_std:
        advantages = advantages / (rewards.std(-1, keepdim=True) + 1e-6)
    return advantages


def _masked_group_advantages(
    rewards: torch.Tensor, in_loss: torch.Tensor, baseline: str, normalize_std: bool
) -> torch.Tensor:
    """``group_advantages`` over the samples of ``in_loss`` only; 0 elsewhere and in groups of fewer than 2."""
    if baseline not in ("leave_one_out", "mean"):
        raise ValueError(f"unknown baseline {baseline!r}: use leave_one_out or mean")
    count = in_loss.sum(-1, keepdim=True).to(rewards.dtype)  # [B, 1] samples left per group
    kept = torch.where(in_loss, rewards, torch.zeros_like(rewards))  # a left-out reward is never read (even inf)
    mean = kept.sum(-1, keepdim=True) / count.clamp(min=1)  # [B, 1]
    centred = torch.where(in_loss, kept - mean, torch.zeros_like(rewards))  # [B, G]; 0 in a group of one
    advantages = centred * count / (count - 1).clamp(min=1) if baseline == "leave_one_out" else centred
    if normalize_std:
        std = (centred.pow(2).sum(-1, keepdim=True) / (count - 1).clamp(min=1)).sqrt()  # unbiased, as torch.std
        advantages = advantages / (std + 1e-6)
    return advantages


def policy_gradient_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    clip_ratio: float = 0.2,
    base_logprobs: torch.Tensor | None = None,
    k3_coef: float = 0.0,
    in_loss: torch.Tensor | None = None,
) -> torch.Tensor:
    """Clipped importance-weighted policy gradient, summed over each response's tokens, mean over samples.

    logprobs [R, T] (with grad), old_logprobs [R, T] (the sampling policy's), advantages [R], mask [R, T].
    ``in_loss`` [R] bool (None = all): the other samples count zero (their k3 term too) in the mean over all R,
    so the denominator is the same on every DDP rank and the ranks' averaged gradient is the one a single
    process gets over all their samples (a mean over each rank's kept samples would weight them 1/(W k_r)).
    With none left the loss is a zero that still depends on ``logprobs``, so backward runs (every rank must).
    With old == current (one update per generation) the ratio is 1 and the gradient is exactly REINFORCE:
    -A * grad log pi(y). With ``k3_coef`` > 0 GRPO's per-token k3 term exp(b - l) - (b - l) - 1 is added
    (b, l: base and policy log-probs). Its value estimates KL(pi || pi_base), but its gradient through l alone is
    that of a per-token KL(pi_base || pi): the optimum is not pi_base^(1+1/beta) (RLConfig.kl_estimator).
    """
    ratio = torch.exp(logprobs - old_logprobs)  # [R, T]
    adv = advantages[:, None]  # [R] -> [R, 1]
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip_ratio, 1 + clip_ratio) * adv)
    per_token = -surrogate
    if k3_coef > 0:
        log_r = base_logprobs - logprobs  # log pi_base/pi per token
        per_token = per_token + k3_coef * (torch.exp(log_r) - log_r - 1)
    counted = response_mask if in_loss is None else response_mask & in_loss[:, None]  # [R, T]; a left-out row: none
    return (per_token * counted).sum(-1).mean()


def pair_residuals(
    policy_y: torch.Tensor,
    base_y: torch.Tensor,
    policy_y2: torch.Tensor,
    base_y2: torch.Tensor,
    kl_coef: float,
    reward_y: torch.Tensor | None = None,
    reward_y2: torch.Tensor | None = None,
) -> torch.Tensor:
    """Paper Eq. 8 residual per pair, with r = log pi_base unless ``reward_y`` / ``reward_y2`` are given:
    beta [log pi/pi_base](y) - beta [log pi/pi_base](y') - [r(y) - r(y')]. Sequence log-probs [P] -> [P].

    Zero for every pair exactly when log pi(y) - log pi(y') = (1 + 1/beta)(log pi_base(y) - log pi_base(y')),
    i.e. pi proportional to pi_base^(1 + 1/beta); with another reward r (e.g. a truncation penalty), when pi
    is proportional to pi_base * exp(r / beta). The KL terms always use log pi_base.
    """
    reward_y = base_y if reward_y is None else reward_y
    reward_y2 = base_y2 if reward_y2 is None else reward_y2
    return kl_coef * (policy_y - base_y) - kl_coef * (policy_y2 - base_y2) - (reward_y - reward_y2)


def squared_pair_loss(residuals: torch.Tensor) -> torch.Tensor:
    """Mean squared residual (a regression, not the logistic DPO loss). [P] -> []."""
    return residuals.pow(2).mean()


def xpo_loss(residuals: torch.Tensor, policy_y2: torch.Tensor, alpha: float) -> torch.Tensor:
    """XPO objective (paper Algorithm 1, with the PLUS sign of its proof): mean over the dataset of
    alpha * log pi(y'|x) + residual^2, y' drawn from the base. [P], [P] -> []."""
    return (alpha * policy_y2 + residuals.pow(2)).mean()
