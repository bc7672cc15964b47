"""A callback the DDP preemption tests add from the command line (``--trainer.callbacks+=sigterm_hook.SigtermAt``):
it sends SIGTERM to this process on the ranks listed in ``$SIGTERM_RANKS`` (comma-separated), at the start of
step ``$SIGTERM_AT_STEP`` or at the end of epoch ``$SIGTERM_AT_EPOCH_END`` (just before the next round)."""

from __future__ import annotations

import os
import signal

import lightning as L


def _at(trainer, variable: str, value: int) -> bool:
    ranks = {int(r) for r in os.environ.get("SIGTERM_RANKS", "").split(",") if r}
    return trainer.global_rank in ranks and int(os.environ.get(variable, "-1")) == value


class SigtermAt(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if _at(trainer, "SIGTERM_AT_STEP", trainer.global_step):
            os.kill(os.getpid(), signal.SIGTERM)

    def on_train_epoch_end(self, trainer, pl_module):
        if _at(trainer, "SIGTERM_AT_EPOCH_END", trainer.current_epoch):
            os.kill(os.getpid(), signal.SIGTERM)
