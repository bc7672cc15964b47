"""SFTSharpeningModule: maximum likelihood on the self-selected best-of-N samples (method.md §3.1).

It trains on the (prompt, best response) pairs the SelfVerificationCallback keeps, scored by the frozen
base (``trains_on`` "selected", ``round_examples``), and minimises the NLL of the response tokens, prompt
tokens masked.
With ``packing`` the examples of a batch are concatenated into a few rows (each attending only to
itself) instead of padded: the same examples and the same token-mean loss, without padding compute.

Loss normalization: each optimizer step minimises the token-mean NLL of ALL its examples, every response
token weighing 1 / (response tokens of the step), the step being its ``accumulate_grad_batches``
micro-batches on every rank. Its gradient is then the same however the step is split into micro-batches
and ranks (a per-micro-batch mean would weigh a token by 1 / (tokens of its own micro-batch)). The step's
token count is known before its micro-batches run: every rank holds the whole buffer and the epoch's
order depends only on (``shuffle_seed``, epoch) (``prompts.batch_response_tokens``). Each micro-batch's
loss is its NLL sum / (step tokens), times ``accumulate_grad_batches`` x world size, which Lightning's
loss division and DDP/FSDP's gradient averaging take out again. ``train/loss`` is the step's token mean.
Deviation from the paper: it may resample every epoch (``verifier.resample_every_epoch``); the paper
samples once.
"""

from __future__ import annotations

from functools import partial

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader

from sharpening.buffer import BufferExample
from sharpening.errors import raise_if_problems
from sharpening.logprobs import response_logprobs
from sharpening.losses import masked_nll
from sharpening.module import PolicyModule, TrainsOn, config_from, plain_hparams
from sharpening.optim import OptimizerConfig
from sharpening.packing import collate_examples, collate_packed, packed_response_logprobs, packing_problem
from sharpening.policy import PolicyConfig
from sharpening.prompts import batch_response_tokens, epoch_sampler
from sharpening.types import PackedBatch, PaddedBatch


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
            overwrite_output_dir: Replace a non-empty output_dir (its contents go once the fitted policy is written
                in full).
            logprob_chunk_size: Response positions per LM-head chunk (bounds logits memory).
            packing: Concatenate each batch's examples into rows instead of padding them: same loss, less compute.
            pack_length: Most tokens per packed row, or the batch's longest example if longer; shorter rows are
                chosen per batch when dense attention over long rows would cost more than the padding they
                save (packing.collate_packed).
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
        self._examples: list[BufferExample] = []  # the current loader's examples (round_examples)
        self._batch_tokens: tuple[int, list[list[int]]] | None = None  # (epoch, response tokens [rank][batch])
        self._step_nll = torch.zeros(())  # the current optimizer step's NLL parts so far (this rank)

    @property
    def trains_on(self) -> TrainsOn:
        """The round's kept (best-of-N) samples."""
        return "selected"

    def train_dataloader(self) -> DataLoader:
        self._examples = self.round_examples()  # the self-verification round for this epoch runs if due
        self._batch_tokens = None  # the examples may be new: count their batches again
        return DataLoader(
            self._examples,
            batch_size=self.batch_size,
            sampler=epoch_sampler(self._trainer, len(self._examples), self.shuffle_seed, self.batch_size),
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

    def setup(self, stage: str) -> None:
        """Refuse, before any weights load, a trainer option that replaces the module's epoch order: the loss
        is normalized over each optimizer step's tokens, counted from that order."""
        super().setup(stage)
        if self.trainer.overfit_batches:
            raise_if_problems(
                [
                    f"--trainer.overfit_batches={self.trainer.overfit_batches}: SFT-sharpening normalizes its loss "
                    "over each optimizer step's response tokens, counted from its own order of the selected samples, "
                    "which overfit_batches replaces; use --trainer.limit_train_batches instead"
                ]
            )

    def training_step(self, batch: PaddedBatch | PackedBatch, batch_idx: int) -> torch.Tensor:
        if isinstance(batch, PackedBatch):
            token_logprobs = packed_response_logprobs(self.policy, batch, chunk_size=self.logprob_chunk_size)  # [R, L]
        else:
            token_logprobs = response_logprobs(
                self.policy,
                batch.prompt_ids,
                batch.prompt_mask,
                batch.response_ids,
                batch.response_mask,
                chunk_size=self.logprob_chunk_size,
            )  # [B, T]
        if self._trainer is None:  # a direct call, outside fit: this batch's own token mean
            return masked_nll(token_logprobs, batch.response_mask)
        step_tokens, step_ends = self._step_tokens(batch_idx, batch.response_mask)
        # this micro-batch's part of the step's token mean (the same response tokens, packed or padded)
        part = masked_nll(token_logprobs, batch.response_mask, token_count=step_tokens)
        self._log_step_loss(part, batch_idx, step_tokens, step_ends)
        # Lightning divides the loss by accumulate_grad_batches and DDP/FSDP average the ranks' gradients:
        # undo both, so the step's gradient is the sum of the parts' gradients over its micro-batches and ranks
        return part * self.trainer.accumulate_grad_batches * self.trainer.world_size

    def _step_tokens(self, batch_idx: int, response_mask: torch.Tensor) -> tuple[int, bool]:
        """Response tokens of the optimizer step that batch ``batch_idx`` belongs to (its micro-batches on
        every rank), and whether this batch ends the step. Lightning steps after every
        ``accumulate_grad_batches`` batches and after the epoch's last one."""
        trainer, counts = self.trainer, self._epoch_batch_tokens()
        mine, tokens = counts[trainer.global_rank], int(response_mask.sum())
        expected = mine[batch_idx] if batch_idx < len(mine) else 0  # 0: no such batch in the epoch's order
        if tokens != expected:
            raise RuntimeError(
                f"SFT batch {batch_idx} of epoch {self.current_epoch} (rank {trainer.global_rank}) holds {tokens} "
                f"response tokens where the module's epoch order has {expected}. "
                "The loss is normalised over each optimizer step's tokens, counted from that order, so training "
                "needs the module's own sampler; drop options that replace it (e.g. --trainer.overfit_batches)"
            )
        accumulate = trainer.accumulate_grad_batches
        start = batch_idx - batch_idx % accumulate
        end = min(start + accumulate, trainer.num_training_batches)
        return sum(sum(rank[start:end]) for rank in counts), batch_idx + 1 == end

    def _epoch_batch_tokens(self) -> list[list[int]]:
        """Response tokens of each batch of this epoch on each rank, [rank][batch], counted once per epoch
        from the buffer and the epoch's order (``batch_response_tokens``)."""
        epoch = self.current_epoch
        if self._batch_tokens is None or self._batch_tokens[0] != epoch:
            world_size = self.trainer.world_size
            counts = batch_response_tokens(self._examples, self.shuffle_seed, epoch, self.batch_size, world_size)
            self._batch_tokens = (epoch, counts)
        return self._batch_tokens[1]

    def _log_step_loss(self, part: torch.Tensor, batch_idx: int, step_tokens: int, step_ends: bool) -> None:
        """At the step's last micro-batch, log the step's token-mean NLL (``train/loss``; its epoch value is
        the epoch's token mean) and response tokens."""
        if batch_idx % self.trainer.accumulate_grad_batches == 0:
            self._step_nll = torch.zeros_like(part)
        self._step_nll = self._step_nll + part.detach()
        if not step_ends:
            return
        # each rank logs world_size x its parts: their mean over ranks (sync_dist) is the sum of all parts
        loss = self._step_nll * self.trainer.world_size
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=step_tokens, sync_dist=True)
        self.log("train/response_tokens", float(step_tokens))  # already over every rank
