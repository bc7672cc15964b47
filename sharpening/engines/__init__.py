"""Sampling engines: what turns a batch of prompts into N sampled responses each (a ``SampleBatch``).

``SamplingEngine`` (base.py) is the interface and what an engine must guarantee; ``SamplingConfig``
(config.py) the options every engine reads. ``HFEngine`` (hf.py) is our own decode loop over a transformers
model, ``generate_samples`` its function form; its decode modes are in hf_decode.py, its draw in draw.py and
race.py. ``VLLMEngine`` (vllm.py, optional) draws with vLLM, colocated, following the in-memory model's
weights; ``make_engine`` picks one by ``SamplingConfig.engine``. ``power_sample`` (power.py) draws from
pi_base^alpha by MCMC (power_mcmc.py) or SMC (power_smc.py).
"""

from sharpening.engines.base import SamplingEngine, decode_responses, derive_seed
from sharpening.engines.config import (
    SamplingConfig,
    VLLMConfig,
    decode_device_problems,
    is_exact_sampling,
    validate_sampling_config,
)
from sharpening.engines.hf import HFEngine, generate_samples
from sharpening.engines.power import PowerSamples, PowerSamplingConfig, power_sample, validate_power_config


def make_engine(
    sampling: SamplingConfig, model_path: str | None = None, *, seed: int = 0, lora_rank: int | None = None
) -> SamplingEngine:
    """The engine ``sampling.engine`` names. ``model_path``: the weights the run started from (vLLM loads them
    once, then follows the in-memory model it is given); ``lora_rank``: the policy's LoRA rank when it trains an
    adapter (vLLM then serves the adapter, not merged weights). Creating a vLLM engine is cheap: vLLM itself
    starts at the first draw."""
    if sampling.engine == "hf":
        return HFEngine()
    from sharpening.engines.vllm import VLLMEngine  # vLLM is optional: imported only when asked for

    if model_path is None:
        raise ValueError("engine 'vllm' needs model_path: the directory or hub id vLLM loads the weights from")
    return VLLMEngine(model_path, sampling.vllm, seed=seed, lora_rank=lora_rank)


__all__ = [
    "HFEngine",
    "PowerSamples",
    "PowerSamplingConfig",
    "SamplingConfig",
    "SamplingEngine",
    "VLLMConfig",
    "decode_device_problems",
    "decode_responses",
    "derive_seed",
    "generate_samples",
    "is_exact_sampling",
    "make_engine",
    "power_sample",
    "validate_power_config",
    "validate_sampling_config",
]
