"""One self-verification round, no Lightning: sample -> score by the self-reward -> select -> kept examples.

A round selects by best-of-N (``select_by="best_of_n"``: N draws, the best by a self-reward of
``rewards.REWARDS`` kept, scored in ``scoring.score_reward``) or by power sampling (``select_by="power"``: one
draw from pi^alpha per prompt, ``engines.power.power_sample``, kept as the prompt's example: power
self-distillation, scored by its base log-likelihood). Both apply the same truncation rule.

``run_round`` takes the models as contexts, the prompt batches as an iterable and the round's settings, and
returns the kept examples of those prompts with the round's metric sums. The caller (the
SelfVerificationCallback) supplies what depends on the run: this rank's batches with the ranks' turns and
SIGTERM agreement, the FSDP gather, eval mode and weight packing, then gathers the kept examples over ranks,
reduces the metric and logs it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from sharpening.buffer import BufferExample, selected_examples
from sharpening.diagnostics import within_entropy_band
from sharpening.engines import HFEngine, SamplingConfig, SamplingEngine, decode_responses, is_exact_sampling
from sharpening.engines.power import PowerSamplingConfig, power_sample
from sharpening.logprobs import sample_logprobs
from sharpening.metrics import SharpeningMetric
from sharpening.policy import stop_token_ids
from sharpening.rewards import extract_answers, resolve_reward, resolve_task_reward, score_samples
from sharpening.scoring import score_reward, with_task_reward
from sharpening.selection import SelectionConfig, select_top_k
from sharpening.tasks.extractors import answers_match
from sharpening.token_stats import sample_token_stats
from sharpening.types import PromptBatch, SampleBatch, ScoredSamples

ModelContext = Callable[[], contextlib.AbstractContextManager[torch.nn.Module]]


@dataclass
class RoundSettings:
    """How a round draws, scores and selects (the SelfVerificationCallback's options)."""

    sampling: SamplingConfig
    selection: SelectionConfig
    extractor: Callable[[str], Any]  # answer extractor of --verifier.selection.answer_extractor
    sample_from: Literal["base", "policy"] = "base"
    seed: int = 0  # a prompt's samples depend only on (seed, epoch, prompt index)
    greedy_accuracy: bool = True  # also decode greedily when prompts have answers
    stop_unselectable: bool = True  # stop drawing a sample once it can no longer be kept (where exact)
    select_by: Literal["best_of_n", "power"] = "best_of_n"  # N draws and the best kept, or one power sample
    power: PowerSamplingConfig = dataclasses.field(default_factory=PowerSamplingConfig)  # read by select_by power
    log_token_entropy: bool = False  # best-of-N: one no-grad pass of the sampling model for sample/token_entropy


@dataclass
class RoundModels:
    """The models a round uses, each entered as a context only while it is needed, and the engine that draws
    from the sampling model (best-of-N and greedy draws; power samples come from our own loop whatever the engine,
    ``power_sample``)."""

    sampling_model: ModelContext  # the model to sample from (the frozen base or the policy), gradients off
    frozen_base: ModelContext  # the scorer: the frozen base, gradients off
    tokenizer: Any
    logprob_chunk_size: int  # response positions per LM-head chunk when the base scores
    engine: SamplingEngine = dataclasses.field(default_factory=HFEngine)  # draws N per prompt and the greedy runs


@dataclass
class RoundResult:
    """The kept samples of the prompts given to ``run_round`` and the round's metric sums over them."""

    examples: list[BufferExample]  # unpadded, in the order of the batches
    metric: SharpeningMetric  # sums of these batches only; the caller reduces it over ranks


def run_round(
    models: RoundModels,
    prompt_batches: Iterable[PromptBatch],
    settings: RoundSettings,
    epoch: int,
    keep_all: bool = False,
) -> RoundResult:
    """Draw, score and select on each batch of ``prompt_batches``; ``keep_all`` keeps all N samples of
    every prompt (offline RL forms pairs from them) instead of the best ``keep_top_k``."""
    if settings.select_by == "power":
        if keep_all:  # run_checks refuses offline RL with power selection before any weights load
            raise ValueError("power selection draws one sample per prompt: it cannot keep all N")
        return _run_power_round(models, prompt_batches, settings, epoch)
    metric = SharpeningMetric()
    kept: list[BufferExample] = []
    for prompts in prompt_batches:
        scored, correct, greedy_correct = process_batch(models, prompts, settings, epoch, keep_all)
        kept.extend(selected_examples(scored))
        entropy = sampler_token_entropy(models, scored.samples) if settings.log_token_entropy else None
        metric.update(scored, correct, greedy_correct, token_entropy=entropy)
    return RoundResult(kept, metric)


def _run_power_round(
    models: RoundModels, prompt_batches: Iterable[PromptBatch], settings: RoundSettings, epoch: int
) -> RoundResult:
    """``run_round`` selecting by power sampling: one power sample per prompt, kept unless the truncation rule
    or min_score drops it."""
    metric = PowerRoundMetric()
    kept: list[BufferExample] = []
    for prompts in prompt_batches:
        drawn = process_power_batch(models, prompts, settings, epoch)
        kept.extend(selected_examples(drawn.scored))
        metric.update(drawn.scored, drawn.correct, drawn.greedy_correct, drawn.tokens_spent, drawn.acceptance_rate)
    return RoundResult(kept, metric)


def process_batch(
    models: RoundModels, prompts: PromptBatch, settings: RoundSettings, epoch: int, keep_all: bool = False
) -> tuple[ScoredSamples, torch.Tensor | None, torch.Tensor | None]:
    """One batch of prompts: samples scored and selected, plus correctness [B, N] and greedy correctness [B]
    when answers exist (else None)."""
    tokenizer, selection = models.tokenizer, settings.selection
    with models.sampling_model() as model:
        samples = models.engine.generate(
            model, prompts, settings.sampling, stop_token_ids(model, tokenizer), tokenizer.pad_token_id,
            seed=settings.seed, round_index=epoch, stop_unselectable=0 if keep_all else stopping_top_k(settings),
        )  # fmt: skip
    answers = extract_answers(decode_responses(tokenizer, samples), settings.extractor)
    scores = score(models, samples, answers, settings)  # [B, N]
    if samples.pruned is not None:  # stopped samples are partial: not a score, never kept
        scores = scores.masked_fill(samples.pruned.to(scores.device), float("-inf"))
    selected, selected_mask = select_top_k(
        scores.to(samples.truncated.device),
        samples.truncated,
        samples.samples_per_prompt if keep_all else selection.keep_top_k,
        selection.truncated,
        selection.truncation_penalty,
        selection.min_score,
    )
    selected_mask = within_entropy_band(selected_mask, answers, selection.answer_entropy_band)  # [B, K]
    scored = ScoredSamples(samples, scores, selected, selected_mask, answers)
    if not any(a is not None for a in prompts.answers):
        return scored, None, None
    correct = torch.tensor(
        [[answers_match(a, ref, settings.extractor) for a in group] for group, ref in zip(answers, prompts.answers)]
    )  # [B, N]
    greedy_correct = greedy_correctness(models, prompts, settings) if settings.greedy_accuracy else None
    return scored, correct, greedy_correct


def sampler_token_entropy(models: RoundModels, samples: SampleBatch) -> torch.Tensor | None:
    """The next-token entropy [B, N, T] (nats) of the model that drew ``samples`` at each response token: one
    no-grad teacher-forced pass (the sampler does not return the full distribution). None for stopped (partial)
    samples, which the round's diagnostics leave out."""
    if samples.pruned is not None:
        return None
    with models.sampling_model() as model:
        _, stats = sample_token_stats(model, samples, models.logprob_chunk_size)  # TokenStats [B, N, T]
    return stats.entropy


def stopping_top_k(settings: RoundSettings) -> int:
    """k for the sampler's stopping of samples that cannot be among the k kept, or 0 where stopping is not
    exact: the score must be the sum of the sampler's own log-probs (loglik of exact draws from the base, with no
    task reward added)."""
    sampling, selection = settings.sampling, settings.selection
    exact = settings.sample_from == "base" and is_exact_sampling(sampling.temperature, sampling.top_k, sampling.top_p)
    pure_loglik = selection.reward == "loglik" and selection.task_reward is None
    return selection.keep_top_k if settings.stop_unselectable and exact and pure_loglik else 0


def score(models: RoundModels, samples: SampleBatch, answers, settings: RoundSettings) -> torch.Tensor:
    """Scores [B, N] by ``selection.reward`` (plus ``task_reward_weight`` times the task reward when set).

    A base-scored reward is scored by the frozen base; a policy-scored one by the model that drew the samples,
    in this round (``sample_from: policy``: the current policy; ``sample_from: base``: the frozen base, so
    policy_loglik equals loglik there). Sampler log-probs are reused only where they ARE the scorer's of exact
    draws (method.md §4.4); the vocabulary statistics are computed only for rewards that read them."""
    selection = settings.selection
    reward = resolve_reward(selection.reward)
    by_drawer = reward.scored_by == "policy" or settings.sample_from == "base"
    scorer = models.sampling_model if reward.scored_by == "policy" else models.frozen_base
    scores = score_reward(reward, samples, answers, scorer, models.logprob_chunk_size, scorer_drew=by_drawer)
    if selection.task_reward is None:
        return scores
    texts = decode_responses(models.tokenizer, samples)
    task_reward = resolve_task_reward(selection.task_reward)
    return with_task_reward(scores, task_reward, selection.task_reward_weight, texts, samples.prompts.answers)


def greedy_correctness(models: RoundModels, prompts: PromptBatch, settings: RoundSettings) -> torch.Tensor:
    """Whether greedy decoding of the sampled-from model gives the reference answer: [B] bool."""
    tokenizer, extractor = models.tokenizer, settings.extractor
    greedy_cfg = dataclasses.replace(
        settings.sampling, samples_per_prompt=1, temperature=0.0, max_new_tokens=round_max_new_tokens(settings)
    )
    with models.sampling_model() as model:
        eos = stop_token_ids(model, tokenizer)
        greedy = models.engine.generate(model, prompts, greedy_cfg, eos, tokenizer.pad_token_id)
    texts = decode_responses(tokenizer, greedy)
    return torch.tensor([answers_match(extractor(g[0]), ref, extractor) for g, ref in zip(texts, prompts.answers)])


def round_max_new_tokens(settings: RoundSettings) -> int:
    """The longest response the round draws: the power sampler's limit under power selection, else N's."""
    return settings.power.max_new_tokens if settings.select_by == "power" else settings.sampling.max_new_tokens


@dataclass
class PowerBatch:
    """One batch of prompts after power selection: the drawn sample per prompt, scored and selected."""

    scored: ScoredSamples  # samples [B, 1, T], scores [B, 1] base log-likelihood, selected [B, 1]
    tokens_spent: torch.Tensor  # [B] long, tokens the power sampler decoded for each prompt (proposals included)
    acceptance_rate: torch.Tensor | None  # [B] float, MCMC's accepted share of proposals; None for SMC
    correct: torch.Tensor | None  # [B, 1] bool, the power sample gives the reference answer; None without answers
    greedy_correct: torch.Tensor | None  # [B] bool, greedy decoding gives it; None without answers or when off


def process_power_batch(models: RoundModels, prompts: PromptBatch, settings: RoundSettings, epoch: int) -> PowerBatch:
    """One power sample per prompt from the sampling model (seeded by (seed, epoch, prompt index) like best-of-N),
    scored by its base log-likelihood, kept unless the truncation rule or min_score drops it."""
    tokenizer, selection = models.tokenizer, settings.selection
    with models.sampling_model() as model:
        drawn = power_sample(
            model, prompts, settings.power, stop_token_ids(model, tokenizer), tokenizer.pad_token_id,
            seed=settings.seed, round_index=epoch,
        )  # fmt: skip
    samples = drawn.samples  # [B, 1, T]
    scores = power_scores(models, samples, settings)  # [B, 1]
    selected, selected_mask = select_top_k(
        scores.to(samples.truncated.device),
        samples.truncated,
        1,
        selection.truncated,
        selection.truncation_penalty,
        selection.min_score,
    )
    scored = ScoredSamples(samples, scores, selected, selected_mask)
    correct = greedy_correct = None
    if any(a is not None for a in prompts.answers):
        answers = extract_answers(decode_responses(tokenizer, samples), settings.extractor)
        correct = torch.tensor(
            [[answers_match(group[0], ref, settings.extractor)] for group, ref in zip(answers, prompts.answers)]
        )  # [B, 1]
        greedy_correct = greedy_correctness(models, prompts, settings) if settings.greedy_accuracy else None
    return PowerBatch(scored, drawn.tokens_spent, drawn.acceptance_rate, correct, greedy_correct)


def power_scores(models: RoundModels, samples: SampleBatch, settings: RoundSettings) -> torch.Tensor:
    """Base log-likelihood [B, 1] of power samples: the sampler's own temperature-1 log-probs when it sampled
    from the base, else the frozen base's rescoring (``selection.reward`` does not apply: the target is pi^alpha)."""
    if settings.sample_from == "base":
        token_logprobs = samples.logprobs
    else:
        with models.frozen_base() as base:
            token_logprobs = sample_logprobs(base, samples, models.logprob_chunk_size)  # [B, 1, T]
    return score_samples("loglik", token_logprobs, samples.response_mask)


class PowerRoundMetric(SharpeningMetric):
    """SharpeningMetric of a power-selection round (one sample per prompt), with the sampler's cost.

    Reported: ``sample/accuracy`` (the power sample's accuracy), ``sample/greedy_accuracy``, the self-reward
    means (base log-likelihood of the drawn and of the kept samples), ``sample/truncated_fraction``,
    ``sample/kept_per_prompt``, ``sample/tokens_per_kept`` (tokens the sampler decoded per kept example) and,
    for MCMC, ``sample/acceptance_rate`` (mean over prompts). Left out: what needs N samples to choose among
    (``bon_accuracy``, ``pass_at_n``, ``distinct_per_prompt``, ``selected_minus_random``).
    """

    _sums = (*SharpeningMetric._sums, "tokens_spent", "acceptance_sum", "acceptance_prompts")
    _not_applicable = ("bon_accuracy", "pass_at_n", "distinct_per_prompt", "selected_minus_random")

    def update(
        self,
        scored: ScoredSamples,
        correct: torch.Tensor | None = None,
        greedy_correct: torch.Tensor | None = None,
        tokens_spent: torch.Tensor | None = None,
        acceptance_rate: torch.Tensor | None = None,
    ) -> None:
        """As SharpeningMetric's, plus tokens_spent [B] and acceptance_rate [B] (None: not MCMC)."""
        super().update(scored, correct, greedy_correct)
        if tokens_spent is not None:
            self.tokens_spent += tokens_spent.sum().cpu()
        if acceptance_rate is not None:
            self.acceptance_sum += acceptance_rate.double().sum().cpu()
            self.acceptance_prompts += acceptance_rate.numel()

    def compute(self) -> dict[str, torch.Tensor]:
        out = {k: v for k, v in super().compute().items() if k.split("/", 1)[1] not in self._not_applicable}
        out["sample/tokens_per_kept"] = (self.tokens_spent / self.selected.clamp(min=1)).float()
        if self.acceptance_prompts > 0:
            out["sample/acceptance_rate"] = (self.acceptance_sum / self.acceptance_prompts).float()
        return out
