"""SFTSharpeningModule: maximum likelihood on the self-selected best-of-N samples (SPEC 3.1).

The SelfVerificationCallback fills ``self.buffer`` with (prompt, best response) pairs scored by the
frozen base; this module minimises the NLL of the response tokens, prompt tokens masked.
Deviation from the paper: it may resample every epoch (``verifier.resample_every_epoch``); the paper
samples once.
"""

from __future__ import annotations

from functools import partial

import torch
from torch.utils.data import DataLoader

from sharpening.buffer import SampleBuffer, collate_examples, epoch_sampler
from sharpening.logprobs import response_logprobs
from sharpening.losses import masked_nll
from sharpening.optim import OptimizerConfig
from sharpening.policy import PolicyConfig
from sharpening.policy_module import PolicyModule, plain_hparams
from sharpening.sampler import derive_seed


class SFTSharpeningModule(PolicyModule):
    """Fine-tune the policy on its own best-of-N samples (selected by the frozen base's log-likelihood)."""

    def __init__(
        self,
        policy: PolicyConfig,
        optimizer: OptimizerConfig = OptimizerConfig(),
        batch_size: int = 8,
        shuffle_seed: int = 0,
        output_dir: str | None = None,
        overwrite_output_dir: bool = False,
        logprob_chunk_size: int = 1024,
    ) -> None:
        """
        Args:
            policy: The model to sharpen and how it trains (full, lora, qlora).
            optimizer: AdamW settings and learning-rate schedule.
            batch_size: Selected samples per optimizer step (per device).
            shuffle_seed: Seed of the order in which buffer samples are visited each epoch.
            output_dir: Where the fitted policy (full model or PEFT adapter) is written at the end; null = nowhere.
            overwrite_output_dir: Allow writing into a non-empty output_dir.
            logprob_chunk_size: Response positions per LM-head chunk (bounds logits memory).
        """
        problems = [] if batch_size >= 1 else [f"--model.batch_size={batch_size}: must be >= 1"]
        super().__init__(policy, optimizer, output_dir, overwrite_output_dir, logprob_chunk_size, problems)
        self.save_hyperparameters(plain_hparams(locals()))
        self.batch_size = batch_size
        self.shuffle_seed = shuffle_seed
        self.buffer: SampleBuffer | None = None  # attached by SelfVerificationCallback.setup
        self.ensure_buffer = lambda epoch: None  # replaced by SelfVerificationCallback.setup

    def train_dataloader(self) -> DataLoader:
        if self.buffer is None:
            raise RuntimeError(
                "SFTSharpeningModule trains on samples selected by a SelfVerificationCallback; "
                "add one (the `sharpen` CLI adds it as `verifier:`)"
            )
        self.ensure_buffer(self.current_epoch)  # the self-verification round for this epoch, if due
        seed = derive_seed(self.shuffle_seed, self.current_epoch)
        return DataLoader(
            self.buffer,
            batch_size=self.batch_size,
            sampler=epoch_sampler(self._trainer, len(self.buffer), seed, self.batch_size),
            collate_fn=partial(collate_examples, pad_token_id=self.tokenizer.pad_token_id),
        )

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        token_logprobs = response_logprobs(
            self.policy,
            batch["prompt_ids"],
            batch["prompt_mask"],
            batch["response_ids"],
            batch["response_mask"],
            chunk_size=self.logprob_chunk_size,
        )  # [B, T]
        loss = masked_nll(token_logprobs, batch["response_mask"])
        size = batch["response_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=size, sync_dist=True)
        self.log("train/response_tokens", batch["response_mask"].sum().float(), batch_size=size, reduce_fx="sum")
        return loss
