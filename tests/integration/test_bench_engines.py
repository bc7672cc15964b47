"""scripts/bench.py --engine runs the engine benchmark (scripts/bench_engines.py) end to end on the hf engine, and
its figures count the warm draw, round and step only.

The vllm side is left to the benchmark's own runs: vLLM's start-up alone (about 20 s on 2 cores, once per task)
would make this the slowest test of the suite."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO_ROOT

ROOT = str(REPO_ROOT)
PROMPTS, SAMPLES, TOKENS = 2, 3, 6


@pytest.mark.slow
def test_engine_benchmark_counts_the_warm_units_only():
    args = [sys.executable, os.path.join(ROOT, "scripts", "bench.py"), "--engine", "hf", "--shape", "tiny", "--json"]
    args += ["--prompts", str(PROMPTS), "--samples", str(SAMPLES), "--max-new-tokens", str(TOKENS)]
    args += ["--train-prompts", str(PROMPTS), "--train-samples", str(SAMPLES), "--train-max-new-tokens", str(TOKENS)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])

    most = PROMPTS * SAMPLES * TOKENS  # one draw's tokens: the cold draw / round / step must not add to the warm one
    generate = report["results"]["generate"]["hf"]
    assert generate["completions"] == PROMPTS * SAMPLES
    assert 0 < generate["warm_response_tokens"] <= most
    assert generate["tokens_per_s"] == pytest.approx(generate["warm_response_tokens"] / generate["warm_seconds"])
    bandwidth, matmul = report["machine"]["bandwidth_gbs"], report["matmul_params"]
    assert report["bound_tokens_per_s"] == pytest.approx(bandwidth * 1e9 / (4 * matmul) * PROMPTS * SAMPLES)
    for task in ("sft_round", "rl_step"):
        run = report["results"][task]["hf"]
        assert run["completions"] == PROMPTS * SAMPLES and 0 < run["response_tokens"] <= most
        seconds = run["seconds"]
        assert min(seconds.values()) >= 0
        assert seconds["generate"] + seconds["score"] + seconds["train"] == pytest.approx(seconds["total"])
    assert report["vllm_over_hf"] == {}  # one engine: nothing to compare
