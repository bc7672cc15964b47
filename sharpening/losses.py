"""Pure losses over per-token log-probs. Shapes: [B, T] per-token tensors, masks bool."""

from __future__ import annotations

import torch


def masked_nll(token_logprobs: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood over response tokens (prompt and padding excluded). [B, T] -> []."""
    count = response_mask.sum().clamp(min=1)
    return -(token_logprobs * response_mask).sum() / count


# ---- RL-sharpening (SPEC 3.2): maximise E_pi[log pi_base(y|x)] - beta KL(pi || pi_base) ----------------
# Shapes: R = B*G samples, T response positions; sequence quantities are sums over response tokens.


def kl_regularized_rewards(base_seq: torch.Tensor, policy_seq: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-sample signal with the exact sequence KL folded in: (1 + beta) log pi_base(y) - beta log pi(y).

    Its expectation under pi is J_beta(pi) = E[log pi_base] - beta KL(pi || pi_base). [...] -> [...].
    """
    return (1.0 + kl_coef) * base_seq - kl_coef * policy_seq


def group_advantages(rewards: torch.Tensor, baseline: str = "leave_one_out", normalize_std: bool = False) -> torch.Tensor:
    """Advantages within each prompt's group, [B, G] -> [B, G]; zero mean per group.

    leave_one_out: r_i - mean_{j != i} r_j (the baseline is independent of sample i, so the gradient
    estimate stays unbiased); mean: r_i - mean_j r_j. ``normalize_std`` divides by the group std.
    """
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


def policy_gradient_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    clip_ratio: float = 0.2,
    base_logprobs: torch.Tensor | None = None,
    k3_coef: float = 0.0,
) -> torch.Tensor:
    """Clipped importance-weighted policy gradient, summed over each response's tokens, mean over samples.

    logprobs [R, T] (with grad), old_logprobs [R, T] (the sampling policy's), advantages [R], mask [R, T].
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
    return (per_token * response_mask).sum(-1).mean()


def pair_residuals(
    policy_y: torch.Tensor, base_y: torch.Tensor, policy_y2: torch.Tensor, base_y2: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """Paper Eq. 8 residual per pair, with r = log pi_base:
    beta [log pi/pi_base](y) - beta [log pi/pi_base](y') - [r(y) - r(y')]. Sequence log-probs [P] -> [P].

    Zero for every pair exactly when log pi(y) - log pi(y') = (1 + 1/beta)(log pi_base(y) - log pi_base(y')),
    i.e. pi proportional to pi_base^(1 + 1/beta).
    """
    return kl_coef * (policy_y - base_y) - kl_coef * (policy_y2 - base_y2) - (base_y - base_y2)


def squared_pair_loss(residuals: torch.Tensor) -> torch.Tensor:
    """Mean squared residual (a regression, not the logistic DPO loss). [P] -> []."""
    return residuals.pow(2).mean()


def xpo_loss(residuals: torch.Tensor, policy_y2: torch.Tensor, alpha: float) -> torch.Tensor:
    """XPO objective (paper Algorithm 1, with the PLUS sign of its proof): mean over the dataset of
    alpha * log pi(y'|x) + residual^2, y' drawn from the base. [P], [P] -> []."""
    return (alpha * policy_y2 + residuals.pow(2)).mean()
