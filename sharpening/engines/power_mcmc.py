"""Power sampling by block Metropolis-Hastings (Karan and Du, "Reasoning with Sampling", arXiv 2510.14901).

The response grows in blocks of ``block_tokens`` drawn at temperature 1/alpha. After each block the chain
takes ``mcmc_steps`` Metropolis-Hastings steps whose target is pi_alpha restricted to responses of at most the
tokens generated so far (L): pick a position t uniformly among the current response's n tokens, redraw the
suffix from t at temperature 1/alpha up to L tokens in all, and accept with

    log A = alpha (log p(new) - log p(old)) + log q(old suffix | prefix) - log q(new suffix | prefix)
            + log(1/n') - log(1/n)

where n' is the proposal's length and 1/n', 1/n are the reverse and forward choices of t (``mh_log_ratio``).
After the last block L = max_new_tokens and every step leaves pi_alpha invariant.

Deviations from the paper and its reference code:
- The position is chosen uniformly over the current response, whose length n changes when a proposal ends at
  another EOS; the choice probabilities 1/n and 1/n' enter the ratio, so the chain is exactly reversible. The
  reference implementation leaves them out (exact only when both responses have the same length).
- log q is the exact teacher-forced log-prob under the temperature-scaled distribution the suffix was drawn
  from (``tempered_logprobs``), in float32, for the old suffix and the new one.
- Responses that ended in EOS before the last block still take every later block's steps (their target grows
  with L like everyone's); only unfinished responses are extended.
"""

from __future__ import annotations

import functools

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

MCMC_STREAM = 1  # tells the MCMC's seeds apart from SMC's (power_smc.SMC_STREAM)


def mh_log_ratio(alpha: float, old: Responses, new: Responses, start: torch.Tensor) -> torch.Tensor:
    """Log acceptance ratio of replacing ``old`` by ``new``, which share their first ``start`` [R] tokens:
    alpha (log p(new) - log p(old)) + log q(old suffix) - log q(new suffix) + log n_old - log n_new, the last
    two being the log-probabilities 1/n_new and 1/n_old of choosing ``start`` uniformly. -> [R] float32."""
    positions = torch.arange(old.response_ids.shape[1], device=start.device)[None]  # [1, W]
    old_suffix = old.response_mask & (positions >= start[:, None])  # [R, W]
    new_suffix = new.response_mask & (positions >= start[:, None])
    logp_gain = (new.logprobs * new_suffix).sum(-1) - (old.logprobs * old_suffix).sum(-1)
    logq_back = (old.proposal_logprobs * old_suffix).sum(-1) - (new.proposal_logprobs * new_suffix).sum(-1)
    choice = old.lengths.float().log() - new.lengths.float().log()
    return alpha * logp_gain + logq_back + choice


def mcmc_sample(
    model: torch.nn.Module,
    prompts: PromptBatch,
    cfg: PowerSamplingConfig,
    eos_ids: list[int],
    pad_token_id: int,
    seed: int,
    round_index: int,
) -> tuple[Responses, torch.Tensor, torch.Tensor]:
    """One chain per prompt: blocks, each followed by ``cfg.mcmc_steps`` Metropolis-Hastings steps.
    Returns the final states [B], the tokens spent [B] long and the acceptance rates [B] float32."""
    b, device = len(prompts), prompts.prompt_ids.device
    indices = prompts.prompt_indices.tolist()
    generators = [torch.Generator().manual_seed(derive_seed(seed, round_index, i, MCMC_STREAM)) for i in indices]
    state = empty_responses(b, cfg.max_new_tokens, pad_token_id, device)
    spent = torch.zeros(b, dtype=torch.long, device=device)
    accepted = torch.zeros(b, device=device)
    proposed = 0
    for block, limit in enumerate(range(cfg.block_tokens, cfg.max_new_tokens + cfg.block_tokens, cfg.block_tokens)):
        limit = min(limit, cfg.max_new_tokens)
        seeds = functools.partial(_proposal_seeds, seed, round_index, indices, block)
        grow = (~state.ended).nonzero().squeeze(-1)  # [G] chains still without EOS, all at the last limit
        if grow.numel():
            lengths = state.lengths.index_select(0, grow)
            args = (lengths, limit - lengths, seeds(-1).index_select(0, grow.cpu()))
            extended, cost = propose_suffixes(
                model, select_prompts(prompts, grow), state.take(grow), *args, cfg.alpha, eos_ids, pad_token_id
            )
            state = state.scatter(grow, extended)
            spent.index_add_(0, grow, cost)
        for step in range(cfg.mcmc_steps):
            draws = torch.stack([torch.rand(2, generator=g) for g in generators]).to(device)  # [B, 2]
            start = (draws[:, 0] * state.lengths).long().clamp(max=state.lengths - 1)  # uniform in [0, n)
            proposal, cost = propose_suffixes(
                model, prompts, state, start, limit - start, seeds(step), cfg.alpha, eos_ids, pad_token_id
            )
            accept = draws[:, 1].log() < mh_log_ratio(cfg.alpha, state, proposal, start)  # [B]
            state = state.where(accept, proposal)
            spent += cost
            accepted += accept.float()
            proposed += 1
    return state, spent, accepted / max(proposed, 1)


def _proposal_seeds(seed: int, round_index: int, indices: list[int], block: int, step: int) -> torch.Tensor:
    """[B] long: the generator seed of each chain's proposal ``step`` (-1: the block's extension) in ``block``."""
    return torch.tensor([derive_seed(seed, round_index, i, MCMC_STREAM, block, step) for i in indices])
