"""Enumerable toys for RL-sharpening (method.md §5): every response can be listed, so distributions are exact.

Responses are strings over a tiny alphabet, at most ``max_new_tokens`` tokens (EOS included). The
outcomes are the complete responses (letters + EOS, up to max_new_tokens - 1 letters) and the
truncated ones (exactly max_new_tokens letters, no EOS); their probabilities sum to 1 exactly.
A tiny Llama is distilled to a target table; the TRAINED model, enumerated, is pi_base.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import torch

from sharpening.logprobs import response_logprobs
from sharpening.prompts import pad_prompts

TOY_LETTERS = "ab"
TOY_MAX_NEW_TOKENS = 3
# Target base tables per prompt (complete responses only; "" is EOS alone). The argmax is clear but
# far from certain, so pi_base^(1 + 1/beta) differs visibly from pi_base.
TOY_TABLES = {
    "x=": {"ab": 0.30, "a": 0.15, "b": 0.15, "aa": 0.10, "ba": 0.10, "bb": 0.10, "": 0.10},
    "y=": {"b": 0.40, "ab": 0.20, "ba": 0.15, "a": 0.10, "aa": 0.05, "bb": 0.05, "": 0.05},
    "z=": {"": 0.35, "bb": 0.25, "a": 0.15, "b": 0.10, "ab": 0.05, "ba": 0.05, "aa": 0.05},
}
# A low-coverage toy (docs/rl.md): responses of at most 3 letters over {a, b, c} (max_new_tokens 4, 40
# complete responses). The argmax "cab" holds only 4% of the mass (C_cov = 25); the 39 others hold 2.8%
# down to 2.1% each, in a fixed shuffled order, so pi_base^(1 + 1/beta) at beta = 0.1 still puts ~0.8 on it.
LOW_COVERAGE_LETTERS = "abc"
LOW_COVERAGE_MAX_NEW_TOKENS = 4
LOW_COVERAGE_ARGMAX = "cab"


def toy_outcomes(letters: str = TOY_LETTERS, max_new_tokens: int = TOY_MAX_NEW_TOKENS) -> list[tuple[str, bool]]:
    """Every outcome as (letters, truncated): complete ones end in EOS, truncated ones have max_new_tokens letters."""
    complete = [("".join(p), False) for n in range(max_new_tokens) for p in itertools.product(letters, repeat=n)]
    truncated = [("".join(p), True) for p in itertools.product(letters, repeat=max_new_tokens)]
    return complete + truncated


def low_coverage_table(
    argmax: str = LOW_COVERAGE_ARGMAX, mass: float = 0.04, second: float = 0.028, seed: int = 0
) -> dict[str, float]:
    """Base table over every complete response of the low-coverage toy: ``argmax`` gets ``mass``; the others
    get masses spaced evenly from ``second`` down (mean (1 - mass) / count), assigned in a seeded shuffle."""
    import random

    outcomes = toy_outcomes(LOW_COVERAGE_LETTERS, LOW_COVERAGE_MAX_NEW_TOKENS)
    others = [text for text, cut in outcomes if not cut and text != argmax]
    lowest = 2 * (1.0 - mass) / len(others) - second
    if not lowest > 0 or not second < mass:
        raise ValueError(f"low_coverage_table: second={second} leaves no valid table for mass={mass}")
    random.Random(seed).shuffle(others)
    step = (second - lowest) / (len(others) - 1)
    return {argmax: mass, **{text: second - step * i for i, text in enumerate(others)}}


LOW_COVERAGE_TABLES = {"x=": low_coverage_table()}


def outcome_logprobs(model, tokenizer, prompt: str, outcomes: list[tuple[str, bool]]) -> torch.Tensor:
    """log pi(outcome | prompt) for every outcome, by teacher forcing: [O] float32 (grad flows)."""
    eos = tokenizer.eos_token_id
    responses = [tokenizer(text, add_special_tokens=False).input_ids + ([] if cut else [eos]) for text, cut in outcomes]
    width = max(len(r) for r in responses)
    response_ids = torch.full((len(responses), width), tokenizer.pad_token_id, dtype=torch.long)
    response_mask = torch.zeros(len(responses), width, dtype=torch.bool)
    for i, r in enumerate(responses):
        response_ids[i, : len(r)] = torch.tensor(r)
        response_mask[i, : len(r)] = True
    prompt_ids = tokenizer(prompt).input_ids
    prompts = pad_prompts([prompt_ids] * len(responses), list(range(len(responses))), [None] * len(responses), 0)
    device = next(model.parameters()).device
    token_lp = response_logprobs(
        model,
        prompts.prompt_ids.to(device),
        prompts.prompt_mask.to(device),
        response_ids.to(device),
        response_mask.to(device),
    )
    return (token_lp * response_mask.to(device)).sum(-1)  # [O]


def sharpened_target(base_logprobs: torch.Tensor, kl_coef: float, tilt: torch.Tensor | None = None) -> torch.Tensor:
    """log pi*_beta = log of pi_base^(1 + 1/beta) exp(tilt / beta), normalised over the outcomes (method.md §3.2;
    ``tilt`` [O]: the weighted task reward w r of each outcome, None: 0). [O] -> [O]."""
    scaled = (1.0 + 1.0 / kl_coef) * base_logprobs
    if tilt is not None:
        scaled = scaled + tilt / kl_coef
    return scaled - scaled.logsumexp(-1)


def starts_with_b(text: str, answer: str | None) -> float:
    """The toy's task reward for the tilted target (``--model.rl.task_reward sharpening.tasks.toy:starts_with_b``):
    1 for a response starting with "b", else 0 (the answer is unused).

    >>> starts_with_b("ba", None), starts_with_b("ab", "ab"), starts_with_b("", None)
    (1.0, 0.0, 0.0)
    """
    return 1.0 if text.startswith("b") else 0.0


def kl_divergence(logp: torch.Tensor, logq: torch.Tensor) -> float:
    """KL(p || q) in nats over the listed outcomes, each side renormalized over them first: a model puts a
    little mass on responses outside the list (other vocabulary tokens), and unnormalized log-probs would
    make the sum a KL no longer (it can go negative). ``measure`` reports that mass on its own."""
    logp, logq = logp - logp.logsumexp(-1), logq - logq.logsumexp(-1)
    return float((logp.exp() * (logp - logq)).sum())


def build_toy_base(
    out_dir: str | Path, tables: dict = TOY_TABLES, steps: int = 400, seed: int = 0, letters: str = TOY_LETTERS
) -> Path:
    """Distil a tiny Llama to ``tables`` (exact cross-entropy over the listed responses); save it with
    its tokenizer (one token per character of ``letters`` and of "xyz=") and a prompts.jsonl.
    Deterministic for a seed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from sharpening.tasks.chars import build_char_tokenizer

    out_dir = Path(out_dir)
    tokenizer = build_char_tokenizer(letters + "xyz=")
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    targets = {p: [(r, False) for r in table] for p, table in tables.items()}
    weights = {p: torch.tensor(list(table.values())) for p, table in tables.items()}
    for _ in range(steps):
        loss = sum(-(weights[p] * outcome_logprobs(model, tokenizer, p, targets[p])).sum() for p in tables)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    base = out_dir / "base"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    with open(out_dir / "prompts.jsonl", "w") as f:
        for prompt in tables:
            f.write(json.dumps({"prompt": prompt, "answer": max(tables[prompt], key=tables[prompt].get)}) + "\n")
    return base


@torch.no_grad()
def measure(
    model, tokenizer, base_model, prompts: list[str], kl_coef: float, task_reward=None, task_reward_weight: float = 1.0
) -> dict[str, float]:
    """By enumeration, averaged over prompts: KL(pi || pi*_beta) with pi renormalized over the listed outcomes,
    the mass pi puts on argmax pi_base, and the mass pi puts outside the listed outcomes (responses using
    other vocabulary tokens; ~1e-4 here). With ``task_reward`` (a function of (text, answer), e.g.
    ``starts_with_b``; the answer given is None) the target is tilted by exp(w r / beta)."""
    outcomes = toy_outcomes()
    tilt = None
    if task_reward is not None:
        tilt = torch.tensor([task_reward_weight * float(task_reward(text, None)) for text, _ in outcomes])  # [O]
    kls, masses, unlisted = [], [], []
    for prompt in prompts:
        base = outcome_logprobs(base_model, tokenizer, prompt, outcomes)
        policy = outcome_logprobs(model, tokenizer, prompt, outcomes)
        kls.append(kl_divergence(policy, sharpened_target(base, kl_coef, tilt)))
        masses.append(float(policy[base.argmax()].exp()))
        unlisted.append(1.0 - float(policy.double().logsumexp(-1).exp()))  # float64: the mass left is ~1e-4
    n = len(prompts)
    return {"kl_to_target": sum(kls) / n, "mass_on_argmax": sum(masses) / n, "unlisted_mass": sum(unlisted) / n}


def toy_prompts(out_dir: str | Path) -> list[str]:
    with open(os.path.join(out_dir, "prompts.jsonl")) as f:
        return [json.loads(line)["prompt"] for line in f]


# Adam's peak learning rate per algorithm. XPO refits 8 times per round on a dataset that starts at one pair
# per prompt: at 3e-3, 4 of 16 trajectories were still on a plateau (KL 0.18-0.30) at 480 steps (8 of 16 with
# a warm-up); at 1e-3 all 16 reached KL < 0.03 (docs/rl.md, seeds 0-7 with either CPU linear kernel).
# Online RL at 3e-3 collapsed some prompts onto one response (a group of G equal draws has zero advantages):
# 400 steps left seeds 2, 3, 4 at KL 0.45, 0.05, 0.10; at 1e-3 seeds 0-7 all end at KL <= 0.004 (docs/rl.md).
ORACLE_LR = {"online": 1e-3, "offline": 3e-3, "xpo": 1e-3}
# The tilted target's task reward (method.md §3.2): online RL with it must reach pi_base^alpha exp(w r / beta).
TOY_TASK_REWARD = "sharpening.tasks.toy:starts_with_b"
TOY_TASK_REWARD_WEIGHT = 1.0
ORACLE_SETTINGS = {
    # algorithm -> (RLConfig overrides, sampling overrides, module overrides, trainer max_steps)
    "online": ({"algorithm": "online"}, {"samples_per_prompt": 16}, {"prompts_per_step": 3}, 400),
    "offline": ({"algorithm": "offline", "pairs_per_update": 256}, {"samples_per_prompt": 64}, {}, 300),
    "xpo": (
        {"algorithm": "xpo", "xpo_alpha": 0.001, "xpo_updates_per_round": 8, "pairs_per_update": 128},
        {"samples_per_prompt": 8},
        {"prompts_per_step": 3},
        1600,  # optimizer steps: 200 rounds x 8 updates
    ),
}


def train_on_toy(
    algorithm: str,
    toy_dir: str | Path,
    kl_coef: float | None = 0.5,
    lr: float | None = None,
    max_steps: int | None = None,
    seed: int = 0,
    finetuning: str = "full",
    cpu_linear: str = "auto",
    max_new_tokens: int = TOY_MAX_NEW_TOKENS,
    rl_extra: dict | None = None,
):
    """Train ``algorithm`` through the real RLSharpeningModule + Trainer on the toy (``lr`` defaults to
    ``ORACLE_LR[algorithm]``; ``rl_extra``: further RLConfig fields, e.g. ``alpha`` with ``kl_coef`` None);
    returns the module. Its length is the
    module's, verifier's and trainer's settings spelled out flat, in the order a config file gives them."""
    import lightning as L

    from sharpening.callbacks import SelfVerificationCallback
    from sharpening.engines import SamplingConfig
    from sharpening.optim import OptimizerConfig
    from sharpening.policy import PolicyConfig
    from sharpening.prompts import PromptDataModule
    from sharpening.rl import RLConfig, RLSharpeningModule
    from sharpening.selection import SelectionConfig

    rl_over, sampling_over, module_over, steps = ORACLE_SETTINGS[algorithm]
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, prompts_per_batch=8, **sampling_over)
    module = RLSharpeningModule(
        PolicyConfig(
            model_name_or_path=str(Path(toy_dir) / "base"),
            finetuning=finetuning,
            dtype="float32",
            lora_r=8,
            cpu_linear=cpu_linear,
        ),
        rl=RLConfig(kl_coef=kl_coef, **rl_over, **(rl_extra or {})),
        sampling=sampling,
        optimizer=OptimizerConfig(lr=ORACLE_LR[algorithm] if lr is None else lr, schedule="constant"),
        seed=seed,
        **module_over,
    )
    verifier = SelfVerificationCallback(
        sampling,
        SelectionConfig(truncated="keep"),
        resample_every_epoch=True,
        greedy_accuracy=False,
        show_progress=False,
    )
    L.seed_everything(seed, verbose=False)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps or steps,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(toy_dir),
        callbacks=[verifier],
        reload_dataloaders_every_n_epochs=1,
    )
    data = PromptDataModule(dataset=str(Path(toy_dir) / "prompts.jsonl"), answer_column="answer")
    trainer.fit(module, datamodule=data)
    return module
