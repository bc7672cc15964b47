"""Measuring helpers shared by both sides of scripts/bench.py: the workload, phase timers, peak RSS, FLOPs.

The workload is the same for both sides: a random Llama built from a config with a fixed seed, saved to
a temporary directory (both sides load it by path), a ~100-token character vocabulary, and arithmetic
prompts such as ``"12+34="``.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import random
import string
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

CHARS = string.digits + string.ascii_letters + string.punctuation + " "  # 95 printable characters
MODEL_SHAPES = {
    "tiny": dict(
        hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=704
    ),
    "small": dict(
        hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, intermediate_size=1408
    ),
}


@dataclass
class Workload:
    """What both sides run, fixed for the whole benchmark."""

    model_path: str  # save_pretrained directory of the model and its tokenizer
    prompt_texts: list[str]  # e.g. "12+34="
    prompts_file: str  # the same prompts as JSONL ({"prompt": ...}), for our PromptDataModule
    samples_per_prompt: int = 8  # N (SFT) and the group size G (RL)
    max_new_tokens: int = 32
    prompts_per_batch: int = 16  # prompts generated together in the SFT round (both sides)
    rl_prompts: int = 8  # prompts per RL step
    sft_batch_size: int = 8  # selected samples per SFT optimizer step
    lr: float = 1e-5
    kl_coef: float = 0.05
    fixed_length: bool = False  # EOS suppressed: every response is max_new_tokens long
    complete_all_samples: bool = False  # ours: draw every sample to its end (no stopping of unselectable ones)
    device: str = "cpu"  # where both sides run: "cpu" or "cuda"
    decode: str = "dynamic"  # ours: SamplingConfig.decode (static KV cache / CUDA graphs are options on CUDA)
    cpu_linear: str = "auto"  # ours: PolicyConfig.cpu_linear (oneDNN or nn.Linear's kernel for CPU linear layers)
    matmul_params: int = 0  # weights that take part in matmuls (all but the embedding table and norms)
    warm_rl_steps: int = 0  # rl_warm_step: optimizer steps timed after one untimed (cold) step in the same trainer


@dataclass
class Measurement:
    """One side's run of one task (SFT round or RL step): seconds and token counts per phase."""

    seconds: dict[str, float] = field(default_factory=dict)  # generate / score / train / total
    completions: dict[str, int] = field(default_factory=dict)  # completions handled per phase
    response_tokens: dict[str, int] = field(default_factory=dict)  # response tokens handled per phase
    useful_flops: dict[str, float] = field(default_factory=dict)  # model FLOPs the phase needs (see useful_flops)
    setup_seconds: float = 0.0  # loading weights, building trainers: reported, not in total
    peak_rss_mib: float = 0.0  # process RSS peak during the side's run, setup included
    peak_gpu_mib: float = 0.0  # CUDA memory allocated at peak during the side's run (0 on CPU)
    rss_growth_mib: float = 0.0  # that peak minus the process RSS when the side started


def few_shot_prefix(examples: int, seed: int = 1) -> str:
    """``examples`` worked sums separated by spaces ("12+34=46 ..."), the same for every prompt: a few-shot prompt."""
    rng = random.Random(seed)
    pairs = [(rng.randint(1, 99), rng.randint(1, 99)) for _ in range(examples)]
    return "".join(f"{a}+{b}={a + b} " for a, b in pairs)


def build_workload(
    name: str, root: str, prompts: int, fixed_length: bool = False, seed: int = 0, few_shot: int = 0
) -> Workload:
    """Save the ``name`` Llama (random, seeded) and its character tokenizer under ``root``; write the prompts
    (each after ``few_shot`` worked examples when asked: long prompts that every sample of a prompt shares)."""
    import json

    from transformers import LlamaConfig, LlamaForCausalLM

    from sharpening.tasks.chars import build_char_tokenizer

    tokenizer = build_char_tokenizer(CHARS)
    prefix = few_shot_prefix(few_shot)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=128 + 64 * -(-len(prefix) // 64),  # room for the prefix, 128 without one
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **MODEL_SHAPES[name],
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    path = os.path.join(root, name)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    rng = random.Random(seed)
    texts = [f"{prefix}{rng.randint(1, 99)}+{rng.randint(1, 99)}=" for _ in range(prompts)]
    prompts_file = os.path.join(root, f"{name}-prompts.jsonl")
    with open(prompts_file, "w") as f:
        f.writelines(json.dumps({"prompt": t}) + "\n" for t in texts)
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return Workload(path, texts, prompts_file, fixed_length=fixed_length, matmul_params=matmul)


def useful_flops(w: Workload, kind: str, sequence_tokens: int) -> float:
    """FLOPs the task needs for ``sequence_tokens`` real (unpadded) tokens: 2 per matmul weight per token
    forward, 6 forward + backward. Attention scores (< 3% at these lengths), padding, repeated prompt
    prefills and duplicate passes are not counted, so both sides get the same figure for the same tokens."""
    per_token = {"forward": 2, "train": 6}[kind]
    return float(per_token * w.matmul_params * sequence_tokens)


def fill_rl_step(m: Measurement, w: Workload, seconds: dict[str, float], counts: dict, steps: int = 1) -> Measurement:
    """An RL step's phases from the clock's seconds (generate, score, total; train is the rest) and the counts
    (completions, response, prompt and scored tokens), as the mean of ``steps`` steps."""
    m.seconds = {
        "generate": seconds["generate"],
        "score": seconds["score"],
        "train": seconds["total"] - seconds["generate"] - seconds["score"],
        "total": seconds["total"],
    }
    m.completions = dict.fromkeys(("generate", "score", "train"), counts["completions"])
    m.response_tokens = dict.fromkeys(("generate", "score", "train"), counts["response_tokens"])
    m.useful_flops = {
        "generate": useful_flops(w, "forward", counts["prompt_tokens"] + counts["response_tokens"]),
        "score": useful_flops(w, "forward", counts["scored_tokens"]),
        "train": useful_flops(w, "train", counts["scored_tokens"]),
    }
    for table in (m.seconds, m.completions, m.response_tokens, m.useful_flops):
        for key in table:
            table[key] /= steps
    return m


def cuda_in_use() -> bool:
    """True once this process has started CUDA (a --device cuda run)."""
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def synchronize() -> None:
    """Wait for queued CUDA work, so a phase's wall time includes its kernels (no-op on CPU)."""
    if cuda_in_use():
        torch.cuda.synchronize()


class PhaseClock:
    """Accumulates wall time per phase name (CUDA work synchronized at both ends)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            synchronize()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def reset(self) -> None:
        """Forget the time so far (between steps: no phase is open then)."""
        self.seconds.clear()

    def wrap(self, name: str, fn: Callable, on_result: Callable | None = None) -> Callable:
        """``fn`` with its time added to ``name`` (and its result passed to ``on_result``)."""

        def timed(*args, **kwargs):
            with self.phase(name):
                result = fn(*args, **kwargs)
            if on_result is not None:
                on_result(result, *args, **kwargs)
            return result

        return timed


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS, so the next side starts from a low RSS."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def current_rss() -> int:
    """Resident set size of this process in bytes (psutil, or /proc)."""
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextlib.contextmanager
def rss_peak(measurement: Measurement, interval_s: float = 0.005) -> Iterator[None]:
    """Sample the process RSS in a thread while the block runs; store its peak and growth (MiB)."""
    release_memory()
    if cuda_in_use():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = current_rss()
    peak = [start]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(interval_s):
            peak[0] = max(peak[0], current_rss())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        peak[0] = max(peak[0], current_rss())
        measurement.peak_rss_mib = peak[0] / 2**20
        measurement.rss_growth_mib = (peak[0] - start) / 2**20
        if cuda_in_use():
            measurement.peak_gpu_mib = torch.cuda.max_memory_allocated() / 2**20


def matmul_peak_gflops(size: int = 2048, repeats: int = 5, device: str = "cpu") -> float:
    """This device's fp32 matmul throughput (best of ``repeats``); on CPU with torch's current thread count,
    the better of torch's ``mm`` (MKL on x86) and oneDNN's matmul (which our linear layers use on CPU).
    On CUDA, fp32 as the benchmark runs it (TF32 as torch's current setting, off by default) and size 8192."""
    from sharpening.kernels.cpu_linear import onednn_linear, onednn_linear_available

    size = 8192 if device == "cuda" else size
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    kernels = [lambda: a @ b]
    if device == "cpu" and onednn_linear_available():
        kernels.append(lambda: onednn_linear(a, b, None))  # a @ b.T: the same FLOPs
    best = float("inf")
    for kernel in kernels:
        kernel()  # warm-up
        for _ in range(repeats):
            synchronize()
            start = time.perf_counter()
            kernel()
            synchronize()
            best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def copy_bandwidth_gbs(device: str, mib: int = 1024, repeats: int = 10) -> float | None:
    """Memory bandwidth of this GPU (GB/s, bytes read + written by a device-to-device copy); None on CPU."""
    return memory_bandwidth_gbs(device, mib, repeats) if device == "cuda" else None


def memory_bandwidth_gbs(device: str, mib: int = 1024, repeats: int = 5) -> float:
    """This device's memory bandwidth (GB/s, bytes read + written by one large copy, best of ``repeats``): HBM
    on a GPU, DRAM through torch's copy threads on a CPU."""
    src = torch.empty(mib * 2**20, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        dst.copy_(src)
        synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() / best / 1e9


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and bool mask [R, P] from unpadded rows (the library's own padding)."""
    from sharpening.prompts import pad_prompts

    batch = pad_prompts(rows, list(range(len(rows))), [None] * len(rows), pad_id)
    return batch.prompt_ids, batch.prompt_mask
