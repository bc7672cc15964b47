"""What the vLLM engine cannot run, found before any weights load: vLLM missing, a model architecture vLLM does not
serve, a context longer than the model's, QLoRA, and head sizes vLLM's CPU attention has no kernel for.

vLLM is optional and slow to import, so this module imports it only inside the checks that need it, and only once
``find_spec`` has found it. The model is read from its config.json alone.
"""

from __future__ import annotations

import importlib.util
import sys

import torch

from sharpening.engines.config import SamplingConfig

CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
"""vLLM 0.32's CPU attention head sizes (``CPUAttentionBackend.get_supported_head_sizes``): what the checks say
when vLLM itself is not there to ask."""


def vllm_problems(
    cfg: SamplingConfig,
    option: str,
    model_path: str,
    *,
    lora: bool,
    load_in_4bit: bool,
    longest_prompt: int | None,
    device,
    revision: str | None = None,
    load_in_4bit_option: str = "--model.load_in_4bit=true",
) -> list[str]:
    """Every problem of drawing with ``cfg`` (options named ``option.<field>``, e.g. ``--verifier.sampling``) from
    the model at ``model_path`` on ``device``; none when ``cfg.engine`` is not vllm. ``lora``: an adapter is
    served on the base (vLLM takes any of the architectures it serves with one). ``load_in_4bit``: the weights are
    the 4-bit QLoRA base, set by ``load_in_4bit_option`` as the user typed it. ``longest_prompt``: tokens of the
    longest prompt, None when the prompts are not read yet. A model that cannot be read is left to the model
    checks, which name it."""
    if cfg.engine != "vllm":
        return []
    installed = vllm_installed()
    problems = [] if installed else [install_problem(option)]
    if load_in_4bit:
        problems.append(qlora_problem(option, load_in_4bit_option))
    config = _model_config(model_path, revision)
    if config is None:
        return problems
    if installed and (arch := unsupported_architecture(config)) is not None:
        problems.append(
            f"{option}.engine=vllm: {model_path!r} is a {arch} (config.json's architectures), which this vLLM does "
            f"not serve (not among its models, and not through its Transformers backend); use {option}.engine=hf, "
            "or a model of an architecture vLLM supports"
        )
    text = config.get_text_config() if hasattr(config, "get_text_config") else config  # a multimodal model's LM
    problems += context_problems(cfg, option, text, longest_prompt)
    if torch.device(device).type == "cpu":
        problems += cpu_head_size_problems(option, model_path, text)
    return problems


def install_problem(option: str) -> str:
    """vLLM is not importable here: how to get it, per platform."""
    return (
        f"{option}.engine=vllm: vLLM is not installed in this Python ({sys.executable}). On a CPU machine: "
        "SHARPENING_VLLM=1 ./scripts/setup.sh (a venv of its own, .venv-vllm, since vLLM's CPU build pins its own "
        "torch and transformers), then run from it (. .venv-vllm/bin/activate); with CUDA: "
        f"pip install 'sharpening[vllm]'. Or draw with our own loop: {option}.engine=hf"
    )


def qlora_problem(option: str, load_in_4bit_option: str) -> str:
    """Why QLoRA and vLLM do not go together."""
    return (
        f"{load_in_4bit_option} with {option}.engine=vllm: not supported. vLLM would serve the unquantized base "
        "with the adapter, a different distribution from the 4-bit policy that is trained and scored, so its draws "
        "and log-probs would not be the policy's. Use LoRA on the full-precision base with vLLM, or "
        f"{option}.engine=hf for QLoRA"
    )


def unsupported_architecture(config) -> str | None:
    """The architecture of ``config`` when vLLM can serve none of them, else None. vLLM serves an architecture
    it registers, or one transformers implements with the attention interface vLLM plugs into (its Transformers
    backend); without trust_remote_code, a model's own code is never loaded."""
    architectures = list(getattr(config, "architectures", None) or [])
    if not architectures:
        return "model without 'architectures'"
    if set(architectures) & vllm_architectures():
        return None
    import transformers

    model_cls = getattr(transformers, architectures[0], None)
    compatible = (
        getattr(model_cls, "is_backend_compatible", lambda: False)()
        or getattr(model_cls, "_can_set_attn_implementation", lambda: False)()
    )
    return None if compatible else architectures[0]


def context_problems(cfg: SamplingConfig, option: str, config, longest_prompt: int | None) -> list[str]:
    """``vllm.max_model_len`` beyond the model's context (vLLM refuses it), or below the longest prompt and its
    response. Without max_model_len vLLM serves the model's context, which the run's own context check covers."""
    length = cfg.vllm.max_model_len
    if length is None:
        return []
    context = getattr(config, "max_position_embeddings", None)
    if context is not None and length > context:
        return [
            f"{option}.vllm.max_model_len={length}: beyond the model's context of {context} tokens "
            "(max_position_embeddings in its config.json), which vLLM refuses; set it to at most "
            f"{context}, or null for the model's context"
        ]
    if longest_prompt is None or longest_prompt + cfg.max_new_tokens <= length:
        return []
    need = longest_prompt + cfg.max_new_tokens
    most = f" (at most the model's context of {context})" if context is not None else ""
    return [
        f"{option}.vllm.max_model_len={length}: the longest prompt has {longest_prompt} tokens, and with "
        f"{option}.max_new_tokens={cfg.max_new_tokens} a sequence needs {need}, more than vLLM would serve; "
        f"raise it to at least {need}{most}, set it to null for the model's context, or lower "
        f"{option}.max_new_tokens"
    ]


def cpu_head_size_problems(option: str, model_path: str, config) -> list[str]:
    """A head size vLLM's CPU attention has no kernel for (it fails at the first draw otherwise)."""
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    head_size = getattr(config, "head_dim", None) or (hidden // heads if hidden and heads else None)
    supported = cpu_head_sizes()
    if head_size is None or head_size in supported:
        return []
    return [
        f"{option}.engine=vllm on CPU: {model_path!r} has attention heads of size {head_size} (head_dim, else "
        f"hidden_size / num_attention_heads), and vLLM's CPU attention supports only "
        f"{', '.join(map(str, supported))}; use {option}.engine=hf on CPU, a model with one of those head sizes, "
        "or a CUDA device"
    ]


def vllm_installed() -> bool:
    """Whether vLLM can be imported here (looked up without importing it)."""
    return importlib.util.find_spec("vllm") is not None


def vllm_architectures() -> set[str]:
    """The model architectures the installed vLLM registers."""
    from vllm.model_executor.models import ModelRegistry

    return set(ModelRegistry.get_supported_archs())


def cpu_head_sizes() -> tuple[int, ...]:
    """The head sizes of vLLM's CPU attention, from the installed vLLM when there is one."""
    if not vllm_installed():
        return CPU_HEAD_SIZES
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    except ImportError:  # a build without the CPU backend (CUDA): the list it would have had
        return CPU_HEAD_SIZES
    return tuple(CPUAttentionBackend.get_supported_head_sizes())


def _model_config(model_path: str, revision: str | None):
    """``model_path``'s config (transformers, trust_remote_code off), or None when it cannot be read."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_path, revision=revision, trust_remote_code=False)
    except (OSError, ValueError):
        return None
