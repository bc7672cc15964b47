"""generate_samples: shapes, EOS handling, seeds, greedy, filters, exactness of its log-probs, statistics."""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from types import SimpleNamespace

import pytest
import torch

from sharpening.engines import (
    SamplingConfig,
    decode_responses,
    derive_seed,
    generate_samples,
    is_exact_sampling,
    validate_sampling_config,
)
from sharpening.engines.draw import filter_logits
from sharpening.logprobs import kv_cache_keyword, sample_logprobs
from sharpening.prompts import pad_prompts

PAD, BOS, EOS = 0, 1, 2
VOCAB = 24


def chi2_critical(df: int, z: float = 3.09) -> float:
    """Upper quantile of chi-square (Wilson-Hilferty); z=3.09 is p=0.001."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi2_stat(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def _prompts(token_lists, indices=None):
    indices = list(range(len(token_lists))) if indices is None else indices
    return pad_prompts(token_lists, indices, [None] * len(token_lists), PAD)


PROMPTS = [[BOS, 3, 4, 11], [BOS, 5, 6, 7, 8, 9, 11], [BOS, 10, 11]]


@pytest.fixture(scope="module")
def uniform_model(tiny_model_path):
    """The tiny Llama with its LM head zeroed: every next-token distribution is uniform over the vocab."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.zero_()
    return model


def _rows(samples):
    """Unpadded responses, [B][N] lists of token ids."""
    b, n, _ = samples.response_ids.shape
    return [[samples.response_ids[i, j][samples.response_mask[i, j]].tolist() for j in range(n)] for i in range(b)]


def _generate(model, prompts, seed=0, round_index=0, eos=EOS, **cfg):
    return generate_samples(model, prompts, SamplingConfig(**cfg), eos, PAD, seed=seed, round_index=round_index)


# ---------------------------------------------------------------- shapes and EOS


def test_shapes_and_dtypes(tiny_model):
    samples = _generate(tiny_model, _prompts(PROMPTS), samples_per_prompt=3, max_new_tokens=6)
    b, n = len(PROMPTS), 3
    assert samples.response_ids.shape[:2] == (b, n)
    t = samples.response_ids.shape[2]
    assert 1 <= t <= 6
    assert samples.response_ids.dtype == torch.long
    assert samples.response_mask.shape == (b, n, t) and samples.response_mask.dtype == torch.bool
    assert samples.logprobs.shape == (b, n, t) and samples.logprobs.dtype == torch.float32
    assert samples.truncated.shape == (b, n) and samples.truncated.dtype == torch.bool
    assert samples.exact_draws is True
    assert samples.samples_per_prompt == n
    assert samples.prompts.prompt_ids is not None and len(samples.prompts) == b
    torch.testing.assert_close(samples.lengths, samples.response_mask.sum(-1))


def _check_eos_layout(samples, eos_ids):
    eos_ids = set(eos_ids)
    b, n, t = samples.response_ids.shape
    for i in range(b):
        for j in range(n):
            ids, mask, lps = (
                samples.response_ids[i, j].tolist(),
                samples.response_mask[i, j].tolist(),
                samples.logprobs[i, j],
            )
            ends = [k for k, tok in enumerate(ids) if tok in eos_ids and mask[k]]
            if ends:
                stop = ends[0]
                assert len(ends) == 1
                assert mask == [True] * (stop + 1) + [False] * (t - stop - 1)  # EOS kept, rest masked
                assert ids[stop + 1 :] == [PAD] * (t - stop - 1)  # pad after EOS
                assert not samples.truncated[i, j]
            else:
                assert all(mask)  # a truncated row used every step
                assert samples.truncated[i, j]
                assert samples.lengths[i, j] == t
            assert (lps[~samples.response_mask[i, j]] == 0).all()
            assert (lps[samples.response_mask[i, j]] <= 0).all()


def test_eos_stops_a_row_and_is_kept(uniform_model):
    eos_ids = [2, 5, 8, 11, 14, 17, 20, 23]  # stop chance 1/3 per step: a mix of ended and truncated rows
    samples = _generate(uniform_model, _prompts(PROMPTS), eos=eos_ids, samples_per_prompt=16, max_new_tokens=4)
    _check_eos_layout(samples, eos_ids)
    assert samples.truncated.any() and (~samples.truncated).any()
    assert samples.response_ids.shape[2] == 4
    lengths = samples.lengths[~samples.truncated]
    assert (lengths < 4).any()  # some rows ended early, and were padded


def test_eos_layout_with_a_random_model(tiny_model):
    samples = _generate(tiny_model, _prompts(PROMPTS), samples_per_prompt=8, max_new_tokens=12, seed=3)
    _check_eos_layout(samples, [EOS])


def test_truncated_exactly_when_no_eos(uniform_model):
    eos_ids = [2, 7, 12, 19]
    samples = _generate(uniform_model, _prompts(PROMPTS), eos=eos_ids, samples_per_prompt=12, max_new_tokens=3)
    has_eos = torch.isin(samples.response_ids, torch.tensor(eos_ids)) & samples.response_mask
    torch.testing.assert_close(samples.truncated, ~has_eos.any(-1))
    assert samples.truncated.any() and (~samples.truncated).any()


def test_eos_on_last_step_is_not_truncated(uniform_model):
    # with almost every token an EOS, max_new_tokens=1 rows end on their only (= last) step
    eos_ids = list(range(VOCAB))
    samples = _generate(uniform_model, _prompts(PROMPTS), eos=eos_ids, samples_per_prompt=4, max_new_tokens=1)
    assert not samples.truncated.any()
    assert samples.response_mask.all()


def test_stops_early_when_every_row_has_ended(uniform_model):
    samples = _generate(
        uniform_model, _prompts(PROMPTS), eos=list(range(VOCAB)), samples_per_prompt=2, max_new_tokens=9
    )
    assert samples.response_ids.shape[2] == 1


# ---------------------------------------------------------------- seeds and batch independence


def test_same_seed_same_tokens(tiny_model):
    a = _generate(tiny_model, _prompts(PROMPTS), seed=7, samples_per_prompt=4, max_new_tokens=8)
    b = _generate(tiny_model, _prompts(PROMPTS), seed=7, samples_per_prompt=4, max_new_tokens=8)
    assert torch.equal(a.response_ids, b.response_ids)
    assert torch.equal(a.response_mask, b.response_mask)
    assert torch.equal(a.truncated, b.truncated)


@pytest.mark.parametrize("change", [dict(seed=8), dict(round_index=1)])
def test_different_seed_or_round_different_tokens(tiny_model, change):
    a = _generate(tiny_model, _prompts(PROMPTS), seed=7, samples_per_prompt=4, max_new_tokens=8)
    b = _generate(tiny_model, _prompts(PROMPTS), **{"seed": 7, **change}, samples_per_prompt=4, max_new_tokens=8)
    assert _rows(a) != _rows(b)


def test_samples_within_a_prompt_differ(tiny_model):
    samples = _generate(tiny_model, _prompts(PROMPTS), samples_per_prompt=6, max_new_tokens=8)
    for group in _rows(samples):
        assert len({tuple(r) for r in group}) > 1


def test_prompt_samples_do_not_depend_on_batch_mates(tiny_model):
    together = _generate(tiny_model, _prompts(PROMPTS, [10, 11, 12]), samples_per_prompt=3, max_new_tokens=8)
    alone = _generate(tiny_model, _prompts([PROMPTS[1]], [11]), samples_per_prompt=3, max_new_tokens=8)
    reordered = _generate(
        tiny_model, _prompts([PROMPTS[2], PROMPTS[1]], [12, 11]), samples_per_prompt=3, max_new_tokens=8
    )
    assert _rows(together)[1] == _rows(alone)[0] == _rows(reordered)[1]
    assert _rows(together)[2] == _rows(reordered)[0]
    torch.testing.assert_close(together.truncated[1], alone.truncated[0])


def test_prompt_index_not_batch_position_drives_the_seed(tiny_model):
    a = _generate(tiny_model, _prompts([PROMPTS[0]], [0]), samples_per_prompt=3, max_new_tokens=8)
    b = _generate(tiny_model, _prompts([PROMPTS[0]], [1]), samples_per_prompt=3, max_new_tokens=8)
    assert _rows(a) != _rows(b)


def test_derive_seed_is_stable_and_distinguishes_parts():
    assert derive_seed(1, 2, 3) == derive_seed(1, 2, 3)
    assert len({derive_seed(1, 2, 3), derive_seed(1, 3, 2), derive_seed(2, 1, 3), derive_seed(1, 2, 4)}) == 4
    assert 0 <= derive_seed(123, 456) < 2**63


# ---------------------------------------------------------------- greedy


def _greedy_by_hand(model, prompt, max_new_tokens):
    ids, out = list(prompt), []
    for _ in range(max_new_tokens):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        token = int(logits.argmax())
        out.append(token)
        ids.append(token)
        if token == EOS:
            break
    return out


@pytest.mark.parametrize("cfg", [dict(temperature=0.0), dict(temperature=1.0, top_k=1), dict(temperature=0.3, top_k=1)])
def test_greedy_equals_argmax_decoding_by_hand(tiny_model, cfg):
    samples = _generate(tiny_model, _prompts(PROMPTS), samples_per_prompt=2, max_new_tokens=6, **cfg)
    for i, prompt in enumerate(PROMPTS):
        want = _greedy_by_hand(tiny_model, prompt, 6)
        assert _rows(samples)[i] == [want, want]
    assert samples.exact_draws is False


# ---------------------------------------------------------------- filter_logits


LOGITS = torch.tensor([[1.0, 4.0, 2.0, 3.0]])
PROBS = torch.tensor([[0.15, 0.5, 0.05, 0.3]])


@pytest.mark.parametrize(
    "logits, top_k, top_p, kept",
    [
        (LOGITS, 0, 1.0, [True, True, True, True]),
        (LOGITS, 4, 1.0, [True, True, True, True]),
        (LOGITS, 10, 1.0, [True, True, True, True]),
        (LOGITS, 1, 1.0, [False, True, False, False]),
        (LOGITS, 2, 1.0, [False, True, False, True]),
        (LOGITS, 3, 1.0, [False, True, True, True]),
        (PROBS.log(), 0, 0.4, [False, True, False, False]),  # top token alone crosses 0.4
        (PROBS.log(), 0, 0.5 - 1e-3, [False, True, False, False]),
        (PROBS.log(), 0, 0.6, [False, True, False, True]),  # 0.5 < 0.6: the crossing token is kept
        (PROBS.log(), 0, 0.9, [True, True, False, True]),
        (PROBS.log(), 0, 0.99, [True, True, True, True]),
        (PROBS.log(), 2, 0.99, [False, True, False, True]),  # top-k first, then nucleus
        (PROBS.log(), 3, 0.6, [False, True, False, True]),  # renormalized top-3: 0.53 < 0.6 keeps two
        (PROBS.log(), 2, 0.6, [False, True, False, False]),  # renormalized top-2: 0.625 >= 0.6 keeps one
    ],
)
def test_filter_logits_table(logits, top_k, top_p, kept):
    out = filter_logits(logits.clone(), top_k, top_p)
    assert out.shape == logits.shape
    assert torch.isfinite(out[0]).tolist() == kept
    torch.testing.assert_close(out[torch.isfinite(out)], logits[torch.isfinite(out)])


def test_filter_logits_is_per_row():
    logits = torch.stack([LOGITS[0], LOGITS[0].flip(0), PROBS[0].log()])
    out = filter_logits(logits, 2, 0.8)  # top-2 then nucleus over the renormalized pair (0.73 / 0.625 < 0.8)
    assert torch.isfinite(out).tolist() == [
        [False, True, False, True],
        [True, False, True, False],
        [False, True, False, True],
    ]


def test_filter_logits_keeps_ties_at_the_kth_value():
    out = filter_logits(torch.tensor([[1.0, 2.0, 2.0, 0.0]]), 1, 1.0)
    assert torch.isfinite(out[0]).tolist() == [False, True, True, False]


@pytest.mark.parametrize(
    "temperature, top_k, top_p, exact",
    [
        (1.0, 0, 1.0, True),
        (0.0, 0, 1.0, False),
        (0.7, 0, 1.0, False),
        (1.0, 5, 1.0, False),
        (1.0, 0, 0.9, False),
        (1.3, 0, 1.0, False),
    ],
)
def test_is_exact_sampling(temperature, top_k, top_p, exact):
    assert is_exact_sampling(temperature, top_k, top_p) is exact


def test_validate_sampling_config_lists_every_problem():
    cfg = SamplingConfig(
        samples_per_prompt=0, max_new_tokens=0, temperature=-1, top_k=-1, top_p=0.0, prompts_per_batch=0
    )
    problems = validate_sampling_config(cfg, "--model.sampling")
    assert len(problems) == 6
    for field in (
        "samples_per_prompt=0",
        "max_new_tokens=0",
        "temperature=-1",
        "top_k=-1",
        "top_p=0.0",
        "prompts_per_batch=0",
    ):
        assert any(p.startswith(f"--model.sampling.{field}") for p in problems), field
    assert validate_sampling_config(SamplingConfig(), "--model.sampling") == []


# ---------------------------------------------------------------- log-probs of the draws (method.md §4.4)


@pytest.mark.parametrize("cfg", [dict(), dict(temperature=0.7, top_k=5), dict(top_p=0.8)])
def test_sampler_logprobs_equal_teacher_forced_rescoring(tiny_model, cfg):
    samples = _generate(tiny_model, _prompts(PROMPTS), samples_per_prompt=4, max_new_tokens=8, seed=1, **cfg)
    with torch.no_grad():
        rescored = sample_logprobs(tiny_model, samples)
    torch.testing.assert_close(samples.logprobs, rescored, atol=1e-5, rtol=0)
    assert samples.exact_draws is is_exact_sampling(
        cfg.get("temperature", 1.0), cfg.get("top_k", 0), cfg.get("top_p", 1.0)
    )


@pytest.mark.parametrize("decode", ["dynamic", "static"])
def test_generation_and_scoring_raise_no_transformers_deprecation(tiny_model, monkeypatch, decode):
    # transformers renamed the KV cache argument and output field; the old name warns (FutureWarning for the
    # argument, a logged warning_once for the output field, which this test records even if it was said before)
    logged = []
    monkeypatch.setattr(logging.Logger, "warning_once", lambda self, msg, *args, **kwargs: logged.append(str(msg)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        samples = _generate(tiny_model, _prompts(PROMPTS), samples_per_prompt=3, max_new_tokens=5, decode=decode)
        with torch.no_grad():
            sample_logprobs(tiny_model, samples)  # the prompt once per group, with a KV cache
            sample_logprobs(tiny_model, samples, share_prompt=False)
    assert not [message for message in logged if "deprecated" in message], logged


def test_decode_responses_drops_special_tokens(tiny_model, tiny_tokenizer):
    samples = _generate(tiny_model, _prompts(PROMPTS), samples_per_prompt=2, max_new_tokens=5)
    texts = decode_responses(tiny_tokenizer, samples)
    assert len(texts) == len(PROMPTS) and all(len(g) == 2 for g in texts)
    for i, group in enumerate(_rows(samples)):
        for j, row in enumerate(group):
            assert texts[i][j] == tiny_tokenizer.decode(row, skip_special_tokens=True)
            assert "</s>" not in texts[i][j] and "<pad>" not in texts[i][j]


# ---------------------------------------------------------------- statistics with uniform logits


def test_uniform_model_first_tokens_are_uniform(uniform_model):
    n = 2400
    samples = _generate(uniform_model, _prompts([PROMPTS[0]]), samples_per_prompt=n, max_new_tokens=1)
    assert samples.response_ids.shape == (1, n, 1)
    counts = torch.bincount(samples.response_ids[0, :, 0], minlength=VOCAB).float()
    assert (counts > 0).all()
    assert chi2_stat(counts, torch.full((VOCAB,), 1 / VOCAB)) < chi2_critical(VOCAB - 1)
    torch.testing.assert_close(samples.logprobs, torch.full_like(samples.logprobs, -math.log(VOCAB)), atol=1e-5, rtol=0)


def test_uniform_model_respects_max_new_tokens_and_eos_rate(uniform_model):
    n, max_new = 400, 5
    samples = _generate(uniform_model, _prompts(PROMPTS[:2]), samples_per_prompt=n, max_new_tokens=max_new, seed=2)
    assert samples.response_ids.shape[2] == max_new
    assert (samples.lengths <= max_new).all()
    # a row is truncated exactly when none of its max_new draws was EOS: probability (23/24)^5
    p_trunc = (1 - 1 / VOCAB) ** max_new
    frac = samples.truncated.float().mean().item()
    sd = math.sqrt(p_trunc * (1 - p_trunc) / (2 * n))
    assert abs(frac - p_trunc) < 4 * sd
    # second tokens (of rows alive at step 2) are uniform too
    alive = samples.response_mask[..., 1]
    counts = torch.bincount(samples.response_ids[..., 1][alive], minlength=VOCAB).float()
    assert chi2_stat(counts, torch.full((VOCAB,), 1 / VOCAB)) < chi2_critical(VOCAB - 1)


# ---------------------------------------------------------------- a mock model with fixed logits


class _Cache:
    def __init__(self, rows: int):
        self.rows = rows
        self.repeats = []

    def batch_repeat_interleave(self, n: int) -> None:
        self.repeats.append(n)
        self.rows *= n


class FixedLogitsLM(torch.nn.Module):
    """Every position predicts the same next-token logits; records the shapes it was called with."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.register_buffer("next_logits", logits.float())
        self.calls = []

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False, logits_to_keep=0, **cache):
        past = cache.pop(kv_cache_keyword(), None)  # the KV cache, under the name this transformers uses
        assert not cache, f"unexpected arguments {sorted(cache)}"
        self.calls.append(
            dict(
                input_shape=tuple(input_ids.shape),
                mask_shape=tuple(attention_mask.shape),
                positions=position_ids.clone(),
                cached=past is not None,
            )
        )
        past = past if past is not None else _Cache(input_ids.shape[0])
        assert past.rows == input_ids.shape[0]
        b, s = input_ids.shape
        keep = 1 if logits_to_keep == 1 else s
        return SimpleNamespace(logits=self.next_logits.expand(b, keep, -1), **{kv_cache_keyword(): past})


def test_prefill_once_then_one_token_per_row():
    model = FixedLogitsLM(torch.zeros(6))
    prompts = _prompts([[1, 3, 4], [1, 5]])
    _generate(model, prompts, eos=99, samples_per_prompt=3, max_new_tokens=4)
    first, *rest = model.calls
    assert first["input_shape"] == (2, 3) and not first["cached"]  # B rows, not B*N
    assert len(rest) == 3  # no forward after the last token is drawn
    for step, call in enumerate(rest):
        assert call["input_shape"] == (6, 1) and call["cached"]
        assert call["mask_shape"] == (6, 3 + step + 1)
    # positions continue from each prompt's own length (left padding does not count)
    assert first["positions"].tolist() == [[0, 1, 2], [0, 0, 1]]
    assert rest[0]["positions"].squeeze(-1).tolist() == [3, 3, 3, 2, 2, 2]
    assert rest[2]["positions"].squeeze(-1).tolist() == [5, 5, 5, 4, 4, 4]


def test_truncated_when_eos_never_drawn():
    samples = _generate(
        FixedLogitsLM(torch.zeros(6)), _prompts([[1, 3]]), eos=99, samples_per_prompt=5, max_new_tokens=3
    )
    assert samples.truncated.all() and samples.response_mask.all()
    assert samples.response_ids.shape == (1, 5, 3)


def _frequencies(logits, n=6000, **cfg):
    samples = _generate(
        FixedLogitsLM(logits), _prompts([[1, 3]]), eos=99, samples_per_prompt=n, max_new_tokens=1, **cfg
    )
    return torch.bincount(samples.response_ids.flatten(), minlength=logits.numel()).float(), samples


def test_temperature_one_follows_the_model():
    probs = torch.tensor([0.6, 0.3, 0.1])
    counts, samples = _frequencies(probs.log())
    assert chi2_stat(counts, probs) < chi2_critical(2)
    torch.testing.assert_close(samples.logprobs[0, :, 0], probs.log()[samples.response_ids[0, :, 0]])


def test_temperature_sharpens_as_a_power():
    probs = torch.tensor([0.6, 0.3, 0.1])
    counts, samples = _frequencies(probs.log(), temperature=0.5)
    want = probs**2 / (probs**2).sum()
    assert chi2_stat(counts, want) < chi2_critical(2)
    # the log-probs returned are still those of the temperature-1 model
    torch.testing.assert_close(samples.logprobs[0, :, 0], probs.log()[samples.response_ids[0, :, 0]])


def test_top_p_renormalizes_the_nucleus():
    probs = torch.tensor([0.6, 0.3, 0.1])
    counts, _ = _frequencies(probs.log(), top_p=0.7)
    assert counts[2] == 0
    assert chi2_stat(counts[:2], torch.tensor([2 / 3, 1 / 3])) < chi2_critical(1)


def test_top_k_restricts_the_support():
    probs = torch.tensor([0.1, 0.3, 0.2, 0.4])
    counts, _ = _frequencies(probs.log(), top_k=2)
    assert counts[0] == 0 and counts[2] == 0
    assert chi2_stat(counts[[1, 3]], torch.tensor([3 / 7, 4 / 7])) < chi2_critical(1)


def test_finished_rows_leave_the_batch_and_the_draws_do_not_change(tiny_model_path):
    """Compaction (finished rows leave the decode batch): same tokens, log-probs and flags; later decode steps
    run on fewer rows."""
    from transformers import AutoModelForCausalLM

    from sharpening.types import PromptBatch

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
    with torch.no_grad():  # make EOS (id 2) likely, so rows finish at different steps
        model.lm_head.weight[2] *= 0
        model.lm_head.weight[2] += model.lm_head.weight.mean(0) + 0.02
    prompts = PromptBatch(
        torch.tensor([[0, 1, 5, 6], [1, 7, 8, 9], [0, 0, 1, 4]]),
        torch.tensor([[False, True, True, True], [True] * 4, [False, False, True, True]]),
        torch.tensor([3, 11, 7]),
        [None] * 3,
    )
    cfg = SamplingConfig(samples_per_prompt=8, max_new_tokens=12)
    batch_sizes = []
    hook = model.model.register_forward_pre_hook(
        lambda m, a, k: batch_sizes.append(k["input_ids"].shape[0]), with_kwargs=True
    )
    compact = generate_samples(model, prompts, cfg, eos_token_id=2, pad_token_id=0, seed=5, compact_finished=True)
    hook.remove()
    plain = generate_samples(model, prompts, cfg, eos_token_id=2, pad_token_id=0, seed=5, compact_finished=False)
    assert torch.equal(compact.response_ids, plain.response_ids)
    assert torch.equal(compact.response_mask, plain.response_mask)
    assert torch.equal(compact.truncated, plain.truncated)
    torch.testing.assert_close(compact.logprobs, plain.logprobs, rtol=1e-5, atol=1e-5)
    lengths = compact.response_mask.sum(-1)
    assert lengths.min() < lengths.max()  # rows finished at different steps
    assert min(batch_sizes[1:]) < 3 * 8  # decode steps ran on fewer rows once some had finished


# ---------------------------------------------------------------- stopping samples that cannot be kept


def _loglik(samples):
    return (samples.logprobs * samples.response_mask).sum(-1)  # [B, N]


@pytest.mark.parametrize("keep_top_k", [1, 3])
def test_stop_unselectable_keeps_the_same_winners_and_draws(tiny_model, keep_top_k):
    """Stopping rows that cannot be among the k best changes no kept sample: the same top-k (indices, tokens,
    scores), every unstopped row token for token as in the full run, and every stopped row would have lost."""
    from sharpening.selection import select_top_k

    eos_ids = [2, 5, 9, 13]  # several end tokens, so rows end early and the bound bites
    prompts = _prompts(PROMPTS * 3, list(range(9)))
    cfg = SamplingConfig(samples_per_prompt=8, max_new_tokens=16, prompts_per_batch=9)
    full = generate_samples(tiny_model, prompts, cfg, eos_ids, PAD, seed=3)
    fast = generate_samples(tiny_model, prompts, cfg, eos_ids, PAD, seed=3, stop_unselectable=keep_top_k)
    assert full.pruned is None and fast.pruned is not None
    assert fast.pruned.any(), "the test must exercise stopping"
    assert not fast.pruned[:, 0].any()  # sample 0 always runs to its end
    assert not (fast.pruned & fast.truncated).any()
    for policy in ("drop", "keep", "penalize"):
        want = select_top_k(_loglik(full), full.truncated, keep_top_k, policy)
        got = select_top_k(_loglik(fast), fast.truncated, keep_top_k, policy)
        assert torch.equal(want[0][want[1]], got[0][got[1]]) and torch.equal(want[1], got[1])
    whole, t = ~fast.pruned, fast.response_ids.shape[-1]  # the fast run may end in fewer steps
    assert not full.response_mask[..., t:][whole].any()
    assert torch.equal(full.response_ids[..., :t][whole], fast.response_ids[whole])
    # batch rows leave at other steps, so matmuls see other batch sizes: log-probs agree to float rounding
    torch.testing.assert_close(full.logprobs[..., :t][whole], fast.logprobs[whole], atol=1e-5, rtol=0)
    assert torch.equal(full.truncated[whole], fast.truncated[whole])
    # A stopped row's partial response is a prefix of its full response, and its full score is below the
    # k-th best response that ended by EOS.
    ended = torch.where(~full.truncated, _loglik(full), torch.full_like(_loglik(full), float("-inf")))
    kth = ended.topk(keep_top_k, dim=-1).values[:, -1:]  # [B, 1]
    assert (_loglik(full)[fast.pruned] < kth.expand_as(ended)[fast.pruned]).all()
    prefix = fast.response_mask & fast.pruned[..., None]
    assert torch.equal(full.response_ids[..., :t][prefix], fast.response_ids[prefix])
    assert fast.response_mask.sum() < full.response_mask.sum()  # tokens not drawn


def test_hf_engine_draws_what_generate_samples_draws(tiny_model):
    """The engine object passes every argument through: seed, round, EOS ids, the stopping bound."""
    from sharpening.engines import HFEngine, SamplingEngine

    engine: SamplingEngine = HFEngine()
    prompts = _prompts(PROMPTS * 2, list(range(6)))
    cfg = SamplingConfig(samples_per_prompt=6, max_new_tokens=12)
    args = (tiny_model, prompts, cfg, [2, 5, 9], PAD)
    got = engine.generate(*args, seed=4, round_index=2, stop_unselectable=1)
    want = generate_samples(*args, seed=4, round_index=2, stop_unselectable=1)
    _assert_same_draws(got, want, atol=0)
    assert got.pruned.any()  # the bound reached the loop
    assert not torch.equal(engine.generate(*args, seed=4, round_index=3).response_ids, want.response_ids)


def test_stop_unselectable_off_without_an_ended_row(uniform_model):
    """Nothing is stopped before some row has ended: there is no bound yet."""
    samples = generate_samples(
        uniform_model,
        _prompts(PROMPTS),
        SamplingConfig(samples_per_prompt=4, max_new_tokens=5),
        [VOCAB + 50],
        PAD,
        stop_unselectable=1,
    )
    assert not samples.pruned.any() and samples.truncated.all()


# ---------------------------------------------------------------- fixed-shape decoding (sampling.decode)


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def eos_likely_model(tiny_model_path, request):
    """The tiny Llama with EOS (id 2) made likely, so rows finish at different steps; each attention backend
    turns the full-length 2-D mask into its own 4-D mask."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, attn_implementation=request.param).eval()
    assert model.config._attn_implementation == request.param
    with torch.no_grad():
        model.lm_head.weight[EOS] = model.lm_head.weight.mean(0) + 0.02
    return model


def _assert_same_draws(got, want, atol=1e-5):
    assert torch.equal(got.response_ids, want.response_ids)
    assert torch.equal(got.response_mask, want.response_mask)
    assert torch.equal(got.truncated, want.truncated)
    assert (got.pruned is None) == (want.pruned is None)
    if want.pruned is not None:
        assert torch.equal(got.pruned, want.pruned)
    torch.testing.assert_close(got.logprobs, want.logprobs, atol=atol, rtol=0)


@pytest.mark.parametrize(
    "cfg, stop_unselectable",
    [(dict(), 0), (dict(temperature=0.7, top_k=8), 0), (dict(), 2), (dict(temperature=0.0), 0)],
    ids=["exact", "filtered", "stop_unselectable", "greedy"],
)
def test_static_decode_draws_as_dynamic(eos_likely_model, cfg, stop_unselectable):
    prompts = _prompts(PROMPTS * 2, [4, 9, 2, 7, 5, 3])  # prompt lengths 4, 7, 3: left padding
    eos_ids = [EOS, 3]  # 3 ends the first prompt's greedy response at step 7
    kwargs = dict(samples_per_prompt=6, max_new_tokens=14, prompts_per_batch=6, **cfg)
    dynamic = generate_samples(
        eos_likely_model, prompts, SamplingConfig(**kwargs), eos_ids, PAD, seed=4, stop_unselectable=stop_unselectable
    )
    mask_shapes = []
    hook = eos_likely_model.model.register_forward_pre_hook(
        lambda m, a, k: mask_shapes.append(tuple(k["attention_mask"].shape)), with_kwargs=True
    )
    try:
        static = generate_samples(
            eos_likely_model,
            prompts,
            SamplingConfig(decode="static", **kwargs),
            eos_ids,
            PAD,
            seed=4,
            stop_unselectable=stop_unselectable,
        )
    finally:
        hook.remove()
    _assert_same_draws(static, dynamic)
    lengths = dynamic.response_mask.sum(-1)
    assert lengths.min() < lengths.max()  # rows finished at different steps
    assert (~dynamic.truncated).any() and dynamic.truncated.any()
    if stop_unselectable:
        assert dynamic.pruned.any()
    # every decode forward has the same shapes: all B*N rows, a mask over the whole cache
    decode_shapes = set(mask_shapes[1:])
    assert decode_shapes == {(6 * 6, 64)}, decode_shapes


@pytest.mark.parametrize("decode", ["dynamic", "static"])
def test_sync_free_loop_draws_the_same(eos_likely_model, decode, monkeypatch):
    """What the loop skips on CUDA (finding live prompts, checking "every row ended" each step) changes no
    output: run here on CPU with those skips forced on."""
    import sharpening.engines.hf as hf

    prompts = _prompts(PROMPTS * 2, [4, 9, 2, 7, 5, 3])
    cfg = SamplingConfig(samples_per_prompt=6, max_new_tokens=60, prompts_per_batch=6, decode=decode)
    want = generate_samples(eos_likely_model, prompts, cfg, [EOS, 3], PAD, seed=2, stop_unselectable=2)
    monkeypatch.setattr(hf, "_avoid_syncs", lambda device: True)
    got = generate_samples(eos_likely_model, prompts, cfg, [EOS, 3], PAD, seed=2, stop_unselectable=2)
    _assert_same_draws(got, want)
    assert want.response_ids.shape[-1] < 60 and not want.truncated.any()  # every row ended before the limit


def test_static_cache_length_covers_every_fed_back_token():
    from sharpening.engines.hf_decode import static_cache_length

    assert static_cache_length(7, 14) == 64
    assert static_cache_length(7, 58) == 64  # 7 + 57 fed-back tokens fit exactly
    assert static_cache_length(7, 59) == 128


def test_static_decode_rejects_a_sliding_window_model(tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=4,
    )
    model = MistralForCausalLM(config).eval()
    with pytest.raises(ValueError, match=r"sampling.decode='static'.*use sampling.decode='dynamic'"):
        _generate(model, _prompts(PROMPTS), samples_per_prompt=2, max_new_tokens=3, decode="static")


def test_validate_rejects_an_unknown_decode_mode():
    problems = validate_sampling_config(SamplingConfig(decode="fast"), "--model.sampling")
    assert problems == [problems[0]] and problems[0].startswith("--model.sampling.decode='fast': must be one of")
    for mode in ("dynamic", "static", "compiled"):
        assert validate_sampling_config(SamplingConfig(decode=mode), "--model.sampling") == []


def test_decode_device_problems():
    from sharpening.engines import decode_device_problems

    compiled = SamplingConfig(decode="compiled")
    assert decode_device_problems(compiled, torch.device("cuda", 0), "--x") == []
    (cpu,) = decode_device_problems(compiled, torch.device("cpu"), "--x")
    assert cpu.startswith("--x.decode=compiled: CUDA graphs need a CUDA device") and "--x.decode=static" in cpu
    (fsdp,) = decode_device_problems(compiled, torch.device("cuda", 0), "--x", sharded=True)
    assert "FSDP" in fsdp
    for mode in ("dynamic", "static"):
        assert decode_device_problems(SamplingConfig(decode=mode), torch.device("cpu"), "--x", sharded=True) == []


def test_compiled_decode_off_cuda_fails_before_any_forward():
    model = FixedLogitsLM(torch.zeros(6))
    with pytest.raises(ValueError, match=r"sampling.decode='compiled'.*cpu.*'static' or 'dynamic'"):
        _generate(model, _prompts([[1, 3]]), eos=99, samples_per_prompt=2, max_new_tokens=3, decode="compiled")
    assert model.calls == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_and_static_decode_draw_as_dynamic_on_cuda(tiny_model_path):
    """On CUDA (float32), 'static' and 'compiled' give the dynamic loop's tokens; the second compiled call
    reuses the compiled forward."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).cuda().eval()
    prompts = _prompts(PROMPTS, [0, 1, 2])
    prompts = dataclasses.replace(prompts, prompt_ids=prompts.prompt_ids.cuda(), prompt_mask=prompts.prompt_mask.cuda())

    def run(decode, seed):
        cfg = SamplingConfig(samples_per_prompt=4, max_new_tokens=10, decode=decode)
        return generate_samples(model, prompts, cfg, EOS, PAD, seed=seed)

    for seed in (0, 1):  # the second round reuses the compiled forward
        want = run("dynamic", seed)
        _assert_same_draws(run("static", seed), want, atol=1e-4)
        _assert_same_draws(run("compiled", seed), want, atol=1e-4)
    assert "_sharpening_compiled_forward" in model.__dict__


def test_stop_token_ids_add_the_generation_configs_eos_ids(tiny_model_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sharpening.policy import stop_token_ids

    model, tok = AutoModelForCausalLM.from_pretrained(tiny_model_path), AutoTokenizer.from_pretrained(tiny_model_path)
    assert stop_token_ids(model, tok) == [tok.eos_token_id]
    model.generation_config.eos_token_id = [7, tok.eos_token_id, 9]  # e.g. an instruct model's end-of-turn ids
    assert stop_token_ids(model, tok) == [tok.eos_token_id, 7, 9]
    model.generation_config.eos_token_id = None
    assert stop_token_ids(model, tok) == [tok.eos_token_id]
