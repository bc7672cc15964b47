"""One self-verification round, no Lightning: sample -> score with the frozen base -> select -> kept examples.

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
from sharpening.engines import SamplingConfig, decode_responses, generate_samples, is_exact_sampling
from sharpening.logprobs import sample_logprobs
from sharpening.metrics import SharpeningMetric
from sharpening.policy import stop_token_ids
from sharpening.rewards import extract_answers, score_samples
from sharpening.selection import SelectionConfig, select_top_k
from sharpening.tasks.extractors import answers_match
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


@dataclass
class RoundModels:
    """The models a round uses, each entered as a context only while it is needed."""

    sampling_model: ModelContext  # the model to sample from (the frozen base or the policy), gradients off
    frozen_base: ModelContext  # the scorer: the frozen base, gradients off
    tokenizer: Any
    logprob_chunk_size: int  # response positions per LM-head chunk when the base scores


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
    metric = SharpeningMetric()
    kept: list[BufferExample] = []
    for prompts in prompt_batches:
        scored, correct, greedy_correct = process_batch(models, prompts, settings, epoch, keep_all)
        kept.extend(selected_examples(scored))
        metric.update(scored, correct, greedy_correct)
    return RoundResult(kept, metric)


def process_batch(
    models: RoundModels, prompts: PromptBatch, settings: RoundSettings, epoch: int, keep_all: bool = False
) -> tuple[ScoredSamples, torch.Tensor | None, torch.Tensor | None]:
    """One batch of prompts: samples scored and selected, plus correctness [B, N] and greedy correctness [B]
    when answers exist (else None)."""
    tokenizer, selection = models.tokenizer, settings.selection
    with models.sampling_model() as model:
        samples = generate_samples(
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
    scored = ScoredSamples(samples, scores, selected, selected_mask)
    if not any(a is not None for a in prompts.answers):
        return scored, None, None
    correct = torch.tensor(
        [[answers_match(a, ref, settings.extractor) for a in group] for group, ref in zip(answers, prompts.answers)]
    )  # [B, N]
    greedy_correct = greedy_correctness(models, prompts, settings) if settings.greedy_accuracy else None
    return scored, correct, greedy_correct


def stopping_top_k(settings: RoundSettings) -> int:
    """k for the sampler's stopping of samples that cannot be among the k kept, or 0 where stopping is not
    exact: the score must be the sum of the sampler's own log-probs (loglik of exact draws from the base)."""
    sampling, selection = settings.sampling, settings.selection
    exact = settings.sample_from == "base" and is_exact_sampling(sampling.temperature, sampling.top_k, sampling.top_p)
    return selection.keep_top_k if settings.stop_unselectable and exact and selection.reward == "loglik" else 0


def score(models: RoundModels, samples: SampleBatch, answers, settings: RoundSettings) -> torch.Tensor:
    """Self-rewards [B, N] from the frozen base; sampler log-probs are reused only when they ARE base
    log-probs of exact draws (sampled from the base at temperature 1 with no truncation, method.md §4.4)."""
    reward = settings.selection.reward
    if reward == "majority":
        return score_samples("majority", answers=answers)
    if settings.sample_from == "base" and samples.exact_draws:
        token_logprobs = samples.logprobs
    else:
        with models.frozen_base() as base:
            token_logprobs = sample_logprobs(base, samples, models.logprob_chunk_size)  # [B, N, T]
    return score_samples(reward, token_logprobs, samples.response_mask)


def greedy_correctness(models: RoundModels, prompts: PromptBatch, settings: RoundSettings) -> torch.Tensor:
    """Whether greedy decoding of the sampled-from model gives the reference answer: [B] bool."""
    tokenizer, extractor = models.tokenizer, settings.extractor
    greedy_cfg = dataclasses.replace(settings.sampling, samples_per_prompt=1, temperature=0.0)
    with models.sampling_model() as model:
        greedy = generate_samples(model, prompts, greedy_cfg, stop_token_ids(model, tokenizer), tokenizer.pad_token_id)
    texts = decode_responses(tokenizer, greedy)
    return torch.tensor([answers_match(extractor(g[0]), ref, extractor) for g, ref in zip(texts, prompts.answers)])
