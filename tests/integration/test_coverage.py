"""The low-coverage toy and SFT-sharpening's exact sample need (docs/rl.md): the enumeration formula
P(BoN@N = y) = (F(y)^N - F(y-)^N) * m_y / m_tie against its closed form and against Monte Carlo draws
selected by the library's own best-of-N rule."""

from __future__ import annotations

import math

import pytest
import torch

from sharpening.selection import best_of_n
from sharpening.tasks import coverage, toy


def _table_logprobs(table: dict[str, float]) -> torch.Tensor:
    return torch.tensor(list(table.values()), dtype=torch.float64).log()


def test_the_low_coverage_table_has_a_rare_unique_argmax():
    table = toy.LOW_COVERAGE_TABLES["x="]
    outcomes = toy.toy_outcomes(toy.LOW_COVERAGE_LETTERS, toy.LOW_COVERAGE_MAX_NEW_TOKENS)
    complete = [text for text, cut in outcomes if not cut]
    assert sorted(table) == sorted(complete) and len(table) == 40
    assert sum(table.values()) == pytest.approx(1.0)
    assert max(table, key=table.get) == toy.LOW_COVERAGE_ARGMAX and table[toy.LOW_COVERAGE_ARGMAX] == 0.04
    assert max(v for k, v in table.items() if k != toy.LOW_COVERAGE_ARGMAX) < 0.04 and min(table.values()) > 0
    logprobs = _table_logprobs(table)
    star = list(table).index(toy.LOW_COVERAGE_ARGMAX)
    assert toy.sharpened_target(logprobs, 0.1)[star].exp() > 0.5  # pi*_beta is reachable at beta = 0.1


@pytest.mark.parametrize("p", [0.04, 0.01, 0.3])
def test_smallest_n_for_a_unique_argmax_is_the_closed_form(p):
    count = math.ceil(2 / p)  # every other outcome holds about p / 2
    rest = torch.full((count,), (1.0 - p - 1e-3) / count)  # 1e-3 left unlisted, placed below every outcome
    logprobs = torch.cat([torch.tensor([p]), rest]).double().log()
    closed = math.ceil(math.log(0.5) / math.log(1.0 - p))
    assert coverage.smallest_n(logprobs, 0) == closed == coverage.first_hit_quantile(p, 0.5)
    at = lambda n: float(coverage.bon_probabilities(logprobs, n)[0])  # noqa: E731
    assert at(closed) >= 0.5 > at(closed - 1)


def test_the_low_coverage_toy_needs_17_samples():
    logprobs = _table_logprobs(toy.LOW_COVERAGE_TABLES["x="])
    assert coverage.smallest_n(logprobs, 0) == 17  # the argmax is listed first; 1 - 0.96^17 = 0.50


def test_bon_probabilities_match_monte_carlo_with_ties_and_unlisted_mass():
    mass = torch.tensor([0.05, 0.2, 0.1, 0.1, 0.3, 0.15, 0.07], dtype=torch.float64)  # 0.03 unlisted; a tie
    logprobs = mass.log()
    n, trials = 5, 100_000
    exact = coverage.bon_probabilities(logprobs, n)
    assert float(exact.sum()) == pytest.approx(1.0 - (1.0 - float(mass.sum())) ** n)
    generator = torch.Generator().manual_seed(0)
    categories = torch.cat([mass, (1.0 - mass.sum()).reshape(1)])  # the last one is the unlisted mass
    draws = torch.multinomial(categories, trials * n, replacement=True, generator=generator).reshape(trials, n)
    scores = torch.cat([logprobs, torch.tensor([-1e9], dtype=torch.float64)])[draws]  # unlisted: below all
    winners = draws.gather(1, best_of_n(scores)[:, None]).squeeze(1)  # the library's selection rule
    estimate = torch.bincount(winners, minlength=len(categories))[: len(mass)].double() / trials
    torch.testing.assert_close(estimate, exact, atol=0.006, rtol=0)


def test_the_distilled_toy_enumerates_every_outcome(tmp_path):
    coverage.build_coverage_toy(tmp_path, steps=3)
    enumerated = coverage.load_coverage_toy(tmp_path)
    assert len(enumerated.outcomes) == 1 + 3 + 9 + 27 + 81  # complete (<= 3 letters) + truncated (4 letters)
    summary = enumerated.summary(0.1)
    assert 0.0 <= summary["unlisted_mass"] < 1.0 and summary["c_cov"] == pytest.approx(1.0 / summary["p_star"])
    assert enumerated.tokenizer.decode(enumerated.argmax_ids(), skip_special_tokens=True) == summary["argmax"]
