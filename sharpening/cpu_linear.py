"""Re-exports ``sharpening.kernels.cpu_linear`` at its former import path."""

from sharpening.kernels.cpu_linear import (  # noqa: F401 (re-export; removed in the final import pass)
    CPU_LINEAR_KERNELS,
    MIN_ONEDNN_WEIGHT,
    OneDNNLinear,
    linear,
    onednn_applies,
    onednn_linear,
    onednn_linear_available,
    packed_linear_weights,
    select_cpu_linear,
    use_onednn_linears,
)
