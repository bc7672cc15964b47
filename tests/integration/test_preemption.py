"""SIGTERM writes a resumable checkpoint and exits cleanly; a NaN gradient stops training with the
last good state saved."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from sigterm_hook import SigtermAt

from sharpening.cli import main
from sharpening.safety import LAST_GOOD_CHECKPOINT, PREEMPTED_CHECKPOINT, NonFiniteError
from tests.helpers import REPO_ROOT, verifier_callback

ROOT = str(REPO_ROOT)


def _args(model, prompts, root, *extra):
    return [
        "fit",
        "--config",
        os.path.join(ROOT, "configs", "demo.yaml"),
        f"--model.init_args.policy.model_name_or_path={model}",
        "--model.init_args.policy.finetuning=lora",
        "--model.init_args.policy.lora_r=4",
        "--model.init_args.batch_size=2",
        f"--model.init_args.output_dir={root}/out",
        f"--data.dataset={prompts}",
        "--data.max_prompts=4",
        "--verifier.sampling.samples_per_prompt=3",
        "--verifier.sampling.max_new_tokens=5",
        "--verifier.selection.truncated=keep",
        "--verifier.show_progress=false",
        "--verifier.resample_every_epoch=true",
        "--trainer.max_epochs=2",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={root}",
        *extra,
    ]


def _verifier(cli):
    return verifier_callback(cli.trainer)


def _adapter(cli):
    return {k: v.clone() for k, v in cli.model.state_dict().items()}


# (resample_every_epoch, step at which SIGTERM arrives). Two batches an epoch, two epochs. Without
# resampling Lightning keeps one loader for the whole run: the restart must skip batches in the resumed
# epoch only, and every epoch must keep its own order (step 3: the second batch of the second epoch).
# (True, 0), a round before every epoch, takes over 2 s on 2 CPU cores.
PREEMPTIONS = [pytest.param(True, 0, marks=pytest.mark.slow), (False, 0), (False, 3)]


@pytest.mark.parametrize(("resample", "step"), PREEMPTIONS)
def test_sigterm_during_training_checkpoints_and_resumes(
    resample, step, tiny_model_path, prompts_file, tmp_path, monkeypatch
):
    loader = f"--verifier.resample_every_epoch={str(resample).lower()}"
    full = main(_args(tiny_model_path, prompts_file, tmp_path / "full", loader))
    monkeypatch.setattr(
        "sharpening.module.PolicyModule.configure_callbacks",
        lambda self: [*_safety(), SigtermAt(step=step)],  # mid-epoch: the first or second of two batches
    )
    stopped = main(_args(tiny_model_path, prompts_file, tmp_path / "run", loader))
    assert stopped.trainer.global_step == step + 1  # the batch in flight finished, then the run stopped
    assert (tmp_path / "run" / "checkpoints" / PREEMPTED_CHECKPOINT).is_file()
    assert not (tmp_path / "run" / "out").exists()  # a preempted run writes no final output
    monkeypatch.undo()
    resumed = main(_args(tiny_model_path, prompts_file, tmp_path / "run", loader, "--ckpt_path=last"))
    assert resumed.trainer.global_step == full.trainer.global_step == 4
    assert _verifier(resumed).buffer.state_dict() == _verifier(full).buffer.state_dict()
    for key, value in _adapter(full).items():  # mid-epoch resume is exact: bitwise on CPU
        torch.testing.assert_close(_adapter(resumed)[key], value, rtol=0, atol=0)
    assert (tmp_path / "run" / "out" / "adapter_config.json").is_file()


def test_sigterm_during_gradient_accumulation_stops_after_the_optimizer_step(
    tiny_model_path, prompts_file, tmp_path, monkeypatch
):
    """A checkpoint between accumulated micro-batches would lose their gradients: the run stops once the step
    they accumulate into is taken, and the resumed run ends with the same weights."""
    accumulate = ["--model.init_args.batch_size=1", "--trainer.accumulate_grad_batches=2"]
    full = main(_args(tiny_model_path, prompts_file, tmp_path / "full", *accumulate))
    monkeypatch.setattr(
        "sharpening.module.PolicyModule.configure_callbacks", lambda self: [*_safety(), SigtermAt(step=1)]
    )  # at the first micro-batch of step 1
    stopped = main(_args(tiny_model_path, prompts_file, tmp_path / "run", *accumulate))
    assert stopped.trainer.global_step == 2 and (tmp_path / "run" / "checkpoints" / PREEMPTED_CHECKPOINT).is_file()
    monkeypatch.undo()
    resumed = main(_args(tiny_model_path, prompts_file, tmp_path / "run", *accumulate, "--ckpt_path=last"))
    assert resumed.trainer.global_step == full.trainer.global_step
    for key, value in _adapter(full).items():
        torch.testing.assert_close(_adapter(resumed)[key], value, rtol=0, atol=0)


def _safety():
    from sharpening.safety import NonFiniteGuardCallback, PreemptionCallback

    return [PreemptionCallback(), NonFiniteGuardCallback()]


def test_sigterm_during_the_epoch_end_round_resumes_to_the_same_weights(
    tiny_model_path, prompts_file, tmp_path, monkeypatch
):
    full = main(_args(tiny_model_path, prompts_file, tmp_path / "full"))
    import sharpening.engines.hf as hf_engine  # the round's hf engine draws through it

    real = hf_engine.generate_samples
    calls = {"n": 0}

    def sigterm_in_second_round(*args, **kwargs):
        calls["n"] += 1
        if kwargs.get("round_index") == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(hf_engine, "generate_samples", sigterm_in_second_round)
    stopped = main(_args(tiny_model_path, prompts_file, tmp_path / "run"))
    assert stopped.trainer.global_step == 2 and _verifier(stopped).buffer.epoch == 0  # round 1 abandoned
    assert (tmp_path / "run" / "checkpoints" / PREEMPTED_CHECKPOINT).is_file()
    monkeypatch.undo()
    resumed = main(_args(tiny_model_path, prompts_file, tmp_path / "run", "--ckpt_path=last"))
    assert _verifier(resumed).buffer.state_dict() == _verifier(full).buffer.state_dict()
    for key, value in _adapter(full).items():
        torch.testing.assert_close(_adapter(resumed)[key], value, rtol=0, atol=0)  # bitwise on CPU


def test_sigterm_during_the_first_round_stops_cleanly(tiny_model_path, prompts_file, tmp_path, monkeypatch):
    import sharpening.engines.hf as hf_engine  # the round's hf engine draws through it

    real = hf_engine.generate_samples

    def sigterm(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(hf_engine, "generate_samples", sigterm)
    cli = main(_args(tiny_model_path, prompts_file, tmp_path / "run"))
    assert cli.trainer.global_step == 0 and len(_verifier(cli).buffer) == 0
    assert not (tmp_path / "run" / "out").exists()


def test_nan_gradient_stops_with_the_last_good_state(tiny_model_path, prompts_file, tmp_path, monkeypatch):
    import sharpening.sft as sft

    real = sft.masked_nll
    steps = {"n": 0}

    def nan_on_third_step(*args, **kwargs):
        steps["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if steps["n"] == 3 else loss

    monkeypatch.setattr(sft, "masked_nll", nan_on_third_step)
    with pytest.raises(NonFiniteError, match="non-finite gradient at step 2"):
        main(_args(tiny_model_path, prompts_file, tmp_path / "run"))
    saved = torch.load(tmp_path / "run" / "checkpoints" / LAST_GOOD_CHECKPOINT, map_location="cpu", weights_only=True)
    assert saved["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values())


@pytest.mark.slow
def test_sigkill_while_saving_leaves_the_previous_checkpoint_loadable(tiny_model_path, prompts_file, tmp_path):
    import subprocess
    import sys

    cli = main(_args(tiny_model_path, prompts_file, tmp_path / "run", "--trainer.max_epochs=1"))
    assert type(cli.trainer.strategy.checkpoint_io).__name__ == "AtomicCheckpointIO"
    (previous,) = (tmp_path / "run" / "checkpoints").glob("*.ckpt")
    before = previous.read_bytes()
    code = f"""
import sys, time, torch
from sharpening.checkpoint import AtomicCheckpointIO
def stalled_save(obj, f, *args, **kwargs):
    f.write(b"partial bytes of a big checkpoint")
    f.flush()
    print("writing", flush=True)
    time.sleep(60)
torch.save = stalled_save
AtomicCheckpointIO().save_checkpoint({{"state_dict": {{}}}}, {str(previous)!r})
"""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.kill()  # SIGKILL mid-write
    proc.wait(timeout=30)
    assert previous.read_bytes() == before  # untouched, still loadable
    torch.load(previous, map_location="cpu", weights_only=True)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("*.ckpt")) == [previous.name]
    resumed = main(
        _args(
            tiny_model_path,
            prompts_file,
            tmp_path / "run",
            "--ckpt_path=last",
            "--model.init_args.overwrite_output_dir=true",
        )
    )  # the first run finished and wrote out/
    assert resumed.trainer.global_step == 4  # resumed from the epoch-0 checkpoint and trained epoch 1
