"""Training batches of kept examples, padded or packed, and the log-probs of packed ones.

Padded (``collate_examples``): prompts left-padded, responses right-padded, one example per row.
Packed (``collate_packed``): several examples per row, no padding between them; each example keeps its own
positions (0, 1, ...) and attends only to itself. How the decoder is told:
  sdpa / eager: an explicit block-diagonal causal mask [R, 1, L, L], which transformers passes to the
    kernel unchanged (a 4D mask is "already prepared"): bool (True = attend) for sdpa, additive float
    (0 / dtype min) for eager, the formats transformers' own mask builders produce for them.
  flash_attention_2: no mask; the varlen kernel gets the segment boundaries (cu_seq_lens over the
    flattened rows), so attention never crosses an example and no padding is computed.
A packed batch gives the padded batch's log-probs (``packing_problem`` says when it would not).
"""

from __future__ import annotations

import torch

from sharpening.buffer import BufferExample
from sharpening.logprobs import chunked_logprobs, windowed_attention
from sharpening.types import PackedBatch, PaddedBatch


def collate_examples(examples: list[BufferExample], pad_token_id: int) -> PaddedBatch:
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
    return PaddedBatch(prompt_ids, prompt_mask, response_ids, response_mask)


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
) -> PackedBatch:
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
    response_lengths = torch.tensor([len(e.response_ids) for e in examples])  # [B]
    return PackedBatch(input_ids, position_ids, example_ids, response_mask, response_lengths)


PACKED_ATTENTION = ("sdpa", "eager", "flash_attention_2")


def packing_problem(model: torch.nn.Module) -> str | None:
    """Why a packed batch would not give ``model`` the padded result; None when it does.

    Sliding-window or chunked attention layers need their window inside the mask, which the explicit
    sdpa/eager mask does not carry (flash attention applies the window itself, per segment).
    """
    config = model.config
    attention = config._attn_implementation
    if attention not in PACKED_ATTENTION:
        return f"attention {attention!r} is not one of {', '.join(PACKED_ATTENTION)}"
    if attention == "flash_attention_2":
        return None
    if windowed_attention(config):
        return f"sliding-window or chunked attention layers under {attention!r} (use flash_attention_2)"
    return None


def block_causal_mask(example_ids: torch.Tensor) -> torch.Tensor:
    """True where query i may attend key j: same example (same id; padding is one block) and j <= i.
    example_ids [R, L] -> [R, 1, L, L] bool."""
    length = example_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=example_ids.device).tril()  # [L, L]
    same = example_ids[:, :, None] == example_ids[:, None, :]  # [R, L, L]
    return (same & causal)[:, None]  # [R, L, L] -> [R, 1, L, L]


def varlen_attention_kwargs(position_ids: torch.Tensor) -> dict:
    """Flash-attention varlen arguments for packed rows: a segment starts wherever the position is 0.
    position_ids [R, L]; the boundaries index the flattened [R*L] tokens (row ends are segment ends)."""
    flat = position_ids.reshape(-1)  # [R, L] -> [R*L]
    starts = (flat == 0).nonzero().view(-1)
    end = torch.tensor([flat.numel()], device=flat.device)
    cu_seq_lens = torch.cat([starts, end]).to(torch.int32)  # [segments + 1]
    longest = int(cu_seq_lens.diff().max())
    return dict(cu_seq_lens_q=cu_seq_lens, cu_seq_lens_k=cu_seq_lens, max_length_q=longest, max_length_k=longest)


def packed_attention_kwargs(model: torch.nn.Module, example_ids: torch.Tensor, position_ids: torch.Tensor) -> dict:
    """What the decoder needs, beside ``position_ids``, to keep every packed example to itself."""
    problem = packing_problem(model)
    if problem is not None:
        raise ValueError(f"packed batches would mix examples: {problem}; train on padded batches instead")
    attention = model.config._attn_implementation
    if attention == "flash_attention_2":
        return varlen_attention_kwargs(position_ids)
    allowed = block_causal_mask(example_ids)  # [R, 1, L, L]
    if attention == "sdpa":
        return {"attention_mask": allowed}
    dtype = model.get_input_embeddings().weight.dtype
    blocked = torch.full(allowed.shape, torch.finfo(dtype).min, dtype=dtype, device=allowed.device)
    return {"attention_mask": blocked.masked_fill(allowed, 0.0)}  # eager adds it to the scores


def packed_response_logprobs(model: torch.nn.Module, batch: PackedBatch, chunk_size: int = 256) -> torch.Tensor:
    """Per-token log-probs of the response tokens of a packed batch (``collate_packed``): [R, L] float32,
    log pi(token | earlier tokens of its own example) where ``response_mask`` is True, zero elsewhere.
    Gradients flow when called under grad.
    """
    input_ids, response_mask = batch.input_ids, batch.response_mask
    kwargs = packed_attention_kwargs(model, batch.example_ids, batch.position_ids)
    hidden = model.get_decoder()(
        input_ids=input_ids, position_ids=batch.position_ids, use_cache=False, **kwargs
    ).last_hidden_state  # [R, L, H]
    targets_mask = response_mask[:, 1:]  # [R, L-1]: the state at position i predicts token i+1
    flat_targets = input_ids[:, 1:][targets_mask]  # [M]
    out = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
    if flat_targets.numel():
        flat_hidden = hidden[:, :-1][targets_mask]  # [M, H]
        logprobs = chunked_logprobs(model, flat_hidden, flat_targets, chunk_size)  # [M]
        out = out.masked_scatter(torch.nn.functional.pad(targets_mask, (1, 0)), logprobs)  # [R, L]
    return out
