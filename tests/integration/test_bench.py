"""scripts/bench.py runs end to end on our side alone (no TRL needed) and reports every phase in its JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO_ROOT

ROOT = str(REPO_ROOT)


@pytest.mark.slow
def test_quick_benchmark_reports_every_phase_without_trl():
    args = [sys.executable, os.path.join(ROOT, "scripts", "bench.py"), "--quick", "--compare", "none", "--json"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run(args, capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])

    assert report["machine"]["matmul_peak_gflops_start"] > 0
    tiny = report["results"]["tiny"]
    for task in ("sft_round", "rl_step"):
        assert set(tiny[task]) == {"ours"}  # --compare none: no TRL side, no ratios
        ours = tiny[task]["ours"]
        for phase in ("generate", "score", "train", "total"):
            stats = ours["phases"][phase]
            assert stats["seconds"] >= 0 and stats["completions_per_s"] > 0 and stats["tokens_per_s"] > 0
        assert ours["phases"]["generate"]["fraction_of_peak"] > 0
        assert ours["phases"]["train"]["fraction_of_peak"] > 0
        assert ours["peak_rss_mib"] > 0
    assert report["sft_round_speedup"] is None and report["rl_step_speedup"] is None


@pytest.mark.slow
def test_warm_rl_steps_time_the_steps_after_the_first_one_per_step():
    """--warm-rl-steps K: rl_warm_step is the mean of K steps after an untimed first one in the same trainer, so
    its counts are one step's (8 prompts x 8 samples), not K + 1 steps'."""
    args = [
        sys.executable,
        os.path.join(ROOT, "scripts", "bench.py"),
        "--quick",
        "--compare",
        "none",
        "--json",
        "--warm-rl-steps",
        "2",
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run(args, capture_output=True, text=True, timeout=180, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    tiny = report["results"]["tiny"]
    assert set(tiny) == {"sft_round", "rl_step", "rl_warm_step"}
    for task in ("rl_step", "rl_warm_step"):
        generate = tiny[task]["ours"]["phases"]["generate"]
        assert 0 < generate["seconds"] and generate["completions_per_s"] * generate["seconds"] == pytest.approx(64)
    assert report["rl_warm_step_speedup"] is None  # --compare none


def test_warm_rl_steps_need_enough_prompts():
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        import bench
    finally:
        sys.path.pop(0)
    with pytest.raises(SystemExit):
        bench.parse_args(["--warm-rl-steps", "8", "--prompts", "64", "--compare", "none"])  # needs 72
    assert bench.parse_args(["--warm-rl-steps", "7", "--compare", "none"]).warm_rl_steps == 7
    assert bench.parse_args(["--quick", "--warm-rl-steps", "2", "--compare", "none"]).prompts == 24


@pytest.mark.slow
def test_few_shot_workload_shares_one_long_prefix_and_fits_the_model(tmp_path):
    """--few-shot K: every prompt starts with the same K worked sums; the model's positions cover prompt + 32."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        from bench_common import build_workload, few_shot_prefix
    finally:
        sys.path.pop(0)
    from transformers import AutoConfig, AutoTokenizer

    prefix = few_shot_prefix(16)
    assert prefix.count("=") == 16 and len(prefix) > 128  # longer than the plain workload's position budget
    w = build_workload("tiny", str(tmp_path), 8, few_shot=16)
    assert all(t.startswith(prefix) and t.count("=") == 17 for t in w.prompt_texts)
    tokenizer = AutoTokenizer.from_pretrained(w.model_path)
    longest = max(len(tokenizer(t).input_ids) for t in w.prompt_texts)
    assert AutoConfig.from_pretrained(w.model_path).max_position_embeddings >= longest + w.max_new_tokens
    plain = build_workload("tiny", str(tmp_path / "plain"), 8)
    assert AutoConfig.from_pretrained(plain.model_path).max_position_embeddings == 128  # the default is unchanged
