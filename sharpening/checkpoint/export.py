"""The fitted policy as a plain Hugging Face (full) or PEFT adapter (LoRA) directory: it loads without
sharpening. Written by ``PolicyModule`` at the end of training."""

from __future__ import annotations

import os
import shutil

import torch

from sharpening.checkpoint.files import disk_full_explained, hidden_name


def save_policy(policy: torch.nn.Module, tokenizer, output_dir: str) -> None:
    """``save_pretrained`` the policy (safetensors) and tokenizer; the result loads without sharpening.

    Written into a new sibling directory, then moved to ``output_dir``, which it replaces: the result holds
    this policy's files only (never an earlier run's adapter beside new full weights), and an error while
    writing (a full disk: DiskFullError) leaves ``output_dir`` as it was. A process killed mid-way leaves
    ``.<name>.<pid>.partial`` / ``.previous``, which the next run clears (``remove_leftovers``).
    """
    for config in (getattr(policy, "peft_config", None) or {}).values():  # a local base: absolute, not cwd-relative
        base = getattr(config, "base_model_name_or_path", None)
        if base and os.path.isdir(os.path.expanduser(base)):
            config.base_model_name_or_path = os.path.abspath(os.path.expanduser(base))
    output_dir = os.path.abspath(output_dir)
    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    staging = hidden_name(output_dir, "partial")
    shutil.rmtree(staging, ignore_errors=True)  # a leftover of this pid's earlier, failed attempt
    os.mkdir(staging)
    try:
        with disk_full_explained(parent, f"writing the policy to {output_dir!r}"):
            policy.save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    previous = hidden_name(output_dir, "previous")
    if os.path.lexists(output_dir):
        os.replace(output_dir, previous)
    try:
        os.replace(staging, output_dir)
    except BaseException:
        if os.path.lexists(previous):
            os.replace(previous, output_dir)
        raise
    shutil.rmtree(previous, ignore_errors=True)
