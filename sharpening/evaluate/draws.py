"""Drawing and scoring the samples of `sharpen evaluate`: one prompt batch per (kind, seed), from the cache or the
sampler, scored as the training round scores (token log-probs, then ``rewards.score_samples``) and reduced to
what the protocol needs (:class:`~sharpening.evaluate.protocol.SeedDraws`).

Draws are exact at temperature 1, so the sampler's log-probs ARE the drawing model's log-likelihoods (method.md §4.4):
they are rescored teacher-forced only for ``score_with: base`` or another temperature. Power samples
(``--protocol.power``) carry the model's temperature-1 log-probs too, so they are scored the same way.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from sharpening.engines import HFEngine, SamplingConfig, SamplingEngine, decode_responses
from sharpening.engines.power import POWER_FORMAT, power_sample
from sharpening.evaluate.cache import DrawCache, sample_tensors
from sharpening.evaluate.config import ProtocolConfig
from sharpening.evaluate.power_rows import power_row_name, power_sampling_config
from sharpening.evaluate.protocol import SELF_REWARDS, PowerDraws, SeedDraws, answer_codes
from sharpening.kernels.cpu_linear import packed_linear_weights
from sharpening.logprobs import sample_logprobs
from sharpening.policy import frozen_base, stop_token_ids
from sharpening.prompts import PromptDataModule
from sharpening.rewards import SelfReward, extract_answers, resolve_reward, score_samples
from sharpening.tasks.extractors import answers_match, resolve_extractor
from sharpening.token_stats import sample_token_stats
from sharpening.types import PromptBatch, SampleBatch


@dataclass
class DrawContext:
    """Everything needed to draw, cache and score one batch of prompts."""

    model: torch.nn.Module
    base: torch.nn.Module | None
    tokenizer: object
    data: PromptDataModule
    protocol: ProtocolConfig
    score_with: str
    cache: DrawCache
    engine: SamplingEngine = field(default_factory=HFEngine)  # draws the sampled and greedy batches (not power rows)


@dataclass
class EvalDraws:
    """Every draw of one evaluation, reduced (no text, no model)."""

    per_seed: list[SeedDraws]  # one per seed, [P, N_max] per field
    greedy: SeedDraws  # the greedy run, [P, 1] per field
    power: dict[str, list[PowerDraws]]  # row method name (config.power_row_name) -> one per seed, [P, 1]


def rescored_rewards(protocol: ProtocolConfig, score_with: str) -> list[str]:
    """The rows' rewards whose scores take a teacher-forced pass (``score_draws``): those that read the vocabulary
    statistics, and those that read log-probs of a model that did not draw the samples exactly (scored by the
    base, or drawn at another temperature)."""
    exact = protocol.temperature == 1.0
    out = []
    for name in protocol.rewards:
        reward = resolve_reward(name)
        own = _scorer(reward, score_with) == "self" and exact
        if reward.needs_stats or (reward.needs_logprobs and not own):
            out.append(name)
    return out


def _scorer(reward: SelfReward, score_with: str) -> str:
    """Which model scores ``reward``: ``self`` (the evaluated model, which drew) or ``base``."""
    return "self" if reward.scored_by == "policy" else score_with


def score_draws(
    samples: SampleBatch,
    model,
    base,
    score_with: str,
    rewards: Sequence[str] = SELF_REWARDS,
    answers: list[list[str | None]] | None = None,
) -> dict[str, torch.Tensor]:
    """``loglik`` and each of ``rewards`` for every draw: {name: [B, N] float32 on the CPU}.

    Base-scored rewards (loglik among them) are scored by the ``score_with`` model, policy-scored ones by the
    evaluated model, which drew. The sampler's log-probs are reused only for exact draws scored by the model that
    drew them (method.md §4.4); otherwise each scoring model takes ONE teacher-forced pass
    (sharpening.logprobs), with the vocabulary statistics when one of its rewards reads them. ``answers`` [B][N]:
    the extracted answers, for rewards of the answers.
    """
    entries = {name: resolve_reward(name) for name in dict.fromkeys(("loglik", *rewards))}
    with_stats = {_scorer(e, score_with) for e in entries.values() if e.needs_stats}
    passes: dict[str, tuple] = {}  # scoring model -> (token_logprobs [B, N, T], TokenStats or None)

    def scorer_pass(who: str) -> tuple:
        if who not in passes:
            context = contextlib.nullcontext(model) if who == "self" else frozen_base(model, base)
            with torch.no_grad(), context as scorer:
                if who in with_stats:
                    passes[who] = sample_token_stats(scorer, samples)  # ([B, N, T], TokenStats)
                else:
                    passes[who] = (sample_logprobs(scorer, samples), None)  # [B, N, T]
        return passes[who]

    out = {}
    for name, reward in entries.items():
        who, token_logprobs, stats = _scorer(reward, score_with), None, None
        if reward.needs_stats:
            token_logprobs, stats = scorer_pass(who)
        elif reward.needs_logprobs:
            own = who == "self" and samples.exact_draws
            token_logprobs = samples.logprobs if own else scorer_pass(who)[0]
        out[name] = score_samples(reward, token_logprobs, samples.response_mask, answers, stats).cpu()  # [B, N]
    return out


def reduce_draws(
    samples: SampleBatch, scores: dict[str, torch.Tensor], tokenizer, extractor, answers=None
) -> SeedDraws:
    """What the protocol needs from a batch of draws: correctness, answer codes, scores, lengths, truncation.
    ``answers`` [B][N]: the draws' extracted answers when already read (else extracted here)."""
    if answers is None:
        answers = extract_answers(decode_responses(tokenizer, samples), extractor)
    correct = torch.tensor(
        [[answers_match(a, ref, extractor) for a in group] for group, ref in zip(answers, samples.prompts.answers)]
    )  # [B, N]
    return SeedDraws(correct, answer_codes(answers), scores, samples.lengths.cpu(), samples.truncated.cpu())


def score_and_reduce(ctx: DrawContext, samples: SampleBatch) -> SeedDraws:
    """``score_draws`` by the protocol's rewards, then ``reduce_draws``: the answers are read once for both."""
    extractor = resolve_extractor(ctx.protocol.answer_extractor)
    answers = extract_answers(decode_responses(ctx.tokenizer, samples), extractor)
    scores = score_draws(samples, ctx.model, ctx.base, ctx.score_with, ctx.protocol.rewards, answers)
    return reduce_draws(samples, scores, ctx.tokenizer, extractor, answers)


def _batch_settings(ctx: DrawContext, settings: dict) -> dict:
    """``settings`` and, when the model stops on several EOS ids, those ids (one EOS stays out of the cache key,
    so caches keyed on the settings alone still match)."""
    eos = stop_token_ids(ctx.model, ctx.tokenizer)
    return settings | {"stop_token_ids": eos} if len(eos) > 1 else settings


def draw_batch(ctx: DrawContext, prompts: PromptBatch, kind: str, seed: int) -> SeedDraws:
    """One prompt batch of one seed (kind=sample) or of the greedy run (kind=greedy), from the cache if there."""
    p = ctx.protocol
    greedy = kind == "greedy"
    n, temperature = (1, 0.0) if greedy else (p.n_max, p.temperature)
    cfg = SamplingConfig(n, p.max_new_tokens, temperature, decode=p.decode, engine=p.engine, vllm=p.vllm)
    unkeyed = ("prompts_per_batch", "decode", "engine", "vllm")  # decode modes draw alike; the engine is below
    settings = {k: v for k, v in asdict(cfg).items() if k not in unkeyed}
    if p.engine != "hf":  # another engine's draws are other draws: never served for hf's, nor hf's for them
        settings["engine"] = p.engine
    settings = _batch_settings(ctx, settings)
    texts = [ctx.data.prompt_texts[i] for i in prompts.prompt_indices.tolist()]
    eos, pad = stop_token_ids(ctx.model, ctx.tokenizer), ctx.tokenizer.pad_token_id
    path = ctx.cache.path(kind, seed, settings, prompts, texts)
    exact = not greedy and cfg.temperature == 1.0
    draw = functools.partial(ctx.engine.generate, ctx.model, prompts, cfg, eos, pad, seed=seed)
    samples = ctx.cache.get_or_draw(path, prompts, exact, draw)
    return score_and_reduce(ctx, samples)


def draw_power_batch(ctx: DrawContext, prompts: PromptBatch, entry_index: int, seed: int) -> PowerDraws:
    """One prompt batch of one seed of ``--protocol.power[entry_index]``, from the cache if there.

    The samples' log-probs are the model's own at temperature 1 (the target's base), so they are scored as exact
    draws are; the cache file also holds the tokens each prompt cost and the MCMC acceptance rate."""
    cfg = power_sampling_config(ctx.protocol, entry_index)
    sampler = {k: v for k, v in asdict(cfg).items() if k != "prompts_per_batch"}
    settings = _batch_settings(ctx, {**sampler, "power_format": POWER_FORMAT})
    texts = [ctx.data.prompt_texts[i] for i in prompts.prompt_indices.tolist()]
    path = ctx.cache.path("power", seed, settings, prompts, texts)
    eos, pad = stop_token_ids(ctx.model, ctx.tokenizer), ctx.tokenizer.pad_token_id

    def draw() -> dict[str, torch.Tensor]:
        out = power_sample(ctx.model, prompts, cfg, eos, pad, seed=seed)
        rate = {} if out.acceptance_rate is None else {"acceptance_rate": out.acceptance_rate.float()}
        return sample_tensors(out.samples) | {"tokens_spent": out.tokens_spent} | rate

    tensors = ctx.cache.load_or_draw(path, str(prompts.prompt_ids.device), draw)
    samples = SampleBatch(prompts, *(tensors[f] for f in DrawCache.FIELDS), exact_draws=True)
    draws = score_and_reduce(ctx, samples)
    rate = tensors.get("acceptance_rate")
    return PowerDraws(draws, tensors["tokens_spent"].cpu(), None if rate is None else rate.cpu())


def collect_draws(ctx: DrawContext, device: torch.device, show_progress: bool = True) -> EvalDraws:
    """Greedy, then N_max draws per prompt for each seed, then each power-sampling setting for each seed, with a
    progress bar over batches."""
    from tqdm.auto import tqdm

    p = ctx.protocol
    batches = list(ctx.data.prompt_batches(p.prompts_per_batch, device=device))
    seeds = [p.seed + s for s in range(p.seeds)]
    runs = [("greedy", 0)] + [("sample", seed) for seed in seeds]
    runs += [(f"power {i}", seed) for i in range(len(p.power)) for seed in seeds]
    bar = tqdm(total=len(runs) * len(batches), desc=f"sampling N_max={p.n_max}", unit="batch",
               disable=not show_progress)  # fmt: skip
    out = []
    models = torch.nn.ModuleList([m for m in (ctx.model, ctx.base) if m is not None])
    with packed_linear_weights(models):  # oneDNN's weight layout made once for all batches (kernels/cpu_linear.py)
        for kind, seed in runs:
            parts = []
            for prompts in batches:
                if kind.startswith("power"):
                    parts.append(draw_power_batch(ctx, prompts, int(kind.split()[1]), seed))
                else:
                    parts.append(draw_batch(ctx, prompts, kind, seed))
                bar.set_postfix_str(f"{kind} seed {seed}, {ctx.cache.reused} batch(es) from cache", refresh=False)
                bar.update()
            out.append(type(parts[0]).concat(parts))
    bar.close()
    power = {power_row_name(entry): out[1 + len(seeds) * (i + 1) : 1 + len(seeds) * (i + 2)]
             for i, entry in enumerate(p.power)}  # fmt: skip
    return EvalDraws(out[1 : 1 + len(seeds)], out[0], power)
