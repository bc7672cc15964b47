"""Re-exports ``sharpening.kernels.decode_attention`` at its former import path."""

from sharpening.kernels.decode_attention import (  # noqa: F401 (re-export; removed in the final import pass)
    DECODE_ATTENTION,
    cpu_decode_attention,
    decode_attention,
    decode_attention_applies,
    decode_attention_forward,
    uses_decode_attention,
)
