"""The model and measures of scripts/bench_engines.py: Qwen2 in Qwen2.5's shapes with random weights and a
character tokenizer over its whole vocabulary, the prompts, and the memory-bandwidth bound of decoding."""

from __future__ import annotations

import json
import os

import torch
from bench_common import CHARS

SHAPES = {  # Qwen2.5's shapes (head size 64 / 128: vLLM has CPU kernels for both); tiny is for smoke tests
    "tiny": dict(
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=256,
        vocab_size=512,
    ),
    "0.5b": dict(
        hidden_size=896,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        intermediate_size=4864,
        vocab_size=151936,
    ),
    "1.5b": dict(
        hidden_size=1536,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        intermediate_size=8960,
        vocab_size=151936,
    ),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def vocabulary_chars(size: int) -> str:
    """``size`` distinct characters: the printable ASCII of bench_common, then code points from U+0100 on
    (surrogates skipped), so a character tokenizer gives every id of a 151,936-token model a token."""
    extra = (chr(c) for c in range(0x100, 0x110000) if not 0xD800 <= c <= 0xDFFF)
    return CHARS + "".join(next(extra) for _ in range(size - len(CHARS)))


def build_model(shape_name: str, dtype: str, max_positions: int, root: str, seed: int = 0) -> tuple[str, int]:
    """Save the random Qwen2 of ``shape_name`` (in ``dtype``) and its tokenizer under ``root``; returns the path
    and the number of weights that take part in matmuls (the LM head included: tied to the embedding)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from sharpening.tasks.chars import SPECIAL_TOKENS, build_char_tokenizer

    shape = dict(SHAPES[shape_name])
    tokenizer = build_char_tokenizer(vocabulary_chars(shape["vocab_size"] - len(SPECIAL_TOKENS)))
    config = Qwen2Config(
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **shape,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(DTYPES[dtype])
    path = os.path.join(root, f"qwen2-{shape_name}")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return path, matmul


def write_prompts(root: str, count: int, seed: int = 0) -> tuple[list[str], str]:
    """``count`` prompts such as ``"12+34="`` and the JSONL file the training tasks read them from."""
    import random

    rng = random.Random(seed)
    texts = [f"{rng.randint(1, 99)}+{rng.randint(1, 99)}=" for _ in range(count)]
    path = os.path.join(root, f"prompts-{count}.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps({"prompt": t}) + "\n" for t in texts)
    return texts, path


def bound_tokens_per_s(bandwidth_gbs: float, matmul_params: int, dtype: str, sequences: int) -> float:
    """Response tokens/s if memory bandwidth were the only limit: a decode step reads every matmul weight once
    and gives one token to each sequence in flight. KV-cache reads, prefill and launches are left out: a bound.

    >>> bound_tokens_per_s(100.0, 10**9, "bfloat16", 64)  # 2 GB per step, 50 steps/s, 64 sequences
    3200.0
    """
    weight_bytes = matmul_params * DTYPES[dtype].itemsize
    return bandwidth_gbs * 1e9 / weight_bytes * sequences
