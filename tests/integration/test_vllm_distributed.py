"""The vLLM engine under DDP (2 gloo processes on CPU, through the real CLI): each rank's engine holds the full
policy and draws its own shard of prompts; the gathered buffer equals one process's, because a prompt's draws
depend only on (seed, round, prompt index). The trainer's process group outlives every rank's engine."""

from __future__ import annotations

import glob
import os

import pytest
import torch

from tests.helpers import build_tiny_model, verifier_state
from tests.integration.test_distributed import RL_SMALL, _buffer, _run
from tests.integration.test_fsdp_cpu import SFT as FSDP_SFT
from tests.integration.test_fsdp_cpu import _fit

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

VLLM = ["--verifier.sampling.engine=vllm", "--verifier.sampling.vllm.max_model_len=64"]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    # head size 32: vLLM's CPU attention has no kernel for the default tiny model's 16
    return build_tiny_model(tmp_path_factory.mktemp("vllm-ddp") / "tiny", hidden=128)


def test_sft_ddp_with_vllm_selects_the_same_samples_as_one_process(model_path, seven_prompts, tmp_path):
    sft = [
        "--model.batch_size=2",
        "--verifier.sampling.samples_per_prompt=3",
        "--verifier.sampling.max_new_tokens=5",
        "--verifier.selection.truncated=drop",
        "--verifier.resample_every_epoch=true",
        *VLLM,
    ]
    single = _run("demo.yaml", model_path, seven_prompts, tmp_path / "one", 1, *sft)
    double = _run("demo.yaml", model_path, seven_prompts, tmp_path / "two", 2, *sft)
    assert _buffer(double) == _buffer(single)
    assert _buffer(single)["examples"]  # something was kept, so the comparison says something
    for run in (single, double):  # vLLM drew, its log-probs matched ours (the max over ranks)
        assert verifier_state(run)["last_metrics"]["engine/parity_max_abs_diff"] < 1e-4


def test_online_rl_ddp_with_vllm_trains_on_both_ranks(model_path, seven_prompts, tmp_path):
    rl_vllm = ["--model.sampling.engine=vllm", "--model.sampling.vllm.max_model_len=64"]
    run = _run("rl.yaml", model_path, seven_prompts, tmp_path, 2, *RL_SMALL, *rl_vllm)
    assert run["global_step"] == 2 * 2  # 7 prompts -> 4 per rank -> 2 steps per epoch, 2 epochs
    assert all(torch.isfinite(v).all() for v in run["state_dict"].values())


@pytest.mark.parametrize("finetuning", ["full", "lora"])
def test_fsdp_with_vllm_draws_from_the_gathered_policy(model_path, seven_prompts, tmp_path, finetuning):
    """Under FSDP each rank hands vLLM the gathered (whole) policy: full weights or the adapter."""
    lora = ["--model.policy.lora_r=4"] if finetuning == "lora" else []
    done = _fit(
        "fsdp.yaml",
        model_path,
        seven_prompts,
        tmp_path,
        *FSDP_SFT,
        *VLLM,
        f"--model.policy.finetuning={finetuning}",
        f"--model.output_dir={tmp_path}/out",
        *lora,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    last = max(glob.glob(os.path.join(tmp_path, "checkpoints", "*.ckpt")), key=os.path.getmtime)
    state = verifier_state(torch.load(last, map_location="cpu", weights_only=True))
    assert state["rounds_done"] == 2  # the second round drew from the trained policy
    assert state["last_metrics"]["engine/parity_max_abs_diff"] < 1e-4
