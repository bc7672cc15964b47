"""RL-sharpening under FSDP (configs/rl_fsdp.yaml, 2 CPU processes, gloo, tests/cpu_fsdp.py's strategy) against
the same run under DDP: online (two updates per rollout), offline and XPO end with the same weights, up to the
float rounding of FSDP's reduce-scatter. Each rank draws its own prompts' rollout with gathered weights, and every
update is a sharded training step on it."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TESTS = os.path.join(ROOT, "tests")

pytestmark = pytest.mark.slow


def _fit(strategy: list[str], model: str, prompts: str, root, *extra) -> dict | None:
    """A 2-process run of configs/rl_fsdp.yaml on the tiny model; its last checkpoint in root/checkpoints."""
    args = [
        sys.executable,
        "-m",
        "sharpening",
        "fit",
        "--config",
        os.path.join(ROOT, "configs", "rl_fsdp.yaml"),
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        "--trainer.precision=32-true",
        *strategy,
        "--trainer.max_epochs=1",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={root}",
        f"--model.policy.model_name_or_path={model}",
        "--model.policy.dtype=float32",
        "--model.policy.gradient_checkpointing=false",
        f"--model.output_dir={root}/out",
        "--model.optimizer.lr=1e-3",
        "--model.sampling.samples_per_prompt=3",
        "--model.sampling.max_new_tokens=5",
        "--model.rl.truncated=keep",
        f"--data.dataset={prompts}",
        "--data.subset=null",
        "--data.prompt_column=prompt",
        "--data.answer_column=null",
        "--data.prompt_template={prompt}",
        "--data.use_chat_template=false",
        "--verifier.show_progress=false",
        *extra,
    ]
    path = os.pathsep.join(filter(None, [TESTS, os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=path)
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-4000:]
    written = glob.glob(os.path.join(root, "checkpoints", "*.ckpt"))  # none where a callback names another place
    last = max(written, key=os.path.getmtime) if written else None
    return last and torch.load(last, map_location="cpu", weights_only=True)


FSDP = ["--trainer.strategy.class_path=cpu_fsdp.CPUFSDPStrategy"]
DDP = ["--trainer.strategy=ddp"]
ALGORITHMS = {
    # 7 prompts -> 4 per rank -> 2 rollouts of 2 prompts, 2 updates each
    "online": (["--model.prompts_per_step=2", "--model.rl.inner_updates=2"], 4),
    # 7 prompts x 3 samples -> 21 pairs -> 11 per rank -> 3 batches of 4
    "offline": (
        [
            "--model.rl.algorithm=offline",
            "--model.rl.pairs_per_update=4",
            "--model.rl.kl_coef=0.5",
            "--verifier.sampling.samples_per_prompt=3",
            "--verifier.sampling.max_new_tokens=5",
            "--verifier.selection.truncated=keep",
        ],
        3,
    ),  # fmt: skip
    # 4 rounds of 1 prompt per rank, 2 refits each
    "xpo": (
        [
            "--model.rl.algorithm=xpo",
            "--model.prompts_per_step=1",
            "--model.rl.xpo_updates_per_round=2",
            "--model.rl.pairs_per_update=2",
        ],
        8,
    ),  # fmt: skip
}


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_fsdp_trains_as_ddp(algorithm, tiny_model_path, seven_prompts, tmp_path):
    extra, steps = ALGORITHMS[algorithm]
    ddp = _fit(DDP, tiny_model_path, seven_prompts, tmp_path / "ddp", *extra)
    fsdp = _fit(FSDP, tiny_model_path, seven_prompts, tmp_path / "fsdp", *extra)
    assert ddp["global_step"] == fsdp["global_step"] == steps  # every rank took every update
    assert fsdp["state_dict"].keys() == ddp["state_dict"].keys()
    assert not any("frozen_copy" in k for k in fsdp["state_dict"])  # trainable weights only, whole
    for name, value in ddp["state_dict"].items():
        torch.testing.assert_close(fsdp["state_dict"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    from safetensors.torch import load_file

    base = load_file(os.path.join(tiny_model_path, "model.safetensors"))
    written = load_file(os.path.join(tmp_path, "fsdp", "out", "model.safetensors"))
    assert any(not torch.equal(written[k], base[k]) for k in base)  # it trained
    for name, value in written.items():  # the written policy is the checkpoint's, gathered whole
        torch.testing.assert_close(value, fsdp["state_dict"][f"policy.{name}"], rtol=0, atol=0)
    if algorithm == "xpo":  # each rank grew its own dataset, as under DDP
        assert [len(p) for p in fsdp["xpo"]["pairs_by_rank"]] == [4, 4]
        assert fsdp["xpo"]["pairs_by_rank"] == ddp["xpo"]["pairs_by_rank"]


def test_fsdp_resume_inside_a_rollout_gives_the_straight_run(tiny_model_path, seven_prompts, tmp_path):
    """A checkpoint after the first of a rollout's two updates: both ranks' rollouts are in it, and the resumed
    FSDP run ends with the weights of the straight one."""
    extra, _ = ALGORITHMS["online"]
    every_step = [
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        f"--trainer.callbacks.dirpath={tmp_path}/steps",
        "--trainer.callbacks.every_n_train_steps=1",
        "--trainer.callbacks.save_top_k=-1",
        "--trainer.callbacks.filename={step}",
    ]
    _fit(FSDP, tiny_model_path, seven_prompts, tmp_path / "straight", *extra, *every_step)
    straight = torch.load(tmp_path / "steps" / "step=4.ckpt", map_location="cpu", weights_only=True)
    middle = torch.load(tmp_path / "steps" / "step=1.ckpt", map_location="cpu", weights_only=True)
    assert [r["prompt_indices"].numel() for r in middle["rl_rollout_by_rank"]] == [2, 2]
    resumed = _fit(FSDP, tiny_model_path, seven_prompts, tmp_path / "resumed", *extra,
                   f"--ckpt_path={tmp_path}/steps/step=1.ckpt")  # fmt: skip
    assert resumed["global_step"] == 4
    for name, value in straight["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][name], value, rtol=0, atol=0, msg=name)
