"""Per-token statistics of the full next-token distribution (entropy, logsumexp, mean logit) beside the
log-probs, from the same teacher-forced pass and the same chunked LM head as ``logprobs`` (never
``rows x length x vocab``). Scoring only: no gradient. Self-rewards that read them (entropy, self-certainty)
declare ``needs_stats``; ``scoring.score_reward`` asks for them only then.
"""

from __future__ import annotations

import torch

from sharpening.logprobs import head_transform, post_processed, response_predicting, sample_predicting
from sharpening.types import SampleBatch, TokenStats


def _chunk_stats(hidden: torch.Tensor, targets: torch.Tensor, head, softcap, scale) -> tuple[torch.Tensor, ...]:
    """(log-prob of the target, entropy, logsumexp, mean logit) of softmax(head(hidden)) per row, float32,
    from one [M, V] logits buffer and one [M, V] work buffer. hidden [M, H], targets [M] -> four [M]."""
    logits = post_processed(head(hidden).float(), softcap, scale)  # [M, V]
    picked = logits.gather(-1, targets[:, None]).squeeze(-1)  # [M]
    lse = logits.logsumexp(-1)  # [M]
    # H = -sum_v p_v (z_v - lse) = lse - sum_v p_v z_v; a -inf logit has p_v = 0 and adds 0 (nan_to_num)
    expected_logit = logits.sub(lse[:, None]).exp_().mul_(logits).nan_to_num_(0.0).sum(-1)  # [M]
    return picked - lse, lse - expected_logit, lse, logits.mean(-1)


@torch.no_grad()
def _response_positions_stats(
    model: torch.nn.Module,
    predicting: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    chunk_size: int,
) -> tuple[torch.Tensor, TokenStats]:
    """The head on response positions only, ``chunk_size`` at a time, keeping the statistics of each row's
    full distribution. predicting [R, T, H], response_ids/response_mask [R, T] -> [R, T] log-probs and
    TokenStats [R, T], zero where the mask is False."""
    head, softcap, scale = head_transform(model)
    columns = [torch.zeros(response_ids.shape, dtype=torch.float32, device=response_ids.device) for _ in range(4)]
    vocab_size = model.config.vocab_size
    flat_targets = response_ids[response_mask]  # [M]
    if flat_targets.numel():
        hidden = predicting[response_mask]  # [M, H]
        chunks = [
            _chunk_stats(
                hidden[start : start + chunk_size], flat_targets[start : start + chunk_size], head, softcap, scale
            )
            for start in range(0, flat_targets.shape[0], chunk_size)
        ]
        columns = [out.masked_scatter(response_mask, torch.cat(col)) for out, col in zip(columns, zip(*chunks))]
        vocab_size = head(hidden[:1]).shape[-1]  # the logits' width, which may exceed config.vocab_size
    logprobs, entropy, lse, mean_logit = columns
    return logprobs, TokenStats(entropy=entropy, logsumexp=lse, mean_logit=mean_logit, vocab_size=vocab_size)


@torch.no_grad()
def response_token_stats(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    chunk_size: int = 256,
) -> tuple[torch.Tensor, TokenStats]:
    """``response_logprobs`` and, from the same pass, the entropy, logsumexp and mean of the logits of the
    full next-token distribution (temperature 1) at each response position. Scoring only: no gradient.
    Peak head memory two ``chunk_size x vocab`` float32 buffers, never ``rows x length x vocab``.

    prompt_ids/prompt_mask: [R, P] left-padded; response_ids/response_mask: [R, T] right-padded.
    Returns [R, T] float32 log-probs and TokenStats [R, T], zero where ``response_mask`` is False.
    """
    predicting = response_predicting(model, prompt_ids, prompt_mask, response_ids, response_mask)  # [R, T, H]
    return _response_positions_stats(model, predicting, response_ids, response_mask, chunk_size)


@torch.no_grad()
def sample_token_stats(
    model: torch.nn.Module, samples: SampleBatch, chunk_size: int = 256, share_prompt: bool = True
) -> tuple[torch.Tensor, TokenStats]:
    """``sample_logprobs`` and the per-token statistics of ``response_token_stats`` from the same pass:
    [B, N, T] float32 log-probs and TokenStats [B, N, T]. Scoring only: no gradient."""
    b, n, t = samples.response_ids.shape
    flat_ids, flat_mask = samples.response_ids.view(b * n, t), samples.response_mask.view(b * n, t)  # -> [B*N, T]
    predicting = sample_predicting(model, samples, share_prompt)  # [B*N, T, H]
    logprobs, stats = _response_positions_stats(model, predicting, flat_ids, flat_mask, chunk_size)
    unflat = lambda x: x.view(b, n, t)  # noqa: E731  [B*N, T] -> [B, N, T]
    stats = TokenStats(unflat(stats.entropy), unflat(stats.logsumexp), unflat(stats.mean_logit), stats.vocab_size)
    return unflat(logprobs), stats
