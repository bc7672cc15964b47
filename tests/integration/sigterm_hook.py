"""A callback that sends SIGTERM to its own process, for the preemption tests. In one process give it the
step (``SigtermAt(step=1)``); the DDP tests add it from the command line
(``--trainer.callbacks+=sigterm_hook.SigtermAt``) and set the ranks in ``$SIGTERM_RANKS`` (comma-separated)
and the moment in ``$SIGTERM_AT_STEP`` (the start of that step) or ``$SIGTERM_AT_EPOCH_END`` (the end of
that epoch, just before the next round)."""

from __future__ import annotations

import os
import signal

import lightning as L


class SigtermAt(L.Callback):
    def __init__(self, step: int | None = None):
        self.step = step  # None: from the environment, on the ranks it lists

    def _due(self, trainer, variable: str, value: int) -> bool:
        if self.step is not None:
            return variable == "SIGTERM_AT_STEP" and value == self.step
        ranks = {int(r) for r in os.environ.get("SIGTERM_RANKS", "").split(",") if r}
        return trainer.global_rank in ranks and int(os.environ.get(variable, "-1")) == value

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._due(trainer, "SIGTERM_AT_STEP", trainer.global_step):
            os.kill(os.getpid(), signal.SIGTERM)

    def on_train_epoch_end(self, trainer, pl_module):
        if self._due(trainer, "SIGTERM_AT_EPOCH_END", trainer.current_epoch):
            os.kill(os.getpid(), signal.SIGTERM)
