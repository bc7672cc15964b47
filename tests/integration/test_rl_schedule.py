"""The learning-rate schedule's length under RL-sharpening's several updates per batch, and the warning when a
resume's limits change it (PolicyModule, so SFT-sharpening too). Tiny model, 6 prompts, short runs."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from sharpening.callbacks import SelfVerificationCallback
from sharpening.engines import SamplingConfig
from sharpening.optim import OptimizerConfig
from sharpening.policy import PolicyConfig
from sharpening.prompts import PromptDataModule
from sharpening.rl import RLConfig, RLSharpeningModule
from sharpening.selection import SelectionConfig
from sharpening.sft import SFTSharpeningModule

LR = 1e-3
SAMPLING = SamplingConfig(samples_per_prompt=2, max_new_tokens=3)


class _RecordLR(Callback):
    """The learning rate each optimizer step runs at."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.lrs.append(optimizer.param_groups[0]["lr"])


def _rl(path: str, schedule: str = "linear", inner_updates: int = 1) -> RLSharpeningModule:
    return RLSharpeningModule(
        PolicyConfig(model_name_or_path=path, finetuning="lora", lora_r=4, dtype="float32"),
        rl=RLConfig(inner_updates=inner_updates),
        sampling=SAMPLING,
        optimizer=OptimizerConfig(lr=LR, schedule=schedule),
        prompts_per_step=3,  # 6 prompts: 2 batches an epoch
    )


def _sft(path: str, schedule: str = "linear") -> SFTSharpeningModule:
    return SFTSharpeningModule(
        PolicyConfig(model_name_or_path=path, finetuning="lora", lora_r=4, dtype="float32"),
        optimizer=OptimizerConfig(lr=LR, schedule=schedule),
        batch_size=3,  # 6 kept samples: 2 batches an epoch
    )


def _fit(module, prompts_file, root, max_epochs=-1, max_steps=-1, ckpt_path=None, callbacks=()):
    callbacks = list(callbacks)
    if isinstance(module, SFTSharpeningModule):
        keep = SelectionConfig(truncated="keep")  # a kept sample per prompt, cut or not: 6 in all
        callbacks.append(SelfVerificationCallback(SAMPLING, keep, greedy_accuracy=False, show_progress=False))
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=max_epochs,
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
        callbacks=callbacks,
        enable_checkpointing=True,
    )
    trainer.fit(module, datamodule=PromptDataModule(prompts_file), ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize(
    "max_epochs, max_steps, steps",
    [
        (-1, 12, 12),  # max_steps counts optimizer steps: 3 batches of 4 updates
        (2, -1, 16),  # 2 epochs x 2 batches x 4 updates
        (2, 10, 12),  # both: max_steps ends first, after the batch that reaches it
    ],
)
def test_linear_schedule_reaches_zero_at_the_last_optimizer_step(
    max_epochs, max_steps, steps, tiny_model_path, prompts_file, tmp_path
):
    record = _RecordLR()
    trainer = _fit(
        _rl(tiny_model_path, inner_updates=4), prompts_file, tmp_path, max_epochs, max_steps, callbacks=[record]
    )
    assert trainer.global_step == steps
    assert record.lrs == pytest.approx([LR * (1 - k / steps) for k in range(steps)], rel=1e-9, abs=0)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # the schedule has ended


def _schedule_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "learning-rate schedule" in str(w.message)]


@pytest.mark.parametrize("kind", ["rl", "sft"])
def test_resume_with_other_limits_warns_that_the_schedule_changes(kind, tiny_model_path, prompts_file, tmp_path):
    """A checkpoint after step 1 of a one-epoch run (2 steps): resuming with the same limits continues its
    schedule silently; with 2 epochs the schedule grows from 2 to 4 steps, and the warning says so."""
    make = {"rl": _rl, "sft": _sft}[kind]
    every_step = ModelCheckpoint(
        dirpath=str(tmp_path / "first"), every_n_train_steps=1, save_top_k=-1, filename="{step}"
    )
    _fit(make(tiny_model_path), prompts_file, tmp_path / "first", max_epochs=1, callbacks=[every_step])
    ckpt = str(tmp_path / "first" / "step=1.ckpt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(make(tiny_model_path), prompts_file, tmp_path / "same", max_epochs=1, ckpt_path=ckpt)
    assert not _schedule_warnings(caught)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = _fit(make(tiny_model_path), prompts_file, tmp_path / "longer", max_epochs=2, ckpt_path=ckpt)
    assert trainer.global_step == 4
    (message,) = _schedule_warnings(caught)
    assert message.startswith(
        "--trainer.max_epochs=2 / --trainer.max_steps=-1: the checkpoint was written with "
        "--trainer.max_epochs=1 / --trainer.max_steps=-1"
    )
    assert "spans 2 optimizer steps" in message and "make it 4" in message
    assert "resume with the limits the checkpoint was written with" in message


def test_resume_with_other_limits_keeps_a_constant_schedule_silently(tiny_model_path, prompts_file, tmp_path):
    every_step = ModelCheckpoint(
        dirpath=str(tmp_path / "first"), every_n_train_steps=1, save_top_k=-1, filename="{step}"
    )
    _fit(_rl(tiny_model_path, "constant"), prompts_file, tmp_path / "first", max_epochs=1, callbacks=[every_step])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ckpt = str(tmp_path / "first" / "step=1.ckpt")
        _fit(_rl(tiny_model_path, "constant"), prompts_file, tmp_path / "longer", max_epochs=2, ckpt_path=ckpt)
    assert not _schedule_warnings(caught)
