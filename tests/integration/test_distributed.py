"""DDP on CPU (2 processes, gloo), through the real CLI in a subprocess (Lightning relaunches the command
for the second rank). Each rank samples its own prompt shard; the gathered buffer equals the
single-process one, because every prompt's draws depend only on (seed, epoch, prompt index).
SIGTERM that reaches one rank, or every rank, stops all ranks at the same step with a resumable checkpoint."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest
import torch

from sharpening.safety import PREEMPTED_CHECKPOINT
from tests.helpers import REPO_ROOT, verifier_state

# Every test starts DDP runs in subprocesses (two ranks on CPU).
pytestmark = pytest.mark.slow

ROOT = str(REPO_ROOT)


def _run(config: str, model: str, prompts: str, root, devices: int, *extra, env=None, ckpt: str = "") -> dict:
    """Fit in a subprocess; the checkpoint named ``ckpt`` (default: the newest one) of the run."""
    args = [
        sys.executable,
        "-m",
        "sharpening",
        "fit",
        "--config",
        os.path.join(ROOT, "configs", config),
        f"--model.policy.model_name_or_path={model}",
        "--model.policy.finetuning=lora",
        "--model.policy.lora_r=4",
        f"--data.dataset={prompts}",
        "--verifier.show_progress=false",
        "--trainer.max_epochs=2",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={root}",
        f"--trainer.devices={devices}",
        f"--trainer.strategy={'ddp' if devices > 1 else 'auto'}",
        *extra,
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **(env or {}))
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    path = (
        os.path.join(root, "checkpoints", ckpt)
        if ckpt
        else max(glob.glob(os.path.join(root, "checkpoints", "*.ckpt")), key=os.path.getmtime)
    )
    return torch.load(path, map_location="cpu", weights_only=True)


def _buffer(checkpoint: dict) -> dict:
    return verifier_state(checkpoint)["buffer"]


def test_sft_ddp_selects_the_same_samples_as_one_process(tiny_model_path, seven_prompts, tmp_path):
    sft = [
        "--model.batch_size=2",
        "--verifier.sampling.samples_per_prompt=3",
        "--verifier.sampling.max_new_tokens=5",
        "--verifier.selection.truncated=drop",
        "--verifier.resample_every_epoch=true",
    ]
    single = _run("demo.yaml", tiny_model_path, seven_prompts, tmp_path / "one", 1, *sft)
    double = _run("demo.yaml", tiny_model_path, seven_prompts, tmp_path / "two", 2, *sft)
    assert _buffer(double) == _buffer(single)  # truncated ones dropped: uneven counts per rank, same set
    # each rank stepped the same number of batches (Lightning would hang otherwise); the distributed
    # sampler splits the gathered buffer, so a step sees half as many samples per rank
    # epoch e keeps k_e samples: one process steps c_e = ceil(k_e / batch 2) times, two ranks ceil(c_e / 2) times
    # each. The checkpoint holds the last epoch's buffer (k_1); the first epoch's c_0 is what remains of the
    # single run's steps (a resampled round may keep another count)
    c1 = -(-len(_buffer(single)["examples"]) // 2)
    c0 = single["global_step"] - c1
    assert double["global_step"] == -(-c0 // 2) + -(-c1 // 2)


RL_SMALL = ["--model.prompts_per_step=2", "--model.sampling.samples_per_prompt=3", "--model.sampling.max_new_tokens=5"]


@pytest.fixture(scope="module")
def rl_ddp_run(tiny_model_path, seven_prompts, tmp_path_factory) -> dict:
    """An uninterrupted 2-rank online RL run: its last checkpoint."""
    return _run("rl.yaml", tiny_model_path, seven_prompts, tmp_path_factory.mktemp("rl-ddp"), 2, *RL_SMALL)


def test_rl_online_ddp_trains_on_both_ranks(rl_ddp_run):
    assert rl_ddp_run["global_step"] == 2 * 2  # 7 prompts -> 4 per rank -> 2 steps per epoch, 2 epochs
    assert all(torch.isfinite(v).all() for v in rl_ddp_run["state_dict"].values())


def _sigterm(variable: str, value: int, ranks: str) -> tuple[list[str], dict]:
    """Arguments and environment that make ``ranks`` (e.g. "1" or "0,1") SIGTERM themselves (sigterm_hook.py)."""
    hook = os.path.join(ROOT, "tests", "integration")
    return ["--trainer.callbacks+=sigterm_hook.SigtermAt"], {
        "PYTHONPATH": hook,
        variable: str(value),
        "SIGTERM_RANKS": ranks,
    }


def _same_weights(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"]
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, rtol=0, atol=0)  # bitwise on CPU


def test_rl_ddp_sigterm_on_one_rank_stops_both_and_resumes_to_the_same_weights(
    rl_ddp_run, tiny_model_path, seven_prompts, tmp_path
):
    hook, env = _sigterm("SIGTERM_AT_STEP", 1, "1")  # rank 0, which writes checkpoints, never sees the signal
    stopped = _run(
        "rl.yaml", tiny_model_path, seven_prompts, tmp_path, 2, *RL_SMALL, *hook, env=env, ckpt=PREEMPTED_CHECKPOINT
    )
    assert stopped["global_step"] == 2  # the step in flight finished on both ranks, then both stopped
    resumed = _run("rl.yaml", tiny_model_path, seven_prompts, tmp_path, 2, *RL_SMALL, "--ckpt_path=last")
    _same_weights(rl_ddp_run, resumed)


def test_rl_ddp_sigterm_on_every_rank_stops_cleanly(tiny_model_path, seven_prompts, tmp_path):
    """A scheduler signals the whole job (Lightning's own handler deadlocks here: it broadcasts inside the handler)."""
    hook, env = _sigterm("SIGTERM_AT_STEP", 1, "0,1")
    stopped = _run(
        "rl.yaml", tiny_model_path, seven_prompts, tmp_path, 2, *RL_SMALL, *hook, env=env, ckpt=PREEMPTED_CHECKPOINT
    )
    assert stopped["global_step"] == 2


def test_sft_ddp_sigterm_on_rank_zero_during_a_round_resumes_to_the_same_weights(
    tiny_model_path, seven_prompts, tmp_path
):
    """Rank 0 stops drawing at once; rank 1 finishes its shard; both abandon the round together."""
    sft = [
        "--model.batch_size=2",
        "--verifier.sampling.samples_per_prompt=3",
        "--verifier.sampling.max_new_tokens=5",
        "--verifier.selection.truncated=keep",
        "--verifier.resample_every_epoch=true",
    ]
    full = _run("demo.yaml", tiny_model_path, seven_prompts, tmp_path / "full", 2, *sft)
    hook, env = _sigterm("SIGTERM_AT_EPOCH_END", 0, "0")
    stopped = _run(
        "demo.yaml",
        tiny_model_path,
        seven_prompts,
        tmp_path / "run",
        2,
        *sft,
        *hook,
        env=env,
        ckpt=PREEMPTED_CHECKPOINT,
    )
    assert 0 < stopped["global_step"] < full["global_step"]
    assert _buffer(stopped)["epoch"] == 0  # the second round was abandoned; a resumed run redraws it
    resumed = _run("demo.yaml", tiny_model_path, seven_prompts, tmp_path / "run", 2, *sft, "--ckpt_path=last")
    _same_weights(full, resumed)


XPO = [
    "--model.rl.algorithm=xpo",
    "--model.rl.xpo_updates_per_round=2",
    "--model.rl.pairs_per_update=2",
    "--model.rl.heldout_prompts=1",
    "--model.prompts_per_step=1",
    "--model.sampling.samples_per_prompt=2",
    "--model.sampling.max_new_tokens=5",
]


def test_xpo_ddp_resume_gives_each_rank_its_own_pairs(tiny_model_path, seven_prompts, tmp_path):
    """Each rank grows its own XPO dataset from its prompt shard. A run stopped mid-epoch and resumed under
    DDP must hand each rank back its own pairs (not rank 0's to both) and end where the straight run ends."""
    every_step = [
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        f"--trainer.callbacks.dirpath={tmp_path}/straight/checkpoints",
        "--trainer.callbacks.every_n_train_steps=1",
        "--trainer.callbacks.save_top_k=-1",
        "--trainer.callbacks.filename={step:02d}",
    ]
    straight = _run("rl.yaml", tiny_model_path, seven_prompts, tmp_path / "straight", 2, *XPO, *every_step)
    # 6 training prompts -> 3 rounds per rank and epoch, 2 optimizer steps each; resume after 2 rounds (mid-epoch)
    resumed = _run(
        "rl.yaml",
        tiny_model_path,
        seven_prompts,
        tmp_path / "resumed",
        2,
        *XPO,
        f"--ckpt_path={tmp_path}/straight/checkpoints/step=04.ckpt",
    )
    assert resumed["global_step"] == straight["global_step"] == 12
    for name, value in straight["state_dict"].items():
        assert torch.equal(resumed["state_dict"][name], value), name
    pairs_by_rank = straight["xpo"]["pairs_by_rank"]
    assert [len(pairs) for pairs in pairs_by_rank] == [6, 6]  # 2 epochs x 3 rounds x 1 prompt, per rank
    assert sorted(p["prompt_index"] for pairs in pairs_by_rank for p in pairs) == sorted(list(range(6)) * 2)
    assert resumed["xpo"]["pairs_by_rank"] == pairs_by_rank  # each rank held its own pairs after the resume
    for key in ("best_j_beta", "best_round"):
        assert resumed["xpo"][key] == straight["xpo"][key]
    for name, value in straight["xpo"]["best_state"].items():
        assert torch.equal(resumed["xpo"]["best_state"][name], value), name
