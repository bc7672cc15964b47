"""Pure losses over per-token log-probs. Shapes: [B, T] per-token tensors, masks bool."""

from __future__ import annotations

import torch


def masked_nll(token_logprobs: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood over response tokens (prompt and padding excluded). [B, T] -> []."""
    count = response_mask.sum().clamp(min=1)
    return -(token_logprobs * response_mask).sum() / count
