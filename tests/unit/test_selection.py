"""select_top_k / best_of_n: table-driven, ties included; mark_unselectable against a brute-force reference."""

from __future__ import annotations

import pytest
import torch

from sharpening.selection import (
    SelectionConfig,
    best_of_n,
    mark_unselectable,
    select_top_k,
    validate_selection_config,
)

INF, NAN = float("inf"), float("nan")
T, F = True, False


@pytest.mark.parametrize(
    "scores, truncated, kwargs, selected, mask",
    [
        # plain argmax
        ([[-3.0, -1.0, -2.0]], [[F, F, F]], {}, [[1]], [[T]]),
        # ties go to the lowest index
        ([[-1.0, -1.0, -1.0]], [[F, F, F]], {}, [[0]], [[T]]),
        ([[-5.0, -1.0, -1.0]], [[F, F, F]], {}, [[1]], [[T]]),
        ([[-1.0, -2.0, -1.0, -1.0]], [[F, F, F, F]], dict(keep_top_k=3), [[0, 2, 3]], [[T, T, T]]),
        # truncated: drop (default) skips the best one
        ([[-1.0, -2.0, -3.0]], [[T, F, F]], {}, [[1]], [[T]]),
        # truncated: keep
        ([[-1.0, -2.0, -3.0]], [[T, F, F]], dict(truncated_policy="keep"), [[0]], [[T]]),
        # truncated: penalize by 10 -> -11 loses to -2
        ([[-1.0, -2.0, -3.0]], [[T, F, F]], dict(truncated_policy="penalize"), [[1]], [[T]]),
        # penalize with a small penalty keeps it best
        ([[-1.0, -2.0, -3.0]], [[T, F, F]], dict(truncated_policy="penalize", truncation_penalty=0.5), [[0]], [[T]]),
        # penalize: a penalized sample is still eligible when it is the only one
        ([[-1.0, -2.0]], [[T, T]], dict(truncated_policy="penalize"), [[0]], [[T]]),
        # all ineligible -> mask False
        ([[-1.0, -2.0]], [[T, T]], {}, [[0]], [[F]]),
        # min_score
        ([[-1.0, -2.0, -3.0]], [[F, F, F]], dict(min_score=-1.5, keep_top_k=2), [[0, 1]], [[T, F]]),
        ([[-1.0, -2.0, -3.0]], [[F, F, F]], dict(min_score=-2.0, keep_top_k=3), [[0, 1, 2]], [[T, T, F]]),
        ([[-4.0, -5.0]], [[F, F]], dict(min_score=-3.0), [[0]], [[F]]),
        # min_score applies to the penalized score
        (
            [[-1.0, -5.0]],
            [[T, F]],
            dict(truncated_policy="penalize", truncation_penalty=3.0, min_score=-4.5),
            [[0]],
            [[T]],
        ),
        (
            [[-1.0, -5.0]],
            [[T, F]],
            dict(truncated_policy="penalize", truncation_penalty=3.0, min_score=-3.5),
            [[0]],
            [[F]],
        ),
        # non-finite scores are never kept
        ([[NAN, -2.0, INF, -INF]], [[F, F, F, F]], {}, [[1]], [[T]]),
        ([[NAN, -INF]], [[F, F]], {}, [[0]], [[F]]),
        ([[NAN, -2.0, INF, -1.0]], [[F, F, F, F]], dict(keep_top_k=3), [[3, 1, 0]], [[T, T, F]]),
        # k > 1: best first
        ([[0.1, 0.5, 0.3, 0.9]], [[F, F, F, F]], dict(keep_top_k=4), [[3, 1, 2, 0]], [[T, T, T, T]]),
        ([[0.1, 0.5, 0.3, 0.9]], [[F, T, F, F]], dict(keep_top_k=3), [[3, 2, 0]], [[T, T, T]]),
        # several prompts are independent rows
        ([[1.0, 2.0], [2.0, 1.0], [1.0, 1.0]], [[F, F], [F, F], [F, F]], {}, [[1], [0], [0]], [[T], [T], [T]]),
    ],
)
def test_select_top_k_table(scores, truncated, kwargs, selected, mask):
    got, got_mask = select_top_k(torch.tensor(scores), torch.tensor(truncated), **kwargs)
    assert got.dtype == torch.long and got_mask.dtype == torch.bool
    assert got_mask.tolist() == mask
    # where the mask is False the index is unspecified: compare kept slots only
    k = len(mask[0])
    assert got.shape == (len(scores), k)
    for row, row_mask, want_row in zip(got.tolist(), mask, selected):
        assert [i for i, m in zip(row, row_mask) if m] == [i for i, m in zip(want_row, row_mask) if m]


def test_masked_out_slots_come_after_kept_ones():
    got, mask = select_top_k(torch.tensor([[-1.0, -2.0, -3.0, -4.0]]), torch.tensor([[T, F, T, F]]), keep_top_k=4)
    assert mask.tolist() == [[T, T, F, F]]
    assert got[0, :2].tolist() == [1, 3]
    assert sorted(got[0].tolist()) == [0, 1, 2, 3]  # still a permutation of the samples


def test_ties_are_broken_deterministically_for_many_samples():
    scores = torch.zeros(3, 64)
    scores[1, 40] = scores[1, 50] = 1.0
    got, mask = select_top_k(scores, torch.zeros_like(scores, dtype=torch.bool), keep_top_k=3)
    assert got.tolist() == [[0, 1, 2], [40, 50, 0], [0, 1, 2]]
    assert mask.all()


def test_does_not_modify_inputs():
    scores = torch.tensor([[-1.0, -2.0]])
    truncated = torch.tensor([[T, F]])
    select_top_k(scores, truncated, truncated_policy="penalize")
    assert scores.tolist() == [[-1.0, -2.0]] and truncated.tolist() == [[T, F]]


def test_unknown_truncated_policy_raises():
    with pytest.raises(ValueError, match="unknown truncated policy 'ignore'"):
        select_top_k(torch.zeros(1, 2), torch.zeros(1, 2, dtype=torch.bool), truncated_policy="ignore")


@pytest.mark.parametrize(
    "scores, truncated, policy, want",
    [
        ([[-3.0, -1.0], [-1.0, -1.0]], None, "keep", [1, 0]),
        ([[-1.0, -2.0]], [[T, F]], "keep", [0]),
        ([[-1.0, -2.0]], [[T, F]], "drop", [1]),
        ([[-1.0, -2.0]], [[T, T]], "drop", [0]),  # none eligible: falls back to sample 0
        ([[-2.0, -1.0]], [[T, T]], "drop", [0]),
        ([[NAN, NAN, NAN]], None, "keep", [0]),
    ],
)
def test_best_of_n(scores, truncated, policy, want):
    truncated = None if truncated is None else torch.tensor(truncated)
    got = best_of_n(torch.tensor(scores), truncated, policy)
    assert got.shape == (len(scores),) and got.tolist() == want


def test_validate_selection_config():
    assert validate_selection_config(SelectionConfig(), 8, "--model.selection") == []
    bad = SelectionConfig(reward="bleu", keep_top_k=9, truncated="ignore")
    problems = validate_selection_config(bad, 8, "--model.selection")
    assert len(problems) == 3
    assert problems[0].startswith("--model.selection.reward='bleu'")
    assert problems[1].startswith("--model.selection.keep_top_k=9") and "(8)" in problems[1]
    assert problems[2].startswith("--model.selection.truncated='ignore'")
    assert validate_selection_config(SelectionConfig(keep_top_k=0), 8, "--x")[0].startswith("--x.keep_top_k=0")


def _unselectable_by_hand(running, row_ids, end_scores, k):
    """Per live row: not sample 0, and its running sum below (with the margin) the k-th best ended score."""
    n, out = len(end_scores[0]), []
    for score, row in zip(running, row_ids):
        ended = sorted(end_scores[row // n], reverse=True)
        kth = ended[k - 1] if k <= n else ended[-1]
        out.append(row % n != 0 and score < kth - 1e-4 * (1.0 + abs(kth)))
    return out


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_mark_unselectable_matches_a_reference(k):
    """Rows of 3 prompts x 4 samples, some ended (finite end scores), live rows in any subset and order."""
    g = torch.Generator().manual_seed(k)
    end_scores = torch.where(torch.rand(3, 4, generator=g) < 0.6, -10 * torch.rand(3, 4, generator=g), -INF)
    row_ids = torch.tensor([0, 1, 2, 3, 5, 6, 7, 9, 10, 11])
    running = -12 * torch.rand(row_ids.shape[0], generator=g)
    got = mark_unselectable(running, row_ids, end_scores, k)
    assert got.tolist() == _unselectable_by_hand(running.tolist(), row_ids.tolist(), end_scores.tolist(), k)


def test_mark_unselectable_table():
    end_scores = torch.tensor([[-1.0, -3.0, -INF], [-INF, -INF, -INF]])
    row_ids = torch.tensor([0, 1, 2, 4, 5])
    # prompt 0: best ended -1, 2nd best -3; prompt 1: nothing ended, no bound yet
    running = torch.tensor([-9.0, -2.0, -3.5, -50.0, -50.0])
    assert mark_unselectable(running, row_ids, end_scores, 1).tolist() == [F, T, T, F, F]  # row 0 is sample 0
    assert mark_unselectable(running, row_ids, end_scores, 2).tolist() == [F, F, T, F, F]
    assert mark_unselectable(running, row_ids, end_scores, 3).tolist() == [F, F, F, F, F]  # 3rd best is -inf
    # a near-tie within the relative margin is not a stop: float rounding of the final sum could flip it
    near = torch.tensor([-1.0 - 1e-5, -1.0 - 1e-3])
    assert mark_unselectable(near, torch.tensor([1, 2]), end_scores, 1).tolist() == [F, T]
