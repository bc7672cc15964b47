"""SelfVerificationCallback: sample -> score with the frozen base -> select -> fill the buffer.

Lightning asks for the train dataloader BEFORE ``on_train_epoch_start`` (and, after a resume, without
re-running the hooks of the restored epoch), so the round for epoch e runs exactly when the module's
``train_dataloader`` is asked for epoch e's data (``ensure_buffer``); dataloaders reload every epoch with
``resample_every_epoch`` (else one loader serves the whole run). Each rank samples its
own shard of prompts; the selected samples are gathered so every rank holds the same, rank-independent
buffer (Lightning's distributed sampler then gives each rank the same number of batches).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from sharpening.buffer import BufferExample, SampleBuffer, selected_examples
from sharpening.cpu_linear import packed_linear_weights
from sharpening.errors import RunStoppedError, raise_if_problems
from sharpening.logprobs import sample_logprobs
from sharpening.metrics import SharpeningMetric
from sharpening.model_checks import token_ids_problem
from sharpening.policy import eval_mode, stop_token_ids
from sharpening.safety import preempt, sigterm_agreed
from sharpening.rewards import extract_answers, score_samples
from sharpening.sampler import (
    SamplingConfig,
    decode_responses,
    generate_samples,
    is_exact_sampling,
    decode_device_problems,
    validate_sampling_config,
)
from sharpening.selection import SelectionConfig, select_top_k, validate_selection_config
from sharpening.tasks.extractors import answers_match, resolve_extractor
from sharpening.types import PromptBatch, SampleBatch, ScoredSamples


class SelfVerificationCallback(L.Callback):
    """Each round: N samples per prompt, scored by the frozen base, the best kept for training."""

    def __init__(
        self,
        sampling: SamplingConfig = SamplingConfig(),
        selection: SelectionConfig = SelectionConfig(),
        sample_from: Literal["base", "policy"] = "base",
        resample_every_epoch: bool = False,
        greedy_accuracy: bool = True,
        seed: int = 0,
        show_progress: bool = True,
        stop_unselectable: bool = True,
    ) -> None:
        """
        Args:
            sampling: How responses are drawn (N, temperature, top-k/p, max_new_tokens).
            selection: Self-reward, how many samples to keep, treatment of truncated responses.
            sample_from: Draw from the frozen ``base`` (the paper) or the current ``policy``; scores always come from the base.
            resample_every_epoch: Run a new round before every epoch (else once, before the first).
            greedy_accuracy: When prompts have answers, also decode greedily to report greedy accuracy.
            seed: Seed of the draws; a prompt's samples depend only on (seed, epoch, prompt index).
            show_progress: Show a progress bar while generating (rank zero).
            stop_unselectable: Stop drawing a sample once it can no longer be kept (exact: loglik reward, exact
                draws from the base); the first draw per prompt is always completed for the sample/ statistics.
        """
        super().__init__()
        self.sampling = sampling
        self.selection = selection
        problems = validate_sampling_config(self.sampling, "--verifier.sampling")
        problems += validate_selection_config(self.selection, self.sampling.samples_per_prompt, "--verifier.selection")
        if sample_from not in ("base", "policy"):
            problems.append(f"--verifier.sample_from={sample_from!r}: must be base or policy")
        if self.sampling.temperature == 0 and self.sampling.samples_per_prompt > 1:
            problems.append(
                "--verifier.sampling.temperature=0 is greedy: all N samples would be identical; use temperature 1.0"
            )
        try:
            self.extractor = resolve_extractor(self.selection.answer_extractor)
        except ValueError as err:
            problems.append(f"--verifier.selection.answer_extractor: {err}")
        raise_if_problems(problems)
        self.sample_from = sample_from
        self.resample_every_epoch = resample_every_epoch
        self.greedy_accuracy = greedy_accuracy
        self.seed = seed
        self.show_progress = show_progress
        self.stop_unselectable = stop_unselectable
        self.buffer = SampleBuffer()
        self.rounds_done = 0
        self.last_metrics: dict[str, float] = {}
        self._logged_epoch: int | None = None  # the epoch whose first batch logged last_metrics to Lightning

    # -- Lightning hooks -------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        sharded = bool(getattr(pl_module, "sharded", False))
        device = trainer.strategy.root_device
        problems = decode_device_problems(self.sampling, device, "--verifier.sampling", sharded)
        if getattr(getattr(pl_module, "rl", None), "algorithm", None) == "offline" and self.selection.reward != "loglik":
            problems.append(  # Eq. 8 reads each kept sample's score as its summed base log-probability
                f"--verifier.selection.reward={self.selection.reward}: offline RL-sharpening uses each sample's score "
                "as log pi_base(y|x) in its squared loss, so it needs --verifier.selection.reward loglik"
            )
        offline = getattr(getattr(pl_module, "rl", None), "algorithm", None) == "offline"
        if offline and self.selection.truncated == "penalize":  # all N kept, pairs hold raw scores: penalty lost
            problems.append(
                "--verifier.selection.truncated=penalize: offline RL-sharpening keeps every sample and reads its raw "
                "score as log pi_base(y|x), so the penalty would not reach its loss (truncated samples would train as "
                "with keep); use drop (the default) or keep, or algorithm online or xpo with --model.rl.truncated penalize"
            )
        raise_if_problems(problems)
        data = trainer.datamodule
        if data is not None and getattr(data, "prompt_ids", None) and hasattr(pl_module, "policy_config"):
            module_sampling = getattr(pl_module, "sampling", None)  # RL samples with its own settings
            mine = self.sampling.max_new_tokens if hasattr(pl_module, "buffer") else 0  # used only for a buffer
            max_new = max(mine, getattr(module_sampling, "max_new_tokens", 0))
            raise_if_problems(context_problems(pl_module.policy_config, data.prompt_ids, max_new, pl_module.tokenizer))
        if not hasattr(pl_module, "buffer"):  # the module does not train from a buffer (e.g. on-policy RL)
            if hasattr(pl_module, "sampling") and (self.sampling, self.selection) != (SamplingConfig(), SelectionConfig()):
                algorithm = getattr(getattr(pl_module, "rl", None), "algorithm", type(pl_module).__name__)
                rank_zero_warn(
                    f"--verifier.sampling / --verifier.selection are set but not used: algorithm {algorithm!r} draws "
                    "its own samples with --model.sampling (the verifier's round feeds only offline RL and SFT)"
                )
            return
        pl_module.buffer = self.buffer
        pl_module.ensure_buffer = lambda epoch: self.ensure_round(trainer, pl_module, epoch)
        if self.resample_every_epoch:
            trainer.reload_dataloaders_every_n_epochs = 1

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        """The round ran while Lightning built this epoch's loader, where ``log`` is not allowed: the metrics of
        the round behind this epoch's buffer are logged at the epoch's first batch (also the first batch after a
        mid-epoch resume, which skips on_train_epoch_start; they are in the checkpoint), to Lightning only (the
        loggers got them at the round's step), so ModelCheckpoint and EarlyStopping can monitor e.g.
        ``sample/accuracy``. Every rank holds the same reduced values."""
        if self.last_metrics and self._logged_epoch != trainer.current_epoch:
            pl_module.log_dict(self.last_metrics, on_step=False, on_epoch=True, logger=False)
            self._logged_epoch = trainer.current_epoch

    def state_dict(self) -> dict:
        return {"buffer": self.buffer.state_dict(), "rounds_done": self.rounds_done, "seed": self.seed,
                "last_metrics": self.last_metrics}  # fmt: skip

    def load_state_dict(self, state_dict: dict) -> None:
        self.buffer.load_state_dict(state_dict["buffer"])
        self.rounds_done = state_dict["rounds_done"]
        self.last_metrics = dict(state_dict.get("last_metrics", {}))  # (older checkpoints: none)
        if state_dict["seed"] != self.seed:
            rank_zero_warn(f"resuming with --verifier.seed={self.seed}, the checkpoint used {state_dict['seed']}")

    def examples_for_epoch(self, trainer: L.Trainer, pl_module: L.LightningModule, epoch: int) -> list[BufferExample]:
        """The kept samples epoch ``epoch`` trains on; the round runs first when one is due. Asked when Lightning
        builds that epoch's loader, at every epoch start and after a resume, so no hook ordering skips a round."""
        if self._needs_round(epoch):
            self.run_round(trainer, pl_module, epoch)
        return self.buffer.examples

    def ensure_round(self, trainer: L.Trainer, pl_module: L.LightningModule, epoch: int) -> None:
        """Make the buffer hold epoch ``epoch``'s round. Called when Lightning asks for that epoch's data,
        at every epoch start and after a resume (mid-epoch or not), so no hook ordering can skip a round."""
        if self._needs_round(epoch):
            self.run_round(trainer, pl_module, epoch)

    def _needs_round(self, epoch: int) -> bool:
        if self.buffer.epoch is None:
            return True
        return self.resample_every_epoch and self.buffer.epoch != epoch

    # -- one round ---------------------------------------------------------------------------------
    def run_round(self, trainer: L.Trainer, pl_module: L.LightningModule, epoch: int) -> dict[str, float]:
        """Sample, score, select on this rank's prompts; gather the kept samples into the buffer.

        On SIGTERM the round is abandoned between prompt batches (the buffer keeps its previous round,
        so a resumed run draws this round again, identically) and the run stops."""
        from tqdm.auto import tqdm

        data = trainer.datamodule
        if data is None or not hasattr(data, "prompt_batches"):
            raise RuntimeError("SelfVerificationCallback needs a PromptDataModule (the `data:` section)")
        per_batch = self.sampling.prompts_per_batch
        shard = math.ceil(max(len(data) - trainer.global_rank, 0) / trainer.world_size)
        batches = data.prompt_batches(per_batch, trainer.global_rank, trainer.world_size, device=pl_module.device)
        metric = SharpeningMetric()
        kept: list[BufferExample] = []
        bar = tqdm(
            batches,
            total=math.ceil(shard / per_batch),
            desc=f"self-verification (epoch {epoch}, N={self.sampling.samples_per_prompt})",
            disable=not (self.show_progress and trainer.is_global_zero),
            leave=False,
        )
        # Every rank takes as many turns as the largest shard has batches and the ranks agree on SIGTERM before
        # each, so a signal on any rank stops all of them within one batch (not after every shard is drawn).
        turns, shard_batches = math.ceil(math.ceil(len(data) / trainer.world_size) / per_batch), iter(bar)
        stopped = False
        # the weights are packed for oneDNN once per round, not once per batch (cpu_linear.py)
        with eval_mode(pl_module.policy), pl_module.gathered_for_generation(), packed_linear_weights(pl_module):
            for _ in range(turns):
                prompts = next(shard_batches, None)  # None: this rank's shard is done, it still takes its turn
                if stopped := sigterm_agreed(trainer):
                    break
                if prompts is not None:
                    scored, correct, greedy_correct = self.process_batch(pl_module, prompts, epoch)
                    kept.extend(selected_examples(scored))
                    metric.update(scored, correct, greedy_correct)
        if stopped or sigterm_agreed(trainer):  # abandon the round: a resumed run redraws it identically
            preempt(trainer, f"during self-verification (epoch {epoch})")
        kept = _gather_examples(kept, trainer.world_size)
        if not kept:
            raise RunStoppedError(
                f"self-verification kept no sample in epoch {epoch}: every response was ineligible: truncated (no EOS "
                "within max_new_tokens), under --verifier.selection.min_score, or scored NaN/inf (weights or logits "
                "that are not finite). Raise --verifier.sampling.max_new_tokens or set --verifier.selection.truncated "
                "keep; lower or unset min_score; check the model's weights"
            )
        self.buffer.replace(kept, epoch)
        self.rounds_done += 1
        metric = metric.to(pl_module.device)  # NCCL reduces device tensors only; the counts are summed on CPU
        self.last_metrics = {k: float(v) for k, v in metric.compute().items()}
        self.last_metrics["sample/buffer_size"] = float(len(self.buffer))
        for logger in trainer.loggers:  # at the step the round ran
            logger.log_metrics(self.last_metrics, step=trainer.global_step)
        rank_zero_info(f"self-verification epoch {epoch}: " + _format_metrics(self.last_metrics))
        return self.last_metrics

    def process_batch(
        self, pl_module: L.LightningModule, prompts: PromptBatch, epoch: int
    ) -> tuple[ScoredSamples, torch.Tensor | None, torch.Tensor | None]:
        """One batch of prompts: samples scored and selected, plus correctness when answers exist."""
        tokenizer = pl_module.tokenizer
        pad = tokenizer.pad_token_id
        keep_all = getattr(pl_module, "keep_all_samples", False)  # e.g. offline RL forms pairs from all N
        with pl_module.sampling_model(self.sample_from) as model:
            eos = stop_token_ids(model, tokenizer)
            samples = generate_samples(
                model, prompts, self.sampling, eos, pad, seed=self.seed, round_index=epoch,
                stop_unselectable=0 if keep_all else self.stopping_top_k(),
            )
        texts = decode_responses(tokenizer, samples)
        answers = extract_answers(texts, self.extractor)
        scores = self.score(pl_module, samples, answers)
        if samples.pruned is not None:  # stopped samples are partial: not a score, never kept
            scores = scores.masked_fill(samples.pruned.to(scores.device), float("-inf"))
        selected, selected_mask = select_top_k(
            scores.to(samples.truncated.device),
            samples.truncated,
            samples.samples_per_prompt if keep_all else self.selection.keep_top_k,
            self.selection.truncated,
            self.selection.truncation_penalty,
            self.selection.min_score,
        )
        scored = ScoredSamples(samples, scores, selected, selected_mask)
        if not any(a is not None for a in prompts.answers):
            return scored, None, None
        correct = torch.tensor(
            [[answers_match(a, ref, self.extractor) for a in group] for group, ref in zip(answers, prompts.answers)]
        )  # [B, N]
        greedy_correct = self.greedy_correctness(pl_module, prompts) if self.greedy_accuracy else None
        return scored, correct, greedy_correct

    def stopping_top_k(self) -> int:
        """k for the sampler's stopping of samples that cannot be among the k kept, or 0 where stopping is not
        exact: the score must be the sum of the sampler's own log-probs (loglik of exact draws from the base)."""
        exact = self.sample_from == "base" and is_exact_sampling(
            self.sampling.temperature, self.sampling.top_k, self.sampling.top_p
        )
        return self.selection.keep_top_k if self.stop_unselectable and exact and self.selection.reward == "loglik" else 0

    def score(self, pl_module: L.LightningModule, samples: SampleBatch, answers) -> torch.Tensor:
        """Self-rewards [B, N] from the frozen base; sampler log-probs are reused only when they ARE base
        log-probs of exact draws (sampled from the base at temperature 1 with no truncation, SPEC 4.4)."""
        if self.selection.reward == "majority":
            return score_samples("majority", answers=answers)
        if self.sample_from == "base" and samples.exact_draws:
            token_logprobs = samples.logprobs
        else:
            with pl_module.frozen_base() as base:
                token_logprobs = sample_logprobs(base, samples, pl_module.logprob_chunk_size)
        return score_samples(self.selection.reward, token_logprobs, samples.response_mask)

    def greedy_correctness(self, pl_module: L.LightningModule, prompts: PromptBatch) -> torch.Tensor:
        """Whether greedy decoding of the sampled-from model gives the reference answer: [B] bool."""
        tokenizer = pl_module.tokenizer
        greedy_cfg = dataclasses.replace(self.sampling, samples_per_prompt=1, temperature=0.0)
        with pl_module.sampling_model(self.sample_from) as model:
            greedy = generate_samples(model, prompts, greedy_cfg, stop_token_ids(model, tokenizer), tokenizer.pad_token_id)
        texts = decode_responses(tokenizer, greedy)
        return torch.tensor(
            [answers_match(self.extractor(g[0]), ref, self.extractor) for g, ref in zip(texts, prompts.answers)]
        )


def context_problems(policy_config, prompt_ids: list[list[int]], max_new_tokens: int, tokenizer=None) -> list[str]:
    """Prompts that cannot fit the model's context with max_new_tokens more, and token ids of ``tokenizer`` past
    the model's vocabulary (reads config.json only)."""
    from transformers import AutoConfig

    name = policy_config.model_name_or_path
    config = AutoConfig.from_pretrained(name, trust_remote_code=policy_config.trust_remote_code, revision=policy_config.revision)
    problems = []
    if tokenizer is not None and (problem := token_ids_problem(tokenizer, prompt_ids, getattr(config, "vocab_size", None))):
        problems.append(f"--model.policy.model_name_or_path={name!r}: {problem}")
    context = getattr(config, "max_position_embeddings", None)
    longest = max(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    need = len(prompt_ids[longest]) + max_new_tokens
    if context is None or need <= context:
        return problems
    return problems + [
        f"--data.dataset: prompt {longest} has {len(prompt_ids[longest])} tokens; with "
        f"max_new_tokens={max_new_tokens} that is {need} > the model's context of {context}; "
        "shorten the prompts (few-shot prefix, template), lower max_new_tokens, or set --data.max_prompts"
    ]


def _gather_examples(examples: list[BufferExample], world_size: int) -> list[BufferExample]:
    """Every rank's kept samples, on every rank."""
    if world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return examples
    gathered: list[list[BufferExample]] = [[] for _ in range(world_size)]
    dist.all_gather_object(gathered, examples)
    return [e for part in gathered for e in part]


def _format_metrics(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k.split('/', 1)[1]}={v:.4g}" for k, v in sorted(metrics.items()))
