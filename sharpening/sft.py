"""SFTSharpeningModule: maximum likelihood on the self-selected best-of-N samples (SPEC 3.1).

The SelfVerificationCallback fills ``self.buffer`` with (prompt, best response) pairs scored by the
frozen base; this module minimises the NLL of the response tokens, prompt tokens masked.
With ``packing`` the examples of a batch are concatenated into a few rows (each attending only to
itself) instead of padded: the same examples and the same token-mean loss, without padding compute.
Deviation from the paper: it may resample every epoch (``verifier.resample_every_epoch``); the paper
samples once.
"""

from __future__ import annotations

from functools import partial

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader

from sharpening.buffer import SampleBuffer, collate_examples, collate_packed, epoch_sampler, no_round
from sharpening.logprobs import packed_response_logprobs, packing_problem, response_logprobs
from sharpening.losses import masked_nll
from sharpening.optim import OptimizerConfig
from sharpening.policy import PolicyConfig
from sharpening.policy_module import PolicyModule, config_from, plain_hparams


class SFTSharpeningModule(PolicyModule):
    """Fine-tune the policy on its own best-of-N samples (selected by the frozen base's log-likelihood)."""

    def __init__(
        self,
        policy: PolicyConfig,
        optimizer: OptimizerConfig | None = None,
        batch_size: int = 8,
        shuffle_seed: int = 0,
        output_dir: str | None = None,
        overwrite_output_dir: bool = False,
        logprob_chunk_size: int = 256,
        packing: bool = True,
        pack_length: int = 512,
    ) -> None:
        """
        Args:
            policy: The model to sharpen and how it trains (full, lora, qlora).
            optimizer: AdamW settings and learning-rate schedule (null: OptimizerConfig's defaults, lr 3e-4 linear).
            batch_size: Selected samples per optimizer step (per device).
            shuffle_seed: Seed of the order in which buffer samples are visited each epoch.
            output_dir: Where the fitted policy (full model or PEFT adapter) is written at the end; null = nowhere.
            overwrite_output_dir: Replace a non-empty output_dir (its old contents go once the new policy is written in full).
            logprob_chunk_size: Response positions per LM-head chunk (bounds logits memory).
            packing: Concatenate each batch's examples into rows instead of padding them: same loss, less compute.
            pack_length: Most tokens per packed row, or the batch's longest example if longer; shorter rows are
                chosen per batch when dense attention over long rows would cost more than the padding they
                save (buffer.collate_packed).
        """
        optimizer = config_from(optimizer, OptimizerConfig) or OptimizerConfig()  # (None: a config without the section)
        problems = [] if batch_size >= 1 else [f"--model.batch_size={batch_size}: must be >= 1"]
        if pack_length < 0:
            problems.append(f"--model.pack_length={pack_length}: must be >= 0 (0 = the longest example of each batch)")
        super().__init__(policy, optimizer, output_dir, overwrite_output_dir, logprob_chunk_size, problems)
        self.save_hyperparameters(plain_hparams(locals()))
        self.batch_size = batch_size
        self.shuffle_seed = shuffle_seed
        self.packing = packing
        self.pack_length = pack_length
        self.buffer: SampleBuffer | None = None  # attached by SelfVerificationCallback.setup
        self.ensure_buffer = no_round  # replaced by SelfVerificationCallback.setup (a plain function: picklable)

    def train_dataloader(self) -> DataLoader:
        if self.buffer is None:
            raise RuntimeError(
                "SFTSharpeningModule trains on samples selected by a SelfVerificationCallback; "
                "add one (the `sharpen` CLI adds it as `verifier:`)"
            )
        self.ensure_buffer(self.current_epoch)  # the self-verification round for this epoch, if due
        return DataLoader(
            self.buffer,
            batch_size=self.batch_size,
            sampler=epoch_sampler(self._trainer, len(self.buffer), self.shuffle_seed, self.batch_size),
            collate_fn=self._collate_fn(),
        )

    def _collate_fn(self):
        """collate_packed when packing is on and exact for the loaded policy, else collate_examples."""
        pad_token_id = self.tokenizer.pad_token_id
        problem = "the policy is not loaded yet" if self.policy is None else packing_problem(self.policy)
        if self.packing and problem is None:
            dense = self.policy.config._attn_implementation != "flash_attention_2"  # flash: attention per example
            span = 6 * self.policy.get_input_embeddings().embedding_dim if dense else None
            return partial(collate_packed, pad_token_id=pad_token_id, pack_length=self.pack_length, attention_span=span)
        if self.packing:
            rank_zero_warn(f"--model.packing=true: training on padded batches instead ({problem})")
        return partial(collate_examples, pad_token_id=pad_token_id)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if "input_ids" in batch:  # packed (collate_packed)
            token_logprobs = packed_response_logprobs(self.policy, batch, chunk_size=self.logprob_chunk_size)  # [R, L]
            size = batch["response_lengths"].shape[0]
        else:
            token_logprobs = response_logprobs(
                self.policy,
                batch["prompt_ids"],
                batch["prompt_mask"],
                batch["response_ids"],
                batch["response_mask"],
                chunk_size=self.logprob_chunk_size,
            )  # [B, T]
            size = batch["response_ids"].shape[0]
        loss = masked_nll(token_logprobs, batch["response_mask"])  # mean over the same response tokens either way
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=size, sync_dist=True)
        self.log("train/response_tokens", batch["response_mask"].sum().float(), batch_size=size, reduce_fx="sum",
                 sync_dist=True)
        return loss
