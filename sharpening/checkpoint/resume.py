"""Coming back from a checkpoint: the checkpoints a run wrote, what ``--ckpt_path last`` resumes, and
whether a checkpoint fits the configuration given, checked before any weights load."""

from __future__ import annotations

import glob
import os

import torch

from sharpening.checkpoint.files import checksum_problem


def run_checkpoints(root: str) -> list[str]:
    """Checkpoints a run in ``root`` wrote, oldest first: in ``root/checkpoints`` (no logger) or in a
    logger's ``root/<name>/version_<n>/checkpoints`` (the default CSV logger's ``lightning_logs``)."""
    patterns = [
        os.path.join(root, "checkpoints", "*.ckpt"),
        os.path.join(root, "*", "version_*", "checkpoints", "*.ckpt"),
    ]
    return sorted((p for pattern in patterns for p in glob.glob(pattern)), key=os.path.getmtime)


def last_checkpoint(default_root_dir: str | None) -> str | None:
    """What ``--ckpt_path last`` resumes: the newest checkpoint of the run in ``default_root_dir`` (the current
    directory when None), whatever logger version wrote it; None when there is none."""
    found = run_checkpoints(default_root_dir or os.getcwd())
    if not found and default_root_dir:  # a ModelCheckpoint dirpath of its own somewhere under the run directory
        found = glob.glob(os.path.join(default_root_dir, "**", "*.ckpt"), recursive=True)
    # (no default_root_dir: only the current directory's own run layouts, never other runs below it)
    return max(found, key=os.path.getmtime) if found else None


def resume_problems(path: str, model_config) -> list[str]:
    """Why the checkpoint at ``path`` cannot resume ``model_config`` (class_path + init_args), if it can't.

    Loading uses ``weights_only=True``: a checkpoint that needs unpickling of arbitrary objects is refused,
    and so is one whose bytes differ from the checksum written with it.
    """
    if not os.path.isfile(path):
        parent = os.path.dirname(path) or "."
        found = sorted(f for f in os.listdir(parent) if f.endswith(".ckpt")) if os.path.isdir(parent) else []
        return [f"--ckpt_path={path!r}: no such file (checkpoints in {parent!r}: {found[:6]})"]
    corrupted = checksum_problem(path, "--ckpt_path")
    if corrupted:
        return [corrupted]
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # pickle.UnpicklingError, RuntimeError from the zip reader, ...
        return [
            f"--ckpt_path={path!r}: refused: it cannot be read as plain tensors and data (weights_only=True): "
            f"{type(err).__name__}: {str(err).splitlines()[0][:200]}. Checkpoints from untrusted sources can run code."
        ]
    want, have = _given_settings(model_config), _saved_settings(checkpoint.get("hyper_parameters", {}))
    problems = []
    for key, value in want.items():
        stored = have[key]
        if key == "module" and value and stored and value.rsplit(".", 1)[-1] == stored.rsplit(".", 1)[-1]:
            continue  # sharpening.SFTSharpeningModule and sharpening.sft.SFTSharpeningModule are one class
        same_path = key == "policy.model_name_or_path" and value and stored
        if same_path and os.path.abspath(value) == os.path.abspath(stored):
            continue
        if value is not None and stored is not None and value != stored:
            option = "--model.class_path" if key == "module" else f"--model.{key}"
            problems.append(
                f"--ckpt_path={path!r} was written with {key}={stored!r} but {option}={value!r}: "
                "resume with the settings that wrote it, or start a new run without --ckpt_path"
            )
    return problems


def _given_settings(model_config) -> dict:
    """The settings a checkpoint must match, as the configuration gives them (class_path + init_args)."""
    init = model_config.get("init_args") or {}
    policy = init.get("policy") or {}
    return {
        "module": model_config.get("class_path"),
        "policy.model_name_or_path": policy.get("model_name_or_path"),
        "policy.finetuning": policy.get("finetuning"),
        "policy.lora_r": policy.get("lora_r") if policy.get("finetuning") != "full" else None,
        "rl.algorithm": (init.get("rl") or {}).get("algorithm"),
    }


def _saved_settings(saved: dict) -> dict:
    """The same settings as the checkpoint's hyper-parameters recorded them (``plain_hparams``)."""
    policy = saved.get("policy", {})
    return {
        "module": saved.get("module_class"),
        "policy.model_name_or_path": policy.get("model_name_or_path"),
        "policy.finetuning": policy.get("finetuning"),
        "policy.lora_r": policy.get("lora_r") if policy.get("finetuning") != "full" else None,
        "rl.algorithm": saved.get("rl", {}).get("algorithm"),
    }
