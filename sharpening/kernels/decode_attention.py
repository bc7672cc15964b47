"""Attention of one decode query by two batched matmuls, for the sampler on CPU.

A decode step attends one new query per row over the row's cached keys: per row and KV head, a [g, D] x
[D, T] product (g query heads share a KV head), a softmax over T, and a [g, T] x [T, D] product. PyTorch's
CPU ``scaled_dot_product_attention`` runs this through its flash kernel, which is built for long queries
and costs 2-4x more per call at these shapes (128 rows, 8 heads, T <= 64: docs/benchmarks.md).
``decode_attention`` does it as two batched matmuls over the grouped KV heads (no copy of K or V).

The sampler turns it on for its decode loop on CPU when the model runs transformers' ``sdpa`` attention
(``cpu_decode_attention``): the model then resolves an attention function registered under
``DECODE_ATTENTION``, which is ``decode_attention`` for one float32 query per row and transformers' sdpa
function for everything else (the prefill, soft-capping, attention sinks, dropout, position biases, masks
per head), with sdpa's masks either way. Results equal sdpa's to float32 rounding (another summation
order), not bitwise.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch

DECODE_ATTENTION = "sharpening_cpu_decode"  # the name registered with transformers' attention interfaces


def decode_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scaling: float
) -> torch.Tensor:
    """Softmax attention of one query per row: query [B, Hq, 1, D], key [B, Hkv, T, D], value [B, Hkv, T, Dv]
    (Hq a multiple of Hkv: grouped heads), mask None, bool [B, 1, 1, T] (True = attend) or additive float
    [B, 1, 1, T] -> output [B, Hq, 1, Dv]."""
    b, hq, _, d = query.shape
    hkv, t = key.shape[1], key.shape[2]
    grouped = query.reshape(b, hkv, hq // hkv, d)  # [B, Hq, 1, D] -> [B, Hkv, g, D]: the heads sharing a KV head
    scores = torch.matmul(grouped, key.transpose(-1, -2)).mul_(scaling)  # [B, Hkv, g, T]
    if mask is not None:
        mask = mask.reshape(b, 1, 1, t)  # [B, 1, 1, T]: the same for every head
        scores = scores.masked_fill_(~mask, float("-inf")) if mask.dtype == torch.bool else scores.add_(mask)
    weights = torch.softmax(scores, dim=-1)
    return torch.matmul(weights, value).view(b, hq, 1, value.shape[-1])  # [B, Hkv, g, Dv] -> [B, Hq, 1, Dv]


def decode_attention_applies(module, query, key, value, attention_mask, dropout: float, kwargs: dict) -> bool:
    """Whether ``decode_attention`` computes what transformers' sdpa function would for this call."""
    if query.shape[2] != 1 or query.device.type != "cpu" or dropout:
        return False
    if not all(x.dtype == torch.float32 for x in (query, key, value)):
        return False
    if query.shape[0] != key.shape[0] or query.shape[1] % key.shape[1]:  # sdpa broadcasts these; we do not
        return False
    if any(kwargs.get(name) is not None for name in ("softcap", "position_bias", "cache", "s_aux")):
        return False
    if getattr(module, "sinks", None) is not None or kwargs.get("output_attentions"):
        return False
    if attention_mask is not None and attention_mask.numel() != query.shape[0] * key.shape[2]:
        return False  # not one mask row per batch row (per-head or broadcast masks): sdpa handles those
    return True


def decode_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: ``decode_attention`` where it applies, else sdpa's.
    Returns (output [B, 1, Hq, Dv], None) as transformers' sdpa function does."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not decode_attention_applies(module, query, key, value, attention_mask, dropout, kwargs):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = decode_attention(query, key, value, attention_mask, scale)  # [B, Hq, 1, Dv]
    return out.transpose(1, 2).contiguous(), None  # [B, Hq, 1, Dv] -> [B, 1, Hq, Dv]


@functools.cache
def _register() -> bool:
    """Register ``DECODE_ATTENTION`` with transformers (attention function and sdpa's mask), once. False where
    this transformers has no attention-mask interface (before 4.53): the sampler then keeps sdpa."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    except ImportError:
        return False
    AttentionInterface.register(DECODE_ATTENTION, decode_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(DECODE_ATTENTION, sdpa_mask)
    return True


def uses_decode_attention(model: torch.nn.Module, device: torch.device) -> bool:
    """True when ``cpu_decode_attention`` switches ``model``: it runs transformers' sdpa attention, on CPU,
    and its config has no sub-configs (whose own attention settings a swap could overwrite)."""
    config = getattr(model, "config", None)
    return (
        device.type == "cpu"
        and getattr(config, "_attn_implementation", None) == "sdpa"
        and not getattr(config, "sub_configs", None)
    )


@contextlib.contextmanager
def cpu_decode_attention(model: torch.nn.Module, device: torch.device) -> Iterator[None]:
    """Within the block, ``model``'s decode steps use ``decode_attention`` (see the module docstring); the
    model's attention setting is restored on exit, also on error. A no-op where it does not apply."""
    if not uses_decode_attention(model, device) or not _register():
        yield
        return
    config = model.config
    config._attn_implementation = DECODE_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"
