"""The power-sampling rows of `sharpen evaluate` (``--protocol.power``): their typed entries, the table's name of
each, the sampler settings they run with and their checks. The samplers themselves are sharpening/engines/power.py.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Literal

from sharpening.engines.power import PowerSamplingConfig, validate_power_config

if TYPE_CHECKING:
    from sharpening.evaluate.config import ProtocolConfig


@dataclass
class PowerRowConfig:
    """One power-sampling row of the table: a sampler for pi_base^alpha (docs/power.md). Its length limit and
    batch size are the protocol's (max_new_tokens, prompts_per_batch), so every row answers under the same limit."""

    method: Literal["mcmc", "smc"] = PowerSamplingConfig.method
    """mcmc (block Metropolis-Hastings) or smc (sequential Monte Carlo over particles)."""
    alpha: float = PowerSamplingConfig.alpha
    """The power of the target pi_base^alpha; proposals are drawn at temperature 1/alpha."""
    block_tokens: int = PowerSamplingConfig.block_tokens
    """MCMC: tokens generated per block before its Metropolis-Hastings steps."""
    mcmc_steps: int = PowerSamplingConfig.mcmc_steps
    """MCMC: Metropolis-Hastings steps after each block."""
    particles: int = PowerSamplingConfig.particles
    """SMC: particles per prompt."""
    resample_threshold: float = PowerSamplingConfig.resample_threshold
    """SMC: resample when the effective sample size falls below this fraction of the particles."""


def power_row_name(entry: PowerRowConfig) -> str:
    """The table's method name of a power-sampling row: the method and the settings it reads.

    >>> power_row_name(PowerRowConfig("smc", 4.0, particles=8, resample_threshold=0.5))
    'power_smc_alpha4_particles8_ess0.5'
    """
    if entry.method == "mcmc":
        return f"power_mcmc_alpha{entry.alpha:g}_block{entry.block_tokens}_steps{entry.mcmc_steps}"
    return f"power_smc_alpha{entry.alpha:g}_particles{entry.particles}_ess{entry.resample_threshold:g}"


def power_sampling_config(protocol: ProtocolConfig, index: int) -> PowerSamplingConfig:
    """The sampler's settings of ``protocol.power[index]``, with the protocol's length limit and batch size."""
    return PowerSamplingConfig(**asdict(protocol.power[index]), max_new_tokens=protocol.max_new_tokens,
                               prompts_per_batch=protocol.prompts_per_batch)  # fmt: skip


def power_problems(protocol: ProtocolConfig, option: str = "--protocol") -> list[str]:
    """Every problem with the power-sampling rows, each named ``--protocol.power[i].field``; two rows with the same
    settings are refused (they would draw the same samples)."""
    problems, names = [], {}
    for i, entry in enumerate(protocol.power):
        shared = (f"{option}.power[{i}].max_new_tokens", f"{option}.power[{i}].prompts_per_batch")  # the protocol's
        found = validate_power_config(power_sampling_config(protocol, i), f"{option}.power[{i}]")
        problems += [p for p in found if not p.startswith(shared)]
        if found:
            continue
        if (name := power_row_name(entry)) in names:
            problems.append(
                f"{option}.power[{i}] has the settings of {option}.power[{names[name]}] ({name}): the same samples "
                "twice; drop one or change its alpha, block_tokens, mcmc_steps, particles or resample_threshold"
            )
        names.setdefault(name, i)
    return problems
