"""Which model and adapter `sharpen evaluate` reads, whether they fit together, and loading them.

The checks read files and config.json before any weight loads: an adapter directory and its weights, the base its
adapter_config.json names (the same directory or hub id, the same weight shapes), the tokenizer files, and the
vocabulary the ids need. The weights load through training's loader (``policy.load_for_inference``).
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from sharpening.errors import ConfigError
from sharpening.evaluate.cache import WEIGHT_SUFFIXES, model_fingerprint
from sharpening.model_checks import token_ids_problem
from sharpening.policy import PolicyConfig, load_for_inference, load_tokenizer

if TYPE_CHECKING:  # config.py imports this module's checks
    from sharpening.evaluate.config import EvalModelConfig


ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
"""What PEFT reads an adapter's weights from."""
SHAPE_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "n_embd", "n_layer", "n_head",
                "n_inner")  # fmt: skip
"""config.json fields that decide the shapes of a model's weights: an adapter fits only a base that agrees on them."""


def is_adapter_dir(path: str) -> bool:
    """Whether ``path`` is a directory holding a PEFT adapter_config.json."""
    return os.path.isfile(os.path.join(os.path.expanduser(path), "adapter_config.json"))


def read_adapter_config(path: str) -> dict:
    """adapter_config.json of the adapter directory ``path`` ({} when missing or not a JSON object)."""
    try:
        with open(os.path.join(os.path.expanduser(path), "adapter_config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def resolve_model_sources(cfg: EvalModelConfig) -> tuple[str, str | None]:
    """(model, adapter): a model_name_or_path that is an adapter directory becomes the adapter, on the
    base named in its adapter_config.json; so does an adapter_path given without a model."""
    adapter = cfg.adapter_path
    if adapter is None and is_adapter_dir(cfg.model_name_or_path):
        adapter = cfg.model_name_or_path
    if adapter is not None and (not cfg.model_name_or_path or adapter == cfg.model_name_or_path):
        base = read_adapter_config(adapter).get("base_model_name_or_path")
        return base if isinstance(base, str) else "", adapter
    return cfg.model_name_or_path, adapter


def _listing(directory: str) -> str:
    found = sorted(os.listdir(directory))
    return f"found: {found[:8]}{' ...' if len(found) > 8 else ''}"


def adapter_files_problem(path: str) -> str | None:
    """Why ``path`` is not an adapter directory PEFT can load (no adapter_config.json, unreadable, no weights)."""
    directory = os.path.expanduser(path)
    if not os.path.isdir(directory):
        return "is a file; name the adapter directory" if os.path.exists(directory) else "no such directory"
    if not is_adapter_dir(directory):
        return f"no adapter_config.json there ({_listing(directory)}); name a PEFT adapter dir (save_pretrained's)"
    if not read_adapter_config(directory):
        return "its adapter_config.json is not a JSON object; copy the adapter directory again"
    if not any(os.path.isfile(os.path.join(directory, f)) for f in ADAPTER_WEIGHT_FILES):
        return (
            f"adapter_config.json but no adapter weights ({' or '.join(ADAPTER_WEIGHT_FILES)}; {_listing(directory)}); "
            "copy the weights there or point to the directory save_pretrained wrote"
        )
    return None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model")  # fmt: skip
"""Files a tokenizer is read from; a model directory with none of them has no tokenizer to sample with."""


def tokenizer_files_problem(model: str, adapter: str | None) -> str | None:
    """Why no tokenizer can be read from the local model directory (nor from the adapter, which may hold one)."""
    places = [os.path.expanduser(p) for p in (model, adapter) if p and os.path.isdir(os.path.expanduser(p))]
    if not places or any(os.path.isfile(os.path.join(p, f)) for p in places for f in TOKENIZER_FILES):
        return None
    return (
        f"no tokenizer files there ({', '.join(TOKENIZER_FILES[:3])}, ...; {_listing(os.path.expanduser(model))}); "
        "save the tokenizer beside the weights (tokenizer.save_pretrained) or copy its files from the base model"
    )


def local_dir(name: str) -> str | None:
    """The real path of ``name`` when it is a local directory."""
    path = os.path.expanduser(name)
    return os.path.realpath(path) if name and os.path.isdir(path) else None


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def _same_source(a: str, b: str) -> bool:
    """The same local directory (by real path), or the same hub id."""
    return (local_dir(a) or a.rstrip("/")) == (local_dir(b) or b.rstrip("/"))


def _model_config(name: str, revision: str | None = None) -> dict | None:
    """config.json of a local model directory or of a hub model in the local cache (never downloads), or None."""
    directory = local_dir(name)
    path = os.path.join(directory, "config.json") if directory else None
    if path is None and not _looks_like_path(name):
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(name, "config.json", revision=revision)
        except ValueError:  # not a valid hub id either
            cached = None
        path = cached if isinstance(cached, str) else None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, TypeError, ValueError):
        return None


def shape_differences(a: dict, b: dict) -> list[str]:
    """``field=a vs b`` for each weight-shape field that both configs set, to different values.

    >>> shape_differences({"hidden_size": 64, "head_dim": 16}, {"hidden_size": 32, "vocab_size": 9})
    ['hidden_size=64 vs 32']
    """
    return [f"{k}={a[k]!r} vs {b[k]!r}" for k in SHAPE_FIELDS if k in a and k in b and a[k] != b[k]]


def _same_weights(a: str, b: str) -> bool:
    """Whether two model directories hold the same weight files (a copy), by their fingerprints."""

    def weights(name: str) -> dict:
        return {k: v for k, v in model_fingerprint(name)["files"].items() if k.endswith(WEIGHT_SUFFIXES)}

    return bool(weights(a)) and weights(a) == weights(b)


def adapter_base_check(cfg: EvalModelConfig, option: str = "--model") -> tuple[list[str], list[str]]:
    """(problems, warnings) of putting the adapter on model_name_or_path, judged before any weights load by the
    base_model_name_or_path of its adapter_config.json: other weight shapes are refused (loading would fail);
    other hub ids with the same shapes load silently into numbers of a model nobody trained, so they are refused
    unless allow_adapter_base_mismatch; a local directory that is not the recorded one (a copied or downloaded
    base is legitimate) is warned about unless it holds the same weight files."""
    model, adapter = resolve_model_sources(cfg)
    recorded = read_adapter_config(adapter).get("base_model_name_or_path") if adapter and model else None
    if not isinstance(recorded, str) or not recorded or _same_source(recorded, model):
        return [], []
    trained_on = f"{option}.adapter_path={adapter!r} was trained on {recorded!r} (its adapter_config.json)"
    ours = _model_config(model, cfg.revision)
    theirs = _model_config(recorded, read_adapter_config(adapter).get("revision"))
    if ours and theirs and (differences := shape_differences(theirs, ours)):
        return [
            f"{trained_on}, whose weight shapes differ from {option}.model_name_or_path={model!r} "
            f"({'; '.join(differences)}), so the adapter cannot load on it; give its base, "
            f"{option}.model_name_or_path {recorded}, or the adapter trained on {model!r}"
        ], []  # fmt: skip
    if local_dir(model) and local_dir(recorded) and _same_weights(model, recorded):
        return [], []
    shapes = "the same weight shapes" if ours and theirs else "shapes not comparable: a config.json is not here"
    local = local_dir(model) or local_dir(recorded) or _looks_like_path(recorded)
    if local or cfg.allow_adapter_base_mismatch:
        return [], [
            f"{trained_on}, not on {option}.model_name_or_path={model!r} ({shapes}); the numbers are right only if "
            f"{model!r} is a copy of {recorded!r}"
        ]  # fmt: skip
    return [
        f"{trained_on}, not on {option}.model_name_or_path={model!r} ({shapes}): on another base it loads without "
        f"an error and measures a model nobody trained. Give {option}.model_name_or_path {recorded}, or pass "
        f"{option}.allow_adapter_base_mismatch true if {model!r} is the base you mean (e.g. a mirror of it)"
    ], []  # fmt: skip


def vocabulary_problem(model: str, cfg: EvalModelConfig) -> str | None:
    """Why the base cannot score the evaluated model's tokens (another vocabulary size), or None."""
    ours, base = _model_config(model, cfg.revision), _model_config(cfg.base_model_name_or_path)
    if not ours or not base or ours.get("vocab_size") == base.get("vocab_size"):
        return None
    return (
        f"its vocab_size={base.get('vocab_size')} differs from the evaluated model's ({ours.get('vocab_size')}), "
        "and it scores the evaluated model's tokens; give the base that model was fine-tuned from"
    )


def tokenizer_vocabulary_problem(
    model: str, revision: str | None, tokenizer, prompt_ids: list[list[int]]
) -> str | None:
    """Why ``model`` cannot embed the ids its tokenizer feeds it (model_checks.token_ids_problem), from its
    config.json."""

    return token_ids_problem(tokenizer, prompt_ids, (_model_config(model, revision) or {}).get("vocab_size"))


# ---------------------------------------------------------------- loading


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_tokenizer_for(cfg: EvalModelConfig, model: str, adapter: str | None):
    """The tokenizer used for templating, sampling and decoding: the adapter's when it saved one."""
    source = adapter if adapter and os.path.isfile(os.path.join(adapter, "tokenizer_config.json")) else model
    try:
        return load_tokenizer(PolicyConfig(model_name_or_path=source, trust_remote_code=cfg.trust_remote_code,
                                           revision=None if source == adapter else cfg.revision))  # fmt: skip
    except ConfigError as err:  # named for training's option; here the tokenizer is the model's or adapter's
        option = "--model.adapter_path" if source == adapter else "--model.model_name_or_path"
        raise ConfigError([p.replace("--model.policy.model_name_or_path", option) for p in err.problems]) from None


def policy_config(cfg: EvalModelConfig, model: str) -> PolicyConfig:
    """The training loader's settings for loading ``model`` as ``cfg`` asks: 4-bit NF4 weights are what a
    QLoRA run holds its base in (finetuning=qlora); otherwise weights load as stored in ``cfg.dtype``."""
    return PolicyConfig(
        model_name_or_path=model, finetuning="qlora" if cfg.load_in_4bit else "full", dtype=cfg.dtype,
        attn_implementation=cfg.attn_implementation, cpu_linear=cfg.cpu_linear,
        trust_remote_code=cfg.trust_remote_code, revision=cfg.revision,
    )  # fmt: skip


def load_models(cfg: EvalModelConfig, model: str, adapter: str | None, device: torch.device):
    """(evaluated model, separate frozen base or None), in eval mode on ``device``.

    The separate base is loaded only for score_with=base without an adapter; with an adapter the base is
    the same weights with the adapter disabled (no second copy, method.md §4.3). That base loads at the hub's
    default revision and, in 4-bit, keeps the dtypes it loads with (no float32 cast of its other weights).
    """
    loaded = policy_config(cfg, model)
    evaluated = load_for_inference(loaded, device, "--model.model_name_or_path", adapter)
    base = None
    if cfg.score_with == "base" and adapter is None:
        base_cfg = replace(loaded, model_name_or_path=cfg.base_model_name_or_path, revision=None)
        base = load_for_inference(base_cfg, device, "--model.base_model_name_or_path", prepare_4bit=False)
    return evaluated, base
