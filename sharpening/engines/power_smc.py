"""Power sampling by sequential Monte Carlo (Power-SMC, arXiv 2602.10273).

Each prompt has ``particles`` responses proposed token by token at temperature 1/alpha. A particle's log weight
grows by alpha log p(token | prefix) - log q(token | prefix) per token (``smc_log_weight_increments``), the log
of the tempered normalizer sum_v p(v | prefix)^alpha; a particle that has ended in EOS keeps its weight. When the
effective sample size (sum w)^2 / sum w^2 falls below ``resample_threshold * particles``, the particles are
resampled (systematic, seeded per prompt) and their weights reset. The returned sample is one particle drawn by
final weight, which targets pi_alpha exactly as particles grow.

How it runs: our sampler draws each live particle to the end of its budget in one call; the weights are then
read token by token, and at the first token where the effective sample size would fall below the threshold the
particles are cut there and resampled, and the next call draws on from the cut. Tokens a particle drew past the
cut are discarded; this is the same distribution as drawing token by token (nothing before the cut depends on
what follows it), at the price of the discarded tokens, which ``tokens_spent`` counts.

Deviations from the paper: particles are drawn with our own decode loop and rescored teacher-forced for the
exact log q (float32), rather than weighted from the decoding logits; a resampling never happens after the last
token (the final draw by weight takes its place).
"""

from __future__ import annotations

import math

import torch

from sharpening.engines.base import derive_seed
from sharpening.engines.power import (
    PowerSamplingConfig,
    Responses,
    empty_responses,
    propose_suffixes,
    select_prompts,
)
from sharpening.types import PromptBatch

SMC_STREAM = 2  # tells SMC's seeds apart from the MCMC's (power_mcmc.MCMC_STREAM)


def smc_log_weight_increments(alpha: float, responses: Responses) -> torch.Tensor:
    """Per-token incremental log weights alpha log p - log q, 0 off the response. [R, W] -> [R, W] float32."""
    return (alpha * responses.logprobs - responses.proposal_logprobs) * responses.response_mask


def systematic_resample(log_weights: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Systematic resampling: N indices into the N particles, particle i chosen about N w_i times (one uniform
    draw from ``generator``). [N] -> [N] long."""
    n = log_weights.shape[0]
    cumulative = log_weights.double().softmax(-1).cumsum(-1).cpu()  # [N]
    points = (torch.rand(1, generator=generator, dtype=torch.float64) + torch.arange(n)) / n  # [N]
    return torch.searchsorted(cumulative, points).clamp(max=n - 1).to(log_weights.device)


def smc_sample(
    model: torch.nn.Module,
    prompts: PromptBatch,
    cfg: PowerSamplingConfig,
    eos_ids: list[int],
    pad_token_id: int,
    seed: int,
    round_index: int,
) -> tuple[Responses, torch.Tensor, None]:
    """``cfg.particles`` particles per prompt, resampled when their effective sample size falls below the
    threshold, one drawn by final weight. Returns the drawn responses [B], the tokens spent [B] long and None."""
    b, n, width = len(prompts), cfg.particles, cfg.max_new_tokens
    device = prompts.prompt_ids.device
    indices = prompts.prompt_indices.tolist()
    generators = [torch.Generator().manual_seed(derive_seed(seed, round_index, i, SMC_STREAM)) for i in indices]
    rows_prompts = _repeat_prompts(prompts, n)
    particles = empty_responses(b * n, width, pad_token_id, device)
    log_weights = torch.zeros(b, n, device=device)
    times, stages = [0] * b, [0] * b  # per prompt: tokens every live particle holds, calls drawn so far
    done = [False] * b
    spent = torch.zeros(b, dtype=torch.long, device=device)
    while not all(done):
        ahead, cost = _draw_on(model, rows_prompts, particles, times, stages, done, cfg, eos_ids, pad_token_id,
                               (seed, round_index, indices))  # fmt: skip
        spent += cost
        fresh = _from_times(times, done, width, device)  # [B, W] tokens not yet in log_weights
        increments = (
            smc_log_weight_increments(cfg.alpha, ahead).view(b, n, width) * fresh[:, None]
        )  # [B*N, W] -> [B, N, W]
        cumulative = log_weights[:, :, None] + increments.cumsum(-1)  # [B, N, W] log weight after each token
        cuts = _resampling_cuts(cumulative, ahead, times, done, cfg.resample_threshold * n)  # [B] -1: none
        log_weights = cumulative[:, :, -1].clone()
        sources = torch.arange(b * n, device=device)  # [B*N] the particle each row becomes
        lengths = torch.full((b * n,), width, device=device)  # [B*N] tokens each row keeps
        for p in range(b):
            if done[p] or cuts[p] < 0:
                done[p] = True
                continue
            picked = systematic_resample(cumulative[p, :, cuts[p] - 1], generators[p])  # [N]
            sources[p * n : (p + 1) * n] = p * n + picked
            lengths[p * n : (p + 1) * n] = cuts[p]
            log_weights[p] = 0.0
            times[p], stages[p] = cuts[p], stages[p] + 1
        particles = _cut(ahead, lengths, pad_token_id).take(sources)
    final = torch.stack([torch.multinomial(w.double().softmax(-1).cpu(), 1, generator=g) for w, g in
                         zip(log_weights, generators)]).squeeze(-1).to(device)  # fmt: skip
    return particles.take(torch.arange(b, device=device) * n + final), spent, None


def _draw_on(model, rows_prompts, particles, times, stages, done, cfg, eos_ids, pad_token_id, seeding):
    """Every particle of a prompt not done that has not ended, drawn on from its prompt's time to the end of the
    budget. Returns all particles (the others as they were) and the tokens spent per prompt [B] long."""
    seed, round_index, indices = seeding
    b, n, width = len(done), cfg.particles, cfg.max_new_tokens
    device = particles.response_ids.device
    ended = particles.ended.tolist()
    live_rows = [r for r in range(b * n) if not done[r // n] and not ended[r]]
    spent = torch.zeros(b, dtype=torch.long, device=device)
    if not live_rows:
        return particles, spent
    rows = torch.tensor(live_rows, dtype=torch.long, device=device)
    keep = torch.tensor([times[r // n] for r in live_rows], device=device)
    row_seeds = torch.tensor(
        [derive_seed(seed, round_index, indices[r // n], SMC_STREAM, stages[r // n], r % n) for r in live_rows]
    )
    drawn, cost = propose_suffixes(
        model, select_prompts(rows_prompts, rows), particles.take(rows), keep, width - keep, row_seeds,
        cfg.alpha, eos_ids, pad_token_id,
    )  # fmt: skip
    return particles.scatter(rows, drawn), spent.index_add_(0, rows // n, cost)


def _from_times(times: list[int], done: list[bool], width: int, device) -> torch.Tensor:
    """[B, W] float, 1 on the token positions at or after each prompt's time (0 for a prompt already done)."""
    starts = torch.tensor([width if d else t for t, d in zip(times, done)], device=device)
    return (torch.arange(width, device=device)[None] >= starts[:, None]).float()


def _resampling_cuts(
    cumulative: torch.Tensor, ahead: Responses, times: list[int], done: list[bool], min_ess: float
) -> list[int]:
    """Per prompt, the first token count s (times < s < W) at which the effective sample size of the weights
    ``cumulative`` [B, N, W] (log weight after each token) falls below ``min_ess`` while some particle is still
    drawing after s; -1 where there is none (or the prompt is done)."""
    b, n, width = cumulative.shape
    log_ess = 2 * cumulative.logsumexp(1) - (2 * cumulative).logsumexp(1)  # [B, W]: after s = index + 1 tokens
    counts = torch.arange(1, width + 1, device=cumulative.device)  # [W]
    lengths = ahead.lengths.view(b, n)  # [B*N] -> [B, N]
    going_on = (~ahead.ended.view(b, n))[:, :, None] | (lengths[:, :, None] > counts)  # [B, N, W]
    after = counts[None] > torch.tensor(times, device=cumulative.device)[:, None]  # [B, W]
    low = (log_ess < math.log(min_ess)) & going_on.any(1) & after & (counts[None] < width)  # [B, W]
    first = torch.where(low.any(-1), low.float().argmax(-1) + 1, -1)  # [B]
    return [-1 if d else int(c) for d, c in zip(done, first.tolist())]


def _cut(particles: Responses, lengths: torch.Tensor, pad_token_id: int) -> Responses:
    """Each row cut to its first ``lengths`` [R] tokens; a row cut before its EOS has not ended."""
    mask = particles.response_mask & (
        torch.arange(particles.response_ids.shape[1], device=lengths.device) < lengths[:, None]
    )  # [R, W]
    return Responses(
        torch.where(mask, particles.response_ids, pad_token_id), mask, particles.logprobs * mask,
        particles.proposal_logprobs * mask, particles.ended & (particles.lengths <= lengths),
    )  # fmt: skip


def _repeat_prompts(prompts: PromptBatch, n: int) -> PromptBatch:
    """Each prompt repeated for its ``n`` particles: [B, P] -> [B*N, P]."""
    return PromptBatch(
        prompts.prompt_ids.repeat_interleave(n, 0),
        prompts.prompt_mask.repeat_interleave(n, 0),
        prompts.prompt_indices.repeat_interleave(n, 0),
        [a for a in prompts.answers for _ in range(n)],
    )
