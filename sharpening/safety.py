"""Safety nets every sharpening module attaches (``PolicyModule.configure_callbacks``).

- Preemption: on SIGTERM, PreemptionCallback writes a resumable checkpoint after the next optimizer step and
  stops the run (``preempt``); the self-verification callback stops between generation batches.
  Resume with ``--ckpt_path last``. The signal handler only records the signal: under DDP the ranks
  decide together, at the same point, by reducing their flags (``sigterm_agreed``), so a signal that
  reaches one rank or all of them at different moments stops every rank at the same step. (Lightning's
  own handler broadcasts from inside the signal handler, which deadlocks or breaks the process group.)
- Atomic checkpoints: AtomicCheckpointIO writes beside the target and renames, so SIGKILL mid-save
  leaves the previous checkpoint loadable.
- Non-finite values: NonFiniteGuardCallback checks the gradients before every optimizer step; on a
  NaN/inf it writes the last good state (the update is not applied) and stops with a message.
"""

from __future__ import annotations

import os

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

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


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints appear whole or not at all: written to a hidden temporary file in the SAME directory,
    flushed to disk, then renamed over the target (``os.replace`` is atomic on one filesystem). A process
    killed while saving leaves the previous checkpoint in place, and no partial ``*.ckpt``."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        path = os.fspath(path)
        directory = os.path.dirname(path) or "."
        os.makedirs(directory, exist_ok=True)
        temporary = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.partial")
        try:
            with open(temporary, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)


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
    """Never apply an update with a NaN or infinite gradient."""

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module, optimizer) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        # a NaN or inf anywhere makes its tensor's norm non-finite: one fused check. Every rank must take
        # the same decision (under FSDP each holds a shard of the gradient), so it is reduced over ranks.
        finite = not grads or bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all())
        if trainer.world_size > 1:
            finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
        if finite:
            return
        path = os.path.join(checkpoint_dir(trainer), LAST_GOOD_CHECKPOINT)
        trainer.save_checkpoint(path, weights_only=False)  # the weights are still those before this update
        raise NonFiniteError(
            f"non-finite gradient at step {trainer.global_step}: training stopped before applying it. "
            f"The last good state is in {path} (resume with --ckpt_path {path}). "
            "Try a lower --model.optimizer.lr, gradient clipping, or float32 (--model.policy.dtype float32)."
        )
