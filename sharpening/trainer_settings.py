"""Trainer settings checked before anything loads: what Lightning accepts but would train nothing, train in
reverse or crash once the weights are loaded, and Lightning's own refusals named as the user typed them.

``SharpeningCLI.instantiate_trainer`` calls both; they read the trainer section only.
"""

from __future__ import annotations

import re

import torch


def trainer_problems(trainer: dict, resuming: bool) -> list[str]:
    """Trainer settings Lightning accepts but that would train nothing (the base model then written as the
    policy), train in reverse (a negative clipping bound flips the gradient), crash after the weights load, or
    that Lightning refuses only with a traceback (a GPU that is not there)."""
    problems = []
    for key in ("max_epochs", "max_steps"):
        value = trainer.get(key)
        if isinstance(value, int) and value < -1:
            problems.append(f"--trainer.{key}={value}: must be >= 1, or -1 for no limit")
        elif value == 0 and not resuming:  # resuming a finished run with 0 writes its policy: allowed
            problems.append(
                f"--trainer.{key}=0: no step would train, and the unchanged base model would be written as the "
                "policy; set it to 1 or more"
            )
    limit = trainer.get("limit_train_batches")
    if limit is not None and not isinstance(limit, bool) and limit == 0:
        problems.append(
            f"--trainer.limit_train_batches={limit}: no batch would train, and the unchanged base model would be "
            "written as the policy; leave it unset, or give a number of batches >= 1 or a fraction in (0, 1]"
        )
    accumulate = trainer.get("accumulate_grad_batches")
    if isinstance(accumulate, int) and accumulate < 1:
        problems.append(f"--trainer.accumulate_grad_batches={accumulate}: must be >= 1 (1 = a step after every batch)")
    clip = trainer.get("gradient_clip_val")
    if clip is not None and not clip >= 0:
        problems.append(
            f"--trainer.gradient_clip_val={clip}: must be >= 0 (0 or null: no clipping); a negative bound reverses "
            "the gradient"
        )
    accelerator = trainer.get("accelerator")
    if accelerator in ("cuda", "gpu") and not torch.cuda.is_available() and not torch.backends.mps.is_available():
        build = " (this torch is a CPU-only build)" if torch.version.cuda is None else ""
        problems.append(
            f"--trainer.accelerator={accelerator}: no GPU is visible to this process{build}; use --trainer.accelerator "
            "cpu (or auto), or run where a GPU is"
        )
    return problems


def lightning_refusal_problem(message: str, trainer: dict) -> str:
    """Lightning's refusal of a trainer setting, with the option it is about: the first trainer key its
    message names, else the first setting whose value it quotes."""
    message = message.strip().splitlines()[0] if message.strip() else "refused"
    found = {}
    for key, value in trainer.items():
        if match := re.search(rf"\b{re.escape(key)}\b", message):
            found[key] = match.start()
        elif isinstance(value, str) and value and (match := re.search(rf"\b{re.escape(value)}\b", message)):
            found[key] = len(message) + match.start()  # after any key the message names
    if not found:
        return f"--trainer: Lightning's Trainer refuses these settings: {message}"
    key = min(found, key=found.get)
    return f"--trainer.{key}={trainer[key]!r}: refused by Lightning's Trainer: {message}"
