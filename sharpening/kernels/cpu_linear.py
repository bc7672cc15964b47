"""Linear layers through oneDNN on CPU (float32).

PyTorch runs ``nn.Linear`` on x86 CPUs through MKL's sgemm. On CPUs where MKL does not take its AVX-512 path
(AMD EPYC, where these benchmarks run), oneDNN's matmul, which PyTorch also ships, is 20-70% (Zen 4) to about
2x (Zen 5) faster for the shapes of a decode step and of an update (scripts/bench.py; docs/benchmarks.md).
``OneDNNLinear`` is ``nn.Linear`` with the same parameters and state dict whose forward and both gradients run
through oneDNN when the call allows it; anything else (CUDA, other dtypes, autocast, tensor subclasses) takes
``nn.Linear``'s own path. Results are float32 with another summation order: equal to ``F.linear`` to
float32 rounding, not bitwise.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
import torch.nn.functional as F

CPU_LINEAR_KERNELS = ("auto", "onednn", "torch")
# Smallest weight (in_features x out_features) that oneDNN gets: below it, its per-call and per-shape setup
# (about 10 us a call, 0.3-0.8 ms for each new row count) costs more than its faster inner loop gives back
# (256 x 256 and 256 x 128 layers ran as fast or faster with nn.Linear's kernel; 256 x 704 and up faster with oneDNN).
MIN_ONEDNN_WEIGHT = 2**17


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T + bias`` by oneDNN: x [..., K], weight [N, K] (dense, or reordered by oneDNN) -> [..., N]."""
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), weight, bias, "none", [], "")
    return y.view(*x.shape[:-1], weight.shape[0])  # [M, N] -> [..., N]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, onednn: bool) -> torch.Tensor:
    """``x @ weight.T + bias``: through oneDNN when ``onednn`` and the call allows it (``onednn_applies``), else
    ``F.linear``. For callers that run a ``OneDNNLinear``'s weight outside its forward (the fused LM head)."""
    if onednn and onednn_applies(x, weight, bias):
        return onednn_linear(x, weight, bias)
    return F.linear(x, weight, bias)


@functools.cache
def onednn_linear_available() -> bool:
    """True when this PyTorch has oneDNN's linear and it agrees with ``F.linear`` on a small probe."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        generator = torch.Generator().manual_seed(0)
        x, w = torch.randn(3, 8, generator=generator), torch.randn(5, 8, generator=generator)
        b = torch.randn(5, generator=generator)
        return bool(torch.allclose(onednn_linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def select_cpu_linear(requested: str, available: bool) -> str:
    """The kernel to load with: 'auto' is onednn where it is available, else torch."""
    if requested != "auto":
        return requested
    return "onednn" if available else "torch"


class _OneDNNLinearFunction(torch.autograd.Function):
    """oneDNN forward, input gradient and weight gradient (the weight gradient as one oneDNN matmul over all
    rows, reading the transposed views in place: 1.6-2x ``mm``'s speed on a Zen 5 EPYC, about the same on the
    Zen 4 one measured before)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return onednn_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_2d = grad.reshape(-1, grad.shape[-1])  # [..., N] -> [M, N]
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = onednn_linear(grad, weight.t(), None)  # [..., N] @ [N, K] -> [..., K]
        if ctx.needs_input_grad[1]:
            x_2d = x.reshape(-1, x.shape[-1])  # [..., K] -> [M, K]
            grad_weight = onednn_linear(grad_2d.t(), x_2d.t(), None)  # [N, M] @ [M, K] -> [N, K]
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_2d.sum(0)
        return grad_x, grad_weight, grad_bias


def _plain(t: torch.Tensor | None) -> bool:
    return t is None or type(t) in (torch.Tensor, torch.nn.Parameter)


def onednn_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether a call can take the oneDNN path: plain float32 CPU tensors, outside CPU autocast."""
    return (
        x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and (bias is None or bias.dtype == torch.float32)
        and _plain(x)
        and _plain(weight)
        and _plain(bias)
        and x.dim() >= 2
        and x.shape[-1] > 0
        and weight.shape[0] > 0
        and x.numel() > 0
        and not torch.is_autocast_enabled("cpu")
    )


class OneDNNLinear(torch.nn.Linear):
    """``nn.Linear`` whose float32 CPU calls run through oneDNN (see the module docstring)."""

    _packing = False  # inside packed_linear_weights: no-grad calls use a reordered copy of the weight
    _packed: tuple | None = None  # ((data_ptr, version), reordered weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not onednn_applies(x, self.weight, self.bias):
            return F.linear(x, self.weight, self.bias)
        if torch.is_grad_enabled() and (
            x.requires_grad or self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad)
        ):
            return _OneDNNLinearFunction.apply(x, self.weight, self.bias)
        return onednn_linear(x, self._packed_weight() if self._packing else self.weight, self.bias)

    def _packed_weight(self) -> torch.Tensor:
        """The weight reordered into oneDNN's blocked layout, made again whenever the weight changed."""
        key = (self.weight.data_ptr(), self.weight._version)
        if self._packed is None or self._packed[0] != key:
            self._packed = (key, torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), None))
        return self._packed[1]


@contextlib.contextmanager
def packed_linear_weights(model: torch.nn.Module) -> Iterator[None]:
    """Inside, no-grad calls of ``model``'s oneDNN linear layers use their weights reordered once into
    oneDNN's blocked layout (same results; 10-30% faster for the few rows of a decode step). The reordered
    copies, one weight's size each, are dropped on exit."""
    modules = [m for m in model.modules() if isinstance(m, OneDNNLinear) and not m._packing]  # not already inside
    for module in modules:
        module._packing = True
    try:
        yield
    finally:
        for module in modules:
            module._packing, module._packed = False, None


def use_onednn_linears(model: torch.nn.Module, min_weight: int = MIN_ONEDNN_WEIGHT) -> int:
    """Turn every plain ``nn.Linear`` of ``model`` with at least ``min_weight`` weights into a ``OneDNNLinear``
    in place (same parameters, hooks and state dict; subclasses such as bitsandbytes' 4-bit layers are left
    alone). Returns how many."""
    count = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear and module.in_features * module.out_features >= min_weight:
            module.__class__ = OneDNNLinear
            count += 1
    return count
