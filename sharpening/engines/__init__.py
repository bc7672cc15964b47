"""Sampling engines: what turns a batch of prompts into N sampled responses each (a ``SampleBatch``).

``SamplingEngine`` (base.py) is the interface and what an engine must guarantee; ``SamplingConfig``
(config.py) the options every engine reads. ``HFEngine`` (hf.py) is our own decode loop over a transformers
model, ``generate_samples`` its function form; its decode modes are in hf_decode.py, its draw in draw.py and
race.py. ``power_sample`` (power.py) draws from pi_base^alpha by MCMC (power_mcmc.py) or SMC (power_smc.py).
"""

from sharpening.engines.base import SamplingEngine, decode_responses, derive_seed
from sharpening.engines.config import (
    SamplingConfig,
    decode_device_problems,
    is_exact_sampling,
    validate_sampling_config,
)
from sharpening.engines.hf import HFEngine, generate_samples
from sharpening.engines.power import PowerSamples, PowerSamplingConfig, power_sample, validate_power_config

__all__ = [
    "HFEngine",
    "PowerSamples",
    "PowerSamplingConfig",
    "SamplingConfig",
    "SamplingEngine",
    "decode_device_problems",
    "decode_responses",
    "derive_seed",
    "generate_samples",
    "is_exact_sampling",
    "power_sample",
    "validate_power_config",
    "validate_sampling_config",
]
