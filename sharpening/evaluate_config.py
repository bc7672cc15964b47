"""Configuration of `sharpen evaluate` (its typed schema: YAML, flags and --help) and every check on it.

All checks run before any model weights load; each problem names the option as typed, the value, the
rule and the fix, and all problems are reported at once (sharpening.errors.ConfigError).
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass, field
from typing import Literal

from sharpening.errors import unwritable_directory_problem
from sharpening.policy import cpu_linear_problems, model_source_problem
from sharpening.prompts import validate_dataset_source
from sharpening.sampler import SamplingConfig, validate_sampling_config
from sharpening.selection import TRUNCATED_POLICIES
from sharpening.tasks.extractors import resolve_extractor


@dataclass
class EvalModelConfig:
    """The model evaluated, and the model whose log-likelihood scores its samples."""

    model_name_or_path: str = ""
    """Hub id or local directory of the evaluated model (or a PEFT adapter directory: its base is read from it)."""
    adapter_path: str | None = None
    """PEFT adapter directory put on top of model_name_or_path (e.g. a LoRA-sharpened model)."""
    base_model_name_or_path: str | None = None
    """Base of a FULLY fine-tuned sharpened model; needed for score_with=base when there is no adapter."""
    score_with: Literal["self", "base"] = "self"
    """Self-reward model: self = the evaluated model; base = its base (adapter disabled, or base_model_name_or_path)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weight dtype; auto is bfloat16 on a CUDA device that supports it, else float32."""
    attn_implementation: Literal["auto", "flash_attention_2", "sdpa", "eager"] = "auto"
    """auto is flash_attention_2 when flash-attn is installed and CUDA is present, else sdpa."""
    cpu_linear: Literal["auto", "onednn", "torch"] = "auto"
    """Kernel of float32 linear layers on CPU: onednn, torch (nn.Linear's: MKL on x86), or auto: onednn for
    layers of 2^17 weights or more where PyTorch has it, torch for smaller ones."""
    device: str = "auto"
    """Device to run on: auto (cuda when available, else cpu), cpu, cuda, cuda:1, ..."""
    trust_remote_code: bool = False
    """Run modelling code shipped with a hub model. Off unless you trust its author."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) of model_name_or_path."""
    load_in_4bit: bool = False
    """Load the weights in 4-bit NF4 (bitsandbytes), as a QLoRA run holds its base: evaluates a QLoRA adapter on
    the base it was trained on (dtype is then the compute dtype; the other weights are float32, as in training)."""


@dataclass
class ProtocolConfig:
    """How many draws, which N, how many seeds, and how answers are read (the paper: N up to 50, 10 seeds)."""

    n_values: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 50])
    """The N of best-of-N, maj@N and pass@N; each uses the first N of the same N_max draws."""
    samples_per_prompt: int | None = None
    """N_max: draws per prompt and seed (null = the largest of n_values)."""
    seeds: int = 10
    """Number of seeds (seed, seed+1, ...); each draws N_max fresh samples per prompt."""
    seed: int = 0
    """First seed."""
    max_new_tokens: int = 512
    """Most tokens per response (EOS included); longer responses are truncated (the paper: 512)."""
    temperature: float = 1.0
    """Sampling temperature; 1.0 (the protocol) draws exactly from the model. Other values are rescored."""
    prompts_per_batch: int = 8
    """Prompts sampled together (each with its N_max draws); lower it when memory runs out."""
    decode: Literal["dynamic", "static", "compiled"] = "dynamic"
    """Decode loop (same draws, other speed): dynamic on CPU; compiled (static KV cache + CUDA graphs) on CUDA."""
    answer_extractor: str = "strip"
    """Answer extraction: strip, last_number, gsm8k, boxed, choice, bool, or an import path (pkg.mod:func)."""
    truncated: Literal["drop", "keep", "penalize"] = "drop"
    """Best-of-N treatment of responses without EOS by max_new_tokens (their log-likelihood is unfairly high)."""

    @property
    def n_max(self) -> int:
        return self.samples_per_prompt or max(self.n_values, default=1)


def _is_adapter_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(os.path.expanduser(path), "adapter_config.json"))


def resolve_model_sources(cfg: EvalModelConfig) -> tuple[str, str | None]:
    """(model, adapter): a model_name_or_path that is an adapter directory becomes the adapter, on the
    base named in its adapter_config.json; so does an adapter_path given without a model."""
    adapter = cfg.adapter_path
    if adapter is None and _is_adapter_dir(cfg.model_name_or_path):
        adapter = cfg.model_name_or_path
    if adapter is not None and (not cfg.model_name_or_path or adapter == cfg.model_name_or_path):
        with open(os.path.join(os.path.expanduser(adapter), "adapter_config.json")) as f:
            return json.load(f).get("base_model_name_or_path") or "", adapter
    return cfg.model_name_or_path, adapter


def device_problem(device: str) -> str | None:
    """Why ``device`` (auto, cpu, cuda, cuda:N) cannot be used here, or None."""
    import torch

    if device in ("auto", "cpu"):
        return None
    try:
        parsed = torch.device(device)
    except RuntimeError:
        return "must be auto, cpu, cuda or cuda:N"
    if parsed.type != "cuda":
        return "must be auto, cpu, cuda or cuda:N"
    if not torch.cuda.is_available():
        return "no CUDA device is available to this process; use auto or cpu"
    if parsed.index is not None and parsed.index >= torch.cuda.device_count():
        return f"this process sees {torch.cuda.device_count()} CUDA device(s) (cuda:0 ...); pick one of them"
    return None


def validate_model_config(cfg: EvalModelConfig, option: str = "--model") -> list[str]:
    """Every problem with the model section; reads only small JSON files."""
    problems = []
    if cfg.adapter_path is not None and not _is_adapter_dir(cfg.adapter_path):
        return [f"{option}.adapter_path={cfg.adapter_path!r}: no adapter_config.json there; name a PEFT adapter dir"]
    model, adapter = resolve_model_sources(cfg)
    if not model:
        problems.append(f"{option}.model_name_or_path is empty: give a hub id or a local model directory")
    elif (problem := model_source_problem(model)) is not None:
        problems.append(f"{option}.model_name_or_path={model!r}: {problem}")
    if cfg.base_model_name_or_path and (problem := model_source_problem(cfg.base_model_name_or_path)) is not None:
        problems.append(f"{option}.base_model_name_or_path={cfg.base_model_name_or_path!r}: {problem}")
    if cfg.score_with not in ("self", "base"):
        problems.append(f"{option}.score_with={cfg.score_with!r}: must be self or base")
    problems += cpu_linear_problems(cfg.cpu_linear, f"{option}.cpu_linear")
    if (problem := device_problem(cfg.device)) is not None:
        problems.append(f"{option}.device={cfg.device!r}: {problem}")
    if cfg.score_with == "base" and adapter is None and not cfg.base_model_name_or_path:
        problems.append(
            f"{option}.score_with=base: no base to score with; give the sharpened model's {option}.adapter_path, or "
            f"{option}.base_model_name_or_path for a fully fine-tuned one (a base model scores itself: use self)"
        )
    if cfg.load_in_4bit and importlib.util.find_spec("bitsandbytes") is None:  # as --model.policy.finetuning=qlora
        problems.append(f"{option}.load_in_4bit=true needs bitsandbytes, which is not installed: pip install 'sharpening[qlora]'")
    if cfg.base_model_name_or_path and adapter is not None:
        problems.append(
            f"{option}.base_model_name_or_path={cfg.base_model_name_or_path!r}: with an adapter the base is the model "
            "under it (adapter disabled); leave base_model_name_or_path empty"
        )
    return problems


def validate_protocol_config(cfg: ProtocolConfig, option: str = "--protocol") -> list[str]:
    """Every problem with the protocol section."""
    problems = []
    if not cfg.n_values or any(n < 1 for n in cfg.n_values):
        problems.append(f"{option}.n_values={cfg.n_values}: give a list of N >= 1, e.g. [1, 2, 4, 8, 16, 32, 50]")
    elif cfg.samples_per_prompt is not None and cfg.samples_per_prompt < max(cfg.n_values):
        problems.append(
            f"{option}.samples_per_prompt={cfg.samples_per_prompt}: N_max must be >= the largest N of "
            f"{option}.n_values ({max(cfg.n_values)}); set it to null to use {max(cfg.n_values)}"
        )
    sampling = SamplingConfig(
        samples_per_prompt=max(cfg.n_max, 1),
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        prompts_per_batch=cfg.prompts_per_batch,
        decode=cfg.decode,
    )
    problems += [p for p in validate_sampling_config(sampling, option) if ".samples_per_prompt" not in p]
    if cfg.temperature == 0:
        problems.append(f"{option}.temperature=0 is greedy: all draws would be identical; the protocol samples at 1.0")
    if cfg.seeds < 1:
        problems.append(f"{option}.seeds={cfg.seeds}: must be >= 1 (the paper uses 10)")
    if cfg.truncated not in TRUNCATED_POLICIES:
        problems.append(f"{option}.truncated={cfg.truncated!r}: must be one of {', '.join(TRUNCATED_POLICIES)}")
    try:
        resolve_extractor(cfg.answer_extractor)
    except ValueError as err:
        problems.append(f"{option}.answer_extractor: {err}")
    return problems


def validate_data_args(data: dict, option: str = "--data") -> list[str]:
    """The PromptDataModule checks that need no file read, plus: evaluation needs an answer column."""
    problems = validate_dataset_source(data.get("dataset", ""), f"{option}.dataset")
    if data.get("max_prompts") is not None and data["max_prompts"] < 1:
        problems.append(f"{option}.max_prompts={data['max_prompts']}: must be >= 1, or null for all prompts")
    if not data.get("answer_column"):
        problems.append(f"{option}.answer_column is not set: accuracy needs reference answers; name their column")
    if data.get("system_prompt") and not data.get("use_chat_template"):
        problems.append(f"{option}.system_prompt is set but {option}.use_chat_template is false; turn it on")
    return problems


def output_dir_problem(output_dir: str, overwrite: bool) -> str | None:
    """Why results may not be written to ``output_dir`` (non-empty without --overwrite true), or None."""
    if not output_dir:
        return "--output_dir is empty: name a directory for results.json, results.csv and the plots"
    if os.path.isfile(output_dir):
        return f"--output_dir={output_dir!r} is a file; name a directory"
    unwritable = unwritable_directory_problem("--output_dir", output_dir)
    if unwritable:
        return unwritable
    found = sorted(os.listdir(output_dir)) if os.path.isdir(output_dir) else []
    if found and not overwrite:
        return (
            f"--overwrite=false: --output_dir={output_dir!r} is not empty ({len(found)} entries: {found[:5]}"
            f"{' ...' if len(found) > 5 else ''}) and results are never "
            "overwritten silently. Pass --overwrite true to replace them (draws cached there are reused, so an "
            "interrupted run resumes), or choose another --output_dir"
        )
    return None
