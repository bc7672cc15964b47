"""Decode attention by matmuls: equal to softmax attention written out, sdpa's path where it does not apply,
and the sampler's use of it (same draws as sdpa, setting restored)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from sharpening.kernels.decode_attention import (
    DECODE_ATTENTION,
    cpu_decode_attention,
    decode_attention,
    decode_attention_forward,
    uses_decode_attention,
)


def _reference(query, key, value, keep):
    """Per row and head: softmax(q . k_j / sqrt(D)) over the kept positions j, then the weighted values."""
    b, hq, _, d = query.shape
    group = hq // key.shape[1]
    out = torch.zeros(b, hq, 1, value.shape[-1], dtype=torch.float64)
    for r in range(b):
        for h in range(hq):
            q, k, v = query[r, h, 0].double(), key[r, h // group].double(), value[r, h // group].double()
            scores = (k @ q) / math.sqrt(d)  # [T]
            scores[~keep[r]] = float("-inf")
            out[r, h, 0] = torch.softmax(scores, 0) @ v
    return out.float()


def _inputs(b=3, hq=4, hkv=2, t=6, d=8, dv=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    query, key = torch.randn(b, hq, 1, d, generator=g), torch.randn(b, hkv, t, d, generator=g)
    keep = torch.ones(b, t, dtype=torch.bool)
    keep[0, :2] = False  # a left-padded row
    keep[2, 3] = False
    return query, key, torch.randn(b, hkv, t, dv, generator=g), keep


@pytest.mark.parametrize("heads", [(4, 2), (4, 4), (6, 1)])
@pytest.mark.parametrize("mask_kind", ["bool", "float", "none"])
def test_equals_softmax_attention_written_out(heads, mask_kind):
    query, key, value, keep = _inputs(hq=heads[0], hkv=heads[1], dv=5)
    if mask_kind == "none":
        keep = torch.ones_like(keep)
        mask = None
    elif mask_kind == "bool":
        mask = keep[:, None, None, :]  # [B, 1, 1, T], True = attend (sdpa's convention)
    else:
        mask = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)[:, None, None, :]
    got = decode_attention(query, key, value, mask, query.shape[-1] ** -0.5)
    torch.testing.assert_close(got, _reference(query, key, value, keep), rtol=1e-5, atol=1e-6)


def test_reads_strided_key_and_value_views():
    """Keys and values that are views of a longer buffer (a cache with room to grow) give the same result."""
    query, key, value, keep = _inputs()
    buffer_k, buffer_v = torch.randn(3, 2, 10, 8), torch.randn(3, 2, 10, 8)
    buffer_k[:, :, :6], buffer_v[:, :, :6] = key, value
    mask = keep[:, None, None, :]
    got = decode_attention(query, buffer_k[:, :, :6], buffer_v[:, :, :6], mask, 8**-0.5)
    torch.testing.assert_close(got, decode_attention(query, key, value, mask, 8**-0.5))


def test_forward_matches_transformers_sdpa_and_delegates_where_it_does_not_apply(monkeypatch):
    from transformers.integrations import sdpa_attention

    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 2, True
    query, key, value, keep = _inputs()
    mask = keep[:, None, None, :]
    want, _ = sdpa_attention.sdpa_attention_forward(module, query, key, value, mask, scaling=0.3)
    got, weights = decode_attention_forward(module, query, key, value, mask, scaling=0.3)
    assert weights is None and got.shape == want.shape == (3, 1, 4, 8)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    calls = []

    def sdpa(*args, **kwargs):
        calls.append(kwargs)
        return torch.zeros(1), None

    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward", sdpa)
    long_query = torch.randn(3, 4, 6, 8)  # a prefill: several queries per row
    cases = [
        (long_query, key, value, None, {}),
        (query.double(), key.double(), value.double(), mask, {}),
        (query, key, value, mask, {"softcap": 30.0}),
        (query, key, value, mask, {"dropout": 0.1}),
        (query, key, value, mask.expand(3, 4, 1, 6), {}),  # a mask per head
        (query[:1], key, value, mask, {}),  # sdpa broadcasts a batch of one query; this function does not
    ]
    for q, k, v, m, kwargs in cases:
        decode_attention_forward(module, q, k, v, m, **kwargs)
    assert len(calls) == len(cases)
    module.sinks = torch.nn.Parameter(torch.zeros(4))
    decode_attention_forward(module, query, key, value, mask)
    assert len(calls) == len(cases) + 1


def test_applies_to_sdpa_models_on_cpu_only(tiny_model_path):
    from transformers import AutoModelForCausalLM

    cpu = torch.device("cpu")
    sdpa = AutoModelForCausalLM.from_pretrained(tiny_model_path, attn_implementation="sdpa")
    eager = AutoModelForCausalLM.from_pretrained(tiny_model_path, attn_implementation="eager")
    assert uses_decode_attention(sdpa, cpu)
    assert not uses_decode_attention(eager, cpu)
    assert not uses_decode_attention(sdpa, torch.device("cuda"))
    with cpu_decode_attention(eager, cpu):
        assert eager.config._attn_implementation == "eager"
    with pytest.raises(RuntimeError, match="boom"):
        with cpu_decode_attention(sdpa, cpu):
            assert sdpa.config._attn_implementation == DECODE_ATTENTION
            raise RuntimeError("boom")
    assert sdpa.config._attn_implementation == "sdpa"  # restored on error too


def test_keeps_sdpa_where_transformers_has_no_mask_interface(tiny_model_path, monkeypatch):
    """transformers before 4.53 has no ``masking_utils``: registration reports it and the model stays on sdpa."""
    import sys

    from transformers import AutoModelForCausalLM

    import sharpening.kernels.decode_attention as module

    monkeypatch.setitem(sys.modules, "transformers.masking_utils", None)  # its import now raises ImportError
    assert module._register.__wrapped__() is False
    monkeypatch.setattr(module, "_register", lambda: False)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, attn_implementation="sdpa")
    with cpu_decode_attention(model, torch.device("cpu")):
        assert model.config._attn_implementation == "sdpa"


def test_sampler_uses_it_and_draws_what_sdpa_draws(tiny_model_path, monkeypatch):
    """Same seed: the same tokens as transformers' sdpa, log-probs to float32 rounding; every decode step's
    attention went through the matmul path, and the model's setting is sdpa again afterwards."""
    from transformers import AutoModelForCausalLM

    import sharpening.kernels.decode_attention as module
    from sharpening.engines import SamplingConfig, generate_samples
    from sharpening.prompts import pad_prompts

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, attn_implementation="sdpa").eval()
    prompts = pad_prompts([[1, 3, 4, 11], [1, 5, 6, 7, 8, 9, 11], [1, 10, 11]], [0, 1, 2], [None] * 3, 0)
    cfg = SamplingConfig(samples_per_prompt=4, max_new_tokens=12)
    calls = []
    real = module.decode_attention

    def counted(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(module, "decode_attention", counted)
    fast = generate_samples(model, prompts, cfg, 2, 0, seed=3)
    assert model.config._attn_implementation == "sdpa"
    steps = fast.response_ids.shape[-1] - 1  # the last drawn token is never fed back
    assert len(calls) >= steps * model.config.num_hidden_layers > 0
    monkeypatch.setattr(module, "uses_decode_attention", lambda model, device: False)
    before = len(calls)
    plain = generate_samples(copy.deepcopy(model), prompts, cfg, 2, 0, seed=3)  # transformers' sdpa throughout
    assert len(calls) == before
    assert torch.equal(fast.response_ids, plain.response_ids)
    torch.testing.assert_close(fast.logprobs, plain.logprobs, rtol=1e-5, atol=1e-5)


def _family_model(family: str):
    """Tiny models whose attention differs from Llama's: a sliding window in every layer (Mistral), sliding and
    full layers mixed with their own scaling and query/key norms (Gemma 3)."""
    import transformers

    common = dict(vocab_size=24, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=8, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
    if family == "mistral":
        config, cls = (
            transformers.MistralConfig(num_hidden_layers=2, sliding_window=4, **common),
            transformers.MistralForCausalLM,
        )
    else:
        config = transformers.Gemma3TextConfig(num_hidden_layers=2, sliding_window=4,
                                               layer_types=["sliding_attention", "full_attention"],
                                               query_pre_attn_scalar=4, **common)  # fmt: skip
        cls = transformers.Gemma3ForCausalLM
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return cls(config).eval()


@pytest.mark.parametrize("family", ["mistral", "gemma3"])
def test_sampler_draws_what_sdpa_draws_for_windowed_and_hybrid_models(family, monkeypatch):
    import sharpening.kernels.decode_attention as module
    from sharpening.engines import SamplingConfig, generate_samples
    from sharpening.prompts import pad_prompts

    model = _family_model(family)
    prompts = pad_prompts([[1, 3, 4, 11, 5, 6], [1, 5, 6, 7, 8, 9, 11], [1, 10, 11]], [0, 1, 2], [None] * 3, 0)
    cfg = SamplingConfig(samples_per_prompt=3, max_new_tokens=10)
    assert uses_decode_attention(model, torch.device("cpu"))
    calls, real = [], module.decode_attention
    monkeypatch.setattr(module, "decode_attention", lambda *args: calls.append(1) or real(*args))
    fast = generate_samples(model, prompts, cfg, 2, 0, seed=7)
    assert len(calls) >= (fast.response_ids.shape[-1] - 1) * model.config.num_hidden_layers > 0  # every decode step
    monkeypatch.setattr(module, "uses_decode_attention", lambda model, device: False)
    plain = generate_samples(model, prompts, cfg, 2, 0, seed=7)
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(fast.response_ids, plain.response_ids)
    torch.testing.assert_close(fast.logprobs, plain.logprobs, rtol=1e-5, atol=1e-5)
