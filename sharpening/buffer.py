"""SampleBuffer: the (prompt, response) pairs selected this round, which the module trains on.

The buffer is a map-style dataset. Its contents and the epoch they were built for travel in the
checkpoint (``state_dict``), so a resumed run trains on exactly the samples it had selected.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from sharpening.sampler import derive_seed
from sharpening.types import ScoredSamples


@dataclass
class BufferExample:
    """One selected sample, unpadded."""

    prompt_ids: list[int]  # prompt tokens exactly as sampled from (template, few-shot, BOS)
    response_ids: list[int]  # response tokens, EOS included when the response ended
    score: float  # self-reward under the frozen base
    prompt_index: int  # index of the prompt in its dataset
    sample_index: int  # which of the N samples it was


class SampleBuffer(torch.utils.data.Dataset):
    """Selected samples of the current round, ordered by (prompt_index, rank of selection)."""

    def __init__(self) -> None:
        self.examples: list[BufferExample] = []
        self.epoch: int | None = None  # epoch the contents were built for; None = never filled

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> BufferExample:
        return self.examples[index]

    def replace(self, examples: list[BufferExample], epoch: int) -> None:
        """New contents for ``epoch``, sorted so the order does not depend on ranks or batching."""
        self.examples = sorted(examples, key=lambda e: (e.prompt_index, e.sample_index))
        self.epoch = epoch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "examples": [asdict(e) for e in self.examples]}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = state["epoch"]
        self.examples = [BufferExample(**e) for e in state["examples"]]


def selected_examples(scored: ScoredSamples) -> list[BufferExample]:
    """The kept samples of a scored batch, with padding stripped."""
    samples = scored.samples
    prompts = samples.prompts
    out = []
    for b in range(len(prompts)):
        prompt = prompts.prompt_ids[b][prompts.prompt_mask[b]].tolist()
        for slot in range(scored.selected.shape[1]):
            if not bool(scored.selected_mask[b, slot]):
                continue
            n = int(scored.selected[b, slot])
            response = samples.response_ids[b, n][samples.response_mask[b, n]].tolist()
            out.append(
                BufferExample(prompt, response, float(scored.scores[b, n]), int(prompts.prompt_indices[b]), n)
            )
    return out


def collate_examples(examples: list[BufferExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Training batch in the shared layout: prompts left-padded to P, responses right-padded to T."""
    p = max(len(e.prompt_ids) for e in examples)
    t = max(len(e.response_ids) for e in examples)
    prompt_ids = torch.full((len(examples), p), pad_token_id, dtype=torch.long)
    response_ids = torch.full((len(examples), t), pad_token_id, dtype=torch.long)
    prompt_mask = torch.zeros(len(examples), p, dtype=torch.bool)
    response_mask = torch.zeros(len(examples), t, dtype=torch.bool)
    for i, e in enumerate(examples):
        prompt_ids[i, p - len(e.prompt_ids) :] = torch.tensor(e.prompt_ids)
        prompt_mask[i, p - len(e.prompt_ids) :] = True
        response_ids[i, : len(e.response_ids)] = torch.tensor(e.response_ids)
        response_mask[i, : len(e.response_ids)] = True
    return {
        "prompt_ids": prompt_ids,  # [B, P]
        "prompt_mask": prompt_mask,  # [B, P]
        "response_ids": response_ids,  # [B, T]
        "response_mask": response_mask,  # [B, T]
    }


def pack_rows(lengths: list[int], row_length: int) -> list[list[int]]:
    """First-fit decreasing: indices of ``lengths`` per row, each row summing to at most ``row_length``.
    Longest first, each into the first row with room (ties keep their order: deterministic)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        r = next((r for r in range(len(rows)) if lengths[i] <= room[r]), None)
        if r is None:
            rows.append([])
            room.append(row_length)
            r = len(rows) - 1
        rows[r].append(i)
        room[r] -= lengths[i]
    return rows


def _cheapest_rows(lengths: list[int], pack_length: int, attention_span: float | None) -> list[list[int]]:
    """``pack_rows`` at the row length, among the longest example, its doublings below ``pack_length`` and
    ``pack_length``, whose [rows, width] batch costs least: rows x width tokens through the linear layers,
    times (1 + width / attention_span) for dense attention over each row (no such term when None)."""
    longest = max(lengths)
    candidates = [longest]
    while candidates[-1] * 2 < pack_length:
        candidates.append(candidates[-1] * 2)
    candidates.append(max(longest, pack_length))

    def cost(rows: list[list[int]]) -> float:
        width = max(sum(lengths[i] for i in row) for row in rows)
        return len(rows) * width * (1.0 + width / attention_span if attention_span else 1.0)

    return min((pack_rows(lengths, c) for c in reversed(candidates)), key=cost)  # ties: the longest rows


def collate_packed(
    examples: list[BufferExample], pad_token_id: int, pack_length: int = 0, attention_span: float | None = None
) -> dict[str, torch.Tensor]:
    """The same examples as ``collate_examples``, concatenated into rows by first-fit decreasing.

    Rows hold at most ``pack_length`` tokens (an example longer than that gets a row of its own length).
    The row length is a trade: longer rows leave less padding, but under the dense block mask of
    sdpa/eager every token of a row of L tokens attends over all L positions, which costs about
    L / (6 x hidden) of its linear-layer FLOPs. With ``attention_span`` (6 x hidden: the row length at
    which attention would cost as much as the linear layers) the row length is chosen per batch among the
    longest example, its doublings and ``pack_length``, minimising rows x width x (1 + width /
    attention_span): short examples share rows, long ones of similar lengths (few-shot prompts) get a row
    each, as padding would. ``attention_span=None`` (flash attention, which attends within each example)
    minimises rows x width. Each example keeps its own positions (0, 1, ...); ``example_ids`` says which
    example a token belongs to (-1: padding at a row end, whose positions restart too, so it is a segment
    of its own).
    """
    if any(not e.prompt_ids for e in examples):
        raise ValueError("collate_packed needs a non-empty prompt per example: its last token predicts the response")
    lengths = [len(e.prompt_ids) + len(e.response_ids) for e in examples]
    rows = _cheapest_rows(lengths, pack_length, attention_span)
    width = max(sum(lengths[i] for i in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros(len(rows), width, dtype=torch.long)
    example_ids = torch.full((len(rows), width), -1, dtype=torch.long)
    response_mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            e, end = examples[i], start + lengths[i]
            input_ids[r, start:end] = torch.tensor(e.prompt_ids + e.response_ids)
            position_ids[r, start:end] = torch.arange(lengths[i])
            example_ids[r, start:end] = i
            response_mask[r, start + len(e.prompt_ids) : end] = True
            start = end
        position_ids[r, start:] = torch.arange(width - start)
    return {
        "input_ids": input_ids,  # [R, L]
        "position_ids": position_ids,  # [R, L]
        "example_ids": example_ids,  # [R, L]
        "response_mask": response_mask,  # [R, L] True on response tokens (the loss targets)
        "response_lengths": torch.tensor([len(e.response_ids) for e in examples]),  # [B]
    }


class EpochSampler(torch.utils.data.DistributedSampler):
    """Epoch ``e``'s shuffled order depends only on ``(seed, e)``, however often it is iterated; split over ranks.

    Lightning calls ``set_epoch(e)`` at every epoch start, also on a loader it keeps from epoch to epoch,
    so each epoch gets its own order (``derive_seed(seed, e)``) whether or not the loader is rebuilt.
    (Lightning calls ``iter()`` twice at a normal epoch start but once after a resume, and a RandomSampler
    draws a new permutation each time, so a resumed epoch would see another order.)
    Each rank takes its shard of the order as Lightning's distributed sampler would (padded by wrapping
    round to equal shards, then every ``num_replicas``-th index), and Lightning keeps a DistributedSampler
    as it is. ``skip`` leaves out the first indices of this rank's shard already consumed before a
    mid-epoch restart in epoch ``skip_epoch``, and only in that epoch: skipping must follow the split, or
    the shards shift. The length stays the full shard's, as Lightning counts the consumed batches itself.
    """

    def __init__(
        self, size: int, seed: int, shuffle: bool = True, skip: int = 0, num_replicas: int = 1, rank: int = 0,
        skip_epoch: int = 0,
    ) -> None:
        super().__init__(range(size), num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.size, self.order_seed, self.order_shuffled = size, seed, shuffle
        self.skip, self.skip_epoch = skip, skip_epoch

    def __iter__(self):
        if self.order_shuffled:
            generator = torch.Generator().manual_seed(derive_seed(self.order_seed, self.epoch))
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        shard = [order[i] for i in super().__iter__()]  # this rank's positions of the order
        return iter(shard[self.skip :] if self.epoch == self.skip_epoch else shard)


def no_round(epoch: int) -> None:
    """A module's ``ensure_buffer`` until a SelfVerificationCallback replaces it: no round to run."""


def epoch_sampler(trainer, size: int, seed: int, batch_size: int) -> EpochSampler:
    """The sampler of a training loader (this rank's shard), set to the trainer's current epoch. After a
    mid-epoch restart it skips, in that epoch only, the batches already trained on (those whose update the
    checkpoint holds: Lightning's ``processed`` count, which a checkpoint written at batch end already
    includes; every rank steps the same number of batches)."""
    skip, replicas, rank, epoch = 0, 1, 0, 0
    if trainer is not None:
        replicas, rank, epoch = trainer.world_size, trainer.global_rank, trainer.current_epoch
        if trainer.fit_loop.restarting:
            progress = trainer.fit_loop.epoch_progress.current
            if progress.started > progress.processed:  # the restored epoch was under way
                skip = trainer.fit_loop.epoch_loop.batch_progress.current.processed * batch_size
    sampler = EpochSampler(size, seed, shuffle=size > 0, skip=skip, num_replicas=replicas, rank=rank, skip_epoch=epoch)
    sampler.set_epoch(epoch)  # Lightning sets it again at each epoch start
    return sampler


def batch_response_tokens(
    examples: list[BufferExample], seed: int, epoch: int, batch_size: int, world_size: int
) -> list[list[int]]:
    """Response tokens of each batch of epoch ``epoch`` on each rank, ``[rank][batch]``, in the order the
    loaders of ``epoch_sampler`` deal them (batch b is the epoch's b-th, also after a mid-epoch restart).

    Every rank holds the whole buffer, so each can count every rank's batches before they run.
    """
    lengths = [len(e.response_ids) for e in examples]
    counts = []
    for rank in range(world_size):
        sampler = EpochSampler(len(lengths), seed, shuffle=len(lengths) > 0, num_replicas=world_size, rank=rank)
        sampler.set_epoch(epoch)
        shard = list(sampler)
        counts.append([sum(lengths[i] for i in shard[b : b + batch_size]) for b in range(0, len(shard), batch_size)])
    return counts


# re-export; removed in the final import pass
from sharpening.rl.pairs import (  # noqa: E402, F401
    PairExample, collate_pairs, pairs_for_rank, pairs_from_buffer,
)
