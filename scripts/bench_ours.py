"""Our side of scripts/bench.py: the library as a user runs it, through a Lightning Trainer.

SFT round: ``SFTSharpeningModule`` + ``SelfVerificationCallback`` (N exact draws per prompt from the
frozen base, scored for free by their sampler log-probs, best kept) for one epoch over the winners.
RL step: ``RLSharpeningModule`` (online algorithm) for one step. Phases are timed by wrapping the
library functions the modules call (``generate_samples``, ``sample_logprobs``, the callback's round);
nothing in the library is changed. Weights load before the clock starts (``configure_model``), as the
TRL side loads its models before ``generate`` / ``train``.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections.abc import Iterator

import torch
from bench_common import Measurement, PhaseClock, Workload, fill_rl_step, rss_peak, useful_flops

NO_EOS = -1  # an id the sampler never draws: responses run to max_new_tokens (the fixed-length variant)


def _trainer(device: str, **kwargs):
    """A quiet one-device Lightning Trainer: no logger, checkpoints, progress bar or summary."""
    import lightning as L

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    # a run stopped by SIGTERM writes its preemption checkpoint under default_root_dir: never the caller's cwd
    kwargs.setdefault("default_root_dir", tempfile.mkdtemp(prefix="sharpening-bench-"))
    return L.Trainer(
        accelerator=device,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,
    )


@contextlib.contextmanager
def _patched(module, name: str, replacement) -> Iterator[None]:
    """Temporarily replace ``module.name`` (the library function a module calls) with a timed wrapper."""
    original = getattr(module, name)
    setattr(module, name, replacement)
    try:
        yield
    finally:
        setattr(module, name, original)


def _timed_generate(clock: PhaseClock, w: Workload, counts: dict[str, int]):
    """``generate_samples`` timed as ``generate``, counting what it produced; EOS off when fixed-length."""
    from sharpening.engines import generate_samples

    def generate(model, prompts, cfg, eos, pad, *args, **kwargs):
        with clock.phase("generate"):
            samples = generate_samples(model, prompts, cfg, NO_EOS if w.fixed_length else eos, pad, *args, **kwargs)
        counts["completions"] += samples.response_ids.shape[0] * samples.response_ids.shape[1]
        counts["response_tokens"] += int(samples.response_mask.sum())
        counts["prompt_tokens"] += int(samples.prompts.prompt_mask.sum())  # each prompt prefilled once
        n = samples.samples_per_prompt  # a teacher-forced pass reads every sample's prompt and response
        counts["scored_tokens"] += int(samples.prompts.prompt_mask.sum()) * n + int(samples.response_mask.sum())
        return samples

    return generate


def _new_counts() -> dict[str, int]:
    return dict.fromkeys(("completions", "response_tokens", "prompt_tokens", "scored_tokens"), 0)


def sft_round(w: Workload, round_index: int) -> Measurement:
    """One self-verification round (sample, score, select) and one SFT epoch on the winners."""
    import sharpening.engines.hf as hf_engine  # the round's hf engine draws through its generate_samples
    from sharpening import (
        OptimizerConfig,
        PolicyConfig,
        PromptDataModule,
        SamplingConfig,
        SelectionConfig,
        SelfVerificationCallback,
        SFTSharpeningModule,
    )

    m, clock, counts = Measurement(), PhaseClock(), _new_counts()
    with rss_peak(m):
        start = time.perf_counter()
        module = SFTSharpeningModule(
            PolicyConfig(
                model_name_or_path=w.model_path,
                finetuning="full",
                dtype="float32",
                attn_implementation="sdpa",
                cpu_linear=w.cpu_linear,
            ),
            OptimizerConfig(lr=w.lr, schedule="linear"),
            batch_size=w.sft_batch_size,
            shuffle_seed=round_index,
        )
        module.configure_model()  # policy + frozen copy, before the clock (TRL's models also load first)
        data = PromptDataModule(w.prompts_file)
        data.load_prompts(module.tokenizer)
        sampling = SamplingConfig(
            w.samples_per_prompt, w.max_new_tokens, 1.0, 0, 1.0, w.prompts_per_batch, decode=w.decode
        )
        callback = SelfVerificationCallback(
            sampling,
            SelectionConfig(reward="loglik", keep_top_k=1, truncated="keep"),
            sample_from="base",
            greedy_accuracy=False,
            seed=round_index,
            show_progress=False,
            stop_unselectable=not w.complete_all_samples,
        )
        callback.run_round = clock.wrap("round", callback.run_round)
        m.setup_seconds = time.perf_counter() - start
        with _patched(hf_engine, "generate_samples", _timed_generate(clock, w, counts)), clock.phase("total"):
            _trainer(w.device, max_epochs=1, gradient_clip_val=1.0, callbacks=[callback]).fit(module, datamodule=data)
    winners = callback.buffer.examples
    _fill_sft(m, w, clock, counts, winners)
    return m


def _fill_sft(m: Measurement, w: Workload, clock: PhaseClock, counts: dict[str, int], winners) -> None:
    """Phase seconds and counts of an SFT round; score is the round minus generation, train the rest."""
    s = clock.seconds
    m.seconds = {
        "generate": s["generate"],
        "score": s["round"] - s["generate"],
        "train": s["total"] - s["round"],
        "total": s["total"],
    }
    trained_tokens = sum(len(e.response_ids) for e in winners)
    sequence_tokens = sum(len(e.prompt_ids) + len(e.response_ids) for e in winners)
    m.completions = {"generate": counts["completions"], "score": counts["completions"], "train": len(winners)}
    m.response_tokens = {
        "generate": counts["response_tokens"],
        "score": counts["response_tokens"],
        "train": trained_tokens,
    }
    m.useful_flops = {
        "generate": useful_flops(w, "forward", counts["prompt_tokens"] + counts["response_tokens"]),
        "score": 0.0,  # exact draws carry their base log-probs: the task needs no scoring pass
        "train": useful_flops(w, "train", sequence_tokens),
    }


def _base_pass_timed(clock: PhaseClock, sample_logprobs):
    """``sample_logprobs`` timed as ``score`` when it is the frozen-base pass (no grad); the policy's pass
    under grad calls the same function and belongs to ``train``."""
    timed = clock.wrap("score", sample_logprobs)

    def score(*args, **kwargs):
        return (sample_logprobs if torch.is_grad_enabled() else timed)(*args, **kwargs)

    return score


def _from_second_step(clock: PhaseClock, counts: dict[str, int]):
    """A Lightning callback that restarts the clock and the counts when the second training batch starts."""
    import lightning as L

    class FromSecondStep(L.Callback):
        started: float | None = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
            if batch_idx == 1:
                clock.reset()
                counts.update(_new_counts())
                self.started = time.perf_counter()

    return FromSecondStep()


def rl_step(w: Workload, round_index: int, warm_steps: int = 0) -> Measurement:
    """One online RL-sharpening step: G samples per prompt from the policy, one base pass, one update. With
    ``warm_steps``, that many more steps follow in the same trainer and only they are timed (per step)."""
    import sharpening.engines.hf as hf_engine  # the rollouts' hf engine draws through its generate_samples
    import sharpening.rl.rollout as rl_module
    from sharpening import OptimizerConfig, PolicyConfig, PromptDataModule, RLConfig, RLSharpeningModule, SamplingConfig

    m, clock, counts = Measurement(), PhaseClock(), _new_counts()
    steps = 1 + warm_steps
    second = _from_second_step(clock, counts)
    with rss_peak(m):
        start = time.perf_counter()
        module = RLSharpeningModule(
            PolicyConfig(
                model_name_or_path=w.model_path,
                finetuning="full",
                dtype="float32",
                attn_implementation="sdpa",
                cpu_linear=w.cpu_linear,
            ),
            RLConfig(algorithm="online", kl_coef=w.kl_coef, max_grad_norm=1.0),
            SamplingConfig(w.samples_per_prompt, w.max_new_tokens, 1.0, 0, 1.0, w.rl_prompts, decode=w.decode),
            OptimizerConfig(lr=w.lr, schedule="constant"),
            prompts_per_step=w.rl_prompts,
            seed=round_index,
        )
        module.configure_model()
        data = PromptDataModule(w.prompts_file, max_prompts=w.rl_prompts * steps)
        data.load_prompts(module.tokenizer)
        m.setup_seconds = time.perf_counter() - start
        score = _base_pass_timed(clock, rl_module.sample_logprobs)
        with (
            _patched(hf_engine, "generate_samples", _timed_generate(clock, w, counts)),
            _patched(rl_module, "sample_logprobs", score),
            clock.phase("total"),
        ):
            trainer = _trainer(w.device, max_steps=steps, max_epochs=1, callbacks=[second] if warm_steps else None)
            trainer.fit(module, datamodule=data)
        if warm_steps:
            clock.seconds["total"] = time.perf_counter() - second.started
    return fill_rl_step(m, w, clock.seconds, counts, max(warm_steps, 1))


def rl_warm_step(w: Workload, round_index: int) -> Measurement:
    """The mean RL step after the first one, in a trainer that keeps its module (``w.warm_rl_steps`` steps)."""
    return rl_step(w, round_index, w.warm_rl_steps)
