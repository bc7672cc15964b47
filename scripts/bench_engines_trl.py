"""TRL with vLLM colocated (``use_vllm=True, vllm_mode="colocate"``): the SFT round and online RL step of
scripts/bench_engines.py written as a TRL user would write them, on the same saved model, prompts, N,
max_new_tokens, temperature (1, no top-k/top-p), dtype and device as our side.

SFT round (TRL has no self-verification round; scripts/bench_trl.py builds the same one with HF ``generate``):
N draws per prompt through TRL's own colocated vLLM generator (``trl.generation.vllm_generation.VLLMGeneration``,
the class ``GRPOTrainer`` uses), a teacher-forced log-likelihood pass of the frozen base, the best of N kept,
then one ``SFTTrainer`` epoch on the kept samples. The draws come from the base as loaded (the paper's round;
ours draws from the frozen base too), so no weights are pushed. Two rounds run in one process; the second is
timed, and vLLM's start-up and the loading of both models are reported apart as ``startup_seconds``.

RL step: ``GRPOTrainer`` with ``use_vllm=True, vllm_mode="colocate"``, the frozen base's log-likelihood as
reward and ``beta`` = our ``kl_coef`` (its reference model loaded from the path), two steps, the second timed
(its weight push to vLLM included, as in ours). TRL's vLLM settings are its defaults, except:

- ``dtype``: TRL passes none to ``vllm.LLM`` and vLLM's ``auto`` turns a float32 checkpoint into bfloat16, so
  the run's dtype is handed to TRL's ``LLM`` call here (both sides draw in the same dtype);
- on CPU, the KV cache is ``VLLM_CPU_KVCACHE_SPACE`` = ``--kv-cache-gb`` (ours reads the same figure); on CUDA
  its memory share is ``--gpu-memory-utilization`` (``vllm_gpu_memory_utilization``) as ours.

TRL is optional and not in the venvs: ``PYTHONPATH`` to a ``pip install --no-deps --target`` of it works.
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
import time

import bench_ours
import bench_trl
import torch
from bench_common import Measurement, PhaseClock, Workload, fill_rl_step, rss_peak

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def trl_problems() -> list[str]:
    """Why TRL's colocated vLLM cannot run in this Python, before any model is built."""
    import importlib.util

    if importlib.util.find_spec("trl") is None:
        return [
            "--compare trl: TRL is not importable in this Python; install it beside the venv, e.g. "
            "pip install --no-deps --target /tmp/trlpkgs trl==1.16.0, and run with PYTHONPATH=/tmp/trlpkgs"
        ]
    if importlib.util.find_spec("vllm") is None:
        return ["--compare trl: TRL's colocated mode needs vLLM; run with .venv-vllm/bin/python"]
    return []


@contextlib.contextmanager
def colocated_vllm_settings(dtype: str, device: str, kv_cache_gb: int):
    """TRL's ``vllm.LLM`` call given the run's dtype, and on CPU the KV cache size ours uses (see the docstring
    at the top); vLLM runs its engine core in this process, as TRL's colocated mode sets up."""
    import trl.generation.vllm_generation as trl_vllm
    from vllm import LLM

    if device == "cpu":
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gb)
    with bench_ours._patched(trl_vllm, "LLM", functools.partial(LLM, dtype=dtype)):
        yield


def vllm_settings(llm) -> dict:
    """What TRL's colocated vLLM runs with, as vLLM resolved it: the dtype the comparison rests on, and the
    settings TRL leaves at vLLM's defaults."""
    model_config = llm.llm_engine.model_config
    return {
        "dtype": str(model_config.dtype).removeprefix("torch."),
        "enforce_eager": model_config.enforce_eager,
        "max_model_len": model_config.max_model_len,
    }


def _load(w: Workload, dtype: str):
    """(model, tokenizer) from the workload's path in ``dtype``, sdpa attention, on the workload's device."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(w.model_path, dtype=DTYPES[dtype], attn_implementation="sdpa")
    return model.to(w.device), AutoTokenizer.from_pretrained(w.model_path)


def _generator(frozen, tok, w: Workload, memory_utilization: float):
    """TRL's colocated vLLM generator on the base, configured as ``GRPOTrainer`` configures it."""
    from accelerate import Accelerator
    from trl.generation.vllm_generation import VLLMGeneration

    return VLLMGeneration(
        model=frozen,
        accelerator=Accelerator(cpu=w.device == "cpu"),
        processing_class=tok,
        mode="colocate",
        gpu_memory_utilization=memory_utilization,
        max_num_seqs=w.prompts_per_batch * w.samples_per_prompt,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        max_completion_length=w.max_new_tokens,
        logprobs=0,
    )


def _one_round(model, frozen, tok, generator, w: Workload, prompt_rows, round_index: int, clock: PhaseClock):
    """Draw N per prompt with vLLM, score by the base's log-likelihood, keep the best, one SFT epoch: the kept
    samples and the response tokens drawn."""
    with clock.phase("total"):
        with clock.phase("generate"):
            repeated = [row for row in prompt_rows for _ in range(w.samples_per_prompt)]  # prompt-major, as GRPO
            _, completions, _, _ = generator.generate(prompts=repeated, images=None, num_generations=1)
            completions = [list(c) for c in completions]
        with clock.phase("score"):
            winners = bench_trl._score_and_select(frozen, tok, w, prompt_rows, completions)
        with clock.phase("train"):
            bench_trl._sft_train(model, tok, w, prompt_rows, winners, round_index)
    return winners, sum(len(c) for c in completions), len(completions)


def sft_round(w: Workload, dtype: str, memory_utilization: float, kv_cache_gb: int) -> dict:
    """Two TRL + vLLM rounds in one process; the second is timed (see the docstring at the top)."""
    m, clock = Measurement(), PhaseClock()
    with rss_peak(m), colocated_vllm_settings(dtype, w.device, kv_cache_gb):
        start = time.perf_counter()
        model, tok = _load(w, dtype)
        frozen, _ = _load(w, dtype)
        frozen.eval().requires_grad_(False)
        generator = _generator(frozen, tok, w, memory_utilization)
        startup = time.perf_counter() - start
        prompt_rows = tok(w.prompt_texts[: w.prompts_per_batch]).input_ids
        _one_round(model, frozen, tok, generator, w, prompt_rows, 0, clock)
        cold = clock.seconds["total"]
        clock.reset()
        winners, tokens, completions = _one_round(model, frozen, tok, generator, w, prompt_rows, 1, clock)
    return {
        "startup_seconds": startup,
        "cold_seconds": cold,
        "seconds": dict(clock.seconds),
        "completions": completions,
        "response_tokens": tokens,
        "kept_response_tokens": sum(len(c) for c in winners),
        "vllm": vllm_settings(generator.llm),
        "peak_rss_mib": m.peak_rss_mib,
        "peak_gpu_mib": m.peak_gpu_mib,
    }


def _grpo_trainer(w: Workload, tok, reward, dtype: str, memory_utilization: float, out: str, steps: int):
    """bench_trl's GRPOTrainer (matched to our RL settings) with vLLM colocated and the run's weight dtype (no
    autocast on either side)."""
    return bench_trl._grpo_trainer(
        w,
        tok,
        reward,
        0,
        out,
        steps,
        use_vllm=True,
        vllm_mode="colocate",
        vllm_gpu_memory_utilization=memory_utilization,
        model_init_kwargs={"dtype": DTYPES[dtype], "attn_implementation": "sdpa"},
    )


def rl_step(w: Workload, dtype: str, memory_utilization: float, kv_cache_gb: int) -> dict:
    """Two GRPO steps with vLLM colocated; the second is timed (see the docstring at the top)."""
    m, clock = Measurement(), PhaseClock()
    seen = dict.fromkeys(("completions", "response_tokens", "scored_tokens", "prompt_tokens"), 0)
    second = bench_trl._from_second_step(clock, seen)
    with rss_peak(m), colocated_vllm_settings(dtype, w.device, kv_cache_gb), tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        frozen, tok = _load(w, dtype)
        frozen.eval().requires_grad_(False)
        reward = bench_trl._loglik_reward(frozen, tok, clock, seen)
        trainer = _grpo_trainer(w, tok, reward, dtype, memory_utilization, out, steps=2)
        bench_trl._timed_grpo(trainer, clock)
        bench_trl._silence(trainer)
        trainer.add_callback(second)
        startup = time.perf_counter() - start
        started = time.perf_counter()
        with clock.phase("total"):
            trainer.train()
        clock.seconds["total"] = time.perf_counter() - second.started
    fill_rl_step(m, w, clock.seconds, seen)
    return {
        "startup_seconds": startup,
        "cold_seconds": second.started - started,
        "seconds": m.seconds,
        "completions": m.completions["generate"],
        "response_tokens": m.response_tokens["generate"],
        "vllm": vllm_settings(trainer.vllm_generation.llm),
        "peak_rss_mib": m.peak_rss_mib,
        "peak_gpu_mib": m.peak_gpu_mib,
    }
