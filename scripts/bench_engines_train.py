"""The SFT round and the online RL step of scripts/bench_engines.py, through the library's Lightning modules.

Both run twice in one trainer and the second, warm one is timed: SFT as two epochs with a round before each
(``resample_every_epoch``), RL as two optimizer steps. The cold one carries the first-call costs (vLLM starts
at the first draw, our decode loop allocates its first caches); its seconds are reported too, and vLLM's
start-up inside them also apart (``startup_seconds``). The engine is
the one ``SamplingConfig.engine`` names, made by the module as in any run; ``make_engine`` is wrapped so its
draws are timed as ``generate``. The SFT round draws from the frozen base (the paper's round) and completes
every sample (``stop_unselectable`` off: vLLM draws every sample to its end, so both engines draw the same
tokens); the RL step draws from the policy after its first update, so vLLM's step includes the weight push.
"""

from __future__ import annotations

import contextlib
import time

import bench_ours
import lightning as L
from bench_common import Measurement, PhaseClock, Workload, rss_peak, synchronize

import sharpening.module as module_file
import sharpening.rl.rollout as rollout_file
from sharpening.engines import SamplingConfig, SamplingEngine
from sharpening.engines.vllm import VLLMEngine


class TimedEngine:
    """A ``SamplingEngine`` that times the draws of the engine it wraps as ``generate`` and counts what they drew;
    every other method of the interface is the wrapped engine's own."""

    def __init__(self, engine: SamplingEngine, clock: PhaseClock, counts: dict[str, int]):
        self.engine, self.clock, self.counts = engine, clock, counts

    def generate(self, model, prompts, cfg, eos_token_id, pad_token_id, *args, **kwargs):
        with self.clock.phase("generate"):
            samples = self.engine.generate(model, prompts, cfg, eos_token_id, pad_token_id, *args, **kwargs)
        self.counts["completions"] += samples.response_ids.shape[0] * samples.response_ids.shape[1]
        self.counts["response_tokens"] += int(samples.response_mask.sum())
        return samples

    def idle(self) -> None:
        with self.clock.phase("generate"):  # the engine giving memory back to the trainer: its cost, not scoring's
            self.engine.idle()

    def __getattr__(self, name: str):
        return getattr(self.engine, name)  # metrics, close, ...: untimed, as the engine has them


class WarmLapCallback(L.Callback):
    """Laps at the end of the first and second epoch (``per="epoch"``) or training batch (``per="batch"``): the
    first lap (from fit start) is the cold unit, the second the warm one. The clock and counts restart at the
    first lap and are copied at the second, so teardown (vLLM's shutdown) stays out of the warm figures."""

    def __init__(self, per: str, clock: PhaseClock, counts: dict[str, int]):
        self.per, self.clock, self.counts = per, clock, counts
        self.mark = 0.0
        self.laps: list[float] = []
        self.warm_phases: dict[str, float] = {}
        self.warm_counts: dict[str, int] = {}

    def on_fit_start(self, trainer, pl_module) -> None:
        self.mark = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.per == "epoch":
            self._lap()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.per == "batch":
            self._lap()

    def _lap(self) -> None:
        synchronize()
        now = time.perf_counter()
        self.laps.append(now - self.mark)
        self.mark = now
        if len(self.laps) == 1:
            self.clock.reset()
            self.counts.update(new_counts())
        elif len(self.laps) == 2:
            self.warm_phases, self.warm_counts = dict(self.clock.seconds), dict(self.counts)


def timed_start(start, started: dict[str, float]):
    """``VLLMEngine.start`` timed into ``started["seconds"]``: vLLM's start-up, inside the cold unit (the first
    draw starts it), reported apart as well."""

    def timed(engine, model) -> None:
        begin = time.perf_counter()
        start(engine, model)
        started["seconds"] += time.perf_counter() - begin

    return timed


def new_counts() -> dict[str, int]:
    return {"completions": 0, "response_tokens": 0}


def _policy(w: Workload, dtype: str):
    from sharpening import PolicyConfig

    return PolicyConfig(model_name_or_path=w.model_path, finetuning="full", dtype=dtype, attn_implementation="sdpa")


def _fit(module, data, laps: WarmLapCallback, patches: list[tuple], device: str, **trainer_kwargs) -> dict:
    """``trainer.fit`` with ``make_engine`` wrapped by ``TimedEngine`` and the other ``patches`` (module, name,
    replacement) applied; returns the cold and warm seconds, the warm phases and counts, and the peak RSS."""
    made = module_file.make_engine

    def timed_make_engine(*args, **kwargs):
        return TimedEngine(made(*args, **kwargs), laps.clock, laps.counts)

    memory, started = Measurement(), {"seconds": 0.0}
    with contextlib.ExitStack() as stack:
        stack.enter_context(bench_ours._patched(VLLMEngine, "start", timed_start(VLLMEngine.start, started)))
        stack.enter_context(rss_peak(memory))
        stack.enter_context(bench_ours._patched(module_file, "make_engine", timed_make_engine))
        for target, name, replacement in patches:
            stack.enter_context(bench_ours._patched(target, name, replacement))
        bench_ours._trainer(device, callbacks=[laps, *trainer_kwargs.pop("callbacks", [])], **trainer_kwargs).fit(
            module, datamodule=data
        )
    if len(laps.laps) < 2:
        raise RuntimeError(f"expected two epochs or steps to time, the trainer ran {len(laps.laps)}")
    return {
        "startup_seconds": started["seconds"],
        "cold_seconds": laps.laps[0],
        "warm_phases": laps.warm_phases,
        "warm_seconds": laps.laps[1],
        **laps.warm_counts,
        "peak_rss_mib": memory.peak_rss_mib,
        "peak_gpu_mib": memory.peak_gpu_mib,
    }


def sft_round(w: Workload, sampling: SamplingConfig, dtype: str) -> dict:
    """Two self-verification rounds (N per prompt from the frozen base, loglik, best kept), each followed by an
    SFT epoch on the kept samples; the second round and epoch are timed."""
    from sharpening import (
        OptimizerConfig,
        PromptDataModule,
        SelectionConfig,
        SelfVerificationCallback,
        SFTSharpeningModule,
    )

    module = SFTSharpeningModule(
        _policy(w, dtype), OptimizerConfig(lr=w.lr, schedule="constant"), batch_size=w.sft_batch_size
    )
    module.configure_model()  # weights load before the clock, as in bench_ours
    data = PromptDataModule(w.prompts_file, max_prompts=w.prompts_per_batch)
    data.load_prompts(module.tokenizer)
    callback = SelfVerificationCallback(
        sampling,
        SelectionConfig(reward="loglik", keep_top_k=1, truncated="keep"),
        sample_from="base",
        resample_every_epoch=True,
        greedy_accuracy=False,
        show_progress=False,
        stop_unselectable=False,
    )
    laps = WarmLapCallback("epoch", PhaseClock(), new_counts())
    callback.run_round = laps.clock.wrap("round", callback.run_round)
    out = _fit(module, data, laps, [], w.device, max_epochs=2, gradient_clip_val=1.0, callbacks=[callback])
    phases = out.pop("warm_phases")
    out["seconds"] = {
        "generate": phases["generate"],
        "score": phases["round"] - phases["generate"],
        "train": out["warm_seconds"] - phases["round"],
        "total": out.pop("warm_seconds"),
    }
    out["engine_metrics"] = callback.last_metrics
    return out


def rl_step(w: Workload, sampling: SamplingConfig, dtype: str) -> dict:
    """Two online RL steps (G per prompt from the policy, one frozen-base pass, one update); the second is
    timed, drawn from the policy as the first update left it."""
    from sharpening import OptimizerConfig, PromptDataModule, RLConfig, RLSharpeningModule

    module = RLSharpeningModule(
        _policy(w, dtype),
        RLConfig(algorithm="online", kl_coef=w.kl_coef, max_grad_norm=1.0),
        sampling,
        OptimizerConfig(lr=w.lr, schedule="constant"),
        prompts_per_step=w.rl_prompts,
    )
    module.configure_model()
    data = PromptDataModule(w.prompts_file, max_prompts=2 * w.rl_prompts)
    data.load_prompts(module.tokenizer)
    laps = WarmLapCallback("batch", PhaseClock(), new_counts())
    score = bench_ours._base_pass_timed(laps.clock, rollout_file.sample_logprobs)
    out = _fit(module, data, laps, [(rollout_file, "sample_logprobs", score)], w.device, max_steps=2, max_epochs=1)
    phases = out.pop("warm_phases")
    total = out.pop("warm_seconds")
    out["seconds"] = {
        "generate": phases["generate"],
        "score": phases.get("score", 0.0),
        "train": total - phases["generate"] - phases.get("score", 0.0),
        "total": total,
    }
    return out
