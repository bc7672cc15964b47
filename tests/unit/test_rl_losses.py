"""RL-sharpening losses against hand computations, finite differences and the closed-form optimum."""

from __future__ import annotations

import pytest
import torch

from sharpening.losses import (
    group_advantages,
    kl_regularized_rewards,
    pair_residuals,
    policy_gradient_loss,
    squared_pair_loss,
    xpo_loss,
)

torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("baseline", ["leave_one_out", "mean"])
@pytest.mark.parametrize("normalize", [False, True])
def test_advantages_have_zero_mean_per_group(baseline, normalize):
    rewards = torch.randn(5, 7, generator=torch.Generator().manual_seed(0)) * 3 - 2
    adv = group_advantages(rewards, baseline, normalize)
    torch.testing.assert_close(adv.mean(-1), torch.zeros(5), atol=1e-5, rtol=0)


def test_leave_one_out_is_reward_minus_mean_of_the_others():
    rewards = torch.tensor([[1.0, 2.0, 6.0]])
    expected = torch.tensor([[1 - 4.0, 2 - 3.5, 6 - 1.5]])
    torch.testing.assert_close(group_advantages(rewards, "leave_one_out"), expected)


def test_leave_one_out_needs_two_samples():
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages(torch.zeros(2, 1), "leave_one_out")


def test_kl_regularized_reward_formula():
    base, policy = torch.tensor([-2.0, -1.0]), torch.tensor([-3.0, -0.5])
    torch.testing.assert_close(kl_regularized_rewards(base, policy, 0.5), 1.5 * base - 0.5 * policy)


def test_pair_residuals_vanish_at_the_closed_form_optimum():
    base = torch.log_softmax(torch.randn(6, generator=torch.Generator().manual_seed(1)), -1)
    beta = 0.3
    optimum = torch.log_softmax((1 + 1 / beta) * base, -1)  # pi* proportional to pi_base^(1+1/beta)
    i, j = torch.triu_indices(6, 6, 1)
    residuals = pair_residuals(optimum[i], base[i], optimum[j], base[j], beta)
    torch.testing.assert_close(residuals, torch.zeros_like(residuals), atol=1e-5, rtol=0)
    other = torch.log_softmax(2.0 * base, -1)  # any other policy leaves residuals
    assert pair_residuals(other[i], base[i], other[j], base[j], beta).abs().max() > 1e-2


def _finite_difference(fn, theta: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    grad = torch.zeros_like(theta)
    for k in range(theta.numel()):
        step = torch.zeros_like(theta)
        step.view(-1)[k] = eps
        grad.view(-1)[k] = (fn(theta + step) - fn(theta - step)) / (2 * eps)
    return grad


def _toy_logprobs(theta: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """A 2-step 'policy' over 4 tokens: log-probs of tokens [R, 2] under per-step logits theta [2, 4]."""
    logp = torch.log_softmax(theta, -1)  # [2, 4]
    return torch.stack([logp[t, tokens[:, t]] for t in range(2)], -1)  # [R, 2]


LOSSES = {
    "policy_gradient": lambda lp, old, base, mask: policy_gradient_loss(
        lp, old, torch.tensor([1.5, -0.5, -1.0], dtype=lp.dtype), mask, 0.2
    ),
    "policy_gradient_k3": lambda lp, old, base, mask: policy_gradient_loss(
        lp, old, torch.tensor([1.5, -0.5, -1.0], dtype=lp.dtype), mask, 0.2, base, 0.1
    ),
    "squared": lambda lp, old, base, mask: squared_pair_loss(
        pair_residuals((lp * mask).sum(-1)[:2], (base * mask).sum(-1)[:2], (lp * mask).sum(-1)[1:], (base * mask).sum(-1)[1:], 0.2)
    ),
    "xpo": lambda lp, old, base, mask: xpo_loss(
        pair_residuals((lp * mask).sum(-1)[:2], (base * mask).sum(-1)[:2], (lp * mask).sum(-1)[1:], (base * mask).sum(-1)[1:], 0.2),
        (lp * mask).sum(-1)[1:],
        0.05,
    ),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_gradient_matches_finite_differences(name):
    g = torch.Generator().manual_seed(3)
    theta0 = torch.randn(2, 4, generator=g, dtype=torch.float64)
    tokens = torch.tensor([[0, 1], [2, 3], [1, 1]])
    mask = torch.tensor([[True, True], [True, False], [True, True]])
    old = _toy_logprobs(theta0 + 0.05 * torch.randn(2, 4, generator=g, dtype=torch.float64), tokens).detach()
    base = _toy_logprobs(torch.randn(2, 4, generator=g, dtype=torch.float64), tokens).detach()
    fn = lambda th: LOSSES[name](_toy_logprobs(th, tokens), old, base, mask)  # noqa: E731
    theta = theta0.clone().requires_grad_(True)
    fn(theta).backward()
    torch.testing.assert_close(theta.grad, _finite_difference(fn, theta0), rtol=1e-5, atol=1e-7)


def test_reinforce_with_folded_kl_is_the_exact_gradient_of_j_beta():
    """Summed over all outcomes with weights pi(y), -E[A grad log pi] equals -grad J_beta exactly."""
    g = torch.Generator().manual_seed(4)
    theta = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    base = torch.log_softmax(torch.randn(6, generator=g, dtype=torch.float64), -1)
    beta = 0.4

    def j_beta(th):
        logp = torch.log_softmax(th, -1)
        return (logp.exp() * ((1 + beta) * base - beta * logp)).sum()

    logp = torch.log_softmax(theta, -1)
    rewards = kl_regularized_rewards(base, logp.detach(), beta)
    weights = logp.detach().exp()
    advantages = 6 * weights * (rewards - (weights * rewards).sum())  # pi-weighted, baseline = E[R]
    loss = policy_gradient_loss(logp[:, None], logp.detach()[:, None], advantages, torch.ones(6, 1, dtype=torch.bool))
    (grad_loss,) = torch.autograd.grad(loss, theta)
    (grad_j,) = torch.autograd.grad(j_beta(theta), theta)
    torch.testing.assert_close(-grad_loss, grad_j, rtol=1e-9, atol=1e-12)


def test_clipping_stops_the_gradient_beyond_the_trust_region():
    logprobs = torch.tensor([[0.5]], requires_grad=True)  # ratio e^0.5 > 1.2
    loss = policy_gradient_loss(logprobs, torch.zeros(1, 1), torch.tensor([1.0]), torch.ones(1, 1, dtype=torch.bool), 0.2)
    loss.backward()
    assert logprobs.grad.abs().item() == 0.0
