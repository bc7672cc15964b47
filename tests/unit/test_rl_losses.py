"""RL-sharpening losses against hand computations, finite differences and the closed-form optimum."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sharpening.losses import (
    apply_truncated_policy,
    group_advantages,
    kl_regularized_rewards,
    pair_residuals,
    policy_gradient_loss,
    squared_pair_loss,
    xpo_loss,
)
from sharpening.rl.pairs import PairExample, collate_pairs

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
        pair_residuals(
            (lp * mask).sum(-1)[:2], (base * mask).sum(-1)[:2], (lp * mask).sum(-1)[1:], (base * mask).sum(-1)[1:], 0.2
        )
    ),
    "xpo": lambda lp, old, base, mask: xpo_loss(
        pair_residuals(
            (lp * mask).sum(-1)[:2], (base * mask).sum(-1)[:2], (lp * mask).sum(-1)[1:], (base * mask).sum(-1)[1:], 0.2
        ),
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
    loss = policy_gradient_loss(
        logprobs, torch.zeros(1, 1), torch.tensor([1.0]), torch.ones(1, 1, dtype=torch.bool), 0.2
    )
    loss.backward()
    assert logprobs.grad.abs().item() == 0.0


# ---- truncated responses (method.md §4.5): keep / drop / penalize -------------------------------------------


def test_keep_is_the_computation_without_truncation_handling_bit_for_bit():
    """keep returns the very rewards and no mask, so advantages, loss and gradient equal those of the same calls
    with the truncation arguments left out: keep changes nothing."""
    g = torch.Generator().manual_seed(5)
    base, policy = -5 * torch.rand(3, 4, generator=g), -5 * torch.rand(3, 4, generator=g)
    truncated = torch.rand(3, 4, generator=g) < 0.5
    rewards = kl_regularized_rewards(base, policy, 0.1)
    kept, in_loss = apply_truncated_policy(rewards, truncated, "keep", 10.0)
    assert kept is rewards and in_loss is None
    logprobs = torch.randn(12, 5, generator=g, requires_grad=True)
    mask = torch.rand(12, 5, generator=g) < 0.8
    for baseline, normalize in [("leave_one_out", False), ("mean", True)]:
        plain = policy_gradient_loss(
            logprobs, logprobs.detach(), group_advantages(rewards, baseline, normalize).flatten(), mask
        )
        with_keep = policy_gradient_loss(
            logprobs,
            logprobs.detach(),
            group_advantages(kept, baseline, normalize, in_loss).flatten(),
            mask,
            in_loss=in_loss,
        )
        (plain_grad,), (keep_grad,) = torch.autograd.grad(plain, logprobs), torch.autograd.grad(with_keep, logprobs)
        assert torch.equal(plain, with_keep) and torch.equal(plain_grad, keep_grad)


def test_penalize_lowers_only_the_truncated_rewards_and_drop_masks_them():
    rewards, truncated = torch.tensor([[-1.0, -2.0, -3.0]]), torch.tensor([[False, True, False]])
    penalized, none = apply_truncated_policy(rewards, truncated, "penalize", 4.0)
    torch.testing.assert_close(penalized, torch.tensor([[-1.0, -6.0, -3.0]]), rtol=0, atol=0)
    assert none is None
    same, in_loss = apply_truncated_policy(rewards, truncated, "drop", 4.0)
    assert same is rewards and in_loss.tolist() == [[True, False, True]]
    with pytest.raises(ValueError, match="unknown truncated policy 'cut'"):
        apply_truncated_policy(rewards, truncated, "cut")


@pytest.mark.parametrize("baseline", ["leave_one_out", "mean"])
@pytest.mark.parametrize("normalize", [False, True])
def test_dropped_samples_leave_the_baseline_as_if_never_drawn(baseline, normalize):
    """Per group, the masked advantages equal the plain ones computed on the kept samples alone."""
    g = torch.Generator().manual_seed(6)
    rewards = torch.randn(4, 6, generator=g) * 3
    in_loss = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 0, 1, 0, 1, 1], [0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 1, 1]]).bool()
    rewards[~in_loss] = float("inf")  # a left-out reward must not leak into anything
    adv = group_advantages(rewards, baseline, normalize, in_loss)
    for b in range(4):
        alone = group_advantages(rewards[b][in_loss[b]][None], baseline, normalize)[0]
        torch.testing.assert_close(adv[b][in_loss[b]], alone, rtol=1e-5, atol=1e-6)
        assert (adv[b][~in_loss[b]] == 0).all()


@pytest.mark.parametrize("baseline", ["leave_one_out", "mean"])
def test_a_group_with_every_sample_or_all_but_one_truncated_gets_zero_advantages(baseline):
    rewards = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]])
    in_loss = torch.tensor([[False, False, False], [False, True, False]])
    adv = group_advantages(rewards, baseline, True, in_loss)
    assert torch.equal(adv, torch.zeros(2, 3))  # finite: no 0/0 from an empty group or a std of one sample


def test_policy_gradient_loss_leaves_dropped_samples_out_with_one_denominator_on_every_rank():
    """Dropped samples count zero in a mean over ALL samples: two DDP ranks that dropped different numbers
    average to the gradient one process gets over both ranks' samples (a per-rank mean over kept samples
    would not)."""
    g = torch.Generator().manual_seed(7)
    logprobs = torch.randn(8, 4, generator=g, requires_grad=True)
    base = torch.randn(8, 4, generator=g)
    adv, mask = torch.randn(8, generator=g), torch.rand(8, 4, generator=g) < 0.8
    in_loss = torch.tensor([True, False, True, True, False, False, False, True])
    one = policy_gradient_loss(logprobs, logprobs.detach(), adv, mask, 0.2, base, 0.1, in_loss)
    (grad_one,) = torch.autograd.grad(one, logprobs)
    ranks = [policy_gradient_loss(logprobs[r], logprobs.detach()[r], adv[r], mask[r], 0.2, base[r], 0.1, in_loss[r])
             for r in (slice(0, 4), slice(4, 8))]  # fmt: skip
    grad_ddp = sum(torch.autograd.grad(loss, logprobs)[0] for loss in ranks) / 2  # DDP averages the ranks' gradients
    torch.testing.assert_close(grad_ddp, grad_one)
    kept = policy_gradient_loss(
        logprobs[in_loss], logprobs.detach()[in_loss], adv[in_loss], mask[in_loss], 0.2, base[in_loss], 0.1
    )
    torch.testing.assert_close(one, kept * in_loss.sum() / len(in_loss))  # the kept samples' terms, over all 8
    assert (grad_one[~in_loss] == 0).all()  # the k3 term of a dropped sample is left out too


def test_every_sample_dropped_gives_a_zero_loss_that_still_backpropagates():
    """No NaN, and a graph to run backward through: every DDP rank must take part in each step."""
    logprobs = torch.randn(4, 3, requires_grad=True)
    loss = policy_gradient_loss(
        logprobs,
        logprobs.detach(),
        torch.zeros(4),
        torch.ones(4, 3, dtype=torch.bool),
        0.2,
        torch.zeros(4, 3),
        0.1,
        torch.zeros(4, dtype=torch.bool),
    )
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(logprobs.grad, torch.zeros(4, 3))


def _exact_policy_gradient(theta, base, truncated, beta, penalty, fold_penalty_into_base=False):
    """-E_pi[A grad log pi] summed over every outcome (weights pi), the signal as online_step builds it."""
    logp = torch.log_softmax(theta, -1)
    if fold_penalty_into_base:  # the wrong way: the penalty inside log pi_base, before the KL is folded in
        signal = kl_regularized_rewards(base - penalty * truncated.double(), logp.detach(), beta)
    else:
        signal, _ = apply_truncated_policy(
            kl_regularized_rewards(base, logp.detach(), beta), truncated, "penalize", penalty
        )
    weights = logp.detach().exp()
    advantages = len(base) * weights * (signal - (weights * signal).sum())
    loss = policy_gradient_loss(
        logp[:, None], logp.detach()[:, None], advantages, torch.ones(len(base), 1, dtype=torch.bool)
    )
    return torch.autograd.grad(loss, theta)[0]


def test_penalize_reaches_the_closed_form_optimum_of_the_penalized_reward():
    """With r = log pi_base - c [truncated], the optimum of E[r] - beta KL(pi || pi_base) is
    pi_base^(1 + 1/beta) exp(-c [truncated] / beta): the exact gradient vanishes there, and only when the
    penalty is applied to the reward (after the KL is folded in), not to log pi_base (it would count 1 + beta times)."""
    g = torch.Generator().manual_seed(8)
    base = torch.log_softmax(torch.randn(8, generator=g, dtype=torch.float64), -1)
    truncated = torch.tensor([0, 1, 0, 0, 1, 1, 0, 0], dtype=torch.bool)
    beta, penalty = 1.0, 0.7
    optimum = (1 + 1 / beta) * base - penalty * truncated.double() / beta
    theta = optimum.clone().requires_grad_(True)
    grad = _exact_policy_gradient(theta, base, truncated, beta, penalty)
    torch.testing.assert_close(grad, torch.zeros_like(grad), rtol=0, atol=1e-12)
    wrong = _exact_policy_gradient(theta, base, truncated, beta, penalty, fold_penalty_into_base=True)
    assert wrong.abs().max() > 1e-3


def test_pair_residuals_with_a_penalized_reward_vanish_at_its_optimum():
    base = torch.log_softmax(torch.randn(6, generator=torch.Generator().manual_seed(9)), -1)
    truncated = torch.tensor([0, 1, 1, 0, 0, 1], dtype=torch.bool)
    beta, penalty = 0.3, 2.0
    reward, _ = apply_truncated_policy(base, truncated, "penalize", penalty)
    optimum = torch.log_softmax(base + reward / beta, -1)  # pi proportional to pi_base exp(r / beta)
    i, j = torch.triu_indices(6, 6, 1)
    residuals = pair_residuals(optimum[i], base[i], optimum[j], base[j], beta, reward[i], reward[j])
    torch.testing.assert_close(residuals, torch.zeros_like(residuals), atol=1e-5, rtol=0)
    unpenalized = pair_residuals(optimum[i], base[i], optimum[j], base[j], beta)
    assert unpenalized.abs().max() > 1.0
    assert torch.equal(pair_residuals(optimum[i], base[i], optimum[j], base[j], beta, base[i], base[j]), unpenalized)


def test_collate_pairs_carries_the_truncation_flags():
    pairs = [PairExample([1], [2], [3], -1.0, -2.0, 0, y, y2) for y, y2 in [(0, 0), (1, 0), (0, 1), (1, 1)]]
    batch = collate_pairs(pairs, pad_token_id=0)
    assert batch["truncated"].tolist() == [False, True, False, True]
    assert batch["other_truncated"].tolist() == [False, False, True, True]
    # pairs made without the flags (their defaults) read as not truncated
    assert collate_pairs([PairExample([1], [2], [3], -1.0, -2.0, 0)], 0)["truncated"].tolist() == [False]


@pytest.mark.parametrize("baseline", ["leave_one_out", "mean"])
def test_online_rl_refuses_one_sample_per_prompt_under_either_baseline(baseline):
    """With one sample the mean baseline is the sample's own reward: every advantage would be 0."""
    from sharpening.engines import SamplingConfig
    from sharpening.rl.config import RLConfig, validate_rl_config

    problems = validate_rl_config(RLConfig(baseline=baseline), SamplingConfig(samples_per_prompt=1))
    assert len(problems) == 1
    assert problems[0].startswith("--model.sampling.samples_per_prompt=1: a group baseline needs >= 2")
    assert f"--model.rl.baseline={baseline}" in problems[0] and "set it to 2 or more" in problems[0]
    assert validate_rl_config(RLConfig(baseline=baseline), SamplingConfig(samples_per_prompt=2)) == []
    assert validate_rl_config(RLConfig(algorithm="xpo", baseline=baseline), SamplingConfig(samples_per_prompt=1)) == []


# ---- the alpha parameterisation and the task-reward tilt (method.md §3.2) ------------------------------------


def _rl_problems(**fields) -> list[str]:
    from sharpening.engines import SamplingConfig
    from sharpening.rl.config import RLConfig, validate_rl_config

    return validate_rl_config(RLConfig(**fields), SamplingConfig(samples_per_prompt=4))


@pytest.mark.parametrize(
    ("fields", "beta", "alpha"),
    [
        ({}, 0.05, 21.0),
        ({"alpha": 3.0}, 0.5, 3.0),
        ({"kl_coef": 0.25}, 0.25, 5.0),
        ({"alpha": 5.0, "kl_coef": 0.25}, 0.25, 5.0),
    ],
)
def test_alpha_and_beta_resolve_to_one_coefficient_both_shown(fields, beta, alpha):
    from sharpening.rl.config import RLConfig, kl_coef_of, with_both_coefficients

    rl = RLConfig(**fields)
    assert (rl.kl_coef, rl.alpha) == (fields.get("kl_coef"), fields.get("alpha"))  # as given: a CLI default stays null
    assert kl_coef_of(rl) == pytest.approx(beta, rel=1e-12)
    shown = with_both_coefficients(rl)  # what the module keeps and saves
    assert shown.kl_coef == pytest.approx(beta, rel=1e-12) and shown.alpha == pytest.approx(alpha, rel=1e-12)
    assert _rl_problems(**fields) == []
    assert _rl_problems(**dataclasses.asdict(shown)) == []  # the saved hyperparameters load back


def test_inconsistent_alpha_and_beta_are_refused_with_the_rule():
    (problem,) = _rl_problems(alpha=4.0, kl_coef=0.5)
    assert problem.startswith("--model.rl.alpha=4.0 and --model.rl.kl_coef=0.5: alpha must equal 1 + 1/beta (3 ")
    assert "set the other to null" in problem


@pytest.mark.parametrize("alpha", [1.0, 0.5, -2.0])
def test_alpha_at_most_one_is_refused(alpha):
    (problem,) = _rl_problems(alpha=alpha)
    assert problem.startswith(f"--model.rl.alpha={alpha}: must be > 1")


def test_tilted_signal_is_maximised_by_the_tilted_power_of_the_base():
    """E_pi[signal] = E_pi[log pi_base + w r] - beta KL(pi || pi_base): over a listed support, the closed form
    pi_base^(1 + 1/beta) exp(w r / beta) beats every perturbation of it and the untilted power."""
    generator = torch.Generator().manual_seed(3)
    base = torch.log_softmax(torch.randn(7, generator=generator), -1)
    tilt = 0.8 * (torch.arange(7) % 2).float()  # w r: reward 1 on odd outcomes, w = 0.8
    beta = 0.4

    def objective(log_pi: torch.Tensor) -> float:
        return float((log_pi.exp() * kl_regularized_rewards(base, log_pi, beta, tilt)).sum())

    target = torch.log_softmax((1 + 1 / beta) * base + tilt / beta, -1)
    best = objective(target)
    for _ in range(20):
        other = torch.log_softmax(target + 0.3 * torch.randn(7, generator=generator), -1)
        assert objective(other) < best
    assert objective(torch.log_softmax((1 + 1 / beta) * base, -1)) < best - 1e-3
    assert objective(torch.log_softmax((1 + 1 / beta) * base + tilt, -1)) < best - 1e-3  # exp(w r), not / beta


def test_rollout_signal_gains_the_weighted_task_reward():
    """Two samples of one prompt, "b" and "a", equal in every log-prob: only w r separates their advantages."""
    from sharpening.rl.config import RLConfig
    from sharpening.rl.rollout import build_rollout
    from sharpening.tasks.chars import build_char_tokenizer
    from sharpening.types import PromptBatch, SampleBatch

    tok = build_char_tokenizer("ab")
    b, a, eos = tok.convert_tokens_to_ids(["b", "a"]) + [tok.eos_token_id]
    prompts = PromptBatch(
        torch.ones(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.bool), torch.tensor([0]), [None]
    )
    response_ids = torch.tensor([[[b, eos], [a, eos]]])  # [B=1, G=2, T=2]
    logprobs = torch.full((1, 2, 2), -0.5)
    samples = SampleBatch(
        prompts,
        response_ids,
        torch.ones(1, 2, 2, dtype=torch.bool),
        logprobs,
        torch.zeros(1, 2, dtype=torch.bool),
        True,
    )
    rl = RLConfig(alpha=3.0, baseline="mean", task_reward="sharpening.tasks.toy:starts_with_b", task_reward_weight=0.6)
    rollout = build_rollout(samples, logprobs.clone(), rl, tok)
    torch.testing.assert_close(rollout.advantages, torch.tensor([0.3, -0.3]))
    untilted = build_rollout(samples, logprobs.clone(), dataclasses.replace(rl, task_reward=None), tok)
    torch.testing.assert_close(untilted.advantages, torch.zeros(2))
