"""Packed SFT batches (packing.collate_packed + packing.packed_response_logprobs) against the padded path.

The padded path (collate_examples + response_logprobs) is the reference: packing must give the same
per-token log-probs, the same loss and the same gradients, with every example attending only to itself.
"""

from __future__ import annotations

import pytest
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device

from sharpening.buffer import BufferExample
from sharpening.logprobs import response_logprobs
from sharpening.losses import masked_nll
from sharpening.packing import (
    block_causal_mask,
    collate_examples,
    collate_packed,
    pack_rows,
    packed_response_logprobs,
    packing_problem,
    varlen_attention_kwargs,
)
from sharpening.policy import PolicyConfig
from sharpening.sft import SFTSharpeningModule
from sharpening.types import PackedBatch, PaddedBatch

PAD = 0

# Prompts of 1 to 9 tokens, responses of 1 to 20 tokens: very different lengths, so the padded layout
# wastes most of its [B, P+T] and packing puts several examples in one row.
PROMPTS = [[1, 3, 4], [1, 5, 6, 7, 8, 9, 10, 11, 12], [1], [1, 13, 14, 15, 16], [1, 17]]
RESPONSES = [[5, 6, 7, 2], [8], list(range(3, 23)), [9, 10, 11, 2], [12, 13, 14, 15, 16, 17, 2]]


def _examples(prompts=PROMPTS, responses=RESPONSES) -> list[BufferExample]:
    return [BufferExample(list(p), list(r), 0.0, i, 0) for i, (p, r) in enumerate(zip(prompts, responses))]


def _padded(model, examples, chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: per-token log-probs [B, T] and the mean NLL of the padded path."""
    batch = collate_examples(examples, PAD)
    logprobs = response_logprobs(
        model, batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask, chunk_size
    )
    return logprobs, masked_nll(logprobs, batch.response_mask)


def _packed(model, examples, pack_length: int = 0, chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed per-token log-probs, unpacked to the padded [B, T] layout, and the mean NLL of the packed path."""
    batch = collate_packed(examples, PAD, pack_length)
    logprobs = packed_response_logprobs(model, batch, chunk_size)  # [R, L]
    width = max(len(e.response_ids) for e in examples)
    out = torch.zeros(len(examples), width)
    for i, e in enumerate(examples):
        out[i, : len(e.response_ids)] = logprobs[(batch.example_ids == i) & batch.response_mask]
    return out, masked_nll(logprobs, batch.response_mask)


@pytest.fixture(scope="module")
def eager_model(tiny_model_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_path, attn_implementation="eager").eval()


@pytest.fixture(params=["sdpa", "eager"])
def model(request, tiny_model, eager_model):
    return tiny_model if request.param == "sdpa" else eager_model


# ---- layout -------------------------------------------------------------------------------------------


def test_pack_rows_is_first_fit_decreasing():
    # 7 opens row 0, 5 row 1, 4 fits beside 5, 3 opens row 2, 2 fits beside 7
    assert pack_rows([3, 7, 2, 5, 4], 9) == [[1, 2], [3, 4], [0]]
    assert pack_rows([4, 4, 4], 12) == [[0, 1, 2]]
    assert pack_rows([5], 5) == [[0]]


@pytest.mark.parametrize("pack_length", [0, 16, 10**6])
def test_layout_restarts_positions_and_marks_only_response_tokens(pack_length):
    examples = _examples()
    batch = collate_packed(examples, PAD, pack_length)
    rows, width = batch.input_ids.shape
    longest = max(len(p) + len(r) for p, r in zip(PROMPTS, RESPONSES))
    assert width <= max(longest, pack_length) and rows <= len(examples)
    for i, e in enumerate(examples):
        where = batch.example_ids == i  # [R, L]
        assert where.any(-1).sum() == 1  # one example, one row
        assert batch.input_ids[where].tolist() == e.prompt_ids + e.response_ids
        assert batch.position_ids[where].tolist() == list(range(len(e.prompt_ids) + len(e.response_ids)))
        assert batch.response_mask[where].tolist() == [False] * len(e.prompt_ids) + [True] * len(e.response_ids)
    padding = batch.example_ids == -1
    assert (batch.input_ids[padding] == PAD).all() and not batch.response_mask[padding].any()
    for r in range(rows):  # padding sits at row ends and restarts positions: a segment of its own
        tail = int(padding[r].sum())
        assert padding[r, width - tail :].all()
        assert batch.position_ids[r, width - tail :].tolist() == list(range(tail))
    assert batch.response_lengths.tolist() == [len(r) for r in RESPONSES]


def test_one_row_when_pack_length_allows():
    batch = collate_packed(_examples(), PAD, pack_length=10**6)
    assert batch.input_ids.shape == (1, sum(len(p) + len(r) for p, r in zip(PROMPTS, RESPONSES)))


def test_block_causal_mask_matches_enumeration():
    example_ids = torch.tensor([[0, 0, 1, 1, 1, -1], [2, 2, 2, 3, -1, -1]])
    got = block_causal_mask(example_ids)
    assert got.shape == (2, 1, 6, 6)
    for r in range(2):
        for i in range(6):
            for j in range(6):
                want = bool(example_ids[r, i] == example_ids[r, j]) and j <= i
                assert bool(got[r, 0, i, j]) == want


def test_varlen_boundaries_are_the_segments_of_the_flattened_rows():
    batch = collate_packed(_examples(), PAD)
    kwargs = varlen_attention_kwargs(batch.position_ids)
    cu = kwargs["cu_seq_lens_q"].tolist()
    flat_ids = batch.example_ids.reshape(-1)  # [R, L] -> [R*L]
    rows, width = batch.example_ids.shape
    for start, end in zip(cu[:-1], cu[1:]):
        assert len(set(flat_ids[start:end].tolist())) == 1  # one example (or one row's padding) per segment
        assert start // width == (end - 1) // width  # never across rows
    assert cu[-1] == rows * width and kwargs["max_length_q"] == max(b - a for a, b in zip(cu[:-1], cu[1:]))
    assert len(cu) - 1 == len(PROMPTS) + int((batch.example_ids == -1).any(-1).sum())


def test_empty_prompt_is_refused():
    with pytest.raises(ValueError, match="non-empty prompt"):
        collate_packed(_examples([[1], []], [[5], [6]]), PAD)


# ---- equality with the padded path ------------------------------------------------------------------------


@pytest.mark.parametrize("pack_length", [0, 10**6])
def test_per_token_logprobs_and_loss_equal_padded(model, pack_length):
    with torch.no_grad():
        want, want_loss = _padded(model, _examples())
        got, got_loss = _packed(model, _examples(), pack_length, chunk_size=5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_loss, want_loss, atol=1e-5, rtol=0)


def test_gradients_equal_padded(tiny_model_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)  # own copy: grads accumulate on it
    params = {
        "lm_head": model.get_output_embeddings().weight,
        "embed": model.get_input_embeddings().weight,
        "q_proj.0": model.model.layers[0].self_attn.q_proj.weight,
        "down_proj.1": model.model.layers[1].mlp.down_proj.weight,
    }
    want = torch.autograd.grad(_padded(model, _examples())[1], list(params.values()))
    got = torch.autograd.grad(_packed(model, _examples(), pack_length=10**6, chunk_size=7)[1], list(params.values()))
    for name, g, w in zip(params, got, want):
        assert w.abs().sum() > 0, name
        torch.testing.assert_close(g, w, atol=1e-5, rtol=0, msg=name)


def test_an_example_sees_only_itself(model):
    """Changing example 2's tokens (same lengths, so the same layout) changes no other example's log-probs."""
    prompts, responses = [list(p) for p in PROMPTS], [list(r) for r in RESPONSES]
    prompts[2], responses[2] = [7], [(7 * t) % 20 + 3 for t in range(len(RESPONSES[2]))]
    with torch.no_grad():
        before, _ = _packed(model, _examples(), pack_length=10**6)
        after, _ = _packed(model, _examples(prompts, responses), pack_length=10**6)
    others = [i for i in range(len(PROMPTS)) if i != 2]
    torch.testing.assert_close(after[others], before[others], atol=1e-6, rtol=0)
    assert not torch.allclose(after[2], before[2])


# ---- edge cases -------------------------------------------------------------------------------------------


def test_one_example(model):
    examples = _examples(PROMPTS[:1], RESPONSES[:1])
    with torch.no_grad():
        want, want_loss = _padded(model, examples)
        got, got_loss = _packed(model, examples)
    assert collate_packed(examples, PAD).input_ids.shape == (1, len(PROMPTS[0]) + len(RESPONSES[0]))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_loss, want_loss, atol=1e-5, rtol=0)


def test_empty_response_contributes_nothing(model):
    responses = [list(r) for r in RESPONSES]
    responses[1] = []
    examples = _examples(PROMPTS, responses)
    with torch.no_grad():
        want, want_loss = _padded(model, examples)
        got, got_loss = _packed(model, examples, pack_length=10**6)
        everything_empty = packed_response_logprobs(model, collate_packed(_examples(PROMPTS, [[]] * 5), PAD))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_loss, want_loss, atol=1e-5, rtol=0)
    assert (everything_empty == 0).all()


def test_examples_longer_than_pack_length_get_rows_of_their_own_length(model):
    batch = collate_packed(_examples(), PAD, pack_length=4)
    assert batch.input_ids.shape[1] == max(len(p) + len(r) for p, r in zip(PROMPTS, RESPONSES))
    with torch.no_grad():
        want, _ = _padded(model, _examples())
        got, _ = _packed(model, _examples(), pack_length=4)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


# ---- attention backends -----------------------------------------------------------------------------------


def _reference_varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """What flash_attn_varlen_func computes, written with sdpa per segment. query [B, H, L, D] -> [B, L, H, D]."""
    assert attention_mask is None, "the varlen path must get no mask"
    cu = kwargs["cu_seq_lens_q"].tolist()
    b, heads, length, dim = query.shape
    groups = heads // key.shape[1]
    q = query.transpose(1, 2).reshape(b * length, heads, dim)  # [B, H, L, D] -> [B*L, H, D]
    k = key.repeat_interleave(groups, 1).transpose(1, 2).reshape(b * length, heads, dim)
    v = value.repeat_interleave(groups, 1).transpose(1, 2).reshape(b * length, heads, dim)
    out = torch.cat(
        [
            torch.nn.functional.scaled_dot_product_attention(
                q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1), is_causal=True, scale=scaling
            ).transpose(0, 1)  # [H, n, D] -> [n, H, D]
            for s, e in zip(cu[:-1], cu[1:])
        ]
    )
    return out.view(b, length, heads, dim), None  # [B*L, H, D] -> [B, L, H, D]


def test_flash_attention_path_hands_segments_to_the_varlen_kernel(tiny_model_path, monkeypatch):
    """flash_attention_2 is CUDA-only: a reference varlen attention stands in for the kernel, so this checks
    that the segment boundaries reach the attention layers and describe exactly the examples."""
    from transformers import AutoModelForCausalLM
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
    with torch.no_grad():
        want, _ = _padded(model, _examples())
        monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "flash_attention_2", _reference_varlen_attention)
        model.config._attn_implementation = "flash_attention_2"
        assert packing_problem(model) is None
        got, _ = _packed(model, _examples(), pack_length=10)  # several rows: boundaries span the flattened rows
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_unverified_attention_is_refused(tiny_model_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    model.config._attn_implementation = "flex_attention"
    assert "flex_attention" in packing_problem(model)
    with pytest.raises(ValueError, match="would mix examples"):
        packed_response_logprobs(model, collate_packed(_examples(), PAD))
    model.config._attn_implementation = "sdpa"
    model.config.sliding_window = 4
    assert "sliding-window" in packing_problem(model)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_real_flash_attention_equals_padded(tiny_model_path):
    pytest.importorskip("flash_attn")
    from transformers import AutoModelForCausalLM

    model = (
        AutoModelForCausalLM.from_pretrained(
            tiny_model_path, dtype=torch.bfloat16, attn_implementation="flash_attention_2"
        )
        .cuda()
        .eval()
    )
    examples = _examples()
    with torch.no_grad():
        batch = move_data_to_device(collate_packed(examples, PAD, pack_length=10), "cuda")
        packed = packed_response_logprobs(model, batch)
        padded = move_data_to_device(collate_examples(examples, PAD), "cuda")
        keys = ("prompt_ids", "prompt_mask", "response_ids", "response_mask")
        want = response_logprobs(model, *(getattr(padded, k) for k in keys))
    for i in range(len(examples)):
        got = packed[(batch.example_ids == i) & batch.response_mask]
        torch.testing.assert_close(got, want[i][padded.response_mask[i]], atol=5e-2, rtol=0)


# ---- the module -------------------------------------------------------------------------------------------


def _examples_of_lengths(lengths: list[int]) -> list[BufferExample]:
    return [BufferExample([1] * (n - 2), [5, 2], 0.0, i, 0) for i, n in enumerate(lengths)]


def test_row_length_weighs_dense_attention_against_padding():
    """Short examples share a row; long ones of similar lengths (few-shot prompts) get a row each under a
    dense mask, where a 512-token row would triple every token's attention; flash (no span) packs them."""
    short = collate_packed(_examples_of_lengths([9, 12, 10, 11, 8, 12, 10, 9]), PAD, 512, attention_span=384)
    assert short.input_ids.shape == (1, 81)
    long = _examples_of_lengths([150, 152, 149, 151, 150, 148, 152, 150])
    dense = collate_packed(long, PAD, 512, attention_span=6 * 512)
    assert dense.input_ids.shape == (8, 152)  # the padded layout's size: packing saves nothing here
    flash = collate_packed(long, PAD, 512, attention_span=None)
    assert flash.input_ids.shape == (4, 304)  # two per row: as few tokens as padding, in fewer rows (ties: longer)
    mixed = collate_packed(_examples_of_lengths([150, 20, 18, 22, 150, 19, 21, 20]), PAD, 512, attention_span=384)
    assert mixed.input_ids.shape[0] < 8 and mixed.input_ids.shape[1] < 512  # pairs up, short rows


def test_module_trains_on_packed_batches_with_the_padded_loss(tiny_model_path):
    policy = PolicyConfig(model_name_or_path=tiny_model_path, finetuning="full", dtype="float32")
    module = SFTSharpeningModule(policy)
    module.configure_model()
    module.eval()
    collate = module._collate_fn()
    assert collate.func is collate_packed and collate.keywords["pack_length"] == 512
    assert collate.keywords["attention_span"] == 6 * 64  # dense sdpa mask: 6 x hidden
    examples = _examples()
    packed_loss = module.training_step(collate(examples), 0)
    padded_loss = module.training_step(collate_examples(examples, module.tokenizer.pad_token_id), 0)
    torch.testing.assert_close(packed_loss, padded_loss, atol=1e-5, rtol=0)
    module.policy.config._attn_implementation = "flex_attention"
    with pytest.warns(UserWarning, match="padded batches"):
        assert module._collate_fn().func is collate_examples


def test_lightning_moves_both_batch_types_to_the_device_whole():
    """Lightning's batch transfer (move_data_to_device) reaches every tensor field of the typed batches."""
    examples = _examples()
    for batch in (collate_examples(examples, PAD), collate_packed(examples, PAD, pack_length=10)):
        moved = move_data_to_device(batch, torch.device("meta"))
        assert type(moved) is type(batch) and isinstance(moved, (PaddedBatch, PackedBatch))
        for name, value in vars(batch).items():
            assert getattr(moved, name).device.type == "meta" and getattr(moved, name).shape == value.shape
