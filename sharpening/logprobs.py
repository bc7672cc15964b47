"""Per-token log-probs of response tokens, teacher-forced, in float32, without full logits.

The decoder runs once over ``[prompt | response]``; the LM head and the log-softmax then run only on
the hidden states that predict response tokens (padding skipped), ``chunk_size`` positions at a time.
Peak memory of the head is ``chunk_size x vocab`` floats, never ``batch x length x vocab``; under autograd
each chunk is recomputed in backward (activation checkpointing), so the same bound holds in training.
Packed batches (several examples per row) use the same head through ``packing.packed_response_logprobs``.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint

from sharpening.kernels.cpu_linear import OneDNNLinear, linear
from sharpening.types import SampleBatch


def head_transform(model: torch.nn.Module):
    """(head, softcap, scale): the LM head plus the logit post-processing some families apply
    (``logit_head_problem`` checks the result against the model's own forward when it loads)."""
    config = model.config
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)  # Cohere: logits * logit_scale
    model_type = getattr(config, "model_type", "")
    if model_type.startswith("granite") and getattr(config, "logits_scaling", None):
        scale = 1.0 / config.logits_scaling  # Granite: logits / logits_scaling
    elif model_type == "falcon_h1" and getattr(config, "lm_head_multiplier", None):
        scale = config.lm_head_multiplier  # Falcon-H1: logits * lm_head_multiplier
    return model.get_output_embeddings(), softcap, scale


@torch.no_grad()
def logit_head_problem(model: torch.nn.Module, tokens: int = 6) -> str | None:
    """Why the log-probs rebuilt here (decoder, then LM head and the known post-processing) would not be
    the model's own, or None. Compares both on a few tokens; a family that post-processes its logits in
    a way not reproduced (a scale under another name, masked tokens) would otherwise be scored against
    another distribution than the one it samples from."""
    head = model.get_output_embeddings()
    if head is None or not hasattr(model, "get_decoder"):
        return "the model has no separate LM head and decoder to score with"
    device = head.weight.device if head.weight.device.type != "meta" else torch.device("cpu")
    ids = torch.arange(tokens, device=device)[None] % head.weight.shape[0]  # [1, tokens]
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            own = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)  # [tokens, V]
            hidden = model.get_decoder()(input_ids=ids).last_hidden_state[0]  # [tokens, H]
            _, softcap, scale = head_transform(model)
            ours = torch.log_softmax(post_processed(head(hidden).float(), softcap, scale), -1)
    finally:
        model.train(training)
    gap = float((own - ours).abs().max())
    tolerance = 1e-3 if head.weight.dtype == torch.float32 else 5e-2
    if gap > tolerance:
        return (
            f"its logits are post-processed in a way sharpening does not reproduce (model_type "
            f"{getattr(model.config, 'model_type', '?')!r}: log-probs differ by up to {gap:.3g} from its own "
            "forward), so teacher-forced scores would come from another distribution than its samples"
        )
    return None


def post_processed(logits: torch.Tensor, softcap, scale) -> torch.Tensor:
    """The family's logit scaling, then soft-capping (``head_transform``), as its forward applies them."""
    if scale is not None:
        logits = logits * scale
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def _chunk_logprobs(hidden: torch.Tensor, targets: torch.Tensor, head, softcap, scale) -> torch.Tensor:
    """log softmax(head(hidden))[target] in float32. hidden [M, H], targets [M] -> [M]."""
    logits = post_processed(head(hidden).float(), softcap, scale)  # [M, V]
    return logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)


def _linear_logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, onednn: bool = False
) -> torch.Tensor:
    """Logits of a plain linear head in float32 (float64 kept), as a fresh tensor the caller may overwrite.
    -> [M, V]"""
    logits = linear(hidden, weight, bias, onednn)
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _picked_and_logsumexp_(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits[target], logsumexp(logits)) per row, overwriting ``logits`` with exp(logits - rowmax):
    one [M, V] buffer instead of logsumexp's second one. logits [M, V] float32 -> [M], [M]."""
    picked = logits.gather(-1, targets[:, None]).squeeze(-1)  # [M]
    top = logits.amax(-1, keepdim=True)  # [M, 1]
    top = top.masked_fill(~torch.isfinite(top), 0.0)  # an all -inf row: logsumexp -inf, like torch's
    lse = logits.sub_(top).exp_().sum(-1).log_() + top.squeeze(-1)  # [M]
    return picked, lse


class _LinearHeadLogprobs(torch.autograd.Function):
    """log softmax(hidden @ W.T + b)[target] for a plain ``nn.Linear`` head, holding one [M, V] buffer.

    Forward keeps only its inputs (no logits); backward recomputes the logits once and turns them, in
    place, into d logp / d logits = onehot(target) - softmax, scaled by the incoming gradient. Peak:
    one chunk of logits when scoring, two in backward (the float32 buffer and its cast to a half-precision
    weight's dtype; one when the weight is float32), against two and four for autograd through logsumexp.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, onednn=False):
        picked, lse = _picked_and_logsumexp_(_linear_logits(hidden, weight, bias, onednn), targets)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.onednn = onednn
        device = hidden.device.type  # backward recomputes under the same autocast as this forward
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        return picked - lse

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        device, enabled, dtype = ctx.autocast
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            grad = _linear_logits(hidden, weight, bias, ctx.onednn)  # [M, V], the forward's logits again
        grad.sub_(lse[:, None]).exp_().mul_(-grad_out[:, None])  # -g * softmax
        rows = torch.arange(targets.shape[0], device=targets.device)
        grad[rows, targets] += grad_out  # + g * onehot
        grad = grad.to(weight.dtype)
        grad_hidden = linear(grad, weight.t(), None, ctx.onednn) if ctx.needs_input_grad[0] else None  # [M, H]
        grad_weight = (  # [V, M] @ [M, H] -> [V, H]
            linear(grad.t(), hidden.to(weight.dtype).t(), None, ctx.onednn) if ctx.needs_input_grad[1] else None
        )
        grad_bias = grad.sum(0) if bias is not None and ctx.needs_input_grad[2] else None
        return grad_hidden, grad_weight, grad_bias, None, None


def _plain_linear_head(head, softcap, scale) -> bool:
    """A head the fused path computes exactly: ``nn.Linear`` itself or its oneDNN form (not a LoRA or
    quantized wrapper), full weights (not a sharded shell), no logit scaling or softcapping."""
    return (
        type(head) in (torch.nn.Linear, OneDNNLinear)
        and head.weight.dim() == 2
        and head.weight.shape == (head.out_features, head.in_features)
        and scale is None
        and not softcap
    )


def chunked_logprobs(
    model: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk_size: int
) -> torch.Tensor:
    """``_chunk_logprobs`` over ``chunk_size`` rows at a time. hidden [M, H], targets [M] -> [M] float32 (M > 0).

    A plain linear head goes through ``_LinearHeadLogprobs`` (one logits buffer per chunk, two in
    backward); any other head through autograd, each chunk recomputed in backward (checkpointing).
    """
    head, softcap, scale = head_transform(model)
    fused = _plain_linear_head(head, softcap, scale)
    onednn = type(head) is OneDNNLinear
    grad = torch.is_grad_enabled() and (hidden.requires_grad or (fused and head.weight.requires_grad))
    pieces = []
    for start in range(0, targets.shape[0], chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        if fused and grad:
            pieces.append(_LinearHeadLogprobs.apply(h, head.weight, head.bias, t, onednn))
        elif fused:
            picked, lse = _picked_and_logsumexp_(_linear_logits(h, head.weight, head.bias, onednn), t)
            pieces.append(picked - lse)
        elif grad:
            pieces.append(checkpoint(_chunk_logprobs, h, t, head, softcap, scale, use_reentrant=False))
        else:
            pieces.append(_chunk_logprobs(h, t, head, softcap, scale))
    return torch.cat(pieces).float()


def response_logprobs(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    chunk_size: int = 256,
) -> torch.Tensor:
    """log pi(response token | prompt, earlier response tokens), zero where ``response_mask`` is False.

    prompt_ids/prompt_mask: [R, P] left-padded; response_ids/response_mask: [R, T] right-padded.
    Returns [R, T] float32. Gradients flow when called under grad.
    """
    predicting = response_predicting(model, prompt_ids, prompt_mask, response_ids, response_mask)  # [R, T, H]
    return _response_positions_logprobs(model, predicting, response_ids, response_mask, chunk_size)


def response_predicting(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
) -> torch.Tensor:
    """The decoder's state before each response token, one pass over ``[prompt | response]``. -> [R, T, H]"""
    p = prompt_ids.shape[1]
    input_ids = torch.cat([prompt_ids, response_ids], dim=1)  # [R, P+T]
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1).long()
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    hidden = model.get_decoder()(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False
    ).last_hidden_state  # [R, P+T, H]
    return hidden[:, p - 1 : -1]  # [R, T, H]: state at position t predicts token t+1


def _response_positions_logprobs(
    model: torch.nn.Module,
    predicting: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    chunk_size: int,
) -> torch.Tensor:
    """The head on response positions only. predicting [R, T, H] (the state before each response token),
    response_ids/response_mask [R, T] -> [R, T] float32, zero where the mask is False."""
    out = torch.zeros(response_ids.shape, dtype=torch.float32, device=response_ids.device)
    flat_targets = response_ids[response_mask]  # [M]
    if flat_targets.numel():
        logprobs = chunked_logprobs(model, predicting[response_mask], flat_targets, chunk_size)  # [M]
        out = out.masked_scatter(response_mask, logprobs)
    return out


@functools.cache
def kv_cache_keyword() -> str:
    """The name under which a model's forward takes its KV cache and its output returns it: ``cache`` where
    transformers has renamed it (5.25 warns on ``past_key_values`` and drops it in 5.40), else ``past_key_values``."""
    from transformers.modeling_outputs import BaseModelOutputWithPast

    return "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def shared_prompt_problem(model: torch.nn.Module) -> str | None:
    """Why ``group_response_logprobs`` cannot run the prompt once per group for ``model`` right now; None
    when it can. The caller then scores every row with its own copy of the prompt (same values).

    Gradient checkpointing drops the KV cache in training (transformers' checkpointed layers pass no cache,
    and a replayed layer would append to it twice), and layers with a sliding window or chunked attention
    keep only part of the cache, so both take the one-pass path.
    """
    if model.training and any(getattr(m, "gradient_checkpointing", False) for m in model.modules()):
        return "gradient checkpointing is on (it drops the KV cache in training)"
    if windowed_attention(model.config):
        return "sliding-window or chunked attention layers"
    return None


def windowed_attention(config) -> bool:
    """True when some attention layer sees only a window or chunk of the sequence (not full causal)."""
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    windowed = getattr(config, "sliding_window", None) or getattr(config, "attention_chunk_size", None)
    return bool(windowed) or layer_types != {"full_attention"}


def group_response_logprobs(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    chunk_size: int = 256,
) -> torch.Tensor:
    """``response_logprobs`` for N responses per prompt, with each prompt run once, not N times.

    The decoder runs over the B prompts with a KV cache; the cache is repeated to the B*N rows (under
    grad the repeat sums the rows' gradients back into the prompt's keys and values), and a second
    decoder call runs the responses against it. The last prompt position's hidden state predicts every
    row's first response token. Same values as ``response_logprobs`` on the flattened rows, up to float
    rounding; the prompt part costs B instead of B*N rows (forward and backward). Check
    ``shared_prompt_problem(model)`` first.

    prompt_ids/prompt_mask: [B, P] left-padded; response_ids/response_mask: [B, N, T] right-padded.
    Returns [B, N, T] float32.
    """
    b, n, t = response_ids.shape
    predicting = _group_predicting(model, prompt_ids, prompt_mask, response_ids, response_mask)  # [B*N, T, H]
    flat_ids, flat_mask = response_ids.reshape(b * n, t), response_mask.reshape(b * n, t)  # [B, N, T] -> [B*N, T]
    out = _response_positions_logprobs(model, predicting, flat_ids, flat_mask, chunk_size)  # [B*N, T]
    return out.view(b, n, t)  # [B*N, T] -> [B, N, T]


def _group_predicting(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
) -> torch.Tensor:
    """The decoder's state before each response token, each prompt run once for its N responses
    (``group_response_logprobs``). prompt_ids/prompt_mask [B, P], response_ids/response_mask [B, N, T]
    -> [B*N, T, H]."""
    b, n, t = response_ids.shape
    decoder = model.get_decoder()
    mask = prompt_mask.long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, P]
    prompt_out = decoder(input_ids=prompt_ids, attention_mask=mask, position_ids=positions, use_cache=True)
    cache = getattr(prompt_out, kv_cache_keyword())
    cache.batch_repeat_interleave(n)  # [B, ...] -> [B*N, ...]
    flat_ids, flat_mask = response_ids.reshape(b * n, t), response_mask.reshape(b * n, t)  # [B, N, T] -> [B*N, T]
    first = positions[:, -1:].repeat_interleave(n, 0) + 1  # [B*N, 1]: the first response position
    hidden = decoder(
        input_ids=flat_ids,
        attention_mask=torch.cat([mask.repeat_interleave(n, 0), flat_mask.long()], dim=1),  # [B*N, P+T]
        position_ids=first + torch.arange(t, device=first.device),  # [B*N, T]
        use_cache=True,
        **{kv_cache_keyword(): cache},
    ).last_hidden_state  # [B*N, T, H]
    last_prompt = prompt_out.last_hidden_state[:, -1:].repeat_interleave(n, 0)  # [B*N, 1, H]
    return torch.cat([last_prompt, hidden[:, :-1]], dim=1)  # [B*N, T, H]: state before token t


def sample_logprobs(
    model: torch.nn.Module, samples: SampleBatch, chunk_size: int = 256, share_prompt: bool = True
) -> torch.Tensor:
    """Teacher-forced per-token log-probs of every sample under ``model``: [B, N, T] float32.

    Uses exactly the prompt ids the samples were drawn from (method.md §4.1). With ``share_prompt`` (and N > 1,
    and no ``shared_prompt_problem``) each prompt runs once for its N samples (``group_response_logprobs``);
    otherwise every sample row carries its own copy of the prompt. Gradients flow when called under grad.
    """
    b, n, t = samples.response_ids.shape
    flat_ids, flat_mask = samples.response_ids.view(b * n, t), samples.response_mask.view(b * n, t)  # -> [B*N, T]
    predicting = sample_predicting(model, samples, share_prompt)  # [B*N, T, H]
    out = _response_positions_logprobs(model, predicting, flat_ids, flat_mask, chunk_size)  # [B*N, T]
    return out.view(b, n, t)  # [B*N, T] -> [B, N, T]


def sample_predicting(model: torch.nn.Module, samples: SampleBatch, share_prompt: bool) -> torch.Tensor:
    """The decoder's state before each response token of every sample, each prompt once per group when it
    can (``sample_logprobs``). -> [B*N, T, H]"""
    b, n, t = samples.response_ids.shape
    prompts = samples.prompts
    if share_prompt and n > 1 and t > 0 and shared_prompt_problem(model) is None:
        return _group_predicting(
            model, prompts.prompt_ids, prompts.prompt_mask, samples.response_ids, samples.response_mask
        )
    return response_predicting(
        model,
        prompts.prompt_ids.repeat_interleave(n, 0),  # [B, P] -> [B*N, P]
        prompts.prompt_mask.repeat_interleave(n, 0),
        samples.response_ids.view(b * n, t),  # [B, N, T] -> [B*N, T]
        samples.response_mask.view(b * n, t),
    )
