"""One token per live row of the ``hf`` engine: temperature, top-k / top-p, then the exact race
(``race.py``) with each prompt's own random generator."""

from __future__ import annotations

import torch

from sharpening.engines.config import SamplingConfig
from sharpening.engines.race import race, race_by_prompt, random_bits

# Tokens per race on CPU (rows of one prompt at a time), so its float64 temporaries stay in cache: 16 prompts x 8
# draws over 32000 or 151936 tokens took about half the time of one race over the whole batch (2^16 and 2^15 were
# no faster). A batch with fewer tokens than this races at once (fewer Python calls).
RACE_CHUNK = 1 << 17


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k / top-p nucleus to -inf. ``logits``: [R, V] float32."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # [R, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p  # keep the token that crosses top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def draw_tokens(
    logits: torch.Tensor,
    row_ids: torch.Tensor,
    generators: list[torch.Generator],
    n: int,
    cfg: SamplingConfig,
    avoid_syncs: bool | None = None,
) -> torch.Tensor:
    """One token per live row: the winner of an exponential race over the scaled, filtered logits (``race``).

    ``row_ids`` [A] are the live rows' original indices (row r belongs to prompt r // n). Each prompt with a live
    row draws its full [n, V] block of random bits from its own generator every step, so a row's token does not
    depend on which rows were dropped. A prompt with no live row left never reads its stream again: its block is
    skipped, unless ``avoid_syncs`` (default: off CPU), where it is drawn anyway, since finding the live prompts
    would wait for the device every step. [A, V] -> [A]."""
    if cfg.temperature == 0:
        return logits.argmax(-1)
    avoid_syncs = logits.device.type != "cpu" if avoid_syncs is None else avoid_syncs
    scaled = filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p)
    vocab = logits.shape[-1]
    if avoid_syncs or row_ids.shape[0] * vocab <= RACE_CHUNK:  # the whole batch in one race
        live_prompts = range(len(generators)) if avoid_syncs else set((row_ids // n).tolist())
        blocks = [
            random_bits(n, vocab, logits.device, g)
            if b in live_prompts
            else torch.zeros(n, vocab, dtype=torch.int64, device=logits.device)  # finished prompt: stream unused
            for b, g in enumerate(generators)
        ]
        return race(scaled, torch.cat(blocks).index_select(0, row_ids))  # bits [B*N, V] -> [A, V]
    return race_by_prompt(scaled, row_ids, generators, n, RACE_CHUNK)
