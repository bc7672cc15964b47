"""Configuration of `sharpen evaluate` (its typed schema: YAML, flags and --help) and every check on it.

All checks run before any model weights load; each problem names the option as typed, the value, the
rule and the fix, and all problems are reported at once (sharpening.errors.ConfigError).
"""

from __future__ import annotations

import importlib.util
import os
import string
from dataclasses import dataclass, field
from typing import Literal

from sharpening.data_files import validate_dataset_source
from sharpening.engines import SamplingConfig, VLLMConfig, validate_sampling_config
from sharpening.errors import unwritable_directory_problem
from sharpening.evaluate.power_rows import PowerRowConfig, power_problems
from sharpening.evaluate.sources import (
    adapter_base_check,
    adapter_files_problem,
    is_adapter_dir,
    local_dir,
    resolve_model_sources,
    tokenizer_files_problem,
    vocabulary_problem,
)
from sharpening.model_checks import model_source_problem
from sharpening.policy import cpu_linear_problems
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
    allow_adapter_base_mismatch: bool = False
    """Put the adapter on a hub model other than the base its adapter_config.json names (e.g. a mirror of it);
    the weight shapes must still agree. A local directory that is not the recorded one is only warned about."""


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
    rewards: list[str] = field(default_factory=lambda: ["loglik", "loglik_norm"])
    """Self-rewards best-of-N ranks by, one ``bon_<name>`` row each: names in sharpening.rewards.REWARDS or import
    paths. Base-scored ones are scored by --model.score_with's model, policy-scored ones by the evaluated model."""
    power: list[PowerRowConfig] = field(default_factory=list)
    """Power-sampling rows, e.g. [{method: mcmc, alpha: 4}, {method: smc, alpha: 4}]: one sample per prompt and
    seed from each; none by default."""
    engine: Literal["hf", "vllm"] = "hf"
    """Who draws the best-of-N and greedy samples: hf (our decode loop) or vllm (needs vLLM installed). Power rows
    are drawn by our own loop either way."""
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    """The vLLM engine's options (engine: vllm)."""

    def __post_init__(self) -> None:
        """Rows and vLLM options given as mappings (YAML, flags, a results file's config) become their configs."""
        self.power = [row if isinstance(row, PowerRowConfig) else PowerRowConfig(**row) for row in self.power]
        if isinstance(self.vllm, dict):
            self.vllm = VLLMConfig(**self.vllm)

    @property
    def n_max(self) -> int:
        return self.samples_per_prompt or max(self.n_values, default=1)


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
    for name, path in (("adapter_path", cfg.adapter_path), ("model_name_or_path", cfg.model_name_or_path)):
        if path and (name == "adapter_path" or is_adapter_dir(path)) and (problem := adapter_files_problem(path)):
            return [f"{option}.{name}={path!r}: {problem}"]
    model, adapter = resolve_model_sources(cfg)
    from_adapter = adapter is not None and model != cfg.model_name_or_path  # the base its adapter_config.json names
    source = "model_name_or_path" if adapter == cfg.model_name_or_path else "adapter_path"
    named = f"{option}.{source}={adapter!r} is an adapter whose base"
    if not model and from_adapter:
        problems.append(f"{named} is not recorded; give the base with {option}.model_name_or_path")
    elif not model:
        problems.append(f"{option}.model_name_or_path is empty: give a hub id or a local model directory")
    elif (problem := model_source_problem(model)) is not None and from_adapter:
        problems.append(f"{named} {model!r} cannot load: {problem}; or give the base with {option}.model_name_or_path")
    elif problem is not None:
        problems.append(f"{option}.model_name_or_path={model!r}: {problem}")
    elif (problem := tokenizer_files_problem(model, adapter)) is not None:
        problems.append(f"{option}.model_name_or_path={model!r}: {problem}")
    else:
        problems += adapter_base_check(cfg, option)[0]
    if cfg.base_model_name_or_path and (problem := model_source_problem(cfg.base_model_name_or_path)) is not None:
        problems.append(f"{option}.base_model_name_or_path={cfg.base_model_name_or_path!r}: {problem}")
    elif cfg.base_model_name_or_path and model and (problem := vocabulary_problem(model, cfg)) is not None:
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
        problems.append(
            f"{option}.load_in_4bit=true needs bitsandbytes, which is not installed: pip install 'sharpening[qlora]'"
        )
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
        engine=cfg.engine,
        vllm=cfg.vllm,
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
    return problems + _reward_problems(cfg, option) + power_problems(cfg, option)


def _reward_problems(cfg: ProtocolConfig, option: str) -> list[str]:
    """Each of ``rewards`` resolves (built-in or import path); none is given twice."""
    from sharpening.errors import ConfigError
    from sharpening.rewards import resolve_reward

    problems = []
    for i, reward in enumerate(cfg.rewards):
        try:
            resolve_reward(reward, f"{option}.rewards[{i}]")
        except ConfigError as err:
            problems += err.problems
    if not cfg.rewards:
        problems.append(f"{option}.rewards=[]: best-of-N needs a reward to rank by; give at least one, e.g. [loglik]")
    if len(set(cfg.rewards)) < len(cfg.rewards):
        problems.append(f"{option}.rewards={cfg.rewards}: a reward is listed twice; give each once")
    return problems


def prompt_template_problem(template: str, option: str = "--data.prompt_template") -> str | None:
    """Why ``template`` is not a format string over named columns, or None.

    >>> prompt_template_problem("Q: {question}\\nA:") is None
    True
    >>> prompt_template_problem("{0}")
    "--data.prompt_template='{0}': {0} is a positional field; name a column, e.g. {prompt}"
    """
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as err:
        fix = "name columns as {column}, write a literal brace as {{ or }}"
        return f"{option}={template!r}: not a format string ({err}); {fix}"
    positional = [name for name in fields if not name or name[0].isdigit()]
    if positional:
        return f"{option}={template!r}: {{{positional[0]}}} is a positional field; name a column, e.g. {{prompt}}"
    return None


def validate_data_args(data: dict, option: str = "--data") -> list[str]:
    """The PromptDataModule checks that need no file read, plus: evaluation needs an answer column."""
    problems = validate_dataset_source(data.get("dataset", ""), f"{option}.dataset")
    if problem := prompt_template_problem(data.get("prompt_template") or "{prompt}", f"{option}.prompt_template"):
        problems.append(problem)
    if data.get("max_prompts") is not None and data["max_prompts"] < 1:
        problems.append(f"{option}.max_prompts={data['max_prompts']}: must be >= 1, or null for all prompts")
    if not data.get("answer_column"):
        problems.append(f"{option}.answer_column is not set: accuracy needs reference answers; name their column")
    if data.get("system_prompt") and not data.get("use_chat_template"):
        problems.append(f"{option}.system_prompt is set but {option}.use_chat_template is false; turn it on")
    return problems


CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
"""config fields that give a model's context (positions), the first one set wins."""


def model_context(name: str, revision: str | None, trust_remote_code: bool) -> tuple[int, str] | None:
    """(positions, the config field that gives them) of a model's context, from its config only, or None."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    except Exception:  # an unknown architecture or remote code not trusted: loading the model says why
        return None
    for field_name in CONTEXT_FIELDS:
        if isinstance(value := getattr(config, field_name, None), int) and value > 0:
            return value, field_name
    return None


def prompt_context_problems(prompt_ids: list[list[int]], max_new_tokens: int, dataset: str, model: str,
                            context: tuple[int, str] | None) -> list[str]:  # fmt: skip
    """Prompts that do not fit ``model``'s ``context`` with max_new_tokens more tokens (positions past it have
    no trained embedding: the draws would be garbage, or fail part-way through a run)."""
    if context is None:
        return []
    positions, field_name = context
    over = [i for i, ids in enumerate(prompt_ids) if len(ids) + max_new_tokens > positions]
    if not over:
        return []
    longest = max(over, key=lambda i: len(prompt_ids[i]))
    room = positions - len(prompt_ids[longest])
    lower = f"lower --protocol.max_new_tokens to {room} or less, " if room >= 1 else ""
    return [
        f"--data.dataset={dataset!r}: {len(over)} of {len(prompt_ids)} prompt(s) do not fit the context of {model!r} "
        f"({field_name}={positions}) with --protocol.max_new_tokens={max_new_tokens} tokens after them (prompts "
        f"{over[:8]}{' ...' if len(over) > 8 else ''}, counting from 0; the longest, prompt {longest}, has "
        f"{len(prompt_ids[longest])} tokens). Fix: {lower}shorten or drop those prompts (the few-shot prefix and "
        "template count too), or use a model with a longer context"
    ]


def read_directories(cfg: EvalModelConfig, option: str = "--model") -> dict[str, str]:
    """{option as typed and its value: local directory} of each model and adapter directory the run reads."""
    model, adapter = resolve_model_sources(cfg)
    base = cfg.base_model_name_or_path
    named = {f"{option}.model_name_or_path={cfg.model_name_or_path!r}": cfg.model_name_or_path,
             f"{option}.adapter_path={cfg.adapter_path!r}": cfg.adapter_path,
             f"the adapter's base {model!r}": model if model != cfg.model_name_or_path else None,
             f"{option}.base_model_name_or_path={base!r}": base}  # fmt: skip
    return {name: directory for name, path in named.items() if path and (directory := local_dir(path))}


def overlap_problem(option: str, path: str, read: dict[str, str]) -> str | None:
    """Why ``path`` may not receive evaluate's files: it is, lies inside or holds a directory the run reads
    (``read``, from :func:`read_directories`), and evaluate never writes among a model's files."""
    target = os.path.realpath(os.path.expanduser(path))
    for name, directory in read.items():
        inside, holds = (os.path.commonpath([a, b]) == b for a, b in ((target, directory), (directory, target)))
        if inside or holds:
            relation = "is" if inside and holds else ("lies inside" if inside else "holds")
            return (
                f"{option}={path!r} {relation} the directory of {name}, and evaluate never writes among a model's "
                f"files; choose a directory apart from it, e.g. {option} {directory.rstrip(os.sep)}-evaluate"
            )
    return None


def output_dir_problem(output_dir: str, overwrite: bool, read: dict[str, str] | None = None) -> str | None:
    """Why results may not be written to ``output_dir`` (a model's directory, or non-empty without --overwrite
    true), or None."""
    if not output_dir:
        return "--output_dir is empty: name a directory for results.json, results.csv and the plots"
    if os.path.isfile(output_dir):
        return f"--output_dir={output_dir!r} is a file; name a directory"
    if (overlap := overlap_problem("--output_dir", output_dir, read or {})) is not None:
        return overlap
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
