"""Per-token log-probs of response tokens, teacher-forced, in float32, without full logits.

The decoder runs once over ``[prompt | response]``; the LM head and the log-softmax then run only on
the hidden states that predict response tokens (padding skipped), ``chunk_size`` positions at a time.
Peak memory of the head is ``chunk_size x vocab`` floats, never ``batch x length x vocab``; under autograd
each chunk is recomputed in backward (activation checkpointing), so the same bound holds in training.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from sharpening.types import SampleBatch


def _head_transform(model: torch.nn.Module):
    """(head, softcap, scale): the LM head plus the logit post-processing some families apply."""
    config = model.config
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)
    return model.get_output_embeddings(), softcap, scale


def _chunk_logprobs(hidden: torch.Tensor, targets: torch.Tensor, head, softcap, scale) -> torch.Tensor:
    """log softmax(head(hidden))[target] in float32. hidden [M, H], targets [M] -> [M]."""
    logits = head(hidden).float()  # [M, V]
    if scale is not None:
        logits = logits * scale
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)


def response_logprobs(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """log pi(response token | prompt, earlier response tokens), zero where ``response_mask`` is False.

    prompt_ids/prompt_mask: [R, P] left-padded; response_ids/response_mask: [R, T] right-padded.
    Returns [R, T] float32. Gradients flow when called under grad.
    """
    p = prompt_ids.shape[1]
    input_ids = torch.cat([prompt_ids, response_ids], dim=1)  # [R, P+T]
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1).long()
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    hidden = model.get_decoder()(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False
    ).last_hidden_state  # [R, P+T, H]
    predicting = hidden[:, p - 1 : -1]  # [R, T, H]: state at position t predicts token t+1
    flat_hidden = predicting[response_mask]  # [M, H], response positions only
    flat_targets = response_ids[response_mask]  # [M]
    head, softcap, scale = _head_transform(model)
    pieces = []
    for start in range(0, flat_targets.shape[0], chunk_size):
        h, t = flat_hidden[start : start + chunk_size], flat_targets[start : start + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad:
            pieces.append(checkpoint(_chunk_logprobs, h, t, head, softcap, scale, use_reentrant=False))
        else:
            pieces.append(_chunk_logprobs(h, t, head, softcap, scale))
    out = torch.zeros(response_ids.shape, dtype=torch.float32, device=response_ids.device)
    if pieces:
        out = out.masked_scatter(response_mask, torch.cat(pieces))
    return out


def sample_logprobs(model: torch.nn.Module, samples: SampleBatch, chunk_size: int = 1024) -> torch.Tensor:
    """Teacher-forced per-token log-probs of every sample under ``model``: [B, N, T] float32.

    Uses exactly the prompt ids the samples were drawn from (SPEC 4.1).
    """
    b, n, t = samples.response_ids.shape
    prompts = samples.prompts
    flat = response_logprobs(
        model,
        prompts.prompt_ids.repeat_interleave(n, 0),  # [B, P] -> [B*N, P]
        prompts.prompt_mask.repeat_interleave(n, 0),
        samples.response_ids.view(b * n, t),  # [B, N, T] -> [B*N, T]
        samples.response_mask.view(b * n, t),
        chunk_size=chunk_size,
    )
    return flat.view(b, n, t)  # [B*N, T] -> [B, N, T]
