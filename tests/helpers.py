"""Helpers several test files share: the repository root, the tiny model builder, and finding the verifier.

Fixtures built on these live in tests/conftest.py; tests import the plain functions from here
(``from tests.helpers import build_tiny_model``), which works because pytest puts the repository root on
``sys.path`` (``pythonpath`` in pyproject.toml).
"""

from __future__ import annotations

from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]

TINY_CHARS = "abcdefgh=0123456789 +"

VERIFIER_CALLBACK = "SelfVerificationCallback"


def build_tiny_model(
    path, seed: int = 0, hidden: int = 64, layers: int = 2, vocab_extra: int = 0, max_positions: int = 64
) -> str:
    """Save a random tiny Llama + char tokenizer to ``path``; return the path as a string."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from sharpening.tasks.chars import build_char_tokenizer

    tokenizer = build_char_tokenizer(TINY_CHARS)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer) + vocab_extra,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def verifier_callback(trainer):
    """The trainer's SelfVerificationCallback (LightningCLI adds it as a forced callback)."""
    found = [c for c in trainer.callbacks if type(c).__name__ == VERIFIER_CALLBACK]
    assert found, f"no {VERIFIER_CALLBACK} among the trainer's callbacks"
    return found[0]


def verifier_state(checkpoint: dict) -> dict:
    """The SelfVerificationCallback's state in a loaded Lightning checkpoint (keyed by the callback's state key)."""
    return next(v for k, v in checkpoint["callbacks"].items() if VERIFIER_CALLBACK in k)
