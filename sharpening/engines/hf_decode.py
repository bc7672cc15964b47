"""The ``hf`` engine's three decode modes (``SamplingConfig.decode``), one class each. They draw the same tokens;
they differ in the KV cache they decode into, in whether finished rows leave the batch, and in the forward:

- ``DynamicDecode``: transformers' growing cache; finished rows leave the batch and the cache. Best on CPU.
- ``StaticDecode``: a preallocated fixed-size cache; every row runs to the end, so every decode forward has
  the same shapes.
- ``CompiledDecode``: ``StaticDecode`` with the forward run through ``torch.compile(mode="reduce-overhead")``
  (CUDA graphs), for launch-bound decoding on CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sharpening.logprobs import kv_cache_keyword

# Finished rows leave the batch and the KV cache once this fraction of the rows has finished (1 / COMPACT_DIVISOR).
# The small benchmark model's 64 x 8 draws (16 prompts a batch): 1/8 and 1/16 were 6% faster than 1/4, 1/2 was
# 13% slower, compacting after every finished row about 1% slower (each compaction copies the whole cache).
COMPACT_DIVISOR = 8
STATIC_CACHE_MULTIPLE = 64  # static KV cache length is rounded up to this, so similar prompt lengths share a shape
STATIC_DONE_CHECK = 8  # on CUDA the fixed-shape loop checks for "every row ended" every this many steps


@dataclass
class RowsInFlight:
    """The batch rows still decoding, one entry per batch row in every field. Compaction drops rows from every
    field (and from the KV cache) at once, so the fields never disagree on which row is which."""

    row_ids: torch.Tensor  # [A] long, original row of each batch row (prompt b's sample j is row b*N + j)
    done_mask: torch.Tensor  # [A] bool, the row has ended (EOS drawn, or stopped as unselectable)
    token_ids: torch.Tensor  # [A] long, the token drawn last, fed back at the next forward
    attention_mask: torch.Tensor  # [A, S] long, 1 on the cache slots the row attends to
    position_ids: torch.Tensor  # [A, 1] long, position of the token fed back next
    running_logprobs: torch.Tensor  # [A] float32, summed log-prob of the row's tokens (with stop_unselectable)

    def select(self, keep: torch.Tensor) -> RowsInFlight:
        """The rows ``keep`` [A'] (batch-row indices), in that order."""
        return RowsInFlight(*(field[keep] for field in (
            self.row_ids, self.done_mask, self.token_ids, self.attention_mask, self.position_ids,
            self.running_logprobs,
        )))  # fmt: skip


def _forward(model: torch.nn.Module):
    """One decode forward, ``(rows, cache)`` -> next-token logits [A, V] float32."""
    key = kv_cache_keyword()

    def step(rows: RowsInFlight, cache) -> torch.Tensor:
        out = model(input_ids=rows.token_ids[:, None], attention_mask=rows.attention_mask,
                    position_ids=rows.position_ids, use_cache=True, **{key: cache})  # fmt: skip
        return out.logits[:, -1].float()

    return step


class DynamicDecode:
    """Growing KV cache: each step appends one slot; with ``compact_finished``, finished rows leave the batch
    and the cache once ``1 / COMPACT_DIVISOR`` of the rows have finished, so they stop costing compute."""

    def __init__(self, model: torch.nn.Module, compact_finished: bool):
        self.forward = _forward(model)
        self.compact_finished = compact_finished

    def prepare(self, cache, attention_mask: torch.Tensor, n: int, max_new_tokens: int):
        """The prefilled cache [B, ...] repeated for each prompt's N samples -> [B*N, ...] (the prompt is
        prefilled once); the attention mask [B*N, P] as it is."""
        cache.batch_repeat_interleave(n)  # [B, ...] -> [B*N, ...]
        self.compact_finished = self.compact_finished and hasattr(cache, "batch_select_indices")
        return cache, attention_mask

    def looks_for_the_end(self, step: int) -> bool:
        """Whether to test "every row has ended" after ``step``: always (the loop syncs every step anyway)."""
        return True

    def advance(self, rows: RowsInFlight, cache, step: int) -> RowsInFlight:
        """Drop finished rows (when enough have finished) and open the next cache slot."""
        done = rows.done_mask
        if self.compact_finished and int(done.sum()) >= max(1, done.numel() // COMPACT_DIVISOR):
            keep = (~done).nonzero().squeeze(-1)  # [A'] rows that go on
            cache.batch_select_indices(keep)
            rows = rows.select(keep)
        mask = rows.attention_mask
        rows.attention_mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)  # [A, S] -> [A, S+1]
        return rows


class StaticDecode:
    """Preallocated fixed-size KV cache: every row stays to the end and every forward has the same shapes.
    With ``avoid_syncs`` (CUDA) "every row has ended" is looked at every ``STATIC_DONE_CHECK`` steps only."""

    def __init__(self, model: torch.nn.Module, decode: str, avoid_syncs: bool):
        self.forward = _forward(model)
        self.decode, self.avoid_syncs = decode, avoid_syncs
        self.prompt_len = 0

    def prepare(self, cache, attention_mask: torch.Tensor, n: int, max_new_tokens: int):
        """A static copy of the prefilled cache, [B, ...] -> [B*N, ..., L, ...], and the mask padded to its
        length, [B*N, P] -> [B*N, L]; slots past the prompt stay masked until written."""
        self.prompt_len = attention_mask.shape[1]
        length = static_cache_length(self.prompt_len, max_new_tokens)
        cache = static_cache(cache, n, length, self.decode)
        padding = attention_mask.new_zeros(attention_mask.shape[0], length - self.prompt_len)
        return cache, torch.cat([attention_mask, padding], -1)

    def looks_for_the_end(self, step: int) -> bool:
        """On CPU every step; on CUDA every few steps, since reading the flag back waits for the GPU."""
        return not self.avoid_syncs or step % STATIC_DONE_CHECK == STATIC_DONE_CHECK - 1

    def advance(self, rows: RowsInFlight, cache, step: int) -> RowsInFlight:
        """Unmask slot P + step, which the next forward writes (the cache keeps its own write counter)."""
        rows.attention_mask[:, self.prompt_len + step] = 1
        return rows


class CompiledDecode(StaticDecode):
    """``StaticDecode`` with the forward captured as CUDA graphs, compiled once per model (kept on the model)."""

    def __init__(self, model: torch.nn.Module, decode: str, avoid_syncs: bool, device: torch.device):
        if device.type != "cuda":
            raise ValueError(
                f"sampling.decode='compiled' captures CUDA graphs, but the prompts are on {device}: "
                "use sampling.decode='static' or 'dynamic' off CUDA"
            )
        super().__init__(model, decode, avoid_syncs)
        forward = model.__dict__.get("_sharpening_compiled_forward")
        if forward is None:  # graph breaks fall back to eager, hence fullgraph=False (as transformers' generate)
            forward = torch.compile(model.__call__, mode="reduce-overhead", fullgraph=False)
            model.__dict__["_sharpening_compiled_forward"] = forward
        key = kv_cache_keyword()

        def step(rows: RowsInFlight, cache) -> torch.Tensor:
            torch.compiler.cudagraph_mark_step_begin()
            out = forward(input_ids=rows.token_ids[:, None], attention_mask=rows.attention_mask,
                          position_ids=rows.position_ids, use_cache=True, **{key: cache})  # fmt: skip
            return out.logits[:, -1].float().clone()  # the graph's output buffer is overwritten by the next replay

        self.forward = step


def make_decode_mode(
    decode: str, model: torch.nn.Module, device: torch.device, avoid_syncs: bool, compact_finished: bool
) -> DynamicDecode | StaticDecode:
    """The decode mode ``decode`` names; 'compiled' off CUDA raises before any forward."""
    if decode == "compiled":
        return CompiledDecode(model, decode, avoid_syncs, device)
    if decode == "static":
        return StaticDecode(model, decode, avoid_syncs)
    return DynamicDecode(model, compact_finished)


def static_cache_length(prompt_len: int, max_new_tokens: int) -> int:
    """Slots of a static KV cache: the prompt and every token fed back (the last drawn token never is),
    rounded up to ``STATIC_CACHE_MULTIPLE``."""
    need = prompt_len + max_new_tokens - 1
    return -(-need // STATIC_CACHE_MULTIPLE) * STATIC_CACHE_MULTIPLE


def static_cache(cache, n: int, length: int, decode: str):
    """A fixed-size copy of a prefilled ``DynamicCache``, each prompt repeated for its N samples: keys and
    values [B, H, P, D] -> [B*N, H, L, D], slots P.. still empty. Each layer's write counter stands at P, so
    the next forward writes slot P, the one after P + 1, and so on."""
    from transformers.cache_utils import Cache, DynamicLayer, StaticLayer

    kinds = {type(layer).__name__ for layer in getattr(cache, "layers", [cache])}
    if kinds != {DynamicLayer.__name__}:
        raise ValueError(
            f"sampling.decode={decode!r} needs full attention in every layer, but this model's KV cache has "
            f"{sorted(kinds)} (sliding window, linear or hybrid layers): use sampling.decode='dynamic'"
        )
    static = Cache(layers=[StaticLayer(max_cache_len=length) for _ in cache.layers])
    if not all(hasattr(layer, "cumulative_length") for layer in static.layers):  # older: slots from cache_position
        import transformers

        raise ValueError(
            f"sampling.decode={decode!r} needs a transformers whose static cache counts its own slots (5.17 or "
            f"newer; found {transformers.__version__}): upgrade transformers or use sampling.decode='dynamic'"
        )
    for i, layer in enumerate(cache.layers):  # writes slots [0, P) and sets the counter to P
        static.update(layer.keys.repeat_interleave(n, 0), layer.values.repeat_interleave(n, 0), i)
    return static
