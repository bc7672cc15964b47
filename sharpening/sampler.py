"""Re-exports the sampling engines' names (``sharpening.engines``) at their former import path."""

from sharpening.engines.base import decode_responses, derive_seed  # noqa: F401 (re-export; removed in the final import pass)
from sharpening.engines.config import (  # noqa: F401 (re-export; removed in the final import pass)
    DECODE_MODES,
    SamplingConfig,
    decode_device_problems,
    is_exact_sampling,
    validate_sampling_config,
)
from sharpening.engines.draw import RACE_CHUNK, filter_logits  # noqa: F401 (re-export; removed in the final import pass)
from sharpening.engines.hf import generate_samples  # noqa: F401 (re-export; removed in the final import pass)
