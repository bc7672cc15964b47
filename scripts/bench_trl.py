"""The TRL side of scripts/bench.py: the same work written the way a TRL user would write it.

SFT round: Hugging Face ``generate`` (num_return_sequences=N), a teacher-forced scoring pass with the
(untrained) model, the best of N kept, then TRL ``SFTTrainer`` with completion-only loss for one epoch.
RL step: TRL ``GRPOTrainer`` for one step, its reward the frozen base's log-likelihood (a plain function
closing over a frozen copy: TRL takes an ``nn.Module`` reward for a sequence classifier), beta > 0 so
TRL loads its reference model from the model path. Settings TRL or HF default differently from ours are
set explicitly: fp32 (no bf16), no gradient checkpointing, temperature 1, top_k 0, top_p 1.

TRL is imported inside functions: it is optional (``pip install 'sharpening[bench]'``).
"""

from __future__ import annotations

import tempfile
import time

import torch
from bench_common import Measurement, PhaseClock, Workload, fill_rl_step, left_pad, rss_peak, useful_flops


def _load(w: Workload):
    """(model, tokenizer) from the workload's path, fp32, sdpa attention, on the workload's device."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(w.model_path, dtype=torch.float32, attn_implementation="sdpa")
    return model.to(w.device), AutoTokenizer.from_pretrained(w.model_path)


@torch.inference_mode()
def sequence_logliks(
    model, prompt_rows: list[list[int]], completion_rows: list[list[int]], pad_id: int
) -> torch.Tensor:
    """log p(completion | prompt) per row with a plain HF forward over [prompt | completion]: [R]."""
    prompt_ids, prompt_mask = (t.to(model.device) for t in left_pad(prompt_rows, pad_id))
    width = max(max(len(c) for c in completion_rows), 1)
    completion_ids = torch.full((len(completion_rows), width), pad_id, dtype=torch.long)
    completion_mask = torch.zeros(len(completion_rows), width, dtype=torch.bool)
    for i, c in enumerate(completion_rows):
        completion_ids[i, : len(c)] = torch.tensor(c, dtype=torch.long)
        completion_mask[i, : len(c)] = True
    completion_ids, completion_mask = completion_ids.to(model.device), completion_mask.to(model.device)
    attention_mask = torch.cat([prompt_mask, completion_mask], 1).long()  # [R, P+T]
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = (
        model(
            input_ids=torch.cat([prompt_ids, completion_ids], 1), attention_mask=attention_mask, position_ids=positions
        )
        .logits[:, prompt_ids.shape[1] - 1 : -1]
        .float()
    )  # [R, T, V]
    token_logprobs = logits.log_softmax(-1).gather(-1, completion_ids[..., None]).squeeze(-1)  # [R, T]
    return (token_logprobs * completion_mask).sum(-1)


def _silence(trainer) -> None:
    """Drop the callback that prints every log dict (disable_tqdm=True swaps the progress bar for it)."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)


def _trim(row: list[int], eos_id: int, pad_id: int) -> list[int]:
    """A generated row cut after its first EOS (kept), or with its right padding removed."""
    if eos_id in row:
        return row[: row.index(eos_id) + 1]
    while row and row[-1] == pad_id:
        row = row[:-1]
    return row


def _generate(model, tok, w: Workload, prompt_rows: list[list[int]], seed: int) -> list[list[int]]:
    """N completions per prompt (prompt-major), ``prompts_per_batch`` prompts per generate call."""
    torch.manual_seed(seed)
    extra = {"min_new_tokens": w.max_new_tokens} if w.fixed_length else {}
    completions = []
    for start in range(0, len(prompt_rows), w.prompts_per_batch):
        rows = prompt_rows[start : start + w.prompts_per_batch]
        ids, mask = (t.to(model.device) for t in left_pad(rows, tok.pad_token_id))
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask.long(),
                do_sample=True,
                num_return_sequences=w.samples_per_prompt,
                max_new_tokens=w.max_new_tokens,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
                **extra,
            )
        completions += [_trim(r, tok.eos_token_id, tok.pad_token_id) for r in out[:, ids.shape[1] :].tolist()]
    return completions


def _score_and_select(model, tok, w: Workload, prompt_rows, completions) -> list[list[int]]:
    """Best completion per prompt by the model's log-likelihood (scored in generation-sized batches)."""
    n, rows = w.samples_per_prompt, w.prompts_per_batch * w.samples_per_prompt
    prompts_per_row = [p for p in prompt_rows for _ in range(n)]
    scores = torch.cat(
        [
            sequence_logliks(model, prompts_per_row[i : i + rows], completions[i : i + rows], tok.pad_token_id)
            for i in range(0, len(completions), rows)
        ]
    ).view(len(prompt_rows), n)  # [B*N] -> [B, N]
    best = scores.argmax(-1).tolist()
    return [completions[b * n + k] for b, k in enumerate(best)]


def _sft_train(model, tok, w: Workload, prompt_rows, winners, seed: int) -> None:
    """TRL SFTTrainer, completion-only loss, one epoch over the winners (pre-tokenized: the same ids)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    data = Dataset.from_dict(
        {
            "input_ids": [p + c for p, c in zip(prompt_rows, winners)],
            "completion_mask": [[0] * len(p) + [1] * len(c) for p, c in zip(prompt_rows, winners)],
        }
    )
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(
            output_dir=out,
            per_device_train_batch_size=w.sft_batch_size,
            num_train_epochs=1,
            learning_rate=w.lr,
            lr_scheduler_type="linear",
            weight_decay=0.0,
            max_grad_norm=1.0,
            bf16=False,
            fp16=False,
            gradient_checkpointing=False,
            completion_only_loss=True,
            packing=False,
            max_length=None,
            report_to="none",
            save_strategy="no",
            logging_steps=1000,
            disable_tqdm=True,
            use_cpu=w.device == "cpu",
            seed=seed,
        )
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
        _silence(trainer)
        trainer.train()


def sft_round(w: Workload, round_index: int) -> Measurement:
    """HF generate + a scoring pass + TRL SFTTrainer: the SFT round a TRL user would write."""
    m, clock = Measurement(), PhaseClock()
    with rss_peak(m):
        start = time.perf_counter()
        model, tok = _load(w)
        prompt_rows = tok(w.prompt_texts).input_ids
        m.setup_seconds = time.perf_counter() - start
        with clock.phase("total"):
            with clock.phase("generate"):
                completions = _generate(model, tok, w, prompt_rows, seed=round_index)
            with clock.phase("score"):
                winners = _score_and_select(model, tok, w, prompt_rows, completions)
            with clock.phase("train"):
                _sft_train(model, tok, w, prompt_rows, winners, round_index)
    generated = sum(len(c) for c in completions)
    m.seconds = dict(clock.seconds)
    m.completions = {"generate": len(completions), "score": len(completions), "train": len(winners)}
    m.response_tokens = {"generate": generated, "score": generated, "train": sum(len(c) for c in winners)}
    m.useful_flops = {
        "generate": useful_flops(w, "forward", sum(len(p) for p in prompt_rows) + generated),
        "score": 0.0,  # not needed by the task (exact draws carry their log-probs); reported as time only
        "train": useful_flops(w, "train", sum(len(p) + len(c) for p, c in zip(prompt_rows, winners))),
    }
    return m


def _loglik_reward(frozen, tok, clock: PhaseClock, seen: dict):
    """A GRPO reward function: log p_base(completion | prompt) under the frozen copy (timed as score)."""

    def base_loglik(prompts, completions, completion_ids, **kwargs) -> list[float]:
        with clock.phase("score"):
            prompt_rows = tok(list(prompts)).input_ids
            rewards = sequence_logliks(frozen, prompt_rows, completion_ids, tok.pad_token_id)
        seen["completions"] += len(completion_ids)
        seen["response_tokens"] += sum(len(c) for c in completion_ids)
        seen["scored_tokens"] += sum(len(p) + len(c) for p, c in zip(prompt_rows, completion_ids))
        seen["prompt_tokens"] += sum(len(p) for p in dict.fromkeys(map(tuple, prompt_rows)))  # unique prompts
        return rewards.tolist()

    return base_loglik


def _timed_grpo(trainer, clock: PhaseClock) -> None:
    """Time TRL's generation and its reference-model pass (as score) on this trainer instance."""
    trainer._generate = clock.wrap("generate", trainer._generate)
    logps = trainer._get_per_token_logps_and_entropies

    def per_token_logps(model, *args, **kwargs):
        if model is not trainer.ref_model:
            return logps(model, *args, **kwargs)
        with clock.phase("score"):
            return logps(model, *args, **kwargs)

    trainer._get_per_token_logps_and_entropies = per_token_logps


def _grpo_trainer(w: Workload, tok, reward, round_index: int, out: str, steps: int = 1, **overrides):
    """GRPOTrainer for ``steps`` steps of rl_prompts x G completions, matched to our RL settings; ``overrides``
    replace or add GRPOConfig fields (the engine benchmark's vLLM colocate settings)."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    settings = dict(
        output_dir=out,
        per_device_train_batch_size=w.rl_prompts * w.samples_per_prompt,
        num_generations=w.samples_per_prompt,
        max_completion_length=w.max_new_tokens,
        beta=w.kl_coef,
        learning_rate=w.lr,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        max_steps=steps,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        generation_kwargs={"min_new_tokens": w.max_new_tokens} if w.fixed_length else None,
        model_init_kwargs={"dtype": torch.float32, "attn_implementation": "sdpa"},
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        use_cpu=w.device == "cpu",
        seed=round_index,
    )
    args = GRPOConfig(**(settings | overrides))
    data = Dataset.from_dict({"prompt": w.prompt_texts[: w.rl_prompts * steps]})
    return GRPOTrainer(model=w.model_path, reward_funcs=reward, args=args, train_dataset=data, processing_class=tok)


def _from_second_step(clock: PhaseClock, seen: dict):
    """A transformers TrainerCallback that restarts the clock and the counts when the second step begins (TRL
    generates inside the step, after ``on_step_begin``)."""
    from transformers import TrainerCallback

    class FromSecondStep(TrainerCallback):
        started: float | None = None

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 1:
                clock.reset()
                seen.update(dict.fromkeys(seen, 0))
                self.started = time.perf_counter()

    return FromSecondStep()


def rl_step(w: Workload, round_index: int, warm_steps: int = 0) -> Measurement:
    """One GRPOTrainer step with the frozen base's log-likelihood as reward and beta = kl_coef. With
    ``warm_steps``, that many more steps follow in the same trainer and only they are timed (per step)."""
    m, clock = Measurement(), PhaseClock()
    seen = dict.fromkeys(("completions", "response_tokens", "scored_tokens", "prompt_tokens"), 0)
    second = _from_second_step(clock, seen)
    with rss_peak(m), tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        frozen, tok = _load(w)
        frozen.eval().requires_grad_(False)
        trainer = _grpo_trainer(w, tok, _loglik_reward(frozen, tok, clock, seen), round_index, out, 1 + warm_steps)
        _timed_grpo(trainer, clock)
        _silence(trainer)
        if warm_steps:
            trainer.add_callback(second)
        m.setup_seconds = time.perf_counter() - start
        with clock.phase("total"):
            trainer.train()
        if warm_steps:
            clock.seconds["total"] = time.perf_counter() - second.started
    return fill_rl_step(m, w, clock.seconds, seen, max(warm_steps, 1))


def rl_warm_step(w: Workload, round_index: int) -> Measurement:
    """The mean GRPO step after the first one, in one trainer (``w.warm_rl_steps`` steps)."""
    return rl_step(w, round_index, w.warm_rl_steps)
