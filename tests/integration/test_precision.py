"""16-mixed (fp16 with a gradient scaler), run on CPU through Lightning's MixedPrecision plugin, in the same
order of operations as on CUDA: RL clips the unscaled gradient, and the non-finite guard leaves the scaler's
overflows to the scaler but still stops on a real NaN."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision

from sharpening.buffer import BufferExample
from sharpening.engines import SamplingConfig
from sharpening.policy import PolicyConfig
from sharpening.prompts import PromptDataModule
from sharpening.rl import RLConfig, RLSharpeningModule
from sharpening.safety import LAST_GOOD_CHECKPOINT, NonFiniteError
from sharpening.sft import SFTSharpeningModule


def _fp16(init_scale: float) -> MixedPrecision:
    return MixedPrecision("16-mixed", device="cpu", scaler=torch.amp.GradScaler("cpu", init_scale=init_scale))


def _trainer(root, max_steps: int, init_scale: float, callbacks=()) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        max_epochs=-1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(root),
        plugins=[_fp16(init_scale)],
        callbacks=list(callbacks),
    )


class GradNormAtStep(L.Callback):
    """The total gradient norm the optimizer itself sees, at every step it takes (after unscaling and clipping)."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_train_start(self, trainer, pl_module) -> None:
        trainer.optimizers[0].register_step_pre_hook(self._record)

    def _record(self, optimizer, args, kwargs) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))


@pytest.mark.slow
def test_rl_clips_the_unscaled_gradient_under_16_mixed(tiny_model_path, prompts_file, tmp_path):
    module = RLSharpeningModule(
        PolicyConfig(model_name_or_path=tiny_model_path, finetuning="lora", lora_r=4, dtype="float32"),
        rl=RLConfig(max_grad_norm=1e-3),
        sampling=SamplingConfig(samples_per_prompt=2, max_new_tokens=4),
        prompts_per_step=2,
    )
    seen = GradNormAtStep()
    trainer = _trainer(tmp_path, max_steps=2, init_scale=256.0, callbacks=[seen])
    trainer.fit(module, datamodule=PromptDataModule(prompts_file))
    assert trainer.precision_plugin.scaler.get_scale() == 256.0  # no overflow: every step was taken
    assert len(seen.norms) == 2
    for norm in seen.norms:  # clipped to 1e-3 itself, not to 1e-3 / 256
        assert norm == pytest.approx(1e-3, rel=1e-3)


def _sft(tiny_model_path, batch_size: int = 2) -> SFTSharpeningModule:
    module = SFTSharpeningModule(
        PolicyConfig(model_name_or_path=tiny_model_path, finetuning="lora", lora_r=4, dtype="float32"),
        batch_size=batch_size,
    )
    tok = module.tokenizer
    words = ["abcd", "bcde", "cdef", "defg"]
    response_ids = [tok(w[::-1], add_special_tokens=False).input_ids + [tok.eos_token_id] for w in words]
    prompt_ids = [tok(w + "=").input_ids for w in words]
    examples = [BufferExample(p, r, 0.0, i, 0) for i, (p, r) in enumerate(zip(prompt_ids, response_ids))]
    module.train_on_examples(examples)
    return module


def test_sft_at_the_default_scale_skips_overflows_and_trains(tiny_model_path, tmp_path):
    module = _sft(tiny_model_path)
    module.configure_model()
    trainer = _trainer(tmp_path, max_steps=12, init_scale=2.0**16)
    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    trainer.fit(module)
    assert trainer.global_step == 12  # past step 0: the overflowing steps were skipped, not fatal
    assert trainer.precision_plugin.scaler.get_scale() < 2.0**16  # the scaler lowered its scale
    assert any(not torch.equal(before[n], p) for n, p in module.named_parameters() if p.requires_grad)


def test_sft_16_mixed_stops_on_a_nan_loss(tiny_model_path, tmp_path):
    module = _sft(tiny_model_path)
    module.configure_model()
    with torch.no_grad():
        module.policy.get_input_embeddings().weight[:] = float("nan")  # poisoned weights: every loss is NaN
    with pytest.raises(NonFiniteError, match="non-finite gradient at step 0 .the loss was non-finite"):
        _trainer(tmp_path, max_steps=4, init_scale=2.0**16).fit(module)
    assert (tmp_path / "checkpoints" / LAST_GOOD_CHECKPOINT).is_file()


def test_sft_16_mixed_stops_on_a_nan_gradient_once_the_scale_is_at_its_floor(tiny_model_path, tmp_path):
    module = _sft(tiny_model_path)
    module.configure_model()
    weight = next(p for p in module.parameters() if p.requires_grad)
    weight.register_hook(lambda grad: grad * float("nan"))  # a finite loss with a NaN gradient
    trainer = _trainer(tmp_path, max_steps=4, init_scale=2.0)
    floor = "non-finite gradient at step 1 .the 16-mixed gradient scaler's scale was 1,"
    with pytest.raises(NonFiniteError, match=floor):
        trainer.fit(module)  # step 0 (scale 2) is skipped as an overflow; at scale 1 it cannot be one
