"""Sampling from the power distribution pi_alpha(y|x) proportional to pi_base(y|x)^alpha, without training.

Two samplers share this interface (``power_sample``): block Metropolis-Hastings (``power_mcmc.py``, Karan and
Du, arXiv 2510.14901) and sequential Monte Carlo (``power_smc.py``, Power-SMC, arXiv 2602.10273). Both propose
with our own sampler at temperature 1/alpha (``generate_samples``) and correct towards pi_alpha with exact
teacher-forced log-probs: log p at temperature 1 and log q, the log-prob under the temperature-scaled
distribution the proposal was actually drawn from, both in float32 (``tempered_logprobs``).

The outcomes are the sampler's: responses ending in EOS within ``max_new_tokens``, and truncated ones (exactly
``max_new_tokens`` tokens without EOS) whose probability is their prefix's. docs/power.md has the options, the
enumeration proof and the token costs.

Seeds: every random choice for prompt ``i`` comes from generators seeded by ``derive_seed(seed, round_index, i,
...)``, so a prompt's sample does not depend on which prompts share its batch, and the same seed gives the
same chain.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from sharpening.engines.config import SamplingConfig
from sharpening.engines.hf import generate_samples
from sharpening.types import PromptBatch, SampleBatch

POWER_METHODS = ("mcmc", "smc")
POWER_FORMAT = 1
"""Version of what ``power_sample`` returns for a given seed: bumped whenever those draws change, so caches of
earlier draws (``sharpen evaluate``) are not reused."""
# Teacher-forced logits held at once by ``tempered_logprobs``: rows x response tokens x vocabulary floats.
SCORE_CHUNK_ELEMENTS = 1 << 25


@dataclass
class PowerSamplingConfig:
    """How power samples (one per prompt, targeting pi_base^alpha) are drawn."""

    method: Literal["mcmc", "smc"] = "mcmc"
    """'mcmc' (block Metropolis-Hastings) or 'smc' (particles reweighted token by token)."""
    alpha: float = 4.0
    """Power of the target pi_base^alpha (> 1 sharpens); proposals are drawn at temperature 1/alpha."""
    block_tokens: int = 16
    """MCMC: tokens generated per block before the block's Metropolis-Hastings steps."""
    mcmc_steps: int = 10
    """MCMC: Metropolis-Hastings steps (suffix resamplings) after each block."""
    particles: int = 16
    """SMC: particles per prompt."""
    resample_threshold: float = 0.5
    """SMC: resample when the effective sample size falls below this fraction of the particles."""
    max_new_tokens: int = 64
    """Most tokens per response (EOS included); a response without EOS by then is truncated."""
    prompts_per_batch: int = 16
    """Prompts sampled together (each with its chain or particles)."""


def validate_power_config(cfg: PowerSamplingConfig, option: str) -> list[str]:
    """Every problem with ``cfg``, each naming ``option.<field>``, the value, the rule and the fix."""
    problems = []
    if cfg.method not in POWER_METHODS:
        problems.append(f"{option}.method={cfg.method!r}: must be 'mcmc' or 'smc'")
    if not (math.isfinite(cfg.alpha) and cfg.alpha > 0):
        problems.append(f"{option}.alpha={cfg.alpha}: must be a finite number > 0 (e.g. 4.0; 1.0 samples the base)")
    checks = (
        ("block_tokens", cfg.block_tokens >= 1, "must be >= 1 (e.g. max_new_tokens / 16)"),
        ("mcmc_steps", cfg.mcmc_steps >= 0, "must be >= 0 (0 is plain sampling at temperature 1/alpha; e.g. 10)"),
        ("particles", cfg.particles >= 1, "must be >= 1 (e.g. 16)"),
        ("max_new_tokens", cfg.max_new_tokens >= 1, "must be >= 1 (e.g. 512)"),
        ("prompts_per_batch", cfg.prompts_per_batch >= 1, "must be >= 1"),
    )
    for name, ok, rule in checks:
        if not ok:
            problems.append(f"{option}.{name}={getattr(cfg, name)}: {rule}")
    if not 0.0 <= cfg.resample_threshold <= 1.0:
        problems.append(
            f"{option}.resample_threshold={cfg.resample_threshold}: must be in [0, 1] "
            "(a fraction of the particles; 0 never resamples, 1 resamples every token; e.g. 0.5)"
        )
    return problems


@dataclass
class PowerSamples:
    """One power sample per prompt and what it cost."""

    samples: SampleBatch  # [B, 1, T]; logprobs: the BASE model's temperature-1 log-probs; exact_draws False
    tokens_spent: torch.Tensor  # [B] long, tokens generated plus tokens rescored (teacher-forced) for the sample
    acceptance_rate: torch.Tensor | None  # [B] float32, accepted / proposed Metropolis-Hastings steps (MCMC)


@dataclass
class Responses:
    """One response per row (a chain's state or a particle), with its exact per-token log-probs."""

    response_ids: torch.Tensor  # [R, W] long, right-padded with the pad id; W = max_new_tokens
    response_mask: torch.Tensor  # [R, W] bool, True on response tokens (EOS included)
    logprobs: torch.Tensor  # [R, W] float32, log p(token | prefix) at temperature 1, 0 off the mask
    proposal_logprobs: torch.Tensor  # [R, W] float32, log q(token | prefix) at temperature 1/alpha, 0 off the mask
    ended: torch.Tensor  # [R] bool, the response ends in EOS

    @property
    def lengths(self) -> torch.Tensor:  # [R] long
        return self.response_mask.sum(-1)

    def take(self, rows: torch.Tensor) -> Responses:
        """The rows ``rows`` [R'] (indices, repeats allowed), in that order."""
        return Responses(*(f.index_select(0, rows) for f in self._fields()))

    def where(self, pick: torch.Tensor, other: Responses) -> Responses:
        """``other``'s row where ``pick`` [R] is True, this one's elsewhere."""
        fields = zip(self._fields(), other._fields())
        return Responses(*(torch.where(pick.view(-1, *[1] * (a.dim() - 1)), b, a) for a, b in fields))

    def scatter(self, rows: torch.Tensor, part: Responses) -> Responses:
        """These responses with rows ``rows`` [G] replaced by ``part``'s [G] rows."""
        fields = [f.clone() for f in self._fields()]
        for f, p in zip(fields, part._fields()):
            f.index_copy_(0, rows, p)
        return Responses(*fields)

    def _fields(self) -> tuple[torch.Tensor, ...]:
        return self.response_ids, self.response_mask, self.logprobs, self.proposal_logprobs, self.ended


def empty_responses(rows: int, width: int, pad_token_id: int, device: torch.device) -> Responses:
    """``rows`` empty responses of width ``width``."""
    zeros = torch.zeros(rows, width, device=device)
    return Responses(
        response_ids=torch.full((rows, width), pad_token_id, dtype=torch.long, device=device),
        response_mask=torch.zeros(rows, width, dtype=torch.bool, device=device),
        logprobs=zeros,
        proposal_logprobs=zeros.clone(),
        ended=torch.zeros(rows, dtype=torch.bool, device=device),
    )


def power_sample(
    model: torch.nn.Module,
    prompts: PromptBatch,
    cfg: PowerSamplingConfig,
    eos_token_id: int | list[int],
    pad_token_id: int,
    seed: int = 0,
    round_index: int = 0,
) -> PowerSamples:
    """One sample per prompt from pi_base^alpha (approximately: exact in the limit of MCMC steps or particles),
    ``cfg.prompts_per_batch`` prompts at a time. Raises ValueError on an invalid ``cfg``."""
    problems = validate_power_config(cfg, "power")
    if problems:
        raise ValueError("invalid power sampling configuration:\n  " + "\n  ".join(problems))
    from sharpening.engines.power_mcmc import mcmc_sample
    from sharpening.engines.power_smc import smc_sample

    sampler = mcmc_sample if cfg.method == "mcmc" else smc_sample
    eos_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    pieces = []
    for start in range(0, len(prompts), cfg.prompts_per_batch):
        chunk = _prompt_slice(prompts, start, start + cfg.prompts_per_batch)
        pieces.append(sampler(model, chunk, cfg, eos_ids, pad_token_id, seed, round_index))
    chosen = Responses(*(torch.cat(f) for f in zip(*(p[0]._fields() for p in pieces))))
    rates = [p[2] for p in pieces]
    return PowerSamples(
        samples=_sample_batch(prompts, chosen),
        tokens_spent=torch.cat([p[1] for p in pieces]),
        acceptance_rate=None if rates[0] is None else torch.cat(rates),
    )


def select_prompts(prompts: PromptBatch, rows: torch.Tensor) -> PromptBatch:
    """The prompts of ``rows`` [G] (indices, repeats allowed), in that order."""
    return PromptBatch(
        prompts.prompt_ids.index_select(0, rows),
        prompts.prompt_mask.index_select(0, rows),
        prompts.prompt_indices.index_select(0, rows.to(prompts.prompt_indices.device)),
        [prompts.answers[i] for i in rows.tolist()],
    )


def _prompt_slice(prompts: PromptBatch, start: int, stop: int) -> PromptBatch:
    return PromptBatch(
        prompts.prompt_ids[start:stop],
        prompts.prompt_mask[start:stop],
        prompts.prompt_indices[start:stop],
        prompts.answers[start:stop],
    )


def _sample_batch(prompts: PromptBatch, chosen: Responses) -> SampleBatch:
    """The chosen responses as a [B, 1, T] SampleBatch, cut to the longest."""
    width = max(int(chosen.lengths.max()), 1)
    return SampleBatch(
        prompts=prompts,
        response_ids=chosen.response_ids[:, None, :width],  # [B, W] -> [B, 1, T]
        response_mask=chosen.response_mask[:, None, :width],  # [B, W] -> [B, 1, T]
        logprobs=chosen.logprobs[:, None, :width],  # [B, W] -> [B, 1, T]
        truncated=~chosen.ended[:, None],  # [B] -> [B, 1]
        exact_draws=False,
    )


@torch.no_grad()
def tempered_logprobs(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced (log p, log q) of every response token: log softmax(logits) and log softmax(logits /
    temperature), in float32, from the model's own forward (its logit post-processing included).

    prompt_ids/prompt_mask: [R, P] left-padded; response_ids/response_mask: [R, T] right-padded.
    Returns two [R, T] float32, zero where ``response_mask`` is False. Rows go through in chunks so that at most
    ``SCORE_CHUNK_ELEMENTS`` logits are held at once.
    """
    r, t = response_ids.shape
    vocab = model.config.vocab_size
    chunk = max(1, SCORE_CHUNK_ELEMENTS // max(1, (t + 1) * vocab))
    logp_pieces, logq_pieces = [], []
    for start in range(0, r, chunk):
        rows = slice(start, start + chunk)
        input_ids = torch.cat([prompt_ids[rows], response_ids[rows]], dim=1)  # [r, P+T]
        attention_mask = torch.cat([prompt_mask[rows], response_mask[rows]], dim=1).long()
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        out = model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False,
            logits_to_keep=t + 1,
        )  # fmt: skip
        logits = out.logits[:, -t - 1 : -1].float()  # [r, T+1, V] -> [r, T, V]: the logits before each response token
        targets = response_ids[rows, :, None]  # [r, T, 1]
        logp_pieces.append(logits.log_softmax(-1).gather(-1, targets).squeeze(-1))
        logq_pieces.append((logits / temperature).log_softmax(-1).gather(-1, targets).squeeze(-1))
    zero = torch.zeros((), device=response_ids.device)
    logp = torch.where(response_mask, torch.cat(logp_pieces), zero)
    logq = torch.where(response_mask, torch.cat(logq_pieces), zero)
    return logp, logq


def propose_suffixes(
    model: torch.nn.Module,
    prompts: PromptBatch,
    current: Responses,
    keep_lengths: torch.Tensor,
    budgets: torch.Tensor,
    row_seeds: torch.Tensor,
    alpha: float,
    eos_ids: list[int],
    pad_token_id: int,
) -> tuple[Responses, torch.Tensor]:
    """For every row: keep ``current``'s first ``keep_lengths`` [R] tokens and draw up to ``budgets`` [R] (>= 1)
    more at temperature 1/alpha with a generator seeded from ``row_seeds`` [R]; rescore the whole response.

    ``prompts`` has one row per response row. Returns the proposals and the tokens each row spent [R] (drawn
    within its budget plus rescored). Rows draw to the largest budget and are cut to their own afterwards: the
    tokens before a row's cut are distributed as if it had stopped there."""
    r, width = current.response_ids.shape
    device = current.response_ids.device
    positions = torch.arange(width, device=device)[None]  # [1, W]
    keep_mask = current.response_mask & (positions < keep_lengths[:, None])  # [R, W]
    prefixes = [prompts.prompt_ids[i][prompts.prompt_mask[i]].tolist() + current.response_ids[i][keep_mask[i]].tolist()
                for i in range(r)]  # fmt: skip
    extended = _left_padded(prefixes, row_seeds, pad_token_id, device)
    cfg = SamplingConfig(
        samples_per_prompt=1, max_new_tokens=int(budgets.max()), temperature=1.0 / alpha, prompts_per_batch=r
    )
    drawn = generate_samples(model, extended, cfg, eos_ids, pad_token_id)
    drawn_ids, drawn_mask = drawn.response_ids[:, 0], drawn.response_mask[:, 0]  # [R, 1, D] -> [R, D]
    drawn_mask = drawn_mask & (torch.arange(drawn_mask.shape[1], device=device)[None] < budgets[:, None])
    drawn_lengths = drawn_mask.sum(-1)  # [R]
    offsets = positions - keep_lengths[:, None]  # [R, W]: position in the drawn suffix
    in_suffix = (offsets >= 0) & (offsets < drawn_lengths[:, None])
    suffix_ids = drawn_ids.gather(1, offsets.clamp(0, drawn_ids.shape[1] - 1))  # [R, D] -> [R, W]
    response_ids = torch.where(in_suffix, suffix_ids, torch.where(keep_mask, current.response_ids, pad_token_id))
    lengths = keep_lengths + drawn_lengths  # [R]
    response_mask = positions < lengths[:, None]  # [R, W]
    ended = torch.isin(drawn_ids, torch.tensor(eos_ids, device=device)) & drawn_mask
    cut = int(lengths.max())
    logp, logq = tempered_logprobs(
        model, prompts.prompt_ids, prompts.prompt_mask, response_ids[:, :cut], response_mask[:, :cut], 1.0 / alpha
    )
    pad = (0, width - cut)
    proposal = Responses(
        response_ids, response_mask, torch.nn.functional.pad(logp, pad), torch.nn.functional.pad(logq, pad),
        ended.any(-1),
    )  # fmt: skip
    return proposal, drawn_lengths + lengths


def _left_padded(prefixes: list[list[int]], row_seeds: torch.Tensor, pad_token_id: int, device) -> PromptBatch:
    """Token lists as a left-padded PromptBatch whose prompt indices are ``row_seeds`` (``generate_samples``
    seeds each row from its index)."""
    width = max(len(p) for p in prefixes)
    ids = torch.full((len(prefixes), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(prefixes), width, dtype=torch.bool)
    for i, p in enumerate(prefixes):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = True
    return PromptBatch(ids.to(device), mask.to(device), row_seeds.to(device), [None] * len(prefixes))
