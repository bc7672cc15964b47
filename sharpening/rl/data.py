"""The training data of online RL and XPO: one item per optimizer update, ``RolloutUpdate(prompts, update)``.

A rollout's ``updates`` items carry the same prompts with update index 0, 1, ...: the module draws the rollout
at index 0 (in its batch-start hook, with the weights of that step: Lightning fetches a batch ahead, so the
loader itself must not draw) and takes one ordinary training step per item on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from sharpening.prompts import EpochSampler
from sharpening.types import PromptBatch


@dataclass
class RolloutUpdate:
    """The prompts of a rollout and which of its updates this training step takes."""

    prompts: PromptBatch  # [B, P] prompts of the rollout (this rank's)
    update: int  # 0 .. updates - 1; 0 draws the rollout


class UpdateSampler(torch.utils.data.DistributedSampler):
    """Each rollout's prompt indices (``prompts_per_step`` of this rank's shard of the epoch's order), ``updates``
    times, as keys ``(indices, update)``. A DistributedSampler, so Lightning keeps it under DDP and FSDP.

    After a mid-epoch restart the prompt sampler skips the finished rollouts, and this sampler the finished
    updates of the rollout under way (in that epoch only); the length stays the whole epoch's, as Lightning
    counts the consumed batches itself."""

    def __init__(self, prompts: EpochSampler, prompts_per_step: int, updates: int, skip_updates: int = 0) -> None:
        super().__init__(range(0), num_replicas=prompts.num_replicas, rank=prompts.rank, shuffle=False)
        self.prompts, self.prompts_per_step, self.updates = prompts, prompts_per_step, updates
        self.skip_updates = skip_updates

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.prompts.set_epoch(epoch)

    def __len__(self) -> int:
        return math.ceil(len(self.prompts) / self.prompts_per_step) * self.updates

    def __iter__(self):
        shard, step = list(self.prompts), self.prompts_per_step
        skip = self.skip_updates if self.prompts.epoch == self.prompts.skip_epoch else 0
        for start in range(0, len(shard), step):
            for update in range(skip, self.updates):
                yield tuple(shard[start : start + step]), update
            skip = 0


class _Keys(torch.utils.data.Dataset):
    """A dataset whose item is its key (the sampler's key is the whole batch)."""

    def __getitem__(self, key):
        return key

    def __len__(self) -> int:
        return 0


def whole_rollout_steps(max_steps: int | None, updates: int) -> int | None:
    """``max_steps`` rounded up to a whole number of rollouts of ``updates`` steps each (-1, 0 or None: as is):
    Lightning stops at ``max_steps``, and a rollout's last update must not be cut."""
    if max_steps is None or max_steps <= 0 or updates <= 1:
        return max_steps
    return math.ceil(max_steps / updates) * updates


def update_loader(trainer, prompt_count: int, seed: int, prompts_per_step: int, updates: int, batch) -> DataLoader:
    """This rank's loader of RolloutUpdates over the first ``prompt_count`` prompts; ``batch(indices)`` builds a
    PromptBatch. After a mid-epoch restart it resumes at the next update (Lightning's ``processed`` count, which
    a checkpoint written at batch end includes), in the rollout under way if the checkpoint fell inside one."""
    replicas, rank, epoch, done = 1, 0, 0, 0
    if trainer is not None:
        replicas, rank, epoch = trainer.world_size, trainer.global_rank, trainer.current_epoch
        if trainer.fit_loop.restarting:
            progress = trainer.fit_loop.epoch_progress.current
            if progress.started > progress.processed:  # the restored epoch was under way
                done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
    rollouts_done, skip_updates = divmod(done, updates)
    prompts = EpochSampler(
        prompt_count,
        seed,
        shuffle=prompt_count > 0,
        skip=rollouts_done * prompts_per_step,
        num_replicas=replicas,
        rank=rank,
        skip_epoch=epoch,
    )
    sampler = UpdateSampler(prompts, prompts_per_step, updates, skip_updates)
    sampler.set_epoch(epoch)  # Lightning sets it again at each epoch start

    def collate(key) -> RolloutUpdate:
        indices, update = key
        return RolloutUpdate(batch(list(indices)), update)

    return DataLoader(_Keys(), batch_size=None, sampler=sampler, collate_fn=collate)
