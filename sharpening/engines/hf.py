"""The ``hf`` engine: our own decode loop over a transformers causal LM, N samples per prompt.

Each prompt is prefilled ONCE and its KV cache is expanded to its N samples (shared prefix). Every token is
drawn with a per-prompt random generator seeded from (seed, round, prompt index) (``draw.draw_tokens``), so a
prompt's samples do not depend on which other prompts share its batch, on the batch size or on the rank that
draws it. The model's own temperature-1 log-prob of each drawn token comes for free.

The loop (``_decode``) is the same for the three decode modes of ``hf_decode.py``, which draw the same tokens.
Rows are tracked two ways: ``RowsInFlight`` holds the batch rows still decoding (fewer once finished rows
leave), ``DrawRecord`` what each original row (prompt b's sample j is row b*N + j) has drawn.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from sharpening.engines.base import derive_seed
from sharpening.engines.config import SamplingConfig, is_exact_sampling
from sharpening.engines.draw import draw_tokens
from sharpening.engines.hf_decode import DynamicDecode, RowsInFlight, StaticDecode, make_decode_mode
from sharpening.kernels.cpu_linear import packed_linear_weights
from sharpening.kernels.decode_attention import cpu_decode_attention
from sharpening.logprobs import kv_cache_keyword
from sharpening.selection import mark_unselectable
from sharpening.types import PromptBatch, SampleBatch


class HFEngine:
    """The ``hf`` sampling engine (``SamplingEngine``): ``generate_samples`` on the model as it is in memory.

    Args:
        compact_finished: Finished rows leave the batch and the KV cache in the dynamic decode mode; the draws
            are the same either way.
    """

    def __init__(self, compact_finished: bool = True):
        self.compact_finished = compact_finished

    def generate(
        self,
        model: torch.nn.Module,
        prompts: PromptBatch,
        cfg: SamplingConfig,
        eos_token_id: int | list[int],
        pad_token_id: int,
        seed: int = 0,
        round_index: int = 0,
        stop_unselectable: int = 0,
    ) -> SampleBatch:
        return generate_samples(
            model,
            prompts,
            cfg,
            eos_token_id,
            pad_token_id,
            seed=seed,
            round_index=round_index,
            compact_finished=self.compact_finished,
            stop_unselectable=stop_unselectable,
        )

    def metrics(self) -> dict[str, float]:
        return {}

    def idle(self) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class DrawRecord:
    """What each original row has drawn; R = B*N rows, one column per decode step."""

    token_columns: list[torch.Tensor]  # T x [R] long, the drawn token, pad once the row had ended
    logprob_columns: list[torch.Tensor]  # T x [R] float32, its temperature-1 log-prob, 0 once the row had ended
    valid_columns: list[torch.Tensor]  # T x [R] bool, True where the row had not ended before the step
    finished_mask: torch.Tensor  # [R] bool, ended by EOS
    pruned_mask: torch.Tensor  # [R] bool, stopped: it could no longer be kept
    end_scores: torch.Tensor  # [R] float32, summed log-prob once ended by EOS, -inf before


@dataclass
class _DrawRules:
    """What every step of one ``generate_samples`` call draws by."""

    cfg: SamplingConfig
    generators: list[torch.Generator]  # one per prompt, B
    eos_ids: torch.Tensor  # [E] long
    pad_token_id: int
    stop_unselectable: int
    avoid_syncs: bool


def _with_cpu_kernels(fn):
    """Run ``fn(model, prompts, ...)`` with ``model``'s oneDNN linear weights packed (kernels/cpu_linear.py)
    and, on CPU under sdpa, its decode steps' attention by matmuls (kernels/decode_attention.py)."""

    @functools.wraps(fn)
    def run(model, prompts, *args, **kwargs):
        with packed_linear_weights(model), cpu_decode_attention(model, prompts.prompt_ids.device):
            return fn(model, prompts, *args, **kwargs)

    return run


@_with_cpu_kernels
@torch.no_grad()
def generate_samples(
    model: torch.nn.Module,
    prompts: PromptBatch,
    cfg: SamplingConfig,
    eos_token_id: int | list[int],
    pad_token_id: int,
    seed: int = 0,
    round_index: int = 0,
    compact_finished: bool = True,
    stop_unselectable: int = 0,
) -> SampleBatch:
    """Draw ``cfg.samples_per_prompt`` responses for every prompt, with a KV cache shared per prompt.

    Rows stop at EOS (which is kept and scored). Returns token ids, the model's temperature-1 log-prob of
    each drawn token, and a truncated flag for rows that hit ``max_new_tokens`` before EOS. With
    ``compact_finished``, finished rows leave the batch and the KV cache (once an eighth of the batch has
    finished), so they stop costing compute; the draws are the same either way. ``cfg.decode`` 'static' and
    'compiled' keep every row to the end in a fixed-size KV cache instead (see ``SamplingConfig.decode``).
    With ``stop_unselectable`` k > 0, a row stops once it cannot be among its prompt's k best by
    log-likelihood (``selection.mark_unselectable``) and is marked ``pruned``.
    """
    device = prompts.prompt_ids.device
    avoid_syncs = _avoid_syncs(device)
    mode = make_decode_mode(cfg.decode, model, device, avoid_syncs, compact_finished)
    eos_ids = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=device)
    generators = [
        torch.Generator(device=device).manual_seed(derive_seed(seed, round_index, int(i)))
        for i in prompts.prompt_indices.tolist()
    ]
    rules = _DrawRules(cfg, generators, eos_ids, pad_token_id, stop_unselectable, avoid_syncs)
    logits, rows, cache = _prefill(model, prompts, cfg, mode)
    record = _decode(mode, cache, logits, rows, rules)
    return _sample_batch(prompts, record, cfg, stop_unselectable)


def _avoid_syncs(device: torch.device) -> bool:
    """True where reading a value back from the device waits for it (CUDA): the loop then skips optional
    checks whose outcome does not change the draws."""
    return device.type != "cpu"


def _prefill(model: torch.nn.Module, prompts: PromptBatch, cfg: SamplingConfig, mode: DynamicDecode | StaticDecode):
    """One forward over the prompts [B, P]: the first step's logits [B*N, V], the rows in flight (all B*N) and
    the KV cache, prepared by ``mode`` for the B*N rows."""
    n = cfg.samples_per_prompt
    mask = prompts.prompt_mask.long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, P]
    out = model(
        input_ids=prompts.prompt_ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1
    )
    logits = out.logits[:, -1].float().repeat_interleave(n, 0)  # [B, V] -> [B*N, V]
    cache, mask = mode.prepare(getattr(out, kv_cache_keyword()), mask.repeat_interleave(n, 0), n, cfg.max_new_tokens)
    total, device = logits.shape[0], logits.device
    rows = RowsInFlight(
        row_ids=torch.arange(total, device=device),
        done_mask=torch.zeros(total, dtype=torch.bool, device=device),
        token_ids=torch.zeros(total, dtype=torch.long, device=device),
        attention_mask=mask,  # [B*N, P], or [B*N, L] for a static cache
        position_ids=positions[:, -1:].repeat_interleave(n, 0) + 1,  # [B, 1] -> [B*N, 1]
        running_logprobs=torch.zeros(total, device=device),
    )
    return logits, rows, cache


def _decode(mode: DynamicDecode | StaticDecode, cache, logits: torch.Tensor, rows: RowsInFlight, rules: _DrawRules):
    """Draw, record, feed back, until ``max_new_tokens`` or every row has ended. ``logits`` [B*N, V] are the
    prefill's; returns what every row drew."""
    total, device = logits.shape[0], logits.device
    record = DrawRecord(
        [], [], [],
        finished_mask=torch.zeros(total, dtype=torch.bool, device=device),
        pruned_mask=torch.zeros(total, dtype=torch.bool, device=device),
        end_scores=torch.full((total,), float("-inf"), device=device),
    )  # fmt: skip
    n, max_new_tokens = rules.cfg.samples_per_prompt, rules.cfg.max_new_tokens
    for step in range(max_new_tokens):
        token_ids = draw_tokens(logits, rows.row_ids, rules.generators, n, rules.cfg, rules.avoid_syncs)  # [A]
        token_logprobs = logits.log_softmax(-1).gather(-1, token_ids[:, None]).squeeze(-1)  # [A]
        rows.token_ids = token_ids
        _record_step(rows, record, token_logprobs, rules)
        if step == max_new_tokens - 1:
            break
        if mode.looks_for_the_end(step) and bool(rows.done_mask.all()):  # waits for the device
            break
        rows = mode.advance(rows, cache, step)
        logits = mode.forward(rows, cache)
        rows.position_ids = rows.position_ids + 1
    return record


def _record_step(rows: RowsInFlight, record: DrawRecord, token_logprobs: torch.Tensor, rules: _DrawRules) -> None:
    """Write the step's tokens [A] (``rows.token_ids``) and log-probs [A] into ``record`` by original row, and
    end the rows that drew EOS or, with ``stop_unselectable``, can no longer be kept. Per batch row -> per
    original row by index: boolean indexing would wait for the device."""
    row_ids, done, token_ids, pad_id = rows.row_ids, rows.done_mask, rows.token_ids, rules.pad_token_id
    live, total = ~done, record.finished_mask.shape[0]
    record.token_columns.append(_by_row(torch.where(live, token_ids, pad_id), row_ids, total, pad_id))
    record.logprob_columns.append(_by_row(torch.where(live, token_logprobs, 0.0), row_ids, total, 0.0))
    record.valid_columns.append(_by_row(live, row_ids, total, False))
    ended = live & torch.isin(token_ids, rules.eos_ids)
    record.finished_mask.index_put_((row_ids,), record.finished_mask.index_select(0, row_ids) | ended)
    if rules.stop_unselectable > 0:
        running = rows.running_logprobs + torch.where(done, torch.zeros_like(token_logprobs), token_logprobs)
        end_scores = torch.where(ended, running, record.end_scores.index_select(0, row_ids))
        record.end_scores.index_put_((row_ids,), end_scores)
        prompt_end_scores = record.end_scores.view(-1, rules.cfg.samples_per_prompt)  # [B*N] -> [B, N]
        hopeless = live & ~ended & mark_unselectable(running, row_ids, prompt_end_scores, rules.stop_unselectable)
        rows.running_logprobs = running
        record.pruned_mask.index_put_((row_ids,), record.pruned_mask.index_select(0, row_ids) | hopeless)
        ended = ended | hopeless
    rows.done_mask = done | ended


def _by_row(values: torch.Tensor, row_ids: torch.Tensor, total: int, fill) -> torch.Tensor:
    """Per-batch-row ``values`` [A] placed at their original rows ``row_ids`` [A] of a [total] tensor of ``fill``."""
    return torch.full((total,), fill, dtype=values.dtype, device=values.device).index_put_((row_ids,), values)


def _sample_batch(prompts: PromptBatch, record: DrawRecord, cfg: SamplingConfig, stop_unselectable: int) -> SampleBatch:
    """The record's columns as [B, N, T] tensors, cut after the last step in which some row drew a token."""
    b, n = len(prompts), cfg.samples_per_prompt
    valid = torch.stack(record.valid_columns, -1)  # T x [B*N] -> [B*N, T]
    width = int(valid.any(0).nonzero().max()) + 1  # steps run after every row ended hold no token
    return SampleBatch(
        prompts=prompts,
        response_ids=torch.stack(record.token_columns, -1)[:, :width].reshape(b, n, -1),  # [B*N, T] -> [B, N, T]
        response_mask=valid[:, :width].reshape(b, n, -1),  # [B*N, T] -> [B, N, T]
        logprobs=torch.stack(record.logprob_columns, -1)[:, :width].reshape(b, n, -1),  # [B*N, T] -> [B, N, T]
        truncated=(~record.finished_mask & ~record.pruned_mask).view(b, n),  # [B*N] -> [B, N]
        exact_draws=is_exact_sampling(cfg.temperature, cfg.top_k, cfg.top_p),
        pruned=record.pruned_mask.view(b, n) if stop_unselectable > 0 else None,  # [B*N] -> [B, N]
    )
