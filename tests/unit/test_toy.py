"""The enumerable toy's KL (sharpening/tasks/toy.py) against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from sharpening.tasks import toy


def test_kl_renormalizes_a_policy_with_mass_outside_the_listed_outcomes():
    """0.2 of p is on unlisted responses: over the listed ones p is (0.375, 0.625), and the KL to q is >= 0."""
    p, q = torch.tensor([0.3, 0.5]).log(), torch.tensor([0.5, 0.5]).log()
    want = 0.375 * math.log(0.375 / 0.5) + 0.625 * math.log(0.625 / 0.5)
    assert toy.kl_divergence(p, q) == pytest.approx(want, abs=1e-6)
    assert toy.kl_divergence(torch.tensor([0.4, 0.4]).log(), q) == pytest.approx(0.0, abs=1e-6)


def test_kl_of_normalized_distributions_is_the_plain_sum():
    p, q = torch.tensor([0.2, 0.3, 0.5]), torch.tensor([0.6, 0.2, 0.2])
    want = float((p * (p / q).log()).sum())
    assert toy.kl_divergence(p.log(), q.log()) == pytest.approx(want, abs=1e-6)
