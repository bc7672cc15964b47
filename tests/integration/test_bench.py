"""scripts/bench.py runs end to end on our side alone (no TRL needed) and reports every phase in its JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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
