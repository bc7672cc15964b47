"""Optimizer and learning-rate schedule from a config (shared by the SFT and RL modules)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Literal

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
