"""Safety nets every sharpening module attaches (``PolicyModule.configure_callbacks``).

- Preemption: on SIGTERM, PreemptionCallback writes a resumable checkpoint after the next optimizer step and
  stops the run (``preempt``); the self-verification callback stops between generation batches.
  Resume with ``--ckpt_path last``. The signal handler only records the signal: under DDP the ranks
  decide together, at the same point, by reducing their flags (``sigterm_agreed``), so a signal that
  reaches one rank or all of them at different moments stops every rank at the same step. (Lightning's
  own handler broadcasts from inside the signal handler, which deadlocks or breaks the process group.)
- Atomic checkpoints: PreemptionCallback installs ``checkpoint.AtomicCheckpointIO``, which writes beside the
  target and renames, so SIGKILL mid-save leaves the previous checkpoint loadable.
- Non-finite values: NonFiniteGuardCallback checks the gradients before every optimizer step; on a
  NaN/inf it writes the last good state (the update is not applied) and stops with a message. Under a
  gradient scaler (16-mixed) an overflow of the scaled gradient is left to the scaler, which skips the step.
"""

from __future__ import annotations

import os

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from sharpening.checkpoint import AtomicCheckpointIO

PREEMPTED_CHECKPOINT = "last-preempted.ckpt"
LAST_GOOD_CHECKPOINT = "last-good.ckpt"


class NonFiniteError(RuntimeError):
    """Training stopped because a gradient was NaN or infinite."""


def sigterm_seen(trainer: L.Trainer) -> bool:
    """SIGTERM received by this process since the fit started. Local: ranks may differ; see ``sigterm_agreed``."""
    flags = (getattr(c, "sigterm_seen", False) for c in trainer.callbacks if isinstance(c, PreemptionCallback))
    return any(flags) or bool(trainer.received_sigterm)


def sigterm_agreed(trainer: L.Trainer) -> bool:
    """Whether any rank has seen SIGTERM: a collective under DDP/FSDP, so every rank must call it at the
    same point, and every rank gets the same answer."""
    seen = sigterm_seen(trainer)
    if trainer.world_size > 1:
        seen = trainer.strategy.reduce_boolean_decision(seen, all=False)
    return seen


def checkpoint_dir(trainer: L.Trainer) -> str:
    """Where this run's checkpoints go: the ModelCheckpoint's directory, else <root>/checkpoints."""
    callback = trainer.checkpoint_callback
    if callback is not None and getattr(callback, "dirpath", None):
        return callback.dirpath
    return os.path.join(trainer.default_root_dir, "checkpoints")


def preempt(trainer: L.Trainer, where: str) -> None:
    """Stop the run after SIGTERM with a resumable checkpoint. Every rank calls it together (after
    ``sigterm_agreed``): saving is a collective. It ends fit with Lightning's ``SIGTERMException``, which the
    CLI reports as a clean stop; no policy is written to output_dir."""
    path = os.path.join(checkpoint_dir(trainer), PREEMPTED_CHECKPOINT)
    trainer.save_checkpoint(path, weights_only=False)  # the whole training state
    rank_zero_info(f"SIGTERM received {where}: stopping. Resumable checkpoint: {path}; resume with --ckpt_path last")
    raise SIGTERMException


class PreemptionCallback(L.Callback):
    """On SIGTERM: checkpoint at the next batch end and stop (exit code 0 from the CLI). Also makes every
    checkpoint write atomic (AtomicCheckpointIO) unless the run configured its own checkpoint IO."""

    sigterm_seen = False

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        self.sigterm_seen = False
        # Lightning installs its SIGTERM handler after this hook; it calls the connector's notifier, which
        # forwards the signal and, under DDP, broadcasts from inside the handler. Ours only records it.
        connector = getattr(trainer, "_signal_connector", None)
        if connector is not None and hasattr(connector, "_sigterm_notifier_fn"):
            connector._sigterm_notifier_fn = self._record_sigterm

    def _record_sigterm(self, signum, frame) -> None:
        self.sigterm_seen = True

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        # only after an optimizer step: a checkpoint between accumulated micro-batches would lose their gradients
        # (the same batches on every rank, so the ranks still reduce their flags together)
        should_accumulate = getattr(trainer.fit_loop.epoch_loop, "_should_accumulate", lambda: False)
        if not should_accumulate() and sigterm_agreed(trainer):  # one reduced flag per optimizer step
            preempt(trainer, f"at step {trainer.global_step}")


class NonFiniteGuardCallback(L.Callback):
    """Never apply an update with a NaN or infinite gradient.

    Without a gradient scaler (float32, bf16) a non-finite gradient stops the run. Under 16-mixed the
    scaler multiplies the loss by its scale before backward, and an overflow of the scaled gradient is
    expected (at the default scale 2^16 in the first steps): the scaler skips that step and halves its
    scale. So with a scaler a non-finite gradient is taken for a scaler overflow and left to the scaler,
    unless it cannot be one:

    - a loss of the step was itself non-finite: the loss comes from the forward pass, which the scale does
      not touch, so a lower scale cannot fix it (NaN weights, a NaN input, an fp16 forward overflow);
    - the step's scale was at most ``min_scale``: the gradient was not scaled up, so the overflow is the
      gradient's own, and the scaler would only skip every step from here on.

    Those stop the run as without a scaler. A gradient that turns NaN while the loss stays finite is stopped
    once the scaler has halved its scale down to ``min_scale`` (16 skipped steps from 2^16).
    """

    min_scale = 1.0
    """A scale at or below this no longer scales the gradient up: an overflow there is not the scaler's."""

    def __init__(self) -> None:
        self._loss_finite: torch.Tensor | None = None  # all losses of the current step finite (a tensor: no sync)

    def on_before_backward(self, trainer: L.Trainer, pl_module, loss: torch.Tensor) -> None:
        finite = torch.isfinite(loss.detach()).all()
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module, optimizer) -> None:
        loss_finite, self._loss_finite = self._loss_finite, None  # the next step starts afresh
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        # a NaN or inf anywhere makes its tensor's norm non-finite: one fused check. Every rank must take
        # the same decision (under FSDP each holds a shard of the gradient), so it is reduced over ranks.
        finite = not grads or bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all())
        if trainer.world_size > 1:
            finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
        if finite:
            return
        reason = self._not_a_scaler_overflow(trainer, loss_finite)
        if reason is None:
            return  # the scaler skips this step and lowers its scale
        path = os.path.join(checkpoint_dir(trainer), LAST_GOOD_CHECKPOINT)
        trainer.save_checkpoint(path, weights_only=False)  # the weights are still those before this update
        raise NonFiniteError(
            f"non-finite gradient at step {trainer.global_step}{reason}: training stopped before applying it. "
            f"The last good state is in {path} (resume with --ckpt_path {path}). "
            "Try a lower --model.optimizer.lr, gradient clipping, or float32 (--model.policy.dtype float32)."
        )

    def _not_a_scaler_overflow(self, trainer: L.Trainer, loss_finite: torch.Tensor | None) -> str | None:
        """Why a non-finite gradient is no overflow of the gradient scaler: '' without a scaler, a reason
        when the loss was non-finite or the scale was at most ``min_scale``, None for a scaler overflow.
        The same answer on every rank (the scale is shared; the loss check is reduced)."""
        scaler = getattr(trainer.precision_plugin, "scaler", None)  # MixedPrecision and FSDPPrecision hold one
        if scaler is None or not scaler.is_enabled():
            return ""
        bad_loss = loss_finite is not None and not bool(loss_finite)
        if trainer.world_size > 1:
            bad_loss = trainer.strategy.reduce_boolean_decision(bad_loss, all=False)
        if bad_loss:
            return " (the loss was non-finite too, which the 16-mixed gradient scaler cannot cause or fix)"
        scale = scaler.get_scale()
        if scale <= self.min_scale:
            return (
                f" (the 16-mixed gradient scaler's scale was {scale:g}, at most {self.min_scale:g}: the gradient "
                "was not scaled up, so this is no scaler overflow)"
            )
        return None
