"""SFT's loss is the token-mean NLL of each optimizer step's examples, however the step is split into
micro-batches (gradient accumulation) and ranks (DDP): responses of 2, 2, 2 and 30 tokens weigh 1/36 per
token whether they come in one batch of 4, two of 2 or four of 1, padded or packed."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from sharpening.buffer import BufferExample
from sharpening.logprobs import response_logprobs
from sharpening.packing import collate_examples
from sharpening.policy import PolicyConfig
from sharpening.sft import SFTSharpeningModule

LENGTHS = [2, 2, 2, 30]


class GradientAtStep(L.Callback):
    """The gradient of every trainable parameter when the first optimizer step is taken."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self.grads:
            self.grads = {n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None}


def _module(path: str, batch_size: int, packing: bool) -> SFTSharpeningModule:
    module = SFTSharpeningModule(
        PolicyConfig(model_name_or_path=path, finetuning="full", dtype="float32"),
        batch_size=batch_size,
        packing=packing,
    )
    tok = module.tokenizer
    examples = [
        BufferExample(tok("ab=").input_ids, tok("abcdefgh"[i] * n, add_special_tokens=False).input_ids, 0.0, i, 0)
        for i, n in enumerate(LENGTHS)
    ]
    assert [len(e.response_ids) for e in examples] == LENGTHS
    module.train_on_examples(examples)
    return module


def _one_step(path: str, batch_size: int, accumulate: int, packing: bool) -> tuple[dict, float]:
    """The gradient of the first optimizer step and the train/loss logged for it."""
    module, seen = _module(path, batch_size, packing), GradientAtStep()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        accumulate_grad_batches=accumulate,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[seen],
    )
    trainer.fit(module)
    return seen.grads, float(trainer.callback_metrics["train/loss_step"])


def _reference(path: str) -> tuple[dict, float]:
    """The gradient and value of the token-mean NLL over all four examples, computed directly."""
    module = _module(path, 4, packing=False)
    module.configure_model()
    batch = collate_examples(module.round_examples(), module.tokenizer.pad_token_id)
    mask = batch.response_mask
    logprobs = response_logprobs(module.policy, batch.prompt_ids, batch.prompt_mask, batch.response_ids, mask)
    loss = -(logprobs * mask).sum() / sum(LENGTHS)
    loss.backward()
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}, float(loss)


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize(("batch_size", "accumulate"), [(4, 1), (2, 2), (1, 4)])
def test_step_gradient_is_the_token_mean_over_all_micro_batches(tiny_model_path, batch_size, accumulate, packing):
    want_grads, want_loss = _reference(tiny_model_path)
    grads, loss = _one_step(tiny_model_path, batch_size, accumulate, packing)
    assert grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert loss == pytest.approx(want_loss, rel=1e-5)  # train/loss: the step's token mean, not its last micro-batch's


class SaveGradientAtStep(GradientAtStep):
    """Rank 0 writes the first step's gradient to ``path`` (ddp_spawn's processes share no memory with the test)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        first = not self.grads
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        if first and trainer.is_global_zero:
            torch.save(self.grads, self.path)


@pytest.mark.slow
def test_two_ddp_ranks_step_with_the_single_batch_gradient(tiny_model_path, tmp_path):
    """2 CPU processes (gloo), 2 micro-batches of one example each: DDP's averaging and the accumulation
    give the token mean over all four examples."""
    want_grads, _ = _reference(tiny_model_path)
    path = str(tmp_path / "grads.pt")
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_steps=1,
        accumulate_grad_batches=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[SaveGradientAtStep(path)],
    )
    trainer.fit(_module(tiny_model_path, batch_size=1, packing=True))
    grads = torch.load(path, weights_only=True)
    assert grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
