"""configs/fsdp.yaml under Lightning's FSDP strategy with 2 CPU processes (gloo): generation under sharded
parameters, norm clipping, trainable-only checkpoints, the written policy, and exact resume. The strategy
is tests/cpu_fsdp.py's CPU subclass of Lightning's FSDPStrategy (same wrapping, state-dict and optimizer
paths; tests/gpu/test_fsdp.py runs the config unchanged on CUDA)."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import REPO_ROOT, verifier_state

# Every test starts sharpen under FSDP in a subprocess (two CPU ranks), the refusals included.
pytestmark = pytest.mark.slow

ROOT = str(REPO_ROOT)
TESTS = os.path.join(ROOT, "tests")


def _fit(config: str, model: str, prompts: str, root, *extra) -> subprocess.CompletedProcess:
    args = [
        sys.executable,
        "-m",
        "sharpening",
        "fit",
        "--config",
        os.path.join(ROOT, "configs", config),
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        "--trainer.precision=32-true",
        "--trainer.strategy.class_path=cpu_fsdp.CPUFSDPStrategy",
        "--trainer.max_epochs=2",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={root}",
        f"--model.policy.model_name_or_path={model}",
        "--model.policy.dtype=float32",
        "--model.policy.gradient_checkpointing=false",
        f"--data.dataset={prompts}",
        "--data.subset=null",
        "--data.prompt_column=prompt",
        "--data.prompt_template={prompt}",
        "--data.use_chat_template=false",
        *extra,
    ]
    path = os.pathsep.join(filter(None, [TESTS, os.environ.get("PYTHONPATH")]))  # keep what the caller set
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=path)
    return subprocess.run(args, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)


SFT = [
    "--model.batch_size=2",
    "--model.optimizer.lr=1e-3",
    "--verifier.sampling.samples_per_prompt=3",
    "--verifier.sampling.max_new_tokens=5",
    "--verifier.selection.truncated=keep",
    "--verifier.selection.answer_extractor=strip",
    "--verifier.resample_every_epoch=true",
    "--verifier.show_progress=false",
]


def _buffer(checkpoint: dict) -> dict:
    return verifier_state(checkpoint)["buffer"]


def _load(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# with LoRA, the config's bf16-mixed compute and gradient checkpointing (float32 weights: LoRA needs them)
AS_SHIPPED = ["--trainer.precision=bf16-mixed", "--model.policy.gradient_checkpointing=true"]


@pytest.mark.parametrize("finetuning", ["full", "lora"])
def test_fsdp_config_generates_trains_and_writes_whole_weights(finetuning, tiny_model_path, seven_prompts, tmp_path):
    done = _fit(
        "fsdp.yaml",
        tiny_model_path,
        seven_prompts,
        tmp_path,
        *SFT,
        f"--model.policy.finetuning={finetuning}",
        "--model.policy.lora_r=4",
        f"--model.output_dir={tmp_path}/out",
        *(AS_SHIPPED if finetuning == "lora" else []),
    )
    assert done.returncode == 0, done.stderr[-4000:]
    checkpoint = _load(glob.glob(os.path.join(tmp_path, "checkpoints", "*.ckpt"))[0])
    assert checkpoint["global_step"] == 4  # 7 prompts -> 4 per rank -> 2 batches of 2, x 2 epochs
    assert len(_buffer(checkpoint)["examples"]) == 7  # each rank generated its shard under sharded weights
    state = checkpoint["state_dict"]
    assert state and not any("frozen_copy" in k for k in state)  # trainable weights only, whole (not shards)
    if finetuning == "lora":
        assert all("lora_" in k for k in state)
        written = load_file(os.path.join(tmp_path, "out", "adapter_model.safetensors"))
        assert len(written) == len(state)
    else:
        written = load_file(os.path.join(tmp_path, "out", "model.safetensors"))
        base = load_file(os.path.join(tiny_model_path, "model.safetensors"))
        assert {k: v.shape for k, v in written.items()} == {k: v.shape for k, v in base.items()}
        for name, value in written.items():  # the written policy is the checkpoint's, gathered whole
            torch.testing.assert_close(value, state[f"policy.{name}"], rtol=0, atol=0)
        assert any(not torch.equal(written[k], base[k]) for k in base)  # and it trained


def test_fsdp_resume_mid_epoch_and_at_the_epoch_boundary_is_exact(tiny_model_path, seven_prompts, tmp_path):
    every_step = [
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        f"--trainer.callbacks.dirpath={tmp_path}/steps",
        "--trainer.callbacks.every_n_train_steps=1",
        "--trainer.callbacks.save_top_k=-1",
        "--trainer.callbacks.filename={step}",
    ]
    done = _fit(
        "fsdp.yaml",
        tiny_model_path,
        seven_prompts,
        tmp_path / "straight",
        *SFT,
        "--model.policy.finetuning=full",
        f"--model.output_dir={tmp_path}/straight/out",
        *every_step,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    straight = _load(os.path.join(tmp_path, "steps", "step=4.ckpt"))
    for step in (1, 2):  # mid-epoch (each rank skips its own consumed batch) and at the epoch boundary
        root = tmp_path / f"resumed{step}"
        done = _fit(
            "fsdp.yaml",
            tiny_model_path,
            seven_prompts,
            root,
            *SFT,
            "--model.policy.finetuning=full",
            f"--model.output_dir={root}/out",
            f"--ckpt_path={tmp_path}/steps/step={step}.ckpt",
        )
        assert done.returncode == 0, done.stderr[-4000:]
        resumed = _load(glob.glob(os.path.join(root, "checkpoints", "*.ckpt"))[0])
        assert resumed["global_step"] == 4
        assert _buffer(resumed) == _buffer(straight)
        for name, value in straight["state_dict"].items():
            assert torch.equal(resumed["state_dict"][name], value), (step, name)


def test_fsdp_sigterm_on_one_rank_stops_both_and_resumes_exactly(tiny_model_path, seven_prompts, tmp_path, monkeypatch):
    """Under FSDP saving is a collective over the shards: a SIGTERM that reaches rank 1 only must still stop
    both ranks at the same step with a whole checkpoint, and the resumed run must end as a straight one."""
    from sharpening.safety import PREEMPTED_CHECKPOINT

    full = ["--model.policy.finetuning=full"]
    done = _fit("fsdp.yaml", tiny_model_path, seven_prompts, tmp_path / "straight", *SFT, *full,
                f"--model.output_dir={tmp_path}/straight/out")  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    straight = _load(glob.glob(os.path.join(tmp_path, "straight", "checkpoints", "epoch=*.ckpt"))[0])
    hook = os.path.join(ROOT, "tests", "integration")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [hook, os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("SIGTERM_RANKS", "1")
    monkeypatch.setenv("SIGTERM_AT_STEP", "1")
    root = tmp_path / "run"
    done = _fit("fsdp.yaml", tiny_model_path, seven_prompts, root, *SFT, *full, f"--model.output_dir={root}/out",
                "--trainer.callbacks+=sigterm_hook.SigtermAt")  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    assert _load(os.path.join(root, "checkpoints", PREEMPTED_CHECKPOINT))["global_step"] == 2
    assert not (root / "out").exists()  # a preempted run writes no policy
    monkeypatch.delenv("SIGTERM_RANKS")
    done = _fit("fsdp.yaml", tiny_model_path, seven_prompts, root, *SFT, *full, f"--model.output_dir={root}/out",
                "--ckpt_path=last")  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    resumed = _load(glob.glob(os.path.join(root, "checkpoints", "epoch=*.ckpt"))[0])
    assert resumed["global_step"] == straight["global_step"] == 4
    for name, value in straight["state_dict"].items():
        assert torch.equal(resumed["state_dict"][name], value), name


@pytest.mark.parametrize(
    "config, extra, message",
    [
        (
            "fsdp.yaml",
            [*SFT, "--model.policy.finetuning=lora", "--model.policy.dtype=bfloat16"],
            ["--model.policy.dtype=bfloat16: LoRA under FSDP needs float32 weights", "--model.policy.dtype float32"],
        ),
        (
            "fsdp.yaml",
            [*SFT, "--model.policy.finetuning=qlora"],
            ["--model.policy.finetuning=qlora: QLoRA does not run under FSDP"],
        ),
        (
            "rl_fsdp.yaml",
            ["--model.rl.algorithm=xpo", "--model.rl.heldout_prompts=2", "--model.sampling.max_new_tokens=8"],
            ["--model.rl.heldout_prompts=2: under FSDP XPO cannot keep the best round's weights"],
        ),
    ],
    ids=["lora-bf16", "qlora", "xpo-heldout"],
)
def test_what_fsdp_cannot_shard_is_refused_before_weights_load(
    config, extra, message, tiny_model_path, seven_prompts, tmp_path
):
    done = _fit(config, tiny_model_path, seven_prompts, tmp_path, *extra)
    assert done.returncode != 0
    for part in message:
        assert part in done.stderr
    assert "Loading weights" not in done.stderr
