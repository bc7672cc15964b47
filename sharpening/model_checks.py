"""Checks of a model and its tokenizer that read files and configs, never weights: whether a directory holds a
loadable model (config.json, weight files, safetensors headers, shard indexes), whether LoRA targets name real
modules, whether flash-attention can run, and whether the tokenizer's ids fit the model's embeddings.
Training (``policy.validate_policy_config``) and evaluation call them before anything loads.
"""

from __future__ import annotations

import importlib.util
import json
import os
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from sharpening.policy import PolicyConfig


def model_source_problem(name: str) -> str | None:
    """Why ``name`` cannot be loaded (missing directory, hub id absent offline), or None."""
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        if not os.path.isfile(os.path.join(expanded, "config.json")):
            found = sorted(os.listdir(expanded))[:8]
            return f"directory has no config.json (found: {found}); point to a save_pretrained directory"
        return config_json_problem(expanded) or model_weights_problem(expanded)
    if os.path.exists(expanded):
        return "is a file; give the directory that holds config.json and the weights"
    parent = os.path.dirname(expanded.rstrip("/"))  # "runs/mdl" with runs/ here is a path, not a hub id
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or (parent and os.path.isdir(parent)):
        hint = ""
        if os.path.normpath(expanded).endswith(os.path.join("artifacts", "demo", "base")):  # the shipped configs' model
            hint = (
                " (the demo's base model: build it once with "
                "`python -m sharpening.tasks.demo build --out artifacts/demo`)"
            )
        return f"no such directory{hint}; check the path (relative paths start from the current directory)"
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    if offline:
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name, "config.json"), str):
            return (
                "not in the local Hugging Face cache and HF_HUB_OFFLINE is set; download it first or give a local path"
            )
    return None


def config_json_problem(directory: str) -> str | None:
    """Why ``directory``'s config.json cannot describe a model (not JSON, not an object, no model_type, one this
    transformers does not know), or None. transformers raises a bare JSONDecodeError or KeyError for these."""

    from transformers import CONFIG_MAPPING

    again = "download or copy the model again, or fix the file"
    try:
        with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (ValueError, UnicodeDecodeError) as err:
        return f"its config.json is not valid JSON ({type(err).__name__}: {str(err)[:120]}); {again}"
    if not isinstance(config, dict):
        return f"its config.json holds a JSON {type(config).__name__}, not an object of model settings; {again}"
    model_type = config.get("model_type")
    if not model_type:
        return (
            f'its config.json has no model_type (e.g. "llama"), so transformers cannot tell the architecture; {again}'
        )
    if model_type not in CONFIG_MAPPING and "auto_map" not in config:  # auto_map: code shipped with the model
        import transformers

        return (
            f"its config.json names model_type {model_type!r}, which transformers {transformers.__version__} does not "
            "know; upgrade transformers, or check the model_type"
        )
    return None


WEIGHT_FILES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"
)  # fmt: skip
"""What ``from_pretrained`` reads the weights of a local directory from, in the order it looks."""


def model_weights_problem(directory: str) -> str | None:
    """Why the weights in a local model ``directory`` cannot load (none there, a truncated safetensors file,
    shards its index names missing), or None. Reads file sizes, shard indexes and safetensors headers only."""
    present = [f for f in WEIGHT_FILES if os.path.isfile(os.path.join(directory, f))]
    if not present:
        found = sorted(os.listdir(directory))[:10]
        return (
            f"the directory has config.json but no weights ({', '.join(WEIGHT_FILES[::2])} or a sharded index; "
            f"found: {found}); copy the weights there or point to the directory save_pretrained wrote"
        )
    if present[0].endswith(".index.json"):
        return shard_index_problem(directory, present[0])
    if present[0] == "model.safetensors":
        return safetensors_problem(os.path.join(directory, present[0]))
    return None


def shard_index_problem(directory: str, index_name: str) -> str | None:
    """Why the shards that ``index_name`` lists cannot load (missing, or a damaged safetensors shard), or None."""

    try:
        with open(os.path.join(directory, index_name), encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        return f"{index_name} is not a shard index (weight_map) ({type(err).__name__}); download or copy it again"
    missing = [s for s in shards if not os.path.isfile(os.path.join(directory, s))]
    if missing:
        return (
            f"{index_name} names {len(shards)} shard file(s) and {len(missing)} are missing ({missing[:4]}"
            f"{' ...' if len(missing) > 4 else ''}); download or copy the missing shards into the directory"
        )
    for shard in shards:
        if shard.endswith(".safetensors") and (problem := safetensors_problem(os.path.join(directory, shard))):
            return problem
    return None


def safetensors_problem(path: str) -> str | None:
    """Why ``path`` is not a whole safetensors file, or None: its 8-byte header length, JSON header and the
    tensors' byte ranges must add up to the file's size exactly (a truncated download does not)."""

    name, size = os.path.basename(path), os.path.getsize(path)
    again = "download or copy the model again (an interrupted download or copy leaves a short file)"
    with open(path, "rb") as f:
        head = f.read(8)
        header_bytes = int.from_bytes(head, "little") if len(head) == 8 else None
        if header_bytes is None or header_bytes > size - 8:
            return f"{name} is truncated or not a safetensors file ({size} bytes, shorter than its header); {again}"
        try:
            header = json.loads(f.read(header_bytes))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, AttributeError, IndexError):
            return f"{name} has a damaged header (not safetensors JSON); {again}"
    if 8 + header_bytes + end != size:
        state = "truncated" if size < 8 + header_bytes + end else "damaged"
        return f"{name} is {state}: its header describes {8 + header_bytes + end} bytes, the file has {size}; {again}"
    return None


def lora_target_problems(cfg: PolicyConfig, option: str) -> list[str]:
    """Targets of ``cfg.lora_target_modules`` that name no module of the model (PEFT's rule: the module's name
    is the target or ends with ``.target``). The model is built on the meta device from its config: no weights."""
    names = meta_module_names(cfg)
    if names is None:  # the config cannot build a model here; loading will say why
        return []
    unmatched = [t for t in cfg.lora_target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if not unmatched:
        return []
    linear = sorted({n.rsplit(".", 1)[-1] for n, kind in names.items() if kind in ("Linear", "Conv1D")} - {"lm_head"})
    return [
        f"{option}={list(cfg.lora_target_modules)}: {unmatched} match(es) no module of {cfg.model_name_or_path!r}; "
        f"its linear layers are named {linear}: target those names, or use [all-linear] (alone) for all of them"
    ]


def meta_module_names(cfg: PolicyConfig) -> dict[str, str] | None:
    """``{module name: class name}`` of the model ``cfg`` names, built on the meta device (no weights are read
    or allocated), or None when its config cannot build it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(
            cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision
        )
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
    except Exception:  # an unknown architecture, remote code not trusted, ...: from_pretrained reports it
        return None
    return {name: type(module).__name__ for name, module in model.named_modules()}


def flash_attn_installed() -> bool:
    """True when the flash-attn package can be imported."""
    return importlib.util.find_spec("flash_attn") is not None


def flash_attention_problem(requested: str, cuda_available: bool, flash_installed: bool) -> str | None:
    """Why ``flash_attention_2``, asked for by name, cannot run here (auto falls back to sdpa silently), or None."""
    if requested != "flash_attention_2" or (cuda_available and flash_installed):
        return None
    needs = (("the flash-attn package", flash_installed), ("a CUDA device", cuda_available))
    missing = " and ".join(what for what, present in needs if not present)
    return (
        f"needs flash-attn and a CUDA device, and this machine lacks {missing}; "
        "use auto (flash_attention_2 where it can run, else sdpa) or sdpa, or pip install flash-attn on a CUDA machine"
    )


def token_ids_problem(tokenizer, prompt_ids: list[list[int]], vocab_size: int | None) -> str | None:
    """Why a model of ``vocab_size`` cannot embed the ids ``tokenizer`` feeds it (the prompts', the pad and EOS
    ids), or None: the embedding lookup would fail with an IndexError once the weights are loaded and drawing.

    >>> class Tok:
    ...     pad_token_id, eos_token_id = 0, 2
    ...     def __len__(self): return 24
    >>> token_ids_problem(Tok(), [[1, 5], [23]], 24) is None
    True
    >>> token_ids_problem(Tok(), [[1, 5], [23]], 10)[:71]
    'its tokenizer gives token ids up to 23 (prompt 1), but the model has an'
    """
    if not vocab_size:
        return None
    highest = {f"prompt {i}": max(ids) for i, ids in enumerate(prompt_ids) if ids}
    highest.update(
        {f"{name} token": i for name in ("pad", "eos") if (i := getattr(tokenizer, f"{name}_token_id")) is not None}
    )
    over = {what: i for what, i in highest.items() if i >= vocab_size}
    if not over:
        return None
    worst = max(over, key=over.get)
    return (
        f"its tokenizer gives token ids up to {over[worst]} ({worst}), but the model has an embedding for ids below "
        f"vocab_size={vocab_size} only (the tokenizer has {len(tokenizer)} tokens); use the tokenizer saved with these "
        "weights, or resize the embeddings (model.resize_token_embeddings(len(tokenizer))) and save the model again"
    )
