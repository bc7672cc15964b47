"""masked_nll: NLL over response tokens only, a token mean over the batch or over a given count."""

from __future__ import annotations

import torch

from sharpening.losses import masked_nll


def test_masked_nll_equals_hand_computation():
    logprobs = torch.tensor([[-1.0, -2.0, -30.0], [-0.5, -100.0, -100.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    # (1 + 2 + 0.5) / 3 tokens
    torch.testing.assert_close(masked_nll(logprobs, mask), torch.tensor(3.5 / 3))


def test_masked_tokens_do_not_change_value_or_gradient():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]], requires_grad=True)
    mask = torch.tensor([[True, False, True], [False, True, False]])
    loss = masked_nll(logprobs, mask)
    torch.testing.assert_close(loss, torch.tensor((1.0 + 3.0 + 5.0) / 3))
    loss.backward()
    want = torch.where(mask, torch.full_like(logprobs, -1 / 3), torch.zeros_like(logprobs))
    torch.testing.assert_close(logprobs.grad, want)
    other = logprobs.detach().clone()
    other[~mask] = -1e6
    torch.testing.assert_close(masked_nll(other, mask), loss.detach())


def test_token_mean_weights_long_responses_more():
    logprobs = torch.tensor([[-1.0, -1.0, -1.0, -1.0], [-3.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, True], [True, False, False, False]])
    torch.testing.assert_close(masked_nll(logprobs, mask), torch.tensor(7.0 / 5))


def test_empty_mask_gives_zero_not_nan():
    loss = masked_nll(torch.tensor([[-1.0, -2.0]]), torch.tensor([[False, False]]))
    assert loss.item() == 0.0


def test_parts_over_the_step_count_sum_to_the_token_mean_of_the_whole_batch():
    """Responses of 2, 2, 2 and 30 tokens split 2 + 2: divided by the step's 36 tokens, the two parts and
    their gradients add up to the one-batch token mean (each token weighs 1/36, wherever it sits)."""
    lengths = [2, 2, 2, 30]
    logprobs = -torch.rand(4, 30, generator=torch.Generator().manual_seed(0)).requires_grad_()
    mask = torch.arange(30)[None, :] < torch.tensor(lengths)[:, None]
    whole = masked_nll(logprobs, mask)
    (want,) = torch.autograd.grad(whole, logprobs)
    parts = masked_nll(logprobs[:2], mask[:2], token_count=36) + masked_nll(logprobs[2:], mask[2:], token_count=36)
    (got,) = torch.autograd.grad(parts, logprobs)
    torch.testing.assert_close(parts, whole)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got[mask], torch.full((36,), -1 / 36))
