"""How responses are drawn: ``SamplingConfig``, its checks, and whether a configuration draws exactly from the
model. Every engine reads the same options."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

DECODE_MODES = ("dynamic", "static", "compiled")
ENGINES = ("hf", "vllm")


@dataclass
class VLLMConfig:
    """The vLLM engine's own options (read only with ``engine: vllm``). vLLM runs colocated: in this process, on
    this rank's device, holding the full policy."""

    gpu_memory_utilization: float = 0.3
    """CUDA: the share of the GPU's memory vLLM may take (weights and KV cache); the trainer needs the rest."""
    cpu_kv_cache_gb: int = 1
    """CPU: GiB of memory for vLLM's KV cache (whole GiB: vLLM reads it as an integer)."""
    max_model_len: int | None = None
    """Longest prompt + response vLLM serves; None: the model's max_position_embeddings."""
    enforce_eager: bool | None = None
    """No CUDA graphs / compilation; None: eager on CPU (fast start), graphs on CUDA."""
    sleep_while_training: bool = True
    """CUDA: free the KV cache and offload vLLM's weights between draws, so the trainer has the memory."""
    parity_samples: int = 4
    """Responses of each draw rescored teacher-forced by our model to check vLLM's log-probs (0 turns it off)."""
    parity_warn: float = 0.01
    """Warn when vLLM's sequence log-prob of a probed response differs from ours by more than this (nats)."""
    parity_refuse: float = 0.1
    """Past this difference vLLM's log-probs are not reused: the draw is rescored teacher-forced."""


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
    'static' and 'compiled' need a model with full attention in every layer (no sliding window). hf engine only."""
    engine: str = "hf"
    """Who draws: 'hf' (our decode loop over the transformers model) or 'vllm' (vLLM, colocated; needs vLLM
    installed: ./scripts/setup.sh --vllm). Both keep per-prompt seeds and return temperature-1 log-probs."""
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    """The vLLM engine's options (engine: vllm)."""


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
    if cfg.engine not in ENGINES:
        problems.append(f"{option}.engine={cfg.engine!r}: must be 'hf' (our decode loop) or 'vllm' (vLLM, colocated)")
    elif cfg.engine == "vllm":
        problems += validate_vllm_config(cfg.vllm, f"{option}.vllm")
        if cfg.decode != "dynamic":
            problems.append(
                f"{option}.decode={cfg.decode!r}: decode modes belong to the hf engine; with {option}.engine=vllm "
                "leave it at 'dynamic' (vLLM runs its own CUDA graphs: see vllm.enforce_eager)"
            )
    return problems


def validate_vllm_config(cfg: VLLMConfig, option: str) -> list[str]:
    """Every problem with the vLLM options, each naming ``option.<field>``."""
    problems = []
    if not 0.0 < cfg.gpu_memory_utilization <= 1.0:
        problems.append(f"{option}.gpu_memory_utilization={cfg.gpu_memory_utilization}: must be in (0, 1], e.g. 0.3")
    if cfg.cpu_kv_cache_gb < 1:
        problems.append(f"{option}.cpu_kv_cache_gb={cfg.cpu_kv_cache_gb}: must be >= 1 (whole GiB), e.g. 1")
    if cfg.max_model_len is not None and cfg.max_model_len < 2:
        problems.append(f"{option}.max_model_len={cfg.max_model_len}: must be >= 2, or null for the model's context")
    if cfg.parity_samples < 0:
        problems.append(f"{option}.parity_samples={cfg.parity_samples}: must be >= 0 (0 turns the probe off)")
    if cfg.parity_warn < 0 or cfg.parity_refuse < cfg.parity_warn:
        problems.append(
            f"{option}.parity_warn={cfg.parity_warn}, parity_refuse={cfg.parity_refuse}: need "
            "0 <= parity_warn <= parity_refuse (nats of sequence log-prob)"
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
