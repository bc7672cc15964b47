"""Load the policy and its tokenizer; full fine-tuning, LoRA or QLoRA; expose the frozen base.

The verifier is always the frozen base model (method.md §4.3): with LoRA/QLoRA it is the SAME weights with
the adapter disabled (no second copy); with full fine-tuning it is one frozen copy, shared by every
self-reward and KL computation.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch

from sharpening.kernels.cpu_linear import (
    CPU_LINEAR_KERNELS,
    MIN_ONEDNN_WEIGHT,
    onednn_linear_available,
    select_cpu_linear,
    use_onednn_linears,
)
from sharpening.model_checks import (
    flash_attention_problem,
    flash_attn_installed,
    lora_target_problems,
    model_source_problem,
)

FINETUNING_MODES = ("full", "lora", "qlora")
ATTN_IMPLEMENTATIONS = ("auto", "flash_attention_2", "sdpa", "eager")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class PolicyConfig:
    """Which model to sharpen and how to train it."""

    model_name_or_path: str = ""
    """Hugging Face hub id or local directory of a causal LM (with its tokenizer)."""
    finetuning: Literal["full", "lora", "qlora"] = "lora"
    """full: all weights train (one frozen copy is kept as verifier); lora: PEFT LoRA adapter;
    qlora: base weights in bitsandbytes 4-bit NF4 plus a LoRA adapter."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weight dtype; auto is bfloat16 on a CUDA device that supports it, else float32."""
    attn_implementation: Literal["auto", "flash_attention_2", "sdpa", "eager"] = "auto"
    """auto is flash_attention_2 when flash-attn is installed and CUDA is present, else sdpa; flash_attention_2
    named explicitly is refused where it cannot run."""
    cpu_linear: Literal["auto", "onednn", "torch"] = "auto"
    """Kernel of float32 linear layers on CPU: onednn, torch (nn.Linear's: MKL on x86), or auto: onednn for
    layers of 2^17 weights or more where PyTorch has it, torch for smaller ones."""
    lora_r: int = 16
    """LoRA rank (lora and qlora)."""
    lora_alpha: int = 32
    """LoRA scaling numerator (the update is scaled by lora_alpha / lora_r)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input during training."""
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Module names that get an adapter; ["all-linear"] means every linear layer but the head."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    trust_remote_code: bool = False
    """Run modelling code shipped with a hub model. Off unless you trust its author."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to load."""


def validate_policy_config(cfg: PolicyConfig, option: str = "--model.policy") -> list[str]:
    """Every problem with ``cfg``, each naming ``option.<field>``; touches no weights."""
    problems = []
    name = cfg.model_name_or_path
    if not name:
        problems.append(f"{option}.model_name_or_path is empty: give a hub id or a local model directory")
    else:
        problem = model_source_problem(name)
        if problem:
            problems.append(f"{option}.model_name_or_path={name!r}: {problem}")
    if cfg.finetuning not in FINETUNING_MODES:
        problems.append(f"{option}.finetuning={cfg.finetuning!r}: must be one of {', '.join(FINETUNING_MODES)}")
    if cfg.attn_implementation not in ATTN_IMPLEMENTATIONS:
        problems.append(
            f"{option}.attn_implementation={cfg.attn_implementation!r}: "
            f"must be one of {', '.join(ATTN_IMPLEMENTATIONS)}"
        )
    elif problem := flash_attention_problem(cfg.attn_implementation, torch.cuda.is_available(), flash_attn_installed()):
        problems.append(f"{option}.attn_implementation={cfg.attn_implementation}: {problem}")
    problems += cpu_linear_problems(cfg.cpu_linear, f"{option}.cpu_linear")
    if cfg.dtype != "auto" and cfg.dtype not in DTYPES:
        problems.append(f"{option}.dtype={cfg.dtype!r}: must be auto, float32, bfloat16 or float16")
    if cfg.finetuning in ("lora", "qlora"):
        if cfg.lora_r < 1:
            problems.append(f"{option}.lora_r={cfg.lora_r}: must be >= 1 with finetuning={cfg.finetuning}; try 8 or 16")
        if cfg.lora_alpha <= 0:
            problems.append(f"{option}.lora_alpha={cfg.lora_alpha}: must be > 0; 2 x lora_r is a common choice")
        if not 0.0 <= cfg.lora_dropout < 1.0:
            problems.append(f"{option}.lora_dropout={cfg.lora_dropout}: must be in [0, 1)")
        if not cfg.lora_target_modules:
            problems.append(f"{option}.lora_target_modules is empty: use [all-linear] or name modules (q_proj, ...)")
        elif cfg.lora_target_modules != ["all-linear"] and name and not model_source_problem(name):
            problems += lora_target_problems(cfg, f"{option}.lora_target_modules")
    if cfg.finetuning == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
        problems.append(
            f"{option}.finetuning=qlora needs bitsandbytes, which is not installed: pip install 'sharpening[qlora]'"
            " or use finetuning=lora"
        )
    return problems


def disable_dropout(model: torch.nn.Module) -> int:
    """Set every dropout of ``model`` to 0 (``nn.Dropout`` modules, LoRA's included, and the attention
    dropout rate that transformers' attention layers read in train mode); return how many were not 0."""
    switched = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout) and module.p > 0:
            module.p, switched = 0.0, switched + 1
        rate = getattr(module, "attention_dropout", None)
        if isinstance(rate, float) and rate > 0:
            module.attention_dropout, switched = 0.0, switched + 1
    return switched


def stop_token_ids(model: torch.nn.Module, tokenizer) -> list[int]:
    """The ids that end a response: the tokenizer's EOS and every EOS of the model's generation config
    (instruct models often stop on several, e.g. Llama 3's <|eot_id|> and <|end_of_text|>). Tokenizer's first."""
    ids = [tokenizer.eos_token_id]
    generation = getattr(model, "generation_config", None)
    extra = getattr(generation, "eos_token_id", None)
    for i in [extra] if isinstance(extra, int) else list(extra or []):
        if i is not None and int(i) not in ids:
            ids.append(int(i))
    return ids


def select_attn_implementation(requested: str, cuda_available: bool, flash_installed: bool) -> str:
    """Attention backend to load with. auto: flash_attention_2 where CUDA and flash-attn are both present, else
    sdpa; a backend named is used as is (``flash_attention_problem`` refuses flash_attention_2 where it cannot run)."""
    if requested != "auto":
        return requested
    return "flash_attention_2" if (cuda_available and flash_installed) else "sdpa"


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The torch dtype for ``name``; auto is bfloat16 on capable CUDA devices, float32 elsewhere."""
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_tokenizer(cfg: PolicyConfig):
    """The model's tokenizer, left-padded for generation; pad falls back to EOS. Errors without EOS."""
    from transformers import AutoTokenizer

    from sharpening.errors import ConfigError

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision
        )
    except Exception as err:  # no tokenizer files (ValueError), a damaged tokenizer.json (JSONDecodeError), ...
        path = os.path.expanduser(cfg.model_name_or_path)
        found = f" (the directory holds {sorted(os.listdir(path))[:10]})" if os.path.isdir(path) else ""
        raise ConfigError([
            f"--model.policy.model_name_or_path={cfg.model_name_or_path!r}: its tokenizer cannot be read{found}: "
            f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200] if str(err).strip() else ''}; save the "
            "tokenizer beside the weights (tokenizer.save_pretrained) or copy its files from the base model"
        ]) from err  # fmt: skip
    if tokenizer.eos_token_id is None:
        raise ConfigError(
            [
                f"--model.policy.model_name_or_path={cfg.model_name_or_path!r}: the tokenizer has no EOS token, "
                "so responses cannot end; set tokenizer.eos_token and save it, or pick another model"
            ]
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_policy(cfg: PolicyConfig, device: torch.device | None = None, frozen_copy: bool = True):
    """Load the trainable policy and, for full fine-tuning with ``frozen_copy``, a frozen copy of the base.

    Returns ``(policy, frozen_base)``; ``frozen_base`` is None for LoRA/QLoRA, whose base is the
    policy itself with the adapter disabled (see :func:`frozen_base`), and for full fine-tuning without
    ``frozen_copy`` (the caller loads the base later with :func:`load_frozen_base`, when it needs one).
    """
    model = load_model(cfg, device or torch.device("cpu"))
    if cfg.gradient_checkpointing:  # transformers 5.25 warns on gradient_checkpointing_enable (gone in v6)
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.finetuning == "full":
        set_cpu_linear(model, cfg.cpu_linear, device)
        frozen = copy.deepcopy(model).eval().requires_grad_(False) if frozen_copy else None
        return model.train(), frozen  # from_pretrained returns eval mode: dropout would stay off in training
    return set_cpu_linear(_add_lora(model, cfg), cfg.cpu_linear, device).train(), None


def load_frozen_base(cfg: PolicyConfig, device: torch.device | None = None) -> torch.nn.Module:
    """The base model of a full fine-tuning run, loaded again from ``cfg.model_name_or_path``: eval mode,
    no gradients. Equal to the frozen copy :func:`load_policy` makes, without holding one from the start."""
    device = device or torch.device("cpu")
    model = set_cpu_linear(load_model(cfg, device), cfg.cpu_linear, device)
    return model.to(device).eval().requires_grad_(False)


def nf4_config(compute_dtype: torch.dtype):
    """QLoRA's base quantization: 4-bit NF4 with double quantization, computing in ``compute_dtype``."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def load_model(cfg: PolicyConfig, device: torch.device, option: str = "--model.policy.model_name_or_path",
               prepare_4bit: bool = False):  # fmt: skip
    """``from_pretrained`` with ``cfg``'s dtype, attention backend and revision; with finetuning=qlora the weights
    are 4-bit NF4, placed on ``device`` while loading (a 4-bit model refuses ``.to``). The one loader of training
    and evaluation.

    ``prepare_4bit`` casts a 4-bit model's other weights to float32 before the logit-head check, as evaluation
    holds a QLoRA base; training does the same later, when it adds the adapter (``_add_lora``). A model whose
    log-probs teacher-forced scoring cannot reproduce is a ConfigError naming ``option``.
    """
    from transformers import AutoModelForCausalLM

    dtype = resolve_dtype(cfg.dtype, device)
    attn = select_attn_implementation(cfg.attn_implementation, torch.cuda.is_available(), flash_attn_installed())
    kwargs = dict(dtype=dtype, attn_implementation=attn, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
    if cfg.finetuning == "qlora":
        kwargs["quantization_config"] = nf4_config(dtype)
        kwargs["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(cfg.model_name_or_path, **kwargs)
    if prepare_4bit and cfg.finetuning == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    raise_if_logit_head_differs(model, option, cfg.model_name_or_path)
    return model


def load_for_inference(cfg: PolicyConfig, device: torch.device, option: str, adapter: str | None = None,
                       prepare_4bit: bool = True) -> torch.nn.Module:  # fmt: skip
    """A model that draws and scores but never trains (evaluation): :func:`load_model`, the PEFT adapter saved
    in ``adapter`` on top, the CPU linear kernels, then eval mode on ``device``."""
    model = load_model(cfg, device, option, prepare_4bit)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model = set_cpu_linear(model, cfg.cpu_linear, device)
    return (model if cfg.finetuning == "qlora" else model.to(device)).eval()  # 4-bit: placed while loading


def raise_if_logit_head_differs(model: torch.nn.Module, option: str, name: str) -> None:
    """A ConfigError when teacher-forced scoring cannot reproduce ``model``'s own log-probs."""
    from sharpening.errors import ConfigError
    from sharpening.logprobs import logit_head_problem

    problem = logit_head_problem(model)
    if problem is not None:
        raise ConfigError([f"{option}={name!r}: {problem}; this model family is not supported yet"])


def cpu_linear_problems(requested: str, option: str) -> list[str]:
    """Problems with a ``cpu_linear`` choice: an unknown name, or onednn where PyTorch lacks it."""
    if requested not in CPU_LINEAR_KERNELS:
        return [f"{option}={requested!r}: must be one of {', '.join(CPU_LINEAR_KERNELS)}"]
    if requested == "onednn" and not onednn_linear_available():
        return [f"{option}=onednn: this PyTorch build has no working oneDNN linear; use auto or torch"]
    return []


def set_cpu_linear(model, requested: str, device: torch.device | None):
    """Route ``model``'s plain float32 linear layers through oneDNN when it runs on CPU (see kernels/cpu_linear.py);
    returns ``model``."""
    on_cpu = device is None or torch.device(device).type == "cpu"
    if on_cpu and select_cpu_linear(requested, onednn_linear_available()) == "onednn":
        use_onednn_linears(model, min_weight=0 if requested == "onednn" else MIN_ONEDNN_WEIGHT)  # auto: large layers
    return model


def _add_lora(model, cfg: PolicyConfig):
    """Wrap ``model`` with a fresh LoRA adapter (after k-bit preparation for QLoRA)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if cfg.finetuning == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    targets = cfg.lora_target_modules
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets[0] if targets == ["all-linear"] else list(targets),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def is_peft_model(model) -> bool:
    """True when ``model`` carries a PEFT adapter that can be switched off."""
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


@contextlib.contextmanager
def frozen_base(policy, frozen_copy=None) -> Iterator[torch.nn.Module]:
    """Context yielding the frozen base model: ``frozen_copy`` when given, else ``policy`` with its
    adapter disabled. Gradients and dropout are off inside (Lightning puts every submodule in train
    mode, and a verifier must be deterministic); train/eval modes are restored after."""
    if frozen_copy is not None:
        with torch.no_grad(), eval_mode(frozen_copy):
            yield frozen_copy
        return
    if not is_peft_model(policy):
        raise RuntimeError("frozen_base: a full fine-tuning policy needs its frozen copy (load_policy returns it)")
    with torch.no_grad(), policy.disable_adapter(), eval_mode(policy):
        yield policy


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Switch dropout off for sampling or scoring, then restore the previous mode."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def count_trainable_parameters(model: torch.nn.Module) -> int:
    """Number of scalar parameters with requires_grad."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
