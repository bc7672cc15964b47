"""response_logprobs at a 150k vocabulary: equal to full logits, and its peak memory set by chunk_size, not length.

The memory test runs in a fresh subprocess and reads the RSS high-water mark (VmHWM) after resetting it to
the current RSS just before each measured call (``echo 5 > /proc/self/clear_refs``), so earlier peaks (model
init, the previous case) cannot hide a later one. glibc's mmap threshold is pinned at 1 MiB there: with the
default dynamic threshold, freed chunks under 32 MiB stay in the heap and RSS grows with the number of chunks
even though live tensors do not (see docs/benchmarks.md); the test checks the library's allocations, not glibc.
No timing is asserted; scripts/logprob_memory.py has the figures.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest
import torch

from sharpening.logprobs import response_logprobs
from tests.helpers import REPO_ROOT

VOCAB = 151_936  # Qwen2/2.5/3
MIB = 2**20


def _reference():
    """scripts/logprob_memory.py: its ``plain_logprobs`` is the full-logits reference (logits -> log_softmax)."""
    root = str(REPO_ROOT)
    spec = importlib.util.spec_from_file_location("logprob_memory", os.path.join(root, "scripts", "logprob_memory.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# One subprocess measures every case in turn: chunked ones first, the full-logits path last.
_MEASURE = textwrap.dedent(
    """
    import gc, json, re, sys
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from sharpening.logprobs import response_logprobs
    sys.path.insert(0, "scripts")
    from logprob_memory import plain_logprobs  # the full-logits reference (cwd: the repository)

    torch.set_num_threads(1)
    V, H, B, P = {vocab}, 32, 2, 8
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=2 * H, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()

    def status(key):
        with open("/proc/self/status") as f:
            return int(re.search(key + r":\\s+(\\d+) kB", f.read()).group(1)) * 1024

    def run(path, t, chunk, backward):
        g = torch.Generator().manual_seed(1)
        args = (torch.randint(3, V, (B, P), generator=g), torch.ones(B, P, dtype=torch.bool),
                torch.randint(3, V, (B, t), generator=g), torch.ones(B, t, dtype=torch.bool))
        score = (lambda *a: plain_logprobs(model, *a)) if path == "plain" else (
            lambda *a: response_logprobs(model, *a, chunk_size=chunk))
        with torch.set_grad_enabled(backward):
            logprobs = score(*args)
            if backward:
                logprobs.sum().backward()
        del logprobs

    run("chunked", 8, 4, True)  # warm-up: kernels, and parameter gradients allocated (then kept, zeroed)
    model.zero_grad(set_to_none=False)
    growth = {{}}
    for name, path, t, chunk, backward in {cases}:
        gc.collect()
        rss_before = status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := current RSS
        run(path, t, chunk, backward)
        growth[name] = status("VmHWM") - rss_before
    print(json.dumps(growth))
    """
)

# name, path, response tokens T, chunk_size, backward. B = 2 rows, so B*T*V*4 = 148 MiB at T = 128.
_CASES = [
    ("chunk8_T128", "chunked", 128, 8, False),
    ("chunk8_T256", "chunked", 256, 8, False),
    ("chunk32_T128", "chunked", 128, 32, False),
    ("chunk16_T64_backward", "chunked", 64, 16, True),
    ("chunk16_T128_backward", "chunked", 128, 16, True),
    ("plain_T128", "plain", 128, None, False),
]


def _full_logits_bytes(t: int) -> int:
    return 2 * t * VOCAB * 4  # B * T * V * float32


@pytest.fixture(scope="module")
def peak_growth() -> dict[str, int]:
    """RSS peak growth in bytes of each case in _CASES, measured in one fresh interpreter."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("needs Linux /proc/self/clear_refs and glibc's MALLOC_MMAP_THRESHOLD_")
    root = str(REPO_ROOT)
    code = _MEASURE.format(vocab=VOCAB, cases=repr(_CASES))
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_=str(MIB))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_chunked_scoring_stays_far_below_full_logits_and_plain_does_not(peak_growth):
    full = _full_logits_bytes(128)
    assert peak_growth["chunk8_T128"] < full / 4, {k: v / MIB for k, v in peak_growth.items()}
    # the same measurement on the full-logits path is over the logits size: the check above can fail
    assert peak_growth["plain_T128"] > full, {k: v / MIB for k, v in peak_growth.items()}


@pytest.mark.slow
def test_peak_grows_with_chunk_size_not_with_length(peak_growth):
    logits_growth = _full_logits_bytes(256) - _full_logits_bytes(128)  # what full logits add when T doubles
    length_growth = peak_growth["chunk8_T256"] - peak_growth["chunk8_T128"]
    assert length_growth < logits_growth / 8, {k: v / MIB for k, v in peak_growth.items()}
    chunk_growth = peak_growth["chunk32_T128"] - peak_growth["chunk8_T128"]
    # the fused linear-head path holds ONE [chunk, V] float32 buffer (autograd through logsumexp held two)
    one_chunk = (32 - 8) * VOCAB * 4
    assert 0.5 * one_chunk < chunk_growth < 1.5 * one_chunk, {k: v / MIB for k, v in peak_growth.items()}


@pytest.mark.slow
def test_backward_peak_does_not_grow_with_length(peak_growth):
    # about 47 MiB whatever T: one chunk of logits (9 MiB, recomputed and turned into its gradient in place)
    # plus two [V, H] head-gradient buffers (the chunk's and the accumulated one, 19 MiB each); autograd
    # through logsumexp held 4 chunks. Full logits at T = 128 are 148 MiB
    logits_growth = _full_logits_bytes(128) - _full_logits_bytes(64)
    length_growth = peak_growth["chunk16_T128_backward"] - peak_growth["chunk16_T64_backward"]
    assert length_growth < logits_growth / 8, {k: v / MIB for k, v in peak_growth.items()}
    assert peak_growth["chunk16_T128_backward"] < _full_logits_bytes(128) / 2, {
        k: v / MIB for k, v in peak_growth.items()
    }


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "checkpointed"])
def test_chunked_equals_full_logits_at_150k_vocab(grad):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(1)
    prompt_ids = torch.randint(3, VOCAB, (2, 5), generator=g)
    prompt_mask = torch.ones(2, 5, dtype=torch.bool)
    response_ids = torch.randint(3, VOCAB, (2, 7), generator=g)
    response_mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])  # 11 positions: chunks of 4, 4, 3
    with torch.set_grad_enabled(grad):
        got = response_logprobs(model, prompt_ids, prompt_mask, response_ids, response_mask, chunk_size=4)
    with torch.no_grad():
        want = _reference().plain_logprobs(model, prompt_ids, prompt_mask, response_ids, response_mask)
    assert got.requires_grad == grad
    torch.testing.assert_close(got.detach(), want, atol=1e-5, rtol=0)
    assert (got[~response_mask] == 0).all() and (got[response_mask] < 0).all()
