"""Shared fixtures: a tiny causal LM and a char tokenizer, saved to disk and loaded by path.

No network: HF_HUB_OFFLINE is forced, and every model comes from a transformers config.
"""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

TINY_CHARS = "abcdefgh=0123456789 +"


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models run fastest on one thread; with two, a busy second core stalls every op."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build_tiny_model(path, seed: int = 0, hidden: int = 64, layers: int = 2, vocab_extra: int = 0):
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
        max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> str:
    """Directory of a tiny random Llama (hidden 64 — bitsandbytes 4-bit needs >= 64 —, 2 layers) and its char tokenizer."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_model(tiny_model_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_path)


def _reversal_prompts(path, words: list[str]) -> str:
    with open(path, "w") as f:
        for p in words:
            f.write(json.dumps({"prompt": p + "=", "answer": p[::-1]}) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory) -> str:
    """A JSONL file of 6 reversal prompts with answers."""
    words = ["abcd", "bcde", "cdef", "defg", "efgh", "fgha"]
    return _reversal_prompts(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", words)


@pytest.fixture(scope="session")
def seven_prompts(tmp_path_factory) -> str:
    """7 reversal prompts: an odd count, so 2 ranks get uneven shards."""
    words = ["abcd", "bcde", "cdef", "defg", "efgh", "fgha", "ghab"]
    return _reversal_prompts(tmp_path_factory.mktemp("seven") / "prompts.jsonl", words)
