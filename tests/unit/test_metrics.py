"""SharpeningMetric on hand-built ScoredSamples: every value computed by hand."""

from __future__ import annotations

import pytest
import torch

from sharpening.metrics import SharpeningMetric
from sharpening.types import PromptBatch, SampleBatch, ScoredSamples


def _scored(scores, selected, selected_mask, truncated, response_ids, response_mask) -> ScoredSamples:
    scores = torch.tensor(scores)
    b, n = scores.shape
    prompts = PromptBatch(
        torch.ones(b, 2, dtype=torch.long), torch.ones(b, 2, dtype=torch.bool), torch.arange(b), [None] * b
    )
    response_ids = torch.tensor(response_ids)
    samples = SampleBatch(
        prompts=prompts,
        response_ids=response_ids,
        response_mask=torch.tensor(response_mask),
        logprobs=torch.zeros(response_ids.shape),
        truncated=torch.tensor(truncated),
        exact_draws=True,
    )
    return ScoredSamples(samples, scores, torch.tensor(selected), torch.tensor(selected_mask))


T, F = True, False


def _batch():
    """2 prompts x 3 samples.

    prompt 0: scores -1, -2, -3; keeps sample 0; responses [5,2], [5,2], [6,2 | pad 9 masked] -> 2 distinct.
    prompt 1: scores -4, -0.5, -6; keeps sample 1; nothing truncated but sample 2;
              responses [7], [7,8], [7] with different padding garbage -> 2 distinct.
    """
    return _scored(
        scores=[[-1.0, -2.0, -3.0], [-4.0, -0.5, -6.0]],
        selected=[[0], [1]],
        selected_mask=[[T], [T]],
        truncated=[[F, F, F], [F, F, T]],
        response_ids=[[[5, 2, 0], [5, 2, 0], [6, 2, 9]], [[7, 0, 0], [7, 8, 0], [7, 3, 3]]],
        response_mask=[[[T, T, F], [T, T, F], [T, T, F]], [[T, F, F], [T, T, F], [T, F, F]]],
    )


def test_self_reward_truncation_and_diversity_by_hand():
    metric = SharpeningMetric()
    metric.update(_batch())
    out = metric.compute()
    mean_all = (-1 - 2 - 3 - 4 - 0.5 - 6) / 6
    mean_selected = (-1 - 0.5) / 2
    assert out["sample/self_reward_mean"].item() == pytest.approx(mean_all)
    assert out["sample/self_reward_selected_mean"].item() == pytest.approx(mean_selected)
    assert out["sample/selected_minus_random"].item() == pytest.approx(mean_selected - mean_all)
    assert out["sample/truncated_fraction"].item() == pytest.approx(1 / 6)
    assert out["sample/distinct_per_prompt"].item() == pytest.approx((2 + 2) / 2)
    assert out["sample/kept_per_prompt"].item() == pytest.approx(1.0)
    assert all(v.dtype == torch.float32 for v in out.values())


def test_accuracy_keys_absent_without_answers():
    metric = SharpeningMetric()
    metric.update(_batch())
    keys = set(metric.compute())
    assert keys == {
        "sample/self_reward_mean",
        "sample/self_reward_selected_mean",
        "sample/truncated_fraction",
        "sample/distinct_per_prompt",
        "sample/kept_per_prompt",
        "sample/selected_minus_random",
        "sample/response_tokens",
        "sample/distinct_2gram",  # no 3-gram: every response has at most 2 tokens
    }


def test_accuracies_by_hand():
    metric = SharpeningMetric()
    # prompt 0: first draw wrong, the selected sample (0)... wrong, sample 2 right -> pass only
    # prompt 1: first draw right, selected sample 1 right
    correct = torch.tensor([[F, F, T], [T, T, F]])
    metric.update(_batch(), correct=correct, greedy_correct=torch.tensor([T, F]))
    out = metric.compute()
    assert out["sample/accuracy"].item() == pytest.approx(1 / 2)
    assert out["sample/pass_at_n"].item() == pytest.approx(2 / 2)
    assert out["sample/bon_accuracy"].item() == pytest.approx(1 / 2)
    assert out["sample/greedy_accuracy"].item() == pytest.approx(1 / 2)


def test_greedy_key_only_with_greedy_answers():
    metric = SharpeningMetric()
    metric.update(_batch(), correct=torch.tensor([[T, F, F], [F, F, F]]))
    out = metric.compute()
    assert "sample/accuracy" in out and "sample/greedy_accuracy" not in out
    metric = SharpeningMetric()
    metric.update(_batch(), greedy_correct=torch.tensor([T, T]))
    out = metric.compute()
    assert out["sample/greedy_accuracy"].item() == 1.0 and "sample/accuracy" not in out


def test_bon_counts_only_kept_selections():
    scored = _batch()
    scored.selected_mask = torch.tensor([[F], [T]])  # prompt 0 had no eligible sample
    metric = SharpeningMetric()
    metric.update(scored, correct=torch.tensor([[T, T, T], [F, F, F]]))
    out = metric.compute()
    assert out["sample/bon_accuracy"].item() == 0.0  # the right answer of prompt 0 was not selected
    assert out["sample/accuracy"].item() == pytest.approx(0.5)
    assert out["sample/self_reward_selected_mean"].item() == pytest.approx(-0.5)
    assert out["sample/kept_per_prompt"].item() == pytest.approx(0.5)


def test_top_k_selection_means():
    scored = _batch()
    scored.selected = torch.tensor([[0, 1], [1, 0]])
    scored.selected_mask = torch.tensor([[T, T], [T, F]])
    metric = SharpeningMetric()
    metric.update(scored)
    out = metric.compute()
    assert out["sample/self_reward_selected_mean"].item() == pytest.approx((-1 - 2 - 0.5) / 3)
    assert out["sample/kept_per_prompt"].item() == pytest.approx(3 / 2)


def test_updates_accumulate_and_reset():
    metric = SharpeningMetric()
    metric.update(_batch(), correct=torch.tensor([[T, F, F], [T, F, F]]))
    second = _scored(
        scores=[[-10.0, -20.0]],
        selected=[[1]],
        selected_mask=[[T]],
        truncated=[[T, T]],
        response_ids=[[[4, 4], [4, 4]]],
        response_mask=[[[T, T], [T, T]]],
    )
    metric.update(second, correct=torch.tensor([[F, T]]))
    out = metric.compute()
    assert out["sample/self_reward_mean"].item() == pytest.approx((-16.5 - 30) / 8)
    assert out["sample/self_reward_selected_mean"].item() == pytest.approx((-1 - 0.5 - 20) / 3)
    assert out["sample/truncated_fraction"].item() == pytest.approx(3 / 8)
    assert out["sample/distinct_per_prompt"].item() == pytest.approx((2 + 2 + 1) / 3)
    assert out["sample/accuracy"].item() == pytest.approx(2 / 3)
    assert out["sample/pass_at_n"].item() == pytest.approx(3 / 3)
    assert out["sample/bon_accuracy"].item() == pytest.approx(2 / 3)
    metric.reset()
    metric.update(second)
    assert metric.compute()["sample/self_reward_mean"].item() == pytest.approx(-15.0)


def test_self_reward_mean_ignores_non_finite_scores_consistently():
    scored = _batch()
    scored.scores = torch.tensor([[-1.0, -2.0, float("-inf")], [-4.0, -0.5, -6.0]])
    metric = SharpeningMetric()
    metric.update(scored)
    out = metric.compute()
    # a mean over the finite scores (the only ones summed)
    assert out["sample/self_reward_mean"].item() == pytest.approx((-1 - 2 - 4 - 0.5 - 6) / 5)


def test_stopped_samples_use_first_draws_and_drop_all_sample_statistics():
    """With samples stopped early (pruned), random-sample statistics come from the first draws (complete),
    pass@N and distinct responses are not reported, and the stopped share is."""
    scored = _batch()
    scored.samples.pruned = torch.tensor([[F, F, T], [F, F, F]])
    scored.scores[0, 2] = float("-inf")
    correct = torch.tensor([[F, F, T], [T, T, F]])
    metric = SharpeningMetric()
    metric.update(scored, correct)
    out = metric.compute()
    assert out["sample/self_reward_mean"].item() == pytest.approx((-1 - 4) / 2)  # first draws only
    assert out["sample/selected_minus_random"].item() == pytest.approx((-1 - 0.5) / 2 - (-1 - 4) / 2)
    assert out["sample/truncated_fraction"].item() == 0.0
    assert out["sample/stopped_fraction"].item() == pytest.approx(1 / 6)
    assert out["sample/accuracy"].item() == pytest.approx(1 / 2)
    assert out["sample/bon_accuracy"].item() == pytest.approx(1 / 2)  # prompt 0 kept a wrong sample
    assert "sample/pass_at_n" not in out and "sample/distinct_per_prompt" not in out
