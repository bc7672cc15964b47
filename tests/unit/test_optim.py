"""schedule_factor values and optimizer config validation."""

from __future__ import annotations

import math

import pytest
import torch

from sharpening.optim import (
    OptimizerConfig,
    build_optimizer,
    schedule_change_warning,
    schedule_factor,
    total_optimizer_steps,
    validate_optimizer_config,
)


@pytest.mark.parametrize(
    "step, warmup, total, schedule, want",
    [
        # warm-up: linear from 1/(w+1) to 1
        (0, 4, 20, "linear", 1 / 5),
        (1, 4, 20, "linear", 2 / 5),
        (3, 4, 20, "linear", 4 / 5),
        (0, 4, 20, "constant", 1 / 5),
        (2, 4, 20, "cosine", 3 / 5),
        # constant
        (0, 0, 10, "constant", 1.0),
        (9, 0, 10, "constant", 1.0),
        (50, 2, 10, "constant", 1.0),
        # linear decay to 0 over total - warmup
        (0, 0, 10, "linear", 1.0),
        (5, 0, 10, "linear", 0.5),
        (9, 0, 10, "linear", 0.1),
        (10, 0, 10, "linear", 0.0),
        (15, 0, 10, "linear", 0.0),  # clamped past the end
        (4, 4, 12, "linear", 1.0),
        (8, 4, 12, "linear", 0.5),
        # cosine decay to 0
        (0, 0, 10, "cosine", 1.0),
        (5, 0, 10, "cosine", 0.5),
        (10, 0, 10, "cosine", 0.0),
        (7, 2, 12, "cosine", 0.5),
        (3, 0, 12, "cosine", 0.5 * (1 + math.cos(math.pi * 3 / 12))),
        # total not known / not after warm-up: hold the peak
        (5, 0, 0, "linear", 1.0),
        (6, 4, 4, "cosine", 1.0),
        # an unbounded run (infinite total) stays at the peak after warm-up
        (1000, 0, float("inf"), "linear", 1.0),
        (1000, 5, float("inf"), "cosine", 1.0),
        (2, 5, float("inf"), "linear", 3 / 6),
    ],
)
def test_schedule_factor_table(step, warmup, total, schedule, want):
    assert schedule_factor(step, warmup, total, schedule) == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_decay_is_monotone(schedule):
    values = [schedule_factor(s, 3, 30, schedule) for s in range(31)]
    assert values[:4] == sorted(values[:4])
    assert values[3:] == sorted(values[3:], reverse=True)
    assert values[-1] == pytest.approx(0.0)


def test_validate_optimizer_config_lists_every_problem():
    assert validate_optimizer_config(OptimizerConfig(), "--model.optimizer") == []
    bad = OptimizerConfig(lr=0.0, weight_decay=-0.1, warmup_steps=-1, schedule="step")
    problems = validate_optimizer_config(bad, "--model.optimizer")
    assert len(problems) == 4
    assert problems[0].startswith("--model.optimizer.lr=0.0")
    assert problems[1].startswith("--model.optimizer.weight_decay=-0.1")
    assert problems[2].startswith("--model.optimizer.warmup_steps=-1")
    assert problems[3].startswith("--model.optimizer.schedule='step'")
    assert validate_optimizer_config(OptimizerConfig(lr=float("nan")), "--o")[0].startswith("--o.lr=nan")
    for betas in [(1.5, 0.999), (0.9, 1.0), (0.9,), (-0.1, 0.9)]:
        assert validate_optimizer_config(OptimizerConfig(betas=betas), "--o") == [
            f"--o.betas={list(betas)}: must be two numbers in [0, 1), e.g. [0.9, 0.999]"
        ]


def test_build_optimizer_steps_the_schedule_lazily():
    weight = torch.nn.Parameter(torch.zeros(2))
    frozen = torch.nn.Parameter(torch.zeros(2), requires_grad=False)
    calls = []

    def total():
        calls.append(1)
        return 4

    cfg = OptimizerConfig(lr=1.0, schedule="linear", betas=[0.8, 0.9])
    out = build_optimizer([weight, frozen], cfg, total)
    optimizer, scheduler = out["optimizer"], out["lr_scheduler"]["scheduler"]
    assert out["lr_scheduler"]["interval"] == "step"
    assert [p for g in optimizer.param_groups for p in g["params"]] == [weight]
    assert optimizer.param_groups[0]["betas"] == (0.8, 0.9)
    assert not calls  # total steps are not asked for before the first step
    lrs = []
    for _ in range(4):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([1.0, 0.75, 0.5, 0.25])


@pytest.mark.parametrize(
    "stepping_batches, updates, max_steps, want",
    [
        (10, 1, -1, 10),  # one update a batch: Lightning's estimate as it is
        (10, 4, -1, 40),  # epochs only: batches x epochs x updates
        (12, 4, 12, 12),  # max_steps only (Lightning caps its estimate at it): max_steps optimizer steps
        (10, 4, 12, 12),  # both: the smaller
        (2, 4, 12, 8),
        (10, 4, 10, 12),  # Lightning stops after the batch that reaches max_steps: 3 batches of 4
        (float("inf"), 4, -1, float("inf")),  # neither: unbounded
    ],
)
def test_total_optimizer_steps(stepping_batches, updates, max_steps, want):
    assert total_optimizer_steps(stepping_batches, updates, max_steps) == want


def _plan(total_steps, max_epochs, max_steps=-1) -> dict:
    return {"total_steps": total_steps, "max_epochs": max_epochs, "max_steps": max_steps}


def test_schedule_change_warning_only_for_a_decaying_schedule_whose_limits_changed_its_length():
    message = schedule_change_warning("linear", _plan(12, 3), _plan(16, 4))
    assert message.startswith(
        "--trainer.max_epochs=4 / --trainer.max_steps=-1: the checkpoint was written with "
        "--trainer.max_epochs=3 / --trainer.max_steps=-1"
    )
    assert "spans 12 optimizer steps" in message and "make it 16" in message
    assert "resume with the limits the checkpoint was written with" in message
    assert "unbounded" in schedule_change_warning("cosine", _plan(12, 3), _plan(float("inf"), -1))
    assert schedule_change_warning("linear", _plan(12, 3), _plan(12, 3)) is None
    assert schedule_change_warning("linear", _plan(12, 3, 12), _plan(12, 4, 12)) is None  # max_steps still ends it
    assert schedule_change_warning("linear", _plan(12, 3), _plan(15, 3)) is None  # same limits: the data's length
    assert schedule_change_warning("constant", _plan(12, 3), _plan(16, 4)) is None
