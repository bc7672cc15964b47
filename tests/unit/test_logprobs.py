"""response_logprobs / sample_logprobs against a per-token log-softmax written out by hand."""

from __future__ import annotations

import warnings

import pytest
import torch

from sharpening.logprobs import response_logprobs, sample_logprobs, shared_prompt_problem
from sharpening.prompts import pad_prompts
from sharpening.types import PromptBatch, SampleBatch

PAD = 0


def _reference_logprobs(model, prompts: list[list[int]], responses: list[list[int]], width: int) -> torch.Tensor:
    """Run the full model on each UNPADDED prompt+response; log-softmax as logits - logsumexp. [R, width]."""
    out = torch.zeros(len(prompts), width)
    for r, (prompt, response) in enumerate(zip(prompts, responses)):
        if not response:
            continue
        ids = torch.tensor([prompt + response])
        logits = model(input_ids=ids).logits[0].float()  # [L, V]
        for j, token in enumerate(response):
            row = logits[len(prompt) - 1 + j]  # the state before response token j predicts it
            out[r, j] = row[token] - torch.logsumexp(row, dim=-1)
    return out


def _right_pad(responses: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in responses)
    ids = torch.full((len(responses), width), PAD, dtype=torch.long)
    mask = torch.zeros(len(responses), width, dtype=torch.bool)
    for i, r in enumerate(responses):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = True
    return ids, mask


# Prompts of different lengths (so left padding differs per row), responses of different lengths
# (right padding differs; one includes EOS=2, one is a single token, one is empty).
PROMPTS = [[1, 3, 4, 5], [1, 6], [1, 7, 8, 9, 10, 11, 12], [1, 13, 14]]
RESPONSES = [[5, 6, 7, 2], [8], [9, 10, 11, 12, 13, 2], []]


@pytest.fixture
def batch():
    prompts = pad_prompts(PROMPTS, list(range(len(PROMPTS))), [None] * len(PROMPTS), PAD)
    response_ids, response_mask = _right_pad(RESPONSES)
    return prompts, response_ids, response_mask


def test_layout_of_the_fixture_is_mixed(batch):
    prompts, response_ids, response_mask = batch
    assert not prompts.prompt_mask.all(-1).all()  # some prompts are left-padded
    assert not response_mask.all(-1).all()  # some responses are right-padded


def test_matches_hand_written_log_softmax(tiny_model, batch):
    prompts, response_ids, response_mask = batch
    with torch.no_grad():
        got = response_logprobs(tiny_model, prompts.prompt_ids, prompts.prompt_mask, response_ids, response_mask)
        want = _reference_logprobs(tiny_model, PROMPTS, RESPONSES, response_ids.shape[1])
    assert got.shape == response_ids.shape
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (got[response_mask] < 0).all()  # real tokens have a real (negative) log-prob


def test_zero_on_masked_positions(tiny_model, batch):
    prompts, response_ids, response_mask = batch
    # garbage in the padded positions must not leak into the output
    noisy_ids = torch.where(response_mask, response_ids, torch.full_like(response_ids, 17))
    with torch.no_grad():
        got = response_logprobs(tiny_model, prompts.prompt_ids, prompts.prompt_mask, noisy_ids, response_mask)
        clean = response_logprobs(tiny_model, prompts.prompt_ids, prompts.prompt_mask, response_ids, response_mask)
    assert (got[~response_mask] == 0).all()
    torch.testing.assert_close(got, clean, atol=1e-6, rtol=0)


def test_row_does_not_depend_on_batch_padding(tiny_model, batch):
    prompts, response_ids, response_mask = batch
    with torch.no_grad():
        together = response_logprobs(tiny_model, prompts.prompt_ids, prompts.prompt_mask, response_ids, response_mask)
        alone = response_logprobs(
            tiny_model,
            torch.tensor([PROMPTS[1]]),
            torch.ones(1, len(PROMPTS[1]), dtype=torch.bool),
            torch.tensor([RESPONSES[1]]),
            torch.ones(1, len(RESPONSES[1]), dtype=torch.bool),
        )
    torch.testing.assert_close(together[1, : len(RESPONSES[1])], alone[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunk_size", [1, 3, 10**6])
def test_chunk_size_does_not_change_values(tiny_model, batch, chunk_size):
    prompts, response_ids, response_mask = batch
    with torch.no_grad():
        base = response_logprobs(tiny_model, prompts.prompt_ids, prompts.prompt_mask, response_ids, response_mask, 7)
        got = response_logprobs(
            tiny_model, prompts.prompt_ids, prompts.prompt_mask, response_ids, response_mask, chunk_size
        )
    torch.testing.assert_close(got, base, atol=1e-6, rtol=0)


def test_all_masked_responses_give_zeros(tiny_model, batch):
    prompts, response_ids, _ = batch
    empty = torch.zeros_like(response_ids, dtype=torch.bool)
    with torch.no_grad():
        got = response_logprobs(tiny_model, prompts.prompt_ids, prompts.prompt_mask, response_ids, empty)
    assert got.shape == response_ids.shape and (got == 0).all()


@pytest.mark.parametrize("chunk_size", [1, 3, 10**6])
def test_gradients_flow_and_match_unchunked_reference(tiny_model, batch, chunk_size):
    prompts, response_ids, response_mask = batch
    params = [p for p in tiny_model.parameters() if p.requires_grad]
    assert params
    got = response_logprobs(
        tiny_model, prompts.prompt_ids, prompts.prompt_mask, response_ids, response_mask, chunk_size
    )
    assert got.requires_grad
    got_grads = torch.autograd.grad(got.sum(), params, allow_unused=True)
    want = _reference_logprobs(tiny_model, PROMPTS, RESPONSES, response_ids.shape[1])
    want_grads = torch.autograd.grad(want.sum(), params, allow_unused=True)
    lm_head = tiny_model.get_output_embeddings().weight
    for g, w in zip(got_grads, want_grads):
        if w is None:
            assert g is None or (g == 0).all()
            continue
        assert g is not None
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
    head_grad = got_grads[[i for i, p in enumerate(params) if p is lm_head][0]]
    assert head_grad.abs().sum() > 0


def test_loss_backward_reaches_parameters(tiny_model_path, batch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    prompts, response_ids, response_mask = batch
    loss = -response_logprobs(model, prompts.prompt_ids, prompts.prompt_mask, response_ids, response_mask, 2).sum()
    loss.backward()
    layer = model.model.layers[0].self_attn.q_proj.weight
    assert layer.grad is not None and layer.grad.abs().sum() > 0
    assert model.get_output_embeddings().weight.grad.abs().sum() > 0


def test_no_grad_under_inference(tiny_model, batch):
    prompts, response_ids, response_mask = batch
    with torch.no_grad():
        got = response_logprobs(tiny_model, prompts.prompt_ids, prompts.prompt_mask, response_ids, response_mask)
    assert not got.requires_grad


def test_float32_output_for_bfloat16_model(tiny_model_path, batch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.bfloat16).eval()
    prompts, response_ids, response_mask = batch
    with torch.no_grad():
        got = response_logprobs(model, prompts.prompt_ids, prompts.prompt_mask, response_ids, response_mask)
    assert got.dtype == torch.float32


def test_sample_logprobs_shape_and_values(tiny_model, batch):
    prompts, _, _ = batch
    b, n, t = len(prompts), 3, 5
    gen = torch.Generator().manual_seed(0)
    response_ids = torch.randint(3, 24, (b, n, t), generator=gen)
    lengths = torch.randint(0, t + 1, (b, n), generator=gen)
    response_mask = torch.arange(t)[None, None, :] < lengths[..., None]  # [B, N, T]
    response_ids = torch.where(response_mask, response_ids, PAD)
    samples = SampleBatch(
        prompts=prompts,
        response_ids=response_ids,
        response_mask=response_mask,
        logprobs=torch.zeros(b, n, t),
        truncated=torch.zeros(b, n, dtype=torch.bool),
        exact_draws=True,
    )
    with torch.no_grad():
        got = sample_logprobs(tiny_model, samples, chunk_size=4)
    assert got.shape == (b, n, t) and got.dtype == torch.float32
    for i in range(b):
        rows = [response_ids[i, j][response_mask[i, j]].tolist() for j in range(n)]
        want = _reference_logprobs(tiny_model, [PROMPTS[i]] * n, rows, t)
        torch.testing.assert_close(got[i], want, atol=1e-5, rtol=0)


def _group_samples(prompts: PromptBatch, n: int = 3, t: int = 5, seed: int = 0) -> SampleBatch:
    """N random responses per prompt of random lengths (0..t tokens: some rows are all padding)."""
    b = len(prompts)
    gen = torch.Generator().manual_seed(seed)
    response_mask = torch.arange(t)[None, None, :] < torch.randint(0, t + 1, (b, n, 1), generator=gen)  # [B, N, T]
    response_ids = torch.where(response_mask, torch.randint(3, 24, (b, n, t), generator=gen), PAD)
    return SampleBatch(
        prompts, response_ids, response_mask, torch.zeros(b, n, t), torch.zeros(b, n, dtype=torch.bool), True
    )


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_shared_prompt_equals_a_prompt_copy_per_sample_in_values_and_gradients(tiny_model_path, batch, attention):
    """Each prompt runs once for its N samples (KV cache repeated); values and gradients are those of the
    one-row-per-sample pass, with left-padded prompts and empty responses in the batch."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, attn_implementation=attention)
    samples = _group_samples(batch[0])
    assert shared_prompt_problem(model) is None
    params = [p for p in model.parameters() if p.requires_grad]
    results = {}
    for share in (True, False):
        got = sample_logprobs(model, samples, chunk_size=4, share_prompt=share)
        results[share] = (got.detach(), torch.autograd.grad((got * got.detach()).sum(), params, allow_unused=True))
    torch.testing.assert_close(results[True][0], results[False][0], atol=1e-5, rtol=0)
    assert (results[True][0][~samples.response_mask] == 0).all()
    for shared, flat in zip(results[True][1], results[False][1]):
        assert (shared is None) == (flat is None)
        if flat is not None:
            torch.testing.assert_close(shared, flat, atol=1e-5, rtol=1e-4)


def test_shared_prompt_runs_each_prompt_once(tiny_model, batch):
    """Token positions through the decoder: B*P + B*N*T with the shared prompt, B*N*(P+T) without."""
    samples = _group_samples(batch[0], n=4)
    (b, p), (_, n, t) = samples.prompts.prompt_ids.shape, samples.response_ids.shape
    seen = []
    hook = tiny_model.get_input_embeddings().register_forward_hook(lambda m, i, out: seen.append(out.shape[:2].numel()))
    try:
        with torch.no_grad():
            sample_logprobs(tiny_model, samples)
            shared = sum(seen)
            seen.clear()
            sample_logprobs(tiny_model, samples, share_prompt=False)
    finally:
        hook.remove()
    assert (shared, sum(seen)) == (b * p + b * n * t, b * n * (p + t))


def test_shared_prompt_gives_way_to_gradient_checkpointing_and_sliding_windows(tiny_model_path, batch):
    """Checkpointed layers drop the KV cache in training, and windowed layers keep part of it: both take
    the one-row-per-sample pass, with the same values."""
    import transformers
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": False})
    model.train()
    assert "gradient checkpointing" in shared_prompt_problem(model)
    samples = _group_samples(batch[0])
    got = sample_logprobs(model, samples)
    model.eval()
    assert shared_prompt_problem(model) is None  # no replay outside training
    with torch.no_grad():
        torch.testing.assert_close(got.detach(), sample_logprobs(model, samples, share_prompt=False), atol=1e-5, rtol=0)
    windowed = transformers.MistralConfig(
        vocab_size=24,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=4,
    )
    assert "sliding-window" in shared_prompt_problem(transformers.MistralForCausalLM(windowed))


def test_a_policy_loaded_with_gradient_checkpointing_scores_in_one_pass_without_deprecation(tiny_model_path):
    from sharpening.policy import PolicyConfig, load_policy

    cfg = PolicyConfig(
        model_name_or_path=tiny_model_path, finetuning="full", dtype="float32", gradient_checkpointing=True
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # transformers' older name for turning checkpointing on
        policy, _ = load_policy(cfg, frozen_copy=False)
    assert policy.training and "gradient checkpointing" in shared_prompt_problem(policy)


def _tiny_family_model(family: str):
    import transformers

    common = dict(
        vocab_size=24,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if family == "gemma2":
        config = transformers.Gemma2Config(final_logit_softcapping=0.5, **common)  # small cap: clearly active
        cls = transformers.Gemma2ForCausalLM
    elif family == "granite":
        config = transformers.GraniteConfig(logits_scaling=0.25, **common)  # logits / 0.25: clearly active
        cls = transformers.GraniteForCausalLM
    else:
        config = transformers.CohereConfig(logit_scale=3.0, **common)
        cls = transformers.CohereForCausalLM
    torch.manual_seed(0)
    return cls(config).eval()


@pytest.mark.parametrize("family", ["gemma2", "cohere", "granite"])
def test_logit_post_processing_families_match_model_forward(family, batch):
    """Families that softcap (Gemma 2) or scale (Cohere, Granite) logits in forward must be scored the same way."""
    from sharpening.logprobs import logit_head_problem

    model = _tiny_family_model(family)
    assert logit_head_problem(model) is None
    prompts, response_ids, response_mask = batch
    with torch.no_grad():
        got = response_logprobs(model, prompts.prompt_ids, prompts.prompt_mask, response_ids, response_mask, 3)
        want = _reference_logprobs(model, PROMPTS, RESPONSES, response_ids.shape[1])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_a_family_whose_logits_are_post_processed_otherwise_is_refused_when_it_loads(
    tiny_model_path, tmp_path, monkeypatch
):
    """A scale under a name sharpening does not know (here: logits * 3 in forward) would make teacher-forced
    scores another distribution than the samples': loading refuses the model instead."""
    import transformers

    from sharpening.errors import ConfigError
    from sharpening.logprobs import logit_head_problem
    from sharpening.policy import PolicyConfig, load_policy

    forward = transformers.LlamaForCausalLM.forward

    def scaled(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        out.logits = out.logits * 3.0
        return out

    model = _tiny_family_model("cohere")
    assert logit_head_problem(model) is None
    monkeypatch.setattr(transformers.LlamaForCausalLM, "forward", scaled)
    with pytest.raises(ConfigError, match="post-processed in a way sharpening does not reproduce"):
        load_policy(PolicyConfig(model_name_or_path=tiny_model_path, finetuning="full", dtype="float32"))


def test_prompt_batch_len():
    batch = PromptBatch(
        torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2, dtype=torch.bool), torch.arange(3), [None] * 3
    )
    assert len(batch) == 3


# ---- the fused linear-head path (one logits buffer per chunk) against autograd through logsumexp ----------


def _head_inputs(dtype=torch.float32, bias=True, rows=7, hidden=5, vocab=11, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    head = torch.nn.Linear(hidden, vocab, bias=bias, dtype=dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, hidden, generator=gen))
        if bias:
            head.bias.copy_(torch.randn(vocab, generator=gen))
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    return h, head, targets


def _autograd_reference(h, head, targets):
    logits = head(h).float()
    return logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)


@pytest.mark.parametrize("bias", [True, False])
def test_fused_head_matches_autograd_values_and_gradients(bias):
    from sharpening.logprobs import _LinearHeadLogprobs

    h, head, targets = _head_inputs(bias=bias)
    upstream = torch.randn(h.shape[0])
    got = _LinearHeadLogprobs.apply(h, head.weight, head.bias, targets)
    params = [h, head.weight] + ([head.bias] if bias else [])
    got_grads = torch.autograd.grad((got * upstream).sum(), params)
    want = _autograd_reference(h, head, targets)
    want_grads = torch.autograd.grad((want * upstream).sum(), params)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)


def test_fused_head_passes_gradcheck_in_float64():
    from sharpening.logprobs import _LinearHeadLogprobs

    h, head, targets = _head_inputs(dtype=torch.float64, rows=4, hidden=3, vocab=6)
    weight = head.weight.detach().clone().requires_grad_()
    bias = head.bias.detach().clone().requires_grad_()
    # float64 logits are kept as they are (no float32 cast), so finite differences are exact enough
    assert torch.autograd.gradcheck(lambda a, w, b: _LinearHeadLogprobs.apply(a, w, b, targets), (h, weight, bias))


def test_fused_head_bfloat16_matches_autograd():
    from sharpening.logprobs import _LinearHeadLogprobs

    h, head, targets = _head_inputs(dtype=torch.bfloat16)
    got = _LinearHeadLogprobs.apply(h, head.weight, head.bias, targets)
    want = _autograd_reference(h, head, targets)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    got_grads = torch.autograd.grad(got.sum(), [h, head.weight])
    want_grads = torch.autograd.grad(want.sum(), [h, head.weight])
    for g, w in zip(got_grads, want_grads):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), w.float(), atol=2e-2, rtol=2e-2)


def test_only_a_plain_linear_head_takes_the_fused_path():
    from sharpening.logprobs import _plain_linear_head

    class Wrapped(torch.nn.Linear):  # a LoRA or quantized layer is a subclass or another module
        pass

    assert _plain_linear_head(torch.nn.Linear(4, 8), None, None)
    assert not _plain_linear_head(Wrapped(4, 8), None, None)
    assert not _plain_linear_head(torch.nn.Linear(4, 8), 30.0, None)  # gemma2-style softcap
    assert not _plain_linear_head(torch.nn.Linear(4, 8), None, 0.0625)  # cohere-style scale
    sharded = torch.nn.Linear(4, 8)
    sharded.weight = torch.nn.Parameter(torch.empty(0))  # an FSDP shell outside forward
    assert not _plain_linear_head(sharded, None, None)


@pytest.mark.parametrize("bias", [True, False])
def test_a_onednn_head_takes_the_fused_path_with_the_same_values_and_gradients(bias, monkeypatch):
    """On CPU a large LM head is a OneDNNLinear (policy.set_cpu_linear): it must keep the fused, one-buffer
    path (it fell back to the checkpointed autograd path before) and give nn.Linear's values and gradients."""
    import sharpening.logprobs as lp
    from sharpening.kernels.cpu_linear import OneDNNLinear, onednn_linear_available, use_onednn_linears

    if not onednn_linear_available():
        pytest.skip("this PyTorch has no working oneDNN linear")
    h, head, targets = _head_inputs(bias=bias, rows=40, hidden=24, vocab=300)
    fast = torch.nn.Linear(head.in_features, head.out_features, bias=bias)
    fast.load_state_dict(head.state_dict())
    assert use_onednn_linears(fast, min_weight=0) == 1 and type(fast) is OneDNNLinear
    assert lp._plain_linear_head(fast, None, None)
    import sharpening.kernels.cpu_linear as cl

    calls, original = [], cl.onednn_linear
    monkeypatch.setattr(cl, "onednn_linear", lambda *a: calls.append(1) or original(*a))
    model = type("M", (), {})()  # only what chunked_logprobs reads: the head and the config
    model.config = type("C", (), {})()
    upstream = torch.randn(h.shape[0])
    for layer, expect_onednn in ((head, False), (fast, True)):
        model.get_output_embeddings = lambda layer=layer: layer
        calls.clear()
        hidden = h.detach().clone().requires_grad_()
        got = lp.chunked_logprobs(model, hidden, targets, chunk_size=16)
        grads = torch.autograd.grad((got * upstream).sum(), [hidden, *layer.parameters()])
        assert bool(calls) == expect_onednn
        if layer is head:
            want, want_grads = got, grads
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("grad", [False, True])
def test_fused_and_checkpointed_chunk_paths_agree_on_the_model(tiny_model, batch, grad, monkeypatch):
    import sharpening.logprobs as lp

    prompts, response_ids, response_mask = batch
    args = (tiny_model, prompts.prompt_ids, prompts.prompt_mask, response_ids, response_mask, 3)
    with torch.set_grad_enabled(grad):
        fused = response_logprobs(*args)
        monkeypatch.setattr(lp, "_plain_linear_head", lambda *a: False)
        plain = response_logprobs(*args)
    torch.testing.assert_close(fused, plain, atol=1e-6, rtol=1e-6)
    if grad:
        params = [p for p in tiny_model.parameters() if p.requires_grad]
        monkeypatch.undo()
        fused_grads = torch.autograd.grad(response_logprobs(*args).sum(), params, allow_unused=True)
        monkeypatch.setattr(lp, "_plain_linear_head", lambda *a: False)
        plain_grads = torch.autograd.grad(response_logprobs(*args).sum(), params, allow_unused=True)
        for f, p in zip(fused_grads, plain_grads):
            if p is None:
                assert f is None or (f == 0).all()
            else:
                torch.testing.assert_close(f, p, atol=1e-6, rtol=1e-5)


def test_fused_head_under_autocast_recomputes_the_same_logits_in_backward():
    """Under bf16 autocast the forward's logits are bf16 matmuls; backward must recompute them the same way,
    or softmax = exp(logits - lse) would not sum to one and the gradient would be off."""
    from sharpening.logprobs import _LinearHeadLogprobs

    h, head, targets = _head_inputs(rows=16, hidden=32, vocab=50)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _LinearHeadLogprobs.apply(h, head.weight, head.bias, targets)
        want = _autograd_reference(h, head, targets)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    got_grads = torch.autograd.grad(got.sum(), [h, head.weight, head.bias])
    want_grads = torch.autograd.grad(want.sum(), [h, head.weight, head.bias])
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g.float(), w.float(), atol=1e-2, rtol=1e-2)
    # the gradient with respect to the logits sums to zero per row: the bias gradient's total is ~0
    assert abs(float(got_grads[2].sum())) < 1e-2
