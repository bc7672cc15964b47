"""How responses are drawn: ``SamplingConfig``, its checks, and whether a configuration draws exactly from the
model. Every engine reads the same options."""

from __future__ import annotations

from dataclasses import dataclass

import torch

DECODE_MODES = ("dynamic", "static", "compiled")


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
    cfg: SamplingConfig,
    device: torch.device,
    option: str,
    sharded: bool = False,
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
