"""oneDNN linear layers on CPU: same values and gradients as nn.Linear, fallbacks, and where they are used."""

from __future__ import annotations

import copy

import pytest
import torch

from sharpening.kernels.cpu_linear import (
    MIN_ONEDNN_WEIGHT,
    OneDNNLinear,
    onednn_applies,
    onednn_linear_available,
    packed_linear_weights,
    select_cpu_linear,
    use_onednn_linears,
)
from sharpening.policy import PolicyConfig, load_frozen_base, load_policy, validate_policy_config

needs_onednn = pytest.mark.skipif(not onednn_linear_available(), reason="this PyTorch has no oneDNN linear")


def _pair(in_features=48, out_features=40, bias=True, seed=0):
    torch.manual_seed(seed)
    plain = torch.nn.Linear(in_features, out_features, bias=bias)
    fast = copy.deepcopy(plain)
    assert use_onednn_linears(torch.nn.Sequential(fast), min_weight=0) == 1
    return plain, fast


def _ops(fn):
    """Names of the aten/mkldnn ops ``fn`` runs."""
    with torch.profiler.profile() as prof:
        fn()
    return {e.key for e in prof.key_averages()}


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(7, 48), (3, 5, 48), (2, 1, 3, 48)])
def test_values_and_gradients_equal_nn_linear(shape, bias):
    plain, fast = _pair(bias=bias)
    x = torch.randn(*shape, requires_grad=True)
    x_fast = x.detach().clone().requires_grad_()
    y, y_fast = plain(x), fast(x_fast)
    assert y_fast.shape == y.shape
    torch.testing.assert_close(y_fast, y, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_fast.backward(grad)
    torch.testing.assert_close(x_fast.grad, x.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.weight.grad, plain.weight.grad, rtol=1e-5, atol=1e-5)
    if bias:
        torch.testing.assert_close(fast.bias.grad, plain.bias.grad, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_float32_cpu_calls_take_onednn_and_others_fall_back():
    _, fast = _pair()
    x = torch.randn(4, 48)
    assert "mkldnn::_linear_pointwise" in _ops(lambda: fast(x))
    with torch.no_grad():
        assert "mkldnn::_linear_pointwise" in _ops(lambda: fast(x))
    assert not onednn_applies(x.double(), fast.weight.double(), None)  # float64: nn.Linear's kernel
    assert "mkldnn::_linear_pointwise" not in _ops(lambda: fast.double()(x.double()))
    fast.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast decides the dtype: F.linear
        assert not onednn_applies(x, fast.weight, fast.bias)
        assert fast(x).dtype == torch.bfloat16
    assert not onednn_applies(torch.randn(0, 48), fast.weight, fast.bias)  # no rows: F.linear
    assert fast(torch.randn(0, 48)).shape == (0, 40)


@needs_onednn
def test_frozen_weights_give_input_gradients_only():
    plain, fast = _pair()
    for layer in (plain, fast):
        layer.requires_grad_(False)
    x = torch.randn(6, 48, requires_grad=True)
    x_fast = x.detach().clone().requires_grad_()
    plain(x).sum().backward()
    fast(x_fast).sum().backward()
    torch.testing.assert_close(x_fast.grad, x.grad, rtol=1e-5, atol=1e-5)
    assert fast.weight.grad is None


@needs_onednn
def test_packed_weights_give_the_same_values_and_follow_weight_updates():
    plain, fast = _pair()
    x = torch.randn(5, 48)
    with torch.no_grad():
        unpacked = fast(x)
        with packed_linear_weights(fast):
            torch.testing.assert_close(fast(x), unpacked, rtol=1e-6, atol=1e-6)
            assert fast._packed is not None
            fast.weight.mul_(2.0)  # an in-place update bumps the version: the packed copy is made again
            plain.weight.mul_(2.0)
            torch.testing.assert_close(fast(x), plain(x), rtol=1e-5, atol=1e-5)
        assert fast._packed is None and not fast._packing  # copies dropped on exit
        with packed_linear_weights(fast):
            with packed_linear_weights(fast):  # nested (a sampler call inside a caller's context): the outer keeps them
                fast(x)
            assert fast._packing and fast._packed is not None
        assert fast._packed is None and not fast._packing


def test_select_cpu_linear():
    assert select_cpu_linear("auto", True) == "onednn"
    assert select_cpu_linear("auto", False) == "torch"
    assert select_cpu_linear("torch", True) == "torch"
    assert select_cpu_linear("onednn", True) == "onednn"


@needs_onednn
def test_swap_keeps_state_dict_and_skips_subclasses():
    class Custom(torch.nn.Linear):  # a subclass (as bitsandbytes' 4-bit layer) has its own forward
        pass

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), Custom(8, 8), torch.nn.Embedding(4, 8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert use_onednn_linears(model, min_weight=0) == 1
    assert type(model[0]) is OneDNNLinear and type(model[1]) is Custom
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert type(copy.deepcopy(model)[0]) is OneDNNLinear


@needs_onednn
@pytest.mark.parametrize("finetuning", ["full", "lora"])
def test_load_policy_routes_cpu_linears_by_config(tiny_model_path, finetuning):
    kinds = {}
    for choice in ("onednn", "torch", "auto"):
        policy, _ = load_policy(PolicyConfig(model_name_or_path=tiny_model_path, finetuning=finetuning,
                                             dtype="float32", cpu_linear=choice))  # fmt: skip
        kinds[choice] = {type(m) for m in policy.modules() if isinstance(m, torch.nn.Linear)}
    assert kinds["onednn"] == {OneDNNLinear} and kinds["torch"] == {torch.nn.Linear}
    assert kinds["auto"] == {torch.nn.Linear}  # the tiny model's layers are all under MIN_ONEDNN_WEIGHT
    base = load_frozen_base(PolicyConfig(model_name_or_path=tiny_model_path, finetuning="full", dtype="float32",
                                         cpu_linear="onednn"))  # fmt: skip
    assert {type(m) for m in base.modules() if isinstance(m, torch.nn.Linear)} == {OneDNNLinear}


@needs_onednn
def test_auto_takes_onednn_for_large_layers_only():
    model = torch.nn.Sequential(torch.nn.Linear(512, 256), torch.nn.Linear(256, 256), torch.nn.Linear(256, 704))
    assert 256 * 256 < MIN_ONEDNN_WEIGHT <= 512 * 256
    assert use_onednn_linears(model) == 2
    assert [type(m) for m in model] == [OneDNNLinear, torch.nn.Linear, OneDNNLinear]


def test_cpu_linear_option_is_validated(tiny_model_path):
    problems = validate_policy_config(PolicyConfig(model_name_or_path=tiny_model_path, cpu_linear="mkl"))
    assert any("--model.policy.cpu_linear='mkl'" in p and "auto, onednn, torch" in p for p in problems)


@needs_onednn
def test_sampler_and_scoring_agree_with_nn_linear(tiny_model):
    """Same draws (same seed) and log-probs to float32 rounding, with the decode step's packed weights."""
    from sharpening.engines import SamplingConfig, generate_samples
    from sharpening.logprobs import sample_logprobs
    from sharpening.prompts import pad_prompts

    fast = copy.deepcopy(tiny_model)
    assert use_onednn_linears(fast, min_weight=0) > 0
    prompts = pad_prompts([[1, 3, 4, 11], [1, 5, 6, 7, 8, 9, 11], [1, 10, 11]], [0, 1, 2], [None] * 3, 0)
    cfg = SamplingConfig(samples_per_prompt=4, max_new_tokens=12)
    plain_samples = generate_samples(tiny_model, prompts, cfg, 2, 0, seed=3)
    fast_samples = generate_samples(fast, prompts, cfg, 2, 0, seed=3)
    assert torch.equal(fast_samples.response_ids, plain_samples.response_ids)
    torch.testing.assert_close(fast_samples.logprobs, plain_samples.logprobs, rtol=1e-5, atol=1e-5)
    assert all(m._packed is None for m in fast.modules() if isinstance(m, OneDNNLinear))
    with torch.no_grad():
        torch.testing.assert_close(sample_logprobs(fast, fast_samples), sample_logprobs(tiny_model, plain_samples),
                                   rtol=1e-5, atol=1e-5)  # fmt: skip


@needs_onednn
def test_samplers_inside_one_packing_context_reorder_each_weight_once(tiny_model):
    """The self-verification round and evaluate wrap all their batches in one context: the sampler's own
    context then reuses the outer copies instead of reordering the weights for every batch."""
    from sharpening.engines import SamplingConfig, generate_samples
    from sharpening.prompts import pad_prompts

    fast = copy.deepcopy(tiny_model)
    use_onednn_linears(fast, min_weight=0)
    layers = [m for m in fast.modules() if isinstance(m, OneDNNLinear)]
    prompts = pad_prompts([[1, 3, 4, 11], [1, 10, 11]], [0, 1], [None] * 2, 0)
    cfg = SamplingConfig(samples_per_prompt=2, max_new_tokens=4)
    with packed_linear_weights(fast):
        generate_samples(fast, prompts, cfg, 2, 0, seed=1)
        first = [m._packed[1] for m in layers]
        generate_samples(fast, prompts, cfg, 2, 0, seed=2)
        assert all(m._packed[1] is copy_ for m, copy_ in zip(layers, first))
    assert all(m._packed is None for m in layers)
