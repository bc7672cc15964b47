"""Collapse diagnostics (sharpening.diagnostics) on hand-made groups, every value counted by hand."""

from __future__ import annotations

import math

import pytest
import torch

from sharpening.diagnostics import (
    answer_entropy,
    distinct_ngram_ratio,
    entropy_band_mask,
    group_diagnostics,
    majority_share,
    mean_token_entropy,
    within_entropy_band,
)
from sharpening.metrics import SharpeningMetric
from sharpening.selection import SelectionConfig, validate_selection_config
from sharpening.types import PromptBatch, SampleBatch, ScoredSamples

T, F = True, False


def _group():
    """2 prompts x 2 responses; masked positions hold tokens that must never count.

    prompt 0: [1,2,3] and [1,2,3]: bigrams (1,2)(2,3)(1,2)(2,3) -> 2/4; trigrams (1,2,3) x2 -> 1/2.
    prompt 1: [4,4,4,4] and [5 | 9 9 9]: bigrams (4,4) x3 -> 1/3 (the short one has none); trigrams (4,4,4) x2 -> 1/2.
    """
    ids = torch.tensor([[[1, 2, 3, 7], [1, 2, 3, 8]], [[4, 4, 4, 4], [5, 9, 9, 9]]])
    mask = torch.tensor([[[T, T, T, F], [T, T, T, F]], [[T, T, T, T], [T, F, F, F]]])
    return ids, mask


def test_distinct_ngram_ratio_by_hand():
    ids, mask = _group()
    assert distinct_ngram_ratio(ids, mask, 2).tolist() == pytest.approx([2 / 4, 1 / 3])
    assert distinct_ngram_ratio(ids, mask, 3).tolist() == pytest.approx([1 / 2, 1 / 2])
    assert distinct_ngram_ratio(ids, mask, 1).tolist() == pytest.approx([3 / 6, 2 / 5])


def test_distinct_ngram_ratio_is_nan_without_any_ngram():
    ids = torch.tensor([[[3, 0], [4, 0]]])
    mask = torch.tensor([[[T, F], [T, F]]])
    assert math.isnan(distinct_ngram_ratio(ids, mask, 2).item())


def test_ngrams_do_not_run_across_responses():
    """Two responses [1] and [2]: no bigram; joining them would invent (1, 2)."""
    ids = torch.tensor([[[1], [2]]])
    assert math.isnan(distinct_ngram_ratio(ids, torch.ones(1, 2, 1, dtype=torch.bool), 2).item())


def test_group_diagnostics_lengths_and_ratios():
    ids, mask = _group()
    out = group_diagnostics(ids, mask)
    assert out["response_tokens"].tolist() == pytest.approx([3.0, 2.5])
    assert out["distinct_2gram"].tolist() == pytest.approx([0.5, 1 / 3])
    assert out["distinct_3gram"].tolist() == pytest.approx([0.5, 0.5])


def test_majority_share_counts_the_largest_answer_over_all_samples():
    answers = [["7", "7", "3", None, "7"], ["1", "2"], [None, None, None], ["a", "b", "b", "a"]]
    assert majority_share(answers).tolist() == pytest.approx([3 / 5, 1 / 2, 0.0, 1 / 2])


def test_answer_entropy_by_hand_with_unanswered_samples_as_their_own_clusters():
    answers = [["7", "7", "7", "7"], ["7", "7", "3", "3"], ["7", "7", None, None], [None, None, None, None]]
    h_half = math.log(2)
    h_2_1_1 = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert answer_entropy(answers).tolist() == pytest.approx([0.0, h_half, h_2_1_1, math.log(4)])


def test_entropy_band_keeps_the_middle_and_its_edges():
    entropy = answer_entropy([["7"] * 4, ["7", "7", "3", "3"], ["1", "2", "3", "4"], ["1", "1", "1", "2"]])
    kept = entropy_band_mask(entropy, low=0.5, high=math.log(2) + 1e-6)
    assert kept.tolist() == [False, True, False, True]  # too easy, in band, too hard, in band (0.562)


def test_mean_token_entropy_ignores_padding():
    entropy = torch.tensor([[[1.0, 2.0, 100.0], [3.0, 50.0, 50.0]]])
    mask = torch.tensor([[[T, T, F], [T, F, F]]])
    assert mean_token_entropy(entropy, mask).item() == pytest.approx(2.0)


def _scored(ids, mask, pruned=None):
    b, n, _ = ids.shape
    prompts = PromptBatch(
        torch.ones(b, 1, dtype=torch.long), torch.ones(b, 1, dtype=torch.bool), torch.arange(b), [None] * b
    )
    samples = SampleBatch(prompts, ids, mask, torch.zeros(ids.shape), torch.zeros(b, n, dtype=torch.bool), True, pruned)
    return ScoredSamples(
        samples, torch.zeros(b, n), torch.zeros(b, 1, dtype=torch.long), torch.ones(b, 1, dtype=torch.bool)
    )


def test_round_metric_reports_the_diagnostics_over_batches():
    ids, mask = _group()
    metric = SharpeningMetric()
    metric.update(_scored(ids, mask), answers=[["1", "1"], ["2", None]], token_entropy=torch.full(ids.shape, 0.5))
    metric.update(_scored(ids[:1], mask[:1]), answers=[["3", "4"]], token_entropy=torch.full((1, 2, 4), 2.0))
    out = metric.compute()
    assert out["sample/response_tokens"].item() == pytest.approx((3 + 3 + 4 + 1 + 3 + 3) / 6)
    assert out["sample/distinct_2gram"].item() == pytest.approx((1 / 2 + 1 / 3 + 1 / 2) / 3)
    assert out["sample/distinct_3gram"].item() == pytest.approx((1 / 2 + 1 / 2 + 1 / 2) / 3)
    assert out["sample/majority_share"].item() == pytest.approx((1 + 1 / 2 + 1 / 2) / 3)
    assert out["sample/token_entropy"].item() == pytest.approx((11 * 0.5 + 6 * 2.0) / 17)  # per token, not per batch


def test_round_metric_leaves_out_what_it_was_not_given_or_cannot_know():
    ids, mask = _group()
    metric = SharpeningMetric()
    metric.update(_scored(ids, mask, pruned=torch.tensor([[False, True], [False, False]])), answers=[["1", "1"]] * 2)
    out = metric.compute()
    assert out["sample/response_tokens"].item() == pytest.approx((3 + 4) / 2)  # each prompt's first (whole) draw
    for left_out in ("distinct_2gram", "distinct_3gram", "majority_share", "token_entropy"):
        assert f"sample/{left_out}" not in out


def test_round_metric_reads_the_answers_the_round_extracted():
    ids, mask = _group()
    scored = _scored(ids, mask)
    scored.answers = [["1", None], ["2", "2"]]
    metric = SharpeningMetric()
    metric.update(scored)
    assert metric.compute()["sample/majority_share"].item() == pytest.approx((1 / 2 + 1) / 2)


def test_rl_step_logs_the_repetition_of_the_policy_draws():
    from sharpening.rl.rollout import policy_estimates

    ids, mask = _group()
    samples = _scored(ids, mask).samples
    seq = torch.zeros(2, 2)
    out = policy_estimates(seq, seq, samples, kl_coef=0.1)
    assert out["train/distinct_2gram"].item() == pytest.approx((1 / 2 + 1 / 3) / 2)
    short_ids = torch.tensor([[[1, 2, 0], [3, 0, 0]], [[4, 4, 4], [4, 4, 4]]])  # prompt 0: no 3-gram; 1: 1 of 2
    short_mask = torch.tensor([[[T, T, F], [T, F, F]], [[T, T, T], [T, T, T]]])
    short = _scored(short_ids, short_mask).samples
    assert policy_estimates(seq, seq, short, 0.1)["train/distinct_3gram"].item() == pytest.approx((1.0 + 0.5) / 2)


def test_round_skips_prompts_outside_the_entropy_band():
    selected_mask = torch.tensor([[T, T], [T, F], [T, T], [T, T]])  # K = 2; prompt 1 had one eligible sample
    answers = [["7"] * 4, ["7", "7", "3", "3"], ["1", "2", "3", "4"], ["1", "1", "1", None]]  # 0, 0.69, 1.39, 0.56
    kept = within_entropy_band(selected_mask, answers, (0.5, 1.0))
    assert kept.tolist() == [[F, F], [T, F], [F, F], [T, T]]
    assert within_entropy_band(selected_mask, answers, None) is selected_mask


@pytest.mark.parametrize("band", [(1.0, 0.5), (-0.1, 1.0), (0.1,)])
def test_a_bad_entropy_band_is_refused(band):
    cfg = SelectionConfig(answer_entropy_band=band)
    problems = validate_selection_config(cfg, 4, "--verifier.selection")
    assert any(p.startswith("--verifier.selection.answer_entropy_band=") for p in problems)
    assert validate_selection_config(SelectionConfig(answer_entropy_band=(0.0, 0.0)), 4, "--verifier.selection") == []


# ---------------------------------------------------------------- online RL: entropy band, answers, token entropy


def test_rl_band_leaves_the_prompts_outside_it_out_of_the_loss_beside_dropped_samples():
    from sharpening.rl.config import RLConfig
    from sharpening.rl.rollout import build_rollout, entropy_band_prompts

    ids = torch.tensor([[[1, 2], [1, 3]], [[4, 5], [4, 6]], [[7, 8], [7, 9]]])  # B=3, G=2
    samples = _scored(ids, torch.ones(3, 2, 2, dtype=torch.bool)).samples
    samples.truncated = torch.tensor([[F, F], [F, T], [F, F]])
    base_logprobs = torch.tensor([[[-1.0, -1.0], [-2.0, -2.0]]] * 3)  # rewards -2, -4 in every group
    answers = [["a", "a"], ["a", "b"], ["a", "b"]]  # entropies 0, log 2, log 2
    band_mask = entropy_band_prompts(answers, (0.5, 1.0))
    assert band_mask.tolist() == [F, T, T]
    rl = RLConfig(kl_coef=0.5, kl_estimator="k3", baseline="mean", truncated="drop")
    rollout = build_rollout(samples, base_logprobs, rl, self_rewards=None, band_mask=band_mask)
    # prompt 0: outside the band; prompt 1: one sample dropped (truncated), too few left for a baseline
    assert rollout.in_loss.tolist() == [F, F, T, F, T, T]
    assert rollout.advantages.tolist() == [0.0, 0.0, 0.0, 0.0, 1.0, -1.0]
    keep = build_rollout(samples, base_logprobs, RLConfig(kl_coef=0.5, kl_estimator="k3", baseline="mean"))
    assert keep.in_loss is None and keep.advantages.tolist() == [1.0, -1.0] * 3
    banded = build_rollout(samples, base_logprobs, RLConfig(kl_coef=0.5, kl_estimator="k3"), band_mask=band_mask)
    assert banded.in_loss.tolist() == [F, F, T, T, T, T]
    assert entropy_band_prompts(answers, None) is None


def test_rl_answer_metrics_majority_share_and_accuracy_only_with_references():
    from sharpening.rl.rollout import answer_metrics
    from sharpening.tasks.extractors import resolve_extractor

    strip = resolve_extractor("strip")
    answers = [["4", "4", "5", None], ["7", "8", "8", "8"]]
    out = answer_metrics(answers, [" 4 ", "7"], strip)
    assert out["train/majority_share"].item() == pytest.approx((2 / 4 + 3 / 4) / 2)
    assert out["train/accuracy"].item() == pytest.approx(3 / 8)  # two 4s, one 7
    assert set(answer_metrics(answers, [None, None], strip)) == {"train/majority_share"}


@pytest.mark.parametrize("band", [(1.0, 0.5), (-0.1, 1.0), (0.1,)])
def test_rl_refuses_a_bad_entropy_band_and_one_off_online(band):
    from sharpening.engines import SamplingConfig
    from sharpening.rl.config import RLConfig, validate_rl_config

    problems = validate_rl_config(RLConfig(answer_entropy_band=band), SamplingConfig(samples_per_prompt=4))
    assert any(p.startswith("--model.rl.answer_entropy_band=") for p in problems)
    assert validate_rl_config(RLConfig(answer_entropy_band=(0.0, 0.0)), SamplingConfig(samples_per_prompt=4)) == []
    offline = validate_rl_config(RLConfig(algorithm="xpo", answer_entropy_band=(0.0, 1.0)), SamplingConfig())
    assert any("answer_entropy_band" in p and "online" in p for p in offline)


def _brute_token_entropies(model, samples) -> torch.Tensor:
    """Every response token's next-token entropy from the full softmax, sample by sample, concatenated."""
    prompts, entropies = samples.prompts, []
    with torch.no_grad():
        for b in range(len(prompts)):
            prompt = prompts.prompt_ids[b][prompts.prompt_mask[b]]
            for n in range(samples.samples_per_prompt):
                response = samples.response_ids[b, n][samples.response_mask[b, n]]
                logits = model(torch.cat([prompt, response])[None]).logits[0].float()  # [P + T, V]
                at = logits[len(prompt) - 1 : len(prompt) - 1 + len(response)].log_softmax(-1)  # [T, V]
                entropies.append(-(at.exp() * at).sum(-1))  # [T]
    return torch.cat(entropies)


def test_rl_token_entropy_is_the_drawing_policys_brute_force_entropy(tiny_model):
    from contextlib import nullcontext

    from sharpening.rl.rollout import policy_token_entropy

    vocab = tiny_model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(3, vocab, (2, 3), generator=generator)
    prompt_mask = torch.tensor([[F, T, T], [T, T, T]])  # left-padded
    response_ids = torch.randint(3, vocab, (2, 2, 4), generator=generator)  # [B, G, T]
    response_mask = torch.tensor([[[T, T, T, F], [T, T, F, F]], [[T, T, T, T], [T, F, F, F]]])
    prompts = PromptBatch(prompt_ids, prompt_mask, torch.arange(2), [None, None])
    samples = SampleBatch(
        prompts, response_ids, response_mask, torch.zeros(2, 2, 4), torch.zeros(2, 2, dtype=torch.bool), True, None
    )
    brute = _brute_token_entropies(tiny_model, samples).mean()  # over all response tokens
    got = policy_token_entropy(lambda: nullcontext(tiny_model), samples, chunk_size=2)
    torch.testing.assert_close(got, brute, rtol=1e-4, atol=1e-5)


def test_round_logs_the_sampling_models_brute_force_token_entropy_only_when_asked(tiny_model, tiny_tokenizer):
    from contextlib import nullcontext

    from sharpening.engines import SamplingConfig, generate_samples
    from sharpening.policy import stop_token_ids
    from sharpening.tasks.extractors import resolve_extractor
    from sharpening.verifier import RoundModels, RoundSettings, run_round

    model = lambda: nullcontext(tiny_model)  # noqa: E731
    models = RoundModels(model, model, tiny_tokenizer, logprob_chunk_size=2)
    ids = [tiny_tokenizer(p, add_special_tokens=False)["input_ids"] for p in ("abc=", "de=")]
    width = max(map(len, ids))
    prompt_ids = torch.tensor([[tiny_tokenizer.pad_token_id] * (width - len(i)) + i for i in ids])
    prompt_mask = torch.tensor([[F] * (width - len(i)) + [T] * len(i) for i in ids])  # left-padded
    prompts = PromptBatch(prompt_ids, prompt_mask, torch.arange(2), [None, None])
    sampling = SamplingConfig(samples_per_prompt=3, max_new_tokens=4)
    settings = RoundSettings(sampling, SelectionConfig(), resolve_extractor("strip"), greedy_accuracy=False)
    assert "sample/token_entropy" not in run_round(models, [prompts], settings, epoch=0).metric.compute()
    settings.log_token_entropy = True
    result = run_round(models, [prompts], settings, epoch=0, keep_all=True)
    drawn = generate_samples(  # the round's draws again: a prompt's samples depend only on (seed, epoch, prompt)
        tiny_model, prompts, sampling, stop_token_ids(tiny_model, tiny_tokenizer), tiny_tokenizer.pad_token_id, seed=0,
        round_index=0, stop_unselectable=0,
    )  # fmt: skip
    brute = _brute_token_entropies(tiny_model, drawn).mean()
    torch.testing.assert_close(result.metric.compute()["sample/token_entropy"].float(), brute, rtol=1e-4, atol=1e-5)


def test_a_token_entropy_flag_the_run_does_not_read_is_warned_about(tiny_model_path):
    from types import SimpleNamespace

    from sharpening.callbacks import SelfVerificationCallback
    from sharpening.policy import PolicyConfig
    from sharpening.rl import RLConfig, RLSharpeningModule
    from sharpening.run_checks import run_warnings

    def warnings(module, **kwargs):
        return run_warnings(module, SimpleNamespace(callbacks=[SelfVerificationCallback(**kwargs)]))

    assert warnings(object(), log_token_entropy=True) == []  # a best-of-N round feeding SFT reads it
    (message,) = warnings(object(), select_by="power", log_token_entropy=True)
    assert "--verifier.log_token_entropy (best-of-N rounds only)" in message
    online = RLSharpeningModule(PolicyConfig(model_name_or_path=tiny_model_path), RLConfig())
    (message,) = warnings(online, log_token_entropy=True)
    assert "--verifier.log_token_entropy=true is set but not used" in message
    assert "--model.rl.log_token_entropy true" in message
