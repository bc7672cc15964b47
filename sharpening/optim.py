"""Optimizer and learning-rate schedule from a config (shared by the SFT and RL modules)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import torch


@dataclass
class OptimizerConfig:
    """AdamW and its learning-rate schedule."""

    lr: float = 3e-4
    """Peak learning rate (the paper: 3e-4 with LoRA)."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    warmup_steps: int = 0
    """Optimizer steps of linear warm-up from 0 to lr."""
    schedule: Literal["constant", "linear", "cosine"] = "linear"
    """After warm-up: constant, linear decay to 0 (the paper's), or cosine decay to 0."""


def validate_optimizer_config(cfg: OptimizerConfig, option: str) -> list[str]:
    """Every problem with ``cfg``, each naming ``option.<field>``."""
    problems = []
    if not cfg.lr > 0:
        problems.append(f"{option}.lr={cfg.lr}: must be > 0 (e.g. 3e-4 for LoRA, 1e-5 for full fine-tuning)")
    if cfg.weight_decay < 0:
        problems.append(f"{option}.weight_decay={cfg.weight_decay}: must be >= 0")
    if cfg.warmup_steps < 0:
        problems.append(f"{option}.warmup_steps={cfg.warmup_steps}: must be >= 0")
    betas = tuple(cfg.betas)
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        problems.append(f"{option}.betas={list(betas)}: must be two numbers in [0, 1), e.g. [0.9, 0.999]")
    if cfg.schedule not in ("constant", "linear", "cosine"):
        problems.append(f"{option}.schedule={cfg.schedule!r}: must be constant, linear or cosine")
    return problems


def schedule_factor(step: int, warmup_steps: int, total_steps: float, schedule: str) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based); an unbounded run (infinite
    ``total_steps``) stays at the peak after warm-up."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant" or not math.isfinite(total_steps) or total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def total_optimizer_steps(stepping_batches: float, updates_per_batch: int, max_steps: int) -> float:
    """Optimizer steps a run takes: the length of its learning-rate schedule.

    ``stepping_batches`` is Lightning's ``estimated_stepping_batches``: batches per epoch x epochs, already
    capped at ``max_steps``. With ``updates_per_batch`` optimizer steps per batch, the epochs give ``batches x
    updates_per_batch`` steps and ``max_steps`` (counted in optimizer steps, checked after each batch) gives
    ceil(max_steps / updates_per_batch) batches; a run with both takes the smaller, with neither it is unbounded.
    The modules take one optimizer step per training step (``schedule_plan``).

    >>> total_optimizer_steps(10, 4, -1)  # 5 batches an epoch x 2 epochs, 4 updates each
    40
    >>> total_optimizer_steps(12, 4, 12)  # max_steps 12 (Lightning's estimate is capped at it)
    12
    >>> total_optimizer_steps(2, 4, 12)  # the epochs end first
    8
    >>> total_optimizer_steps(10, 4, 10)  # the batch that reaches max_steps runs all its updates
    12
    >>> total_optimizer_steps(float("inf"), 4, -1)
    inf
    """
    batches = stepping_batches
    if max_steps is not None and max_steps >= 0:
        batches = min(batches, math.ceil(max_steps / updates_per_batch))
    return batches * updates_per_batch


def schedule_plan(trainer) -> dict:
    """The schedule's length in a Lightning run and the limits that gave it (a checkpoint keeps it). Lightning's
    estimate reads the training data: call it once that exists (the buffer is filled at fit start). Each training
    step is one optimizer step (an RL rollout's updates are steps of their own)."""
    steps = total_optimizer_steps(float(trainer.estimated_stepping_batches), 1, trainer.max_steps)
    return {"total_steps": steps, "max_epochs": trainer.max_epochs, "max_steps": trainer.max_steps}


def schedule_change_warning(schedule: str, saved: dict, plan: dict) -> str | None:
    """What to tell a user whose resumed run (``plan``) changes the length of the checkpoint's decaying schedule
    (``saved``) with other limits; None when it continues as an uninterrupted run would: a constant schedule
    (warm-up included) does not depend on the length, and under the same limits the length follows the data
    exactly as it would have."""
    limits = ("max_epochs", "max_steps")
    if schedule == "constant" or saved["total_steps"] == plan["total_steps"]:
        return None
    if all(saved[k] == plan[k] for k in limits):
        return None
    return (
        f"--trainer.max_epochs={plan['max_epochs']} / --trainer.max_steps={plan['max_steps']}: the checkpoint was "
        f"written with --trainer.max_epochs={saved['max_epochs']} / --trainer.max_steps={saved['max_steps']}, over "
        f"which its learning-rate schedule (--model.optimizer.schedule={schedule}) spans "
        f"{_steps(saved['total_steps'])} optimizer steps; these limits make it {_steps(plan['total_steps'])}. The "
        "learning rate from here follows the new length, so the weights will differ from those of an uninterrupted "
        "run. To continue the schedule exactly, resume with the limits the checkpoint was written with (a constant "
        "schedule continues exactly whatever the limits)"
    )


def _steps(total: float) -> str:
    return f"{int(total)}" if math.isfinite(total) else "unbounded (no limit)"


def build_optimizer(
    params: Iterable[torch.nn.Parameter], cfg: OptimizerConfig, total_steps: Callable[[], float], fused: bool = True
) -> dict:
    """Lightning's optimizer dict: AdamW over trainable ``params`` and a per-step LambdaLR.

    ``total_steps`` is called lazily, once training data exists (the buffer is filled at fit start).
    ``fused=False`` where a fused step cannot be used: under Lightning's mixed precision (``16-mixed``,
    ``bf16-mixed``) gradient clipping refuses an optimizer that unscales gradients inside its step.
    """
    trainable = [p for p in params if p.requires_grad]
    kwargs = dict(lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas))
    optimizer = None
    if fused:
        try:  # the fused kernel is ~4x faster per step on CPU (measured in docs/benchmarks.md)
            optimizer = torch.optim.AdamW(trainable, fused=True, **kwargs)
        except (RuntimeError, ValueError):  # a device or dtype the fused kernel does not support
            pass
    if optimizer is None:
        optimizer = torch.optim.AdamW(trainable, **kwargs)

    def factor(step: int) -> float:
        if step == 0 or cfg.schedule == "constant":
            return schedule_factor(step, cfg.warmup_steps, 0, "constant")
        return schedule_factor(step, cfg.warmup_steps, total_steps(), cfg.schedule)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
