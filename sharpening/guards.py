"""CollapseGuardCallback: stop a run whose monitored metric rose and then fell, keeping its best state.

Label-free rewards improve a run for a while and then collapse it (SRT, arXiv 2505.22660 and 2505.21444 report
this). The guard watches one logged metric (e.g. ``sample/accuracy`` of the rounds, ``train/response_tokens``
or ``sample/majority_share`` with ``mode: min``). At each evaluation (every training epoch's end, or every
``every_n_steps`` optimizer steps):

- a value better than the best so far becomes the best, and the whole training state is written to
  ``<checkpoint dir>/best-guard.ckpt`` through the run's checkpoint IO (``checkpoint.AtomicCheckpointIO``:
  whole or not at all, with its checksum), so the file is always the state at the best value;
- a value more than ``min_delta`` worse than the best counts one decline; ``patience`` declines in a row
  stop the run. A value within ``min_delta`` of the best is noise: it ends a run of declines without counting.

When the guard stops the run, the best checkpoint's weights are loaded back into the module before the
module's ``on_train_end`` (callbacks run first), so ``--model.output_dir`` receives the best policy, not the
last. A run that ends without the guard stopping it keeps its last policy (best-guard.ckpt still holds the
best). Under FSDP the weights are not loaded back (they are sharded): output_dir holds the last policy and
best-guard.ckpt the best; a warning says so.
"""

from __future__ import annotations

import math
import os
from typing import Literal

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from sharpening.checkpoint import AtomicCheckpointIO, verify_checkpoint
from sharpening.errors import raise_if_problems
from sharpening.safety import checkpoint_dir

BEST_CHECKPOINT = "best-guard.ckpt"


class CollapseGuardCallback(L.Callback):
    """Stop when ``monitor`` has declined ``patience`` evaluations in a row after its best; keep the best."""

    def __init__(
        self,
        monitor: str,
        mode: Literal["max", "min"] = "max",
        patience: int = 3,
        min_delta: float = 0.0,
        every_n_steps: int | None = None,
    ) -> None:
        """
        Args:
            monitor: The logged metric watched, e.g. ``sample/accuracy`` or ``train/reward``.
            mode: ``max``: higher is better (a fall is a decline); ``min``: lower is better.
            patience: Evaluations in a row more than ``min_delta`` worse than the best that stop the run.
            min_delta: How much worse than the best a value must be to count as a decline (noise below it).
            every_n_steps: Evaluate every this many optimizer steps; None: at every training epoch's end.
        """
        super().__init__()
        problems = []
        if mode not in ("max", "min"):
            problems.append(f"CollapseGuardCallback mode={mode!r}: must be max or min")
        if patience < 1:
            problems.append(f"CollapseGuardCallback patience={patience}: must be at least 1 (evaluations of decline)")
        if not min_delta >= 0:
            problems.append(f"CollapseGuardCallback min_delta={min_delta}: must be >= 0 (a size, whatever the mode)")
        if every_n_steps is not None and every_n_steps < 1:
            problems.append(f"CollapseGuardCallback every_n_steps={every_n_steps}: must be >= 1, or null (epochs)")
        raise_if_problems(problems)
        self.monitor, self.mode, self.patience, self.min_delta = monitor, mode, patience, min_delta
        self.every_n_steps = every_n_steps
        self.best: float | None = None  # the best value seen (in the metric's own sign)
        self.best_step = -1  # the optimizer step the best value was evaluated at
        self.declines = 0  # evaluations in a row more than min_delta worse than the best
        self.stopped_step: int | None = None  # the step the guard stopped the run at, None while it has not
        self._evaluated_step = -1  # the step of the last evaluation

    # -- the rule, apart from Lightning ------------------------------------------------------------
    def observe(self, value: float) -> Literal["best", "decline", "noise"]:
        """Update the best value and the run of declines with one evaluation; a non-finite value is a decline."""
        sign = 1.0 if self.mode == "max" else -1.0
        if math.isfinite(value) and (self.best is None or sign * (value - self.best) > 0):
            self.best, self.declines = value, 0
            return "best"
        if not math.isfinite(value) or sign * (self.best - value) > self.min_delta:
            self.declines += 1
            return "decline"
        self.declines = 0
        return "noise"

    # -- Lightning hooks ---------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Checkpoints written whole or not at all, as ``safety.PreemptionCallback`` arranges for every run."""
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        due = self.every_n_steps and step > 0 and step % self.every_n_steps == 0
        if due and step != self._evaluated_step:  # accumulating micro-batches share one step
            self._evaluate(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every_n_steps is None:
            self._evaluate(trainer)

    def _evaluate(self, trainer: L.Trainer) -> None:
        """Read the monitored value (the same on every rank: logged with its reduction), then keep or stop."""
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            raise RuntimeError(
                f"CollapseGuardCallback monitor={self.monitor!r} was not logged by step {trainer.global_step}; logged: "
                f"{sorted(trainer.callback_metrics)}. Name one of these (rounds log sample/..., RL steps train/...)"
            )
        self._evaluated_step = trainer.global_step
        outcome = self.observe(float(value))
        if outcome == "best":
            self.best_step = trainer.global_step
            trainer.save_checkpoint(self.best_path(trainer), weights_only=False)  # collective: every rank calls
        elif outcome == "decline" and self.declines >= self.patience:
            self.stopped_step = trainer.global_step
            trainer.should_stop = True
            rank_zero_info(
                f"collapse guard: {self.monitor} declined {self.declines} evaluations in a row "
                f"(now {float(value):.4g}, best {self.best:.4g} at step {self.best_step}); stopping, keeping "
                f"{self.best_path(trainer)}"
            )

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """When the guard stopped the run: the best checkpoint's weights back into the module (before its own
        on_train_end writes output_dir)."""
        if self.stopped_step is None:
            return
        if getattr(pl_module, "sharded", False):
            rank_zero_warn(
                f"collapse guard: under FSDP the best weights are not loaded back; output_dir (if set) holds the "
                f"policy of step {self.stopped_step}, {self.best_path(trainer)} the best (step {self.best_step})"
            )
            return
        path = self.best_path(trainer)
        verify_checkpoint(path, "best-guard checkpoint")
        checkpoint = torch.load(path, map_location=pl_module.device, weights_only=True)
        pl_module.load_state_dict(checkpoint["state_dict"])
        rank_zero_info(f"collapse guard: the policy of step {self.best_step} ({self.monitor}={self.best:.4g}) restored")

    @staticmethod
    def best_path(trainer: L.Trainer) -> str:
        """``<checkpoint dir>/best-guard.ckpt``: beside the run's other checkpoints (``safety.checkpoint_dir``)."""
        return os.path.join(checkpoint_dir(trainer), BEST_CHECKPOINT)

    def state_dict(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "declines": self.declines}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best, self.best_step, self.declines = state_dict["best"], state_dict["best_step"], state_dict["declines"]
