"""The sampler's draw is exact far into the tail: tokens 16 to 48 nats below the top are drawn as often as the
model says (the exponential race of sharpening/engines/race.py and its 63-bit exponential variates)."""

from __future__ import annotations

import math

import pytest
import torch

import sharpening.engines.draw as draw_module
from sharpening.engines import SamplingConfig
from sharpening.engines.draw import draw_tokens
from sharpening.engines.race import negative_exponentials, race


def binomial_interval(draws: int, p: float, alpha: float = 1e-4) -> tuple[int, int]:
    """The counts [lo, hi] outside which Binomial(draws, p) falls with probability <= alpha (alpha/2 a side)."""
    pmf = [
        math.exp(
            math.lgamma(draws + 1)
            - math.lgamma(k + 1)
            - math.lgamma(draws - k + 1)
            + k * math.log(p)
            + (draws - k) * math.log1p(-p)
        )
        for k in range(draws + 1)
    ]
    lo, below = 0, 0.0
    while below + pmf[lo] <= alpha / 2:
        below += pmf[lo]
        lo += 1
    hi, above = draws, 0.0
    while above + pmf[hi] <= alpha / 2:
        above += pmf[hi]
        hi -= 1
    return lo, hi


def _exponential(k: int) -> float:
    """The variate that the random bits k stand for, in Python floats: -log1p(-U), U = (k + 1/2) 2^-63 < 1."""
    return -math.log1p(-min((k + 0.5) * 2.0**-63, 1.0 - 2.0**-53))


@pytest.mark.slow
def test_tokens_16_and_18_nats_below_the_top_are_drawn_as_often_as_the_model_says():
    # one token at 0, 2^16 at -16 and 2^19 at -18: each tail group holds about 0.7% of the mass. Float32 Gumbel
    # noise drew the -16 group at 0.62 and the -18 group at 0.003 of that rate.
    groups = [(0.0, 1), (-16.0, 2**16), (-18.0, 2**19)]
    logits = torch.cat([torch.full((count,), logit) for logit, count in groups])  # [V]
    total = sum(count * math.exp(logit) for logit, count in groups)
    n, prompts = 8, 192  # 1536 draws, 8 rows of each prompt's generator
    generators = [torch.Generator().manual_seed(1000 + b) for b in range(prompts)]
    tokens = torch.cat(
        [
            draw_tokens(logits.expand(n, -1), torch.arange(n), [g], n, SamplingConfig(samples_per_prompt=n))
            for g in generators
        ]
    )
    group_of = torch.bucketize(tokens, torch.tensor([1, 1 + 2**16]), right=True)  # token -> 0, 1 or 2
    counts = torch.bincount(group_of, minlength=3).tolist()
    for (logit, count), observed in zip(groups[1:], counts[1:]):
        lo, hi = binomial_interval(len(tokens), count * math.exp(logit) / total, alpha=1e-3)
        assert lo <= observed <= hi, f"{count} tokens at {logit}: drawn {observed} times, expected [{lo}, {hi}]"


@pytest.mark.parametrize("log_t", [-44.0, -40.0, -30.0, -20.0, -18.0, -16.0, -1.0, 0.0, 2.0, 30.0, 36.0])
def test_the_exponential_variates_have_the_exponential_distribution_far_into_both_tails(log_t):
    # E(k) rises with k, so P(E < t) is the count of 63-bit k below the first k with E(k) >= t, over 2^63
    t = math.exp(log_t)
    lo, hi = 0, 2**63
    while lo < hi:
        mid = (lo + hi) // 2
        if -float(negative_exponentials(torch.tensor([mid]))) >= t:
            hi = mid
        else:
            lo = mid + 1
    cdf = -math.expm1(-t)
    assert abs(lo / 2**63 - cdf) <= 2.0**-62 + 2.0**-50 * cdf, (lo / 2**63, cdf)


def test_the_smallest_and_largest_variates_are_finite_and_positive():
    extremes = torch.tensor([0, 1, 2**62, 2**63 - 2**10, 2**63 - 1])
    values = -negative_exponentials(extremes)
    assert torch.isfinite(values).all() and (values > 0).all()
    assert values[0] == pytest.approx(2.0**-64, rel=1e-15)
    assert values[-1] == pytest.approx(53 * math.log(2), rel=1e-15)  # U at most 1 - 2^-53


@pytest.mark.parametrize("gap", [20.0, 30.0, 40.0])
def test_a_token_far_below_the_top_wins_exactly_when_its_variate_is_small_enough(gap):
    # the tail token's variate E(k) against the top's E(k_top) ~ 1: it wins iff exp(-gap) / E(k) > 1 / E(k_top)
    k_top = 2**62
    threshold = math.exp(-gap) * _exponential(k_top)  # the tail wins below this variate
    k_edge = int(threshold / 2.0**-63)  # E(k) ~ (k + 1/2) 2^-63 this far down
    for k in (0, k_edge - 2, k_edge + 2, 2**40):
        bits = torch.tensor([[k_top, k]])
        tail_wins = _exponential(k) < threshold
        assert race(torch.tensor([[0.0, -gap]]), bits).item() == int(tail_wins), (k, tail_wins)


def test_the_race_matches_a_python_reference_on_wide_logits():
    g = torch.Generator().manual_seed(3)
    scaled = torch.randn(64, 50, generator=g) * 15  # gaps of tens of nats
    scaled[:, 7] = float("-inf")  # filtered out
    bits = torch.empty(64, 50, dtype=torch.int64).random_(generator=g)
    bits[::4, ::3] = torch.randint(0, 2**20, (16, 17), generator=g)  # tiny variates: far-tail tokens can win
    want = []
    for row, row_bits in zip(scaled.tolist(), bits.tolist()):
        top = max(row)
        values = [math.exp(logit - top) / _exponential(k) for logit, k in zip(row, row_bits)]
        want.append(max(range(len(values)), key=values.__getitem__))
    assert race(scaled, bits).tolist() == want


@pytest.mark.parametrize(
    "cfg",
    [
        SamplingConfig(samples_per_prompt=4),
        SamplingConfig(samples_per_prompt=4, top_k=5),
        SamplingConfig(samples_per_prompt=4, temperature=0.7, top_p=0.9),
    ],
)
def test_racing_prompt_by_prompt_draws_what_racing_the_batch_draws(monkeypatch, cfg):
    # the CPU path that races a few rows at a time uses the same bits, so it draws the same tokens, live rows or not
    logits = torch.randn(12, 3000, generator=torch.Generator().manual_seed(5)) * 4
    rows = torch.tensor([0, 1, 3, 5, 9, 10, 11])  # prompt 1 has one live row, prompts 0 and 2 several

    def draw(chunk, rows):
        monkeypatch.setattr(draw_module, "RACE_CHUNK", chunk)
        generators = [torch.Generator().manual_seed(derived) for derived in (11, 12, 13)]
        return draw_tokens(logits[rows], rows, generators, 4, cfg)

    whole = draw(10**9, rows)
    assert torch.equal(draw(3000, rows), whole)  # one row per race
    assert torch.equal(draw(7000, rows), whole)  # two rows per race
    assert torch.equal(draw(3000, torch.arange(12))[rows], whole)  # a row's token does not depend on the others
