"""masked_nll: mean NLL over response tokens only."""

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
