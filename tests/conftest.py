"""Shared fixtures: a tiny causal LM and a char tokenizer, saved to disk and loaded by path.

No network: HF_HUB_OFFLINE is forced, and every model comes from a transformers config.
"""

from __future__ import annotations

import importlib.util
import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from tests.helpers import build_tiny_model


def pytest_collection_modifyitems(config, items):
    """vLLM is an optional install with its own venv (.venv-vllm): its tests skip where it is not importable."""
    if importlib.util.find_spec("vllm") is not None:
        return
    skip = pytest.mark.skip(reason="needs vLLM: run in .venv-vllm (SHARPENING_VLLM=1 ./scripts/test.sh -m vllm)")
    for item in items:
        if item.get_closest_marker("vllm") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models run fastest on one thread; with two, a busy second core stalls every op."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> str:
    """Directory of a tiny random Llama and its char tokenizer.

    Hidden size 64 (bitsandbytes 4-bit needs at least 64), 2 layers.
    """
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
