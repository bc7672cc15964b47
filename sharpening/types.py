"""Containers passed between pipeline stages. Data only: the maths lives in pure functions elsewhere.

Layout convention used everywhere: prompts are LEFT-padded to a common length P, responses are
RIGHT-padded to a common length T, so ``cat([prompt_ids, response_ids], -1)`` is one aligned sequence
whose response token j sits at position P + j for every row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PromptBatch:
    """Templated prompts, tokenized and left-padded."""

    prompt_ids: torch.Tensor  # [B, P] long, left-padded with the pad id
    prompt_mask: torch.Tensor  # [B, P] bool, True on real prompt tokens
    prompt_indices: torch.Tensor  # [B] long, index of each prompt in its dataset (seeds derive from it)
    answers: list[str | None]  # B reference answers (evaluation only), None when absent

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]


@dataclass
class SampleBatch:
    """N sampled responses per prompt, as returned by the sampler."""

    prompts: PromptBatch
    response_ids: torch.Tensor  # [B, N, T] long, right-padded with the pad id after EOS
    response_mask: torch.Tensor  # [B, N, T] bool, True on response tokens (EOS included)
    logprobs: torch.Tensor  # [B, N, T] float32, log pi(token) under the SAMPLING model at temperature 1
    truncated: torch.Tensor  # [B, N] bool, True when max_new_tokens was hit before EOS
    exact_draws: bool  # True when drawn at temperature 1 with no top-k/top-p truncation
    pruned: torch.Tensor | None = None  # [B, N] bool, True where drawing stopped early: the sample could not be kept

    @property
    def samples_per_prompt(self) -> int:
        return self.response_ids.shape[1]

    @property
    def lengths(self) -> torch.Tensor:  # [B, N] long, response tokens per sample (EOS included)
        return self.response_mask.sum(-1)


@dataclass
class ScoredSamples:
    """Samples with their self-rewards and the selection made from them."""

    samples: SampleBatch
    scores: torch.Tensor  # [B, N] float32, self-reward of each sample (higher is better)
    selected: torch.Tensor  # [B, K] long, indices into N of the kept samples, best first
    selected_mask: torch.Tensor  # [B, K] bool, False where no sample was eligible
    answers: list[list[str | None]] | None = None  # [B][N] extracted answers (diagnostics), None when not extracted


@dataclass
class PaddedBatch:
    """Training examples in the shared layout: prompts left-padded to P, responses right-padded to T."""

    prompt_ids: torch.Tensor  # [B, P] long, left-padded with the pad id
    prompt_mask: torch.Tensor  # [B, P] bool, True on prompt tokens
    response_ids: torch.Tensor  # [B, T] long, right-padded with the pad id
    response_mask: torch.Tensor  # [B, T] bool, True on response tokens (the loss targets)


@dataclass
class PackedBatch:
    """The same examples concatenated into R rows of L tokens, each example attending only to itself."""

    input_ids: torch.Tensor  # [R, L] long, prompt then response of each example, the pad id at row ends
    position_ids: torch.Tensor  # [R, L] long, restarting at 0 for each example (and for a row's end padding)
    example_ids: torch.Tensor  # [R, L] long, which example a token belongs to; -1 on padding
    response_mask: torch.Tensor  # [R, L] bool, True on response tokens (the loss targets)
    response_lengths: torch.Tensor  # [B] long, response tokens of each example, in the examples' order


@dataclass
class TokenStats:
    """Statistics of the full next-token distribution (temperature 1) at each response position, from the
    teacher-forced pass that gives the log-probs (``token_stats.sample_token_stats``); zero where the response
    mask is False. Scoring-only: computed without gradient."""

    entropy: torch.Tensor  # [..., T] float32, nats: -sum_v p_v log p_v
    logsumexp: torch.Tensor  # [..., T] float32, log sum_v exp(logit_v)
    mean_logit: torch.Tensor  # [..., T] float32, (1/V) sum_v logit_v
    vocab_size: int  # V, the width of the logits the statistics are over (the LM head's rows)
