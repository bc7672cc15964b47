"""N samples per prompt: the only generate loop of the framework.

Each prompt is prefilled ONCE and its KV cache is expanded to its N samples (shared prefix). Every
token is drawn with a per-prompt random generator seeded from (seed, round, prompt index), so a prompt's
samples do not depend on which other prompts share its batch, on the batch size or on the rank that
draws it. The model's own temperature-1 log-prob of each drawn token comes for free.

``decode="static"`` decodes into a preallocated fixed-size KV cache, so every decode forward has the same
shapes; ``decode="compiled"`` also runs that forward through ``torch.compile(mode="reduce-overhead")`` (CUDA
graphs), for launch-bound decoding on CUDA. Both draw the same tokens as ``decode="dynamic"``.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import torch

from sharpening.kernels.cpu_linear import packed_linear_weights
from sharpening.kernels.decode_attention import cpu_decode_attention
from sharpening.engines.race import race, race_by_prompt, random_bits
from sharpening.logprobs import kv_cache_keyword
from sharpening.types import PromptBatch, SampleBatch

# Finished rows leave the batch and the KV cache once this fraction of the rows has finished (1 / COMPACT_DIVISOR).
# The small benchmark model's 64 x 8 draws (16 prompts a batch): 1/8 and 1/16 were 6% faster than 1/4, 1/2 was
# 13% slower, compacting after every finished row about 1% slower (each compaction copies the whole cache).
COMPACT_DIVISOR = 8


@dataclass
class SamplingConfig:
    """How responses are drawn."""

    samples_per_prompt: int = 8
    """N: responses drawn per prompt."""
    max_new_tokens: int = 64
    """Most tokens per response (EOS included); a response without EOS by then is truncated."""
    temperature: float = 1.0
    """Softmax temperature; 1.0 with top_k=0 and top_p=1.0 draws exactly from the model; 0 is greedy."""
    top_k: int = 0
    """Keep only the k most likely tokens (0 = off)."""
    top_p: float = 1.0
    """Nucleus sampling mass (1.0 = off)."""
    prompts_per_batch: int = 16
    """Prompts generated together (each with its N samples). Self-verification rounds and evaluation; online and
    XPO RL draw a step's prompts together (--model.prompts_per_step)."""
    decode: str = "dynamic"
    """Decode loop: 'dynamic' (growing KV cache, finished rows leave the batch; best on CPU), 'static'
    (preallocated KV cache, fixed shapes, every row to the end) or 'compiled' (static + CUDA graphs; CUDA only).
    'static' and 'compiled' need a model with full attention in every layer (no sliding window)."""


DECODE_MODES = ("dynamic", "static", "compiled")
STATIC_CACHE_MULTIPLE = 64  # static KV cache length is rounded up to this, so similar prompt lengths share a shape
STATIC_DONE_CHECK = 8  # on CUDA the fixed-shape loop checks for "every row ended" every this many steps
# Tokens per race on CPU (rows of one prompt at a time), so its float64 temporaries stay in cache: 16 prompts x 8
# draws over 32000 or 151936 tokens took about half the time of one race over the whole batch (2^16 and 2^15 were
# no faster). A batch with fewer tokens than this races at once (fewer Python calls).
RACE_CHUNK = 1 << 17


def validate_sampling_config(cfg: SamplingConfig, option: str) -> list[str]:
    """Every problem with ``cfg``, each naming ``option.<field>``."""
    problems = []
    if cfg.samples_per_prompt < 1:
        problems.append(f"{option}.samples_per_prompt={cfg.samples_per_prompt}: must be >= 1 (the paper uses 50)")
    if cfg.max_new_tokens <= 0:
        problems.append(f"{option}.max_new_tokens={cfg.max_new_tokens}: must be > 0 (e.g. 512)")
    if cfg.temperature < 0:
        problems.append(f"{option}.temperature={cfg.temperature}: must be >= 0 (1.0 samples the model, 0 is greedy)")
    if cfg.top_k < 0:
        problems.append(f"{option}.top_k={cfg.top_k}: must be >= 0 (0 turns it off)")
    if not 0.0 < cfg.top_p <= 1.0:
        problems.append(f"{option}.top_p={cfg.top_p}: must be in (0, 1] (1.0 turns it off)")
    if cfg.prompts_per_batch < 1:
        problems.append(f"{option}.prompts_per_batch={cfg.prompts_per_batch}: must be >= 1")
    if cfg.decode not in DECODE_MODES:
        problems.append(
            f"{option}.decode={cfg.decode!r}: must be one of 'dynamic', 'static', 'compiled' "
            "(use 'dynamic' on CPU, 'static' or 'compiled' for CUDA graphs on CUDA)"
        )
    return problems


def decode_device_problems(
    cfg: SamplingConfig, device: torch.device, option: str, sharded: bool = False,
    gpu_option: str = "--trainer.accelerator gpu",
) -> list[str]:
    """``cfg.decode`` against the device the run generates on and its strategy, known once the Trainer is
    set up (before any weights load). ``gpu_option``: how the user's command asks for a GPU."""
    if cfg.decode != "compiled":
        return []
    if torch.device(device).type != "cuda":
        return [
            f"{option}.decode=compiled: CUDA graphs need a CUDA device, but this run generates on {device}; "
            f"use {option}.decode=static or dynamic, or run on a GPU ({gpu_option})"
        ]
    if sharded:
        return [
            f"{option}.decode=compiled: not supported under FSDP (the weights are gathered anew for every round, "
            f"so a captured CUDA graph would read freed memory); use {option}.decode=static"
        ]
    return []


def is_exact_sampling(temperature: float, top_k: int, top_p: float) -> bool:
    """True when draws follow the model's distribution exactly (temperature 1, no truncation)."""
    return temperature == 1.0 and top_k == 0 and top_p >= 1.0


def derive_seed(*parts: int) -> int:
    """A stable 63-bit seed from integers (seed, round, prompt index, ...); independent of Python's hash salt."""
    digest = hashlib.blake2b(":".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


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


def _draw(logits: torch.Tensor, rows: torch.Tensor, generators: list[torch.Generator], n: int, cfg: SamplingConfig):
    """One token per live row: the winner of an exponential race over the scaled, filtered logits (``race``).
    ``rows`` [A] are the live rows' original indices (row r belongs to prompt r // n). Each prompt with a live
    row draws its full [n, V] block of random bits from its own generator every step, so a row's token does not
    depend on which rows were dropped. A prompt with no live row left never reads its stream again: on CPU its
    block is skipped; on CUDA it is drawn anyway, since finding the live prompts would wait for the GPU every
    step. [A, V] -> [A]."""
    if cfg.temperature == 0:
        return logits.argmax(-1)
    scaled = filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p)
    vocab = logits.shape[-1]
    if _avoid_syncs(logits.device) or rows.shape[0] * vocab <= RACE_CHUNK:  # the whole batch in one race
        live_prompts = range(len(generators)) if _avoid_syncs(logits.device) else set((rows // n).tolist())
        blocks = [
            random_bits(n, vocab, logits.device, g) if b in live_prompts
            else torch.zeros(n, vocab, dtype=torch.int64, device=logits.device)  # finished prompt: stream unused
            for b, g in enumerate(generators)
        ]
        return race(scaled, torch.cat(blocks).index_select(0, rows))  # bits [B*N, V] -> [A, V]
    return race_by_prompt(scaled, rows, generators, n, RACE_CHUNK)


def _with_cpu_kernels(fn):
    """Run ``fn(model, prompts, ...)`` with ``model``'s oneDNN linear weights packed (cpu_linear.py) and, on
    CPU under sdpa, its decode steps' attention by matmuls (decode_attention.py)."""

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
    """
    n, device = cfg.samples_per_prompt, prompts.prompt_ids.device
    static = cfg.decode in ("static", "compiled")
    if cfg.decode == "compiled" and device.type != "cuda":
        raise ValueError(
            f"sampling.decode='compiled' captures CUDA graphs, but the prompts are on {device}: "
            "use sampling.decode='static' or 'dynamic' off CUDA"
        )
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=device)
    generators = [
        torch.Generator(device=device).manual_seed(derive_seed(seed, round_index, int(i)))
        for i in prompts.prompt_indices.tolist()
    ]
    mask = prompts.prompt_mask.long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, P]
    out = model(
        input_ids=prompts.prompt_ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1
    )
    cache, prompt_len = getattr(out, kv_cache_keyword()), mask.shape[1]
    logits = out.logits[:, -1].float().repeat_interleave(n, 0)  # [B*N, V]
    mask = mask.repeat_interleave(n, 0)  # [B*N, P]
    next_position = positions[:, -1:].repeat_interleave(n, 0) + 1  # [B*N, 1]
    if static:
        length = _static_cache_length(prompt_len, cfg.max_new_tokens)
        cache = _static_cache(cache, n, length, cfg.decode)  # [B, ...] -> [B*N, ..., L, ...]
        mask = torch.cat([mask, mask.new_zeros(mask.shape[0], length - prompt_len)], -1)  # [B*N, P] -> [B*N, L]
    else:
        cache.batch_repeat_interleave(n)  # [B, ...] -> [B*N, ...]: the prompt is prefilled once
    compact_finished = compact_finished and not static and hasattr(cache, "batch_select_indices")
    decode_step = _decode_step(model, cfg.decode)

    total = logits.shape[0]
    rows = torch.arange(total, device=device)  # original index of each row still in the batch
    done = torch.zeros(total, dtype=torch.bool, device=device)  # per batch row: EOS already emitted
    finished = torch.zeros(total, dtype=torch.bool, device=device)  # per original row
    pruned = torch.zeros(total, dtype=torch.bool, device=device)  # per original row: stopped, cannot be kept
    running = torch.zeros(total, device=device)  # per batch row: summed log-prob so far
    end_scores = torch.full((total,), float("-inf"), device=device)  # per original row: score once ended by EOS
    tokens, logprobs, valid = [], [], []
    for step in range(cfg.max_new_tokens):
        token = _draw(logits, rows, generators, n, cfg)  # [A]
        token_logprob = logits.log_softmax(-1).gather(-1, token[:, None]).squeeze(-1)  # [A]
        # per batch row -> per original row by index (no boolean indexing: it would wait for the GPU)
        live = ~done
        tokens.append(_by_row(torch.where(live, token, pad_token_id), rows, total, pad_token_id))
        logprobs.append(_by_row(torch.where(live, token_logprob, 0.0), rows, total, 0.0))
        valid.append(_by_row(live, rows, total, False))
        ended = live & torch.isin(token, eos)
        finished.index_put_((rows,), finished.index_select(0, rows) | ended)
        if stop_unselectable > 0:
            running = running + torch.where(done, torch.zeros_like(token_logprob), token_logprob)
            end_scores.index_put_((rows,), torch.where(ended, running, end_scores.index_select(0, rows)))
            hopeless = live & ~ended & _unselectable(running, rows, end_scores.view(-1, n), stop_unselectable)
            pruned.index_put_((rows,), pruned.index_select(0, rows) | hopeless)
            ended = ended | hopeless
        done = done | ended
        if step == cfg.max_new_tokens - 1:
            break
        look = not (static and _avoid_syncs(device)) or step % STATIC_DONE_CHECK == STATIC_DONE_CHECK - 1
        if look and bool(done.all()):  # on CUDA the fixed-shape loop looks every few steps: it waits for the GPU
            break
        if compact_finished and int(done.sum()) >= max(1, done.numel() // COMPACT_DIVISOR):
            keep = (~done).nonzero().squeeze(-1)  # [A'] rows that go on
            cache.batch_select_indices(keep)
            mask, next_position, rows, token, done = mask[keep], next_position[keep], rows[keep], token[keep], done[keep]
            running = running[keep]
        if static:  # the cache writes slot P + step (its own counter); unwritten slots stay masked
            mask[:, prompt_len + step] = 1
        else:
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
        logits = decode_step(input_ids=token[:, None], attention_mask=mask, position_ids=next_position, cache=cache)
        next_position = next_position + 1

    b, valid = len(prompts), torch.stack(valid, -1)  # [B*N, T]
    width = int(valid.any(0).nonzero().max()) + 1  # steps run after every row ended hold no token
    return SampleBatch(
        prompts=prompts,
        response_ids=torch.stack(tokens, -1)[:, :width].reshape(b, n, -1),  # [B*N, T] -> [B, N, T]
        response_mask=valid[:, :width].reshape(b, n, -1),
        logprobs=torch.stack(logprobs, -1)[:, :width].reshape(b, n, -1),
        truncated=(~finished & ~pruned).view(b, n),
        exact_draws=is_exact_sampling(cfg.temperature, cfg.top_k, cfg.top_p),
        pruned=pruned.view(b, n) if stop_unselectable > 0 else None,
    )


def _avoid_syncs(device: torch.device) -> bool:
    """True where reading a value back from the device waits for it (CUDA): the loop then skips optional
    checks whose outcome does not change the draws."""
    return device.type != "cpu"


def _by_row(values: torch.Tensor, rows: torch.Tensor, total: int, fill) -> torch.Tensor:
    """Per-batch-row ``values`` [A] placed at their original rows ``rows`` [A] of a [total] tensor of ``fill``."""
    return torch.full((total,), fill, dtype=values.dtype, device=values.device).index_put_((rows,), values)


def _static_cache_length(prompt_len: int, max_new_tokens: int) -> int:
    """Slots of a static KV cache: the prompt and every token fed back (the last drawn token never is),
    rounded up to ``STATIC_CACHE_MULTIPLE``."""
    need = prompt_len + max_new_tokens - 1
    return -(-need // STATIC_CACHE_MULTIPLE) * STATIC_CACHE_MULTIPLE


def _static_cache(cache, n: int, length: int, decode: str):
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


def _decode_step(model: torch.nn.Module, decode: str):
    """One decode forward, ``(input_ids [R, 1], attention_mask, position_ids [R, 1], cache)`` -> next-token
    logits [R, V] float32. For 'compiled', the model's CUDA-graph forward (compiled once per model)."""
    key = kv_cache_keyword()
    if decode != "compiled":
        return lambda cache, **inputs: model(**inputs, **{key: cache}, use_cache=True).logits[:, -1].float()
    forward = model.__dict__.get("_sharpening_compiled_forward")
    if forward is None:  # graph breaks fall back to eager, hence fullgraph=False (as transformers' generate)
        forward = torch.compile(model.__call__, mode="reduce-overhead", fullgraph=False)
        model.__dict__["_sharpening_compiled_forward"] = forward

    def step(cache, **inputs):
        torch.compiler.cudagraph_mark_step_begin()
        out = forward(**inputs, **{key: cache}, use_cache=True)
        return out.logits[:, -1].float().clone()  # the graph's output buffer is overwritten by the next replay

    return step


def _unselectable(running: torch.Tensor, rows: torch.Tensor, end_scores: torch.Tensor, k: int) -> torch.Tensor:
    """Rows whose summed log-prob so far is already below the k-th best ended response of their prompt.

    running [A] per batch row, rows [A] original indices, end_scores [B, N] (-inf until a row ends by EOS).
    A margin of 1e-4 relative keeps float rounding of the final sum from turning a near-tie into a wrong
    stop; sample 0 is never stopped. Returns [A] bool."""
    n = end_scores.shape[1]
    bound = end_scores.topk(min(k, n), dim=-1).values[:, -1]  # [B]: -inf while fewer than k have ended
    bound = bound.index_select(0, rows // n)  # [B] -> [A]
    return (running < bound - 1e-4 * (1.0 + bound.abs())) & (rows % n != 0)


def decode_responses(tokenizer, samples: SampleBatch) -> list[list[str]]:
    """Response texts, [B][N], special tokens (EOS, pad) removed."""
    b, n, _ = samples.response_ids.shape
    flat = samples.response_ids.view(b * n, -1).tolist()  # [B*N, T]
    texts = tokenizer.batch_decode(flat, skip_special_tokens=True)
    return [texts[i * n : (i + 1) * n] for i in range(b)]
