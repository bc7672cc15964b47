"""SelfVerificationCallback: when rounds run, the ranks' turns, SIGTERM, the buffer and the round's logging.

The module asks for the epoch's examples (``PolicyModule.round_examples``) when Lightning builds that
epoch's loader, which is BEFORE ``on_train_epoch_start`` (and, after a resume, without re-running the
hooks of the restored epoch), so the round for epoch e runs exactly when epoch e's data is asked for;
dataloaders reload every epoch with ``resample_every_epoch`` (else one loader serves the whole run). The
round itself is ``verifier.run_round``. Each rank samples its own shard of prompts; the kept samples are
gathered so every rank holds the same, rank-independent buffer (Lightning's distributed sampler then
gives each rank the same number of batches). The buffer is checkpointed through ``state_dict``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from functools import partial
from typing import Literal

import lightning as L
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from sharpening.buffer import BufferExample, SampleBuffer
from sharpening.engines import SamplingConfig, validate_sampling_config
from sharpening.engines.power import PowerSamplingConfig, validate_power_config
from sharpening.errors import RunStoppedError, raise_if_problems
from sharpening.kernels.cpu_linear import packed_linear_weights
from sharpening.module import PolicyModule
from sharpening.policy import eval_mode
from sharpening.prompts import PromptDataModule
from sharpening.run_checks import run_problems, run_warnings
from sharpening.safety import preempt, sigterm_agreed
from sharpening.selection import SelectionConfig, validate_selection_config
from sharpening.tasks.extractors import resolve_extractor
from sharpening.types import PromptBatch
from sharpening.verifier import RoundModels, RoundSettings, round_max_new_tokens, run_round


class SelfVerificationCallback(L.Callback):
    """Each round: N samples per prompt, scored by the self-reward, the best kept for training (or, with
    ``select_by: power``, one power sample per prompt kept: power self-distillation)."""

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
        select_by: Literal["best_of_n", "power"] = "best_of_n",
        power: PowerSamplingConfig = PowerSamplingConfig(),
        log_token_entropy: bool = False,
    ) -> None:
        """
        Args:
            sampling: How responses are drawn (N, temperature, top-k/p, max_new_tokens).
            selection: Self-reward (any of ``sharpening.rewards.REWARDS`` or an import path), an optional task
                reward and its weight, how many samples to keep, treatment of truncated responses.
            sample_from: Draw from the frozen ``base`` (the paper) or the current ``policy``. Base-scored rewards
                (loglik, ...) are scored by the base; policy-scored ones (self_certainty, ...) by the model that
                drew, in the same round: with ``base``, that is the base too.
            resample_every_epoch: Run a new round before every epoch (else once, before the first).
            greedy_accuracy: When prompts have answers, also decode greedily to report greedy accuracy.
            seed: Seed of the draws; a prompt's samples depend only on (seed, epoch, prompt index).
            show_progress: Show a progress bar while generating (rank zero).
            stop_unselectable: Stop drawing a sample once it can no longer be kept (exact: loglik reward, exact
                draws from the base); the first draw per prompt is always completed for the sample/ statistics.
                Best-of-N only.
            select_by: ``best_of_n`` keeps the best of N draws by self-reward; ``power`` keeps one sample of
                pi^alpha per prompt drawn by ``power`` (its score: base log-likelihood; sampling, reward and
                stop_unselectable unused).
            power: How power samples are drawn (method mcmc|smc, alpha, blocks, steps, particles, max_new_tokens,
                prompts_per_batch); read only with ``select_by: power``.
            log_token_entropy: Log ``sample/token_entropy``, the sampling model's mean next-token entropy over
                the responses (best-of-N); costs one no-grad teacher-forced pass of the sampling model per batch.
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
        problems += _power_problems(select_by, power, self.selection)
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
        self.select_by = select_by
        self.power = power
        self.log_token_entropy = log_token_entropy
        self.buffer = SampleBuffer()
        self.rounds_done = 0
        self.last_metrics: dict[str, float] = {}
        self._logged_epoch: int | None = None  # the epoch whose first batch logged last_metrics to Lightning

    # -- Lightning hooks -------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Refuse what the sections cannot do together (``run_checks``; the CLI checked it before, Python API
        users get it here) and warn of what they leave unused (here only, so once per run on either path).
        With ``resample_every_epoch`` Lightning must rebuild the loader every epoch, so each epoch's loader asks
        for its own round: the trainer holds that setting, so it is set here."""
        module = _policy_module(pl_module)
        raise_if_problems(run_problems(module, trainer.datamodule, trainer))
        for warning in run_warnings(module, trainer):
            rank_zero_warn(warning)
        if self.resample_every_epoch and module.trains_on != "prompts":
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
        self.last_metrics = dict(state_dict.get("last_metrics", {}))  # a state without last_metrics: none to show
        if state_dict["seed"] != self.seed:
            rank_zero_warn(f"resuming with --verifier.seed={self.seed}, the checkpoint used {state_dict['seed']}")

    def examples_for_epoch(self, trainer: L.Trainer, pl_module: L.LightningModule, epoch: int) -> list[BufferExample]:
        """The kept samples epoch ``epoch`` trains on; the round runs first when one is due. Asked when Lightning
        builds that epoch's loader, at every epoch start and after a resume, so no hook ordering skips a round."""
        if self._needs_round(epoch):
            self.run_round(trainer, pl_module, epoch)
        return self.buffer.examples

    def _needs_round(self, epoch: int) -> bool:
        if self.buffer.epoch is None:
            return True
        return self.resample_every_epoch and self.buffer.epoch != epoch

    def round_settings(self) -> RoundSettings:
        """This callback's options as the round reads them."""
        return RoundSettings(
            self.sampling,
            self.selection,
            self.extractor,
            self.sample_from,
            self.seed,
            self.greedy_accuracy,
            self.stop_unselectable,
            self.select_by,
            self.power,
            self.log_token_entropy,
        )

    @property
    def max_new_tokens(self) -> int:
        """The longest response a round draws (the context check adds it to the longest prompt)."""
        return round_max_new_tokens(self.round_settings())

    def round_models(self, module: PolicyModule) -> RoundModels:
        """The module's model to sample from (``sample_from``) and its frozen base, as contexts, and the module's
        engine for ``sampling.engine``."""
        return RoundModels(
            partial(module.sampling_model, self.sample_from),
            module.frozen_base,
            module.tokenizer,
            module.logprob_chunk_size,
            module.sampling_engine(self.sampling),
        )

    # -- one round ---------------------------------------------------------------------------------
    def run_round(self, trainer: L.Trainer, pl_module: L.LightningModule, epoch: int) -> dict[str, float]:
        """Sample, score, select on this rank's prompts (``verifier.run_round``); gather the kept samples of
        every rank into the buffer, reduce and log the metrics.

        On SIGTERM the round is abandoned between prompt batches (the buffer keeps its previous round,
        so a resumed run draws this round again, identically) and the run stops."""
        module, data = _policy_module(pl_module), trainer.datamodule
        if not isinstance(data, PromptDataModule):
            raise RuntimeError("SelfVerificationCallback needs a PromptDataModule (the `data:` section)")
        turns = AgreedTurns(trainer, *self._progress(trainer, data, epoch, module.device))
        # the weights are packed for oneDNN once per round, not once per batch (kernels/cpu_linear.py)
        models = self.round_models(module)
        with eval_mode(module.policy), module.gathered_for_generation(), packed_linear_weights(module):
            result = run_round(models, turns, self.round_settings(), epoch, module.trains_on == "all_samples")
        models.engine.idle()  # the trainer has the device until the next round
        if turns.stopped or sigterm_agreed(trainer):  # abandon the round: a resumed run redraws it identically
            preempt(trainer, f"during self-verification (epoch {epoch})")
        kept = _gather_examples(result.examples, trainer.world_size)
        if not kept:
            raise RunStoppedError(
                f"self-verification kept no sample in epoch {epoch}: every response was ineligible: truncated (no EOS "
                "within max_new_tokens), under --verifier.selection.min_score, or scored NaN/inf (weights or logits "
                "that are not finite). Raise --verifier.sampling.max_new_tokens or set --verifier.selection.truncated "
                "keep; lower or unset min_score; check the model's weights"
            )
        self.buffer.replace(kept, epoch)
        self.rounds_done += 1
        metric = result.metric.to(module.device)  # NCCL reduces device tensors only; the counts are summed on CPU
        self.last_metrics = {k: float(v) for k, v in metric.compute().items()}
        self.last_metrics["sample/buffer_size"] = float(len(self.buffer))
        self.last_metrics |= _max_over_ranks(models.engine.metrics(), trainer.world_size)
        for logger in trainer.loggers:  # at the step the round ran
            logger.log_metrics(self.last_metrics, step=trainer.global_step)
        rank_zero_info(f"self-verification epoch {epoch}: " + _format_metrics(self.last_metrics))
        return self.last_metrics

    def _progress(self, trainer: L.Trainer, data: PromptDataModule, epoch: int, device) -> tuple:
        """This rank's prompt batches under a progress bar (rank zero), with the number of turns every rank takes."""
        from tqdm.auto import tqdm

        power = self.select_by == "power"
        per_batch = self.power.prompts_per_batch if power else self.sampling.prompts_per_batch
        draws = f"N={self.sampling.samples_per_prompt}"
        if power:
            draws = f"power {self.power.method}, alpha={self.power.alpha}"
        shard = math.ceil(max(len(data) - trainer.global_rank, 0) / trainer.world_size)
        batches = data.prompt_batches(per_batch, trainer.global_rank, trainer.world_size, device=device)
        bar = tqdm(
            batches,
            total=math.ceil(shard / per_batch),
            desc=f"self-verification (epoch {epoch}, {draws})",
            disable=not (self.show_progress and trainer.is_global_zero),
            leave=False,
        )
        return bar, math.ceil(math.ceil(len(data) / trainer.world_size) / per_batch)


class AgreedTurns:
    """This rank's prompt batches, one per turn, stopping when the ranks agree on SIGTERM (``stopped``).

    Every rank takes as many turns as the largest shard has batches and the ranks agree on SIGTERM before
    each, so a signal on any rank stops all of them within one batch (not after every shard is drawn)."""

    def __init__(self, trainer: L.Trainer, batches, turns: int) -> None:
        self.trainer, self.batches, self.turns = trainer, batches, turns
        self.stopped = False

    def __iter__(self) -> Iterator[PromptBatch]:
        batches = iter(self.batches)
        for _ in range(self.turns):
            prompts = next(batches, None)  # None: this rank's shard is done, it still takes its turn
            self.stopped = sigterm_agreed(self.trainer)
            if self.stopped:
                return
            if prompts is not None:
                yield prompts


def _policy_module(pl_module: L.LightningModule) -> PolicyModule:
    """``pl_module`` as the PolicyModule the round needs (its models, tokenizer and ``trains_on``)."""
    if not isinstance(pl_module, PolicyModule):
        raise TypeError(
            f"SelfVerificationCallback needs a PolicyModule (SFTSharpeningModule or RLSharpeningModule), got "
            f"{type(pl_module).__name__}"
        )
    return pl_module


def _power_problems(select_by: str, power: PowerSamplingConfig, selection: SelectionConfig) -> list[str]:
    """``--verifier.select_by`` and, when it is power, ``--verifier.power`` and what best-of-N options it
    cannot honour (one sample per prompt: nothing to keep a top k of)."""
    if select_by not in ("best_of_n", "power"):
        return [f"--verifier.select_by={select_by!r}: must be best_of_n or power"]
    if select_by != "power":
        return []
    problems = validate_power_config(power, "--verifier.power")
    if selection.keep_top_k != 1:
        problems.append(
            f"--verifier.selection.keep_top_k={selection.keep_top_k}: --verifier.select_by=power draws one sample "
            "per prompt, so it keeps at most 1; set keep_top_k 1, or select_by best_of_n to keep several"
        )
    return problems


def _gather_examples(examples: list[BufferExample], world_size: int) -> list[BufferExample]:
    """Every rank's kept samples, on every rank."""
    if world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return examples
    gathered: list[list[BufferExample]] = [[] for _ in range(world_size)]
    dist.all_gather_object(gathered, examples)
    return [e for part in gathered for e in part]


def _max_over_ranks(metrics: dict[str, float], world_size: int) -> dict[str, float]:
    """Each metric's largest value over the ranks (the engine's parity gap: the worst rank's is the one to see).
    Gathered as objects: a rank whose shard drew nothing may report no metric at all."""
    if world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return dict(metrics)
    gathered: list[dict[str, float]] = [{} for _ in range(world_size)]
    dist.all_gather_object(gathered, metrics)
    out: dict[str, float] = {}
    for part in gathered:
        for name, value in part.items():
            out[name] = max(out.get(name, value), float(value))
    return out


def _format_metrics(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k.split('/', 1)[1]}={v:.4g}" for k, v in sorted(metrics.items()))
