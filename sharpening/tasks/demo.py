"""The built-in demo task: string reversal with a likely-but-wrong "hedge", where sharpening matters.

A prompt is a 4-letter string ``s`` over ``DEMO_ALPHABET`` (not a palindrome) followed by ``=``, e.g.
``abcd=``; the correct answer is ``reverse(s)`` (``dcba``). The base model is trained on a distribution
in which, for each prompt,

* with probability ``1 - HEDGE_PROB`` (0.35) the response is ``reverse(s)``, and
* with probability ``HEDGE_PROB`` (0.65) it is a *hedge*: ``s[0] + s[1]`` and two uniformly random
  letters (64 hedges, each with probability ~0.01).

So the correct answer is the single most likely *complete* response (0.35 against ~0.01 for any one
hedge), but not the most likely *first token* (``s[0]`` with 0.65 against ``s[3]`` with 0.35). Greedy
decoding therefore starts a hedge and is wrong on almost every prompt, one sample is right ~35% of the
time, and best-of-N by the model's own sequence log-likelihood is right whenever the correct answer is
among the N samples (~1 - 0.65^N: ~97% for N = 8). Sharpening (fine-tuning on the self-likelihood
best-of-N) should move single-sample accuracy towards the best-of-N accuracy.

Prompts are split once, deterministically: ``EVAL_SIZE`` evaluation prompts that no model ever trains on,
``SHARPEN_SIZE`` sharpening prompts, and every non-evaluation prompt trains the base model (which
therefore has to learn the rule, not memorise answers).

Build everything with ``python -m sharpening.tasks.demo build --out artifacts/demo``.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import itertools
import json
import logging
import math
import random
import sys
import time
from pathlib import Path

import torch

from sharpening.tasks.chars import build_char_tokenizer

log = logging.getLogger(__name__)

DEMO_ALPHABET = "abcdefgh"
"""The letters prompts and responses are made of (one token each)."""
SEPARATOR = "="
"""Ends every prompt: the response starts right after it."""
PROMPT_LETTERS = 4
"""Letters per prompt string (and per response, without EOS)."""
HEDGE_PROB = 0.65
"""Probability (per prompt) that a base response is a hedge rather than the correct reversal."""
EVAL_SIZE = 200
"""Number of held-out evaluation prompts."""
SHARPEN_SIZE = 512
"""Number of sharpening-train prompts (disjoint from the evaluation prompts)."""


def check_prompt(prompt: str) -> str:
    """The letter string of a valid demo prompt ('abcd=' -> 'abcd'); ValueError otherwise."""
    s = prompt[:-1]
    ok = prompt.endswith(SEPARATOR) and len(s) == PROMPT_LETTERS and all(c in DEMO_ALPHABET for c in s)
    if not ok or s == s[::-1]:
        raise ValueError(
            f"demo prompt {prompt!r}: expected {PROMPT_LETTERS} letters of {DEMO_ALPHABET!r}, "
            f"not a palindrome, followed by {SEPARATOR!r} (e.g. 'abcd=')"
        )
    return s


def correct_answer(prompt: str) -> str:
    """The correct response to a demo prompt: its letters reversed ('abcd=' -> 'dcba')."""
    return check_prompt(prompt)[::-1]


def extract_answer(text: str) -> str:
    """The answer in a model response (what is compared with ``correct_answer``): the text, stripped."""
    return text.strip()


def demo_response_distribution(prompt: str) -> dict[str, float]:
    """The exact data-generating distribution over responses (without EOS) for one prompt.

    >>> dist = demo_response_distribution("abcd=")
    >>> round(dist["dcba"], 2), len(dist), round(sum(dist.values()), 6)
    (0.35, 65, 1.0)
    """
    s = check_prompt(prompt)
    dist = {s[::-1]: 1.0 - HEDGE_PROB}
    tails = list(itertools.product(DEMO_ALPHABET, repeat=PROMPT_LETTERS - 2))
    for tail in tails:
        hedge = s[:2] + "".join(tail)
        dist[hedge] = dist.get(hedge, 0.0) + HEDGE_PROB / len(tails)
    return dist


def split_demo_prompts(seed: int = 0) -> tuple[list[str], list[str], list[str]]:
    """``(base_train, sharpen_train, eval)`` prompt lists, each sorted; the same for the same seed.

    ``eval`` (``EVAL_SIZE`` prompts) is disjoint from both others; ``sharpen_train`` (``SHARPEN_SIZE``)
    is a subset of ``base_train``, which is every valid prompt not in ``eval``.
    """
    letters = ("".join(p) for p in itertools.product(DEMO_ALPHABET, repeat=PROMPT_LETTERS))
    prompts = [s + SEPARATOR for s in letters if s != s[::-1]]
    random.Random(seed).shuffle(prompts)
    eval_prompts, rest = prompts[:EVAL_SIZE], prompts[EVAL_SIZE:]
    return sorted(rest), sorted(rest[:SHARPEN_SIZE]), sorted(eval_prompts)


def write_demo_data(out_dir: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Write ``train.jsonl`` (sharpening prompts) and ``eval.jsonl`` under ``out_dir``; return both paths.

    Each line is ``{"prompt": "abcd=", "answer": "dcba"}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _, sharpen_train, eval_prompts = split_demo_prompts(seed)
    paths = out / "train.jsonl", out / "eval.jsonl"
    for path, prompts in zip(paths, (sharpen_train, eval_prompts)):
        rows = (json.dumps({"prompt": p, "answer": correct_answer(p)}) for p in prompts)
        path.write_text("".join(row + "\n" for row in rows))
    return paths


def tiny_char_model(tokenizer, hidden_size: int, num_layers: int, head_dim: int | None = None):
    """A freshly initialised tiny ``LlamaForCausalLM`` for the demo (uses the global torch RNG). Its 4 attention
    heads are ``head_dim`` wide (None: ``hidden_size / 4``); vLLM's CPU attention needs a head size it has a kernel
    for (e.g. 32 or 64), which the default width 64 (heads of 16) does not give."""
    from transformers import LlamaConfig, LlamaForCausalLM

    ids = {f"{k}_token_id": getattr(tokenizer, f"{k}_token_id") for k in ("bos", "eos", "pad")}
    shape = {} if head_dim is None else {"head_dim": head_dim}
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=32,
        tie_word_embeddings=False,
        **shape,
        **ids,
    )
    model = LlamaForCausalLM(config)
    for key, value in ids.items():
        setattr(model.generation_config, key, value)
    model.generation_config.max_new_tokens = PROMPT_LETTERS + 1
    return model


def _sample_batch(
    prompt_ids: torch.Tensor, letter_ids: torch.Tensor, eos_id: int, batch_size: int, gen: torch.Generator
) -> torch.Tensor:
    """Token ids ``<s> s = response </s>`` (batch, 11): prompts drawn uniformly, responses from the base
    distribution. ``prompt_ids`` is (num_prompts, 6) tokenised prompts; ``letter_ids`` the alphabet's ids."""
    prompts = prompt_ids[torch.randint(len(prompt_ids), (batch_size,), generator=gen)]
    s = prompts[:, 1 : 1 + PROMPT_LETTERS]
    tail = letter_ids[torch.randint(len(letter_ids), (batch_size, PROMPT_LETTERS - 2), generator=gen)]
    hedge = torch.cat([s[:, :2], tail], 1)
    is_hedge = torch.rand(batch_size, 1, generator=gen) < HEDGE_PROB
    response = torch.where(is_hedge, hedge, s.flip(1))
    return torch.cat([prompts, response, torch.full((batch_size, 1), eos_id)], 1)


def train_base(model, sample, steps: int, lr: float) -> float:
    """AdamW (linear warm-up, cosine decay) with teacher forcing on fresh batches from ``sample()``; the loss
    covers the response tokens and EOS only (prompt tokens are masked). Returns the last batch's loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
    )
    first = PROMPT_LETTERS + 1  # the logits at this position (the separator) predict the first response token
    model.train()
    for _ in range(steps):
        ids = sample()
        logits = model(input_ids=ids[:, :-1]).logits[:, first:]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, first + 1 :].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return loss.item()


def build_is_current(base_dir: Path, params: dict) -> bool:
    """True when ``base_dir`` holds a model and tokenizer built with exactly ``params``."""
    try:
        saved = json.loads((base_dir / "demo_build.json").read_text())
    except (OSError, ValueError):
        return False
    files = ("config.json", "model.safetensors", "tokenizer.json")
    return all((base_dir / f).is_file() for f in files) and saved.get("params") == params


def build_demo_base(
    out_dir: str | Path,
    seed: int = 0,
    steps: int = 2000,
    batch_size: int = 128,
    lr: float = 3e-3,
    hidden_size: int = 64,
    num_layers: int = 2,
    force: bool = False,
    head_dim: int | None = None,
) -> Path:
    """Train the demo base model on the base-train prompts; save it and its tokenizer to ``out_dir/base``.

    ``steps`` AdamW steps of ``batch_size`` fresh sequences each (peak learning rate ``lr``) train a Llama
    with ``num_layers`` layers of width ``hidden_size`` and 4 heads of ``head_dim`` (None: ``hidden_size / 4``):
    ~40 s on 2 CPU cores with the defaults. The same seed and parameters give the same weights (on the same
    hardware and torch thread count). Training is skipped when ``out_dir/base/demo_build.json`` records the same
    parameters, unless ``force``; the record names ``head_dim`` only when it is set, so a default build's
    record (and whether it is current) does not depend on the option existing.
    """
    params = {
        "seed": seed,
        "hedge_prob": HEDGE_PROB,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "hidden_size": hidden_size,
        "num_layers": num_layers,
    }
    if head_dim is not None:
        params["head_dim"] = head_dim
    base_dir = Path(out_dir) / "base"
    if not force and build_is_current(base_dir, params):
        log.info("base model in %s is up to date (seed %d): not rebuilt", base_dir, seed)
        return base_dir
    tokenizer = build_char_tokenizer(DEMO_ALPHABET + SEPARATOR)
    prompt_ids = torch.tensor(tokenizer(split_demo_prompts(seed)[0])["input_ids"])
    letter_ids = torch.tensor(tokenizer.convert_tokens_to_ids(list(DEMO_ALPHABET)))

    def sampler(gen: torch.Generator):
        return functools.partial(_sample_batch, prompt_ids, letter_ids, tokenizer.eos_token_id, batch_size, gen)

    return train_and_save_base(
        base_dir, tokenizer, params, sampler, seed, steps, lr, hidden_size, num_layers, head_dim=head_dim
    )


def train_and_save_base(
    base_dir: Path,
    tokenizer,
    params: dict,
    sampler,
    seed: int,
    steps: int,
    lr: float,
    hidden_size: int,
    num_layers: int,
    max_new_tokens: int | None = None,
    head_dim: int | None = None,
) -> Path:
    """Train a ``tiny_char_model`` on batches from ``sampler(generator)`` (seeded by ``seed``), then save it, its
    tokenizer and ``demo_build.json`` (``params``: what ``build_is_current`` compares) to ``base_dir``."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = tiny_char_model(tokenizer, hidden_size, num_layers, head_dim)
    if max_new_tokens is not None:
        model.generation_config.max_new_tokens = max_new_tokens
    start = time.perf_counter()
    loss = train_base(model, sampler(gen), steps, lr)
    seconds = time.perf_counter() - start
    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    summary = {"params": params, "final_loss": round(loss, 4), "train_seconds": round(seconds, 1)}
    (base_dir / "demo_build.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info("trained the base model in %.1f s (final loss %.4f) and saved it to %s", seconds, loss, base_dir)
    return base_dir


def build_command(prog: str, example_out: str, write_data, build_base, argv: list[str] | None, doc: str) -> None:
    """``{prog} build --out DIR [--seed N] [--force] [--head-dim D]``: ``write_data(out, seed)`` then
    ``build_base(out, seed, force=...)``. Shared by the built-in tasks' ``main``; ``--head-dim`` is offered when
    ``build_base`` takes ``head_dim``."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="write OUT/{train,eval}.jsonl; train the base model into OUT/base")
    build.add_argument("--out", required=True, help=f"output directory, e.g. {example_out}")
    build.add_argument("--seed", type=int, default=0, help="seed of the prompt split and of the base model")
    build.add_argument("--force", action="store_true", help="retrain the base model even when it is up to date")
    shaped = "head_dim" in inspect.signature(build_base).parameters
    if shaped:
        build.add_argument(
            "--head-dim",
            type=_positive_int,
            default=None,
            help="width of each of the 4 attention heads (default: hidden size / 4 = 16); "
            "vLLM on CPU needs one it has a kernel for, e.g. 32",
        )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    train_path, eval_path = write_data(args.out, args.seed)
    log.info("wrote %s and %s", train_path, eval_path)
    shape = {"head_dim": args.head_dim} if shaped else {}
    build_base(args.out, args.seed, force=args.force, **shape)


def _positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (the message argparse prints names the flag and the value)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number (e.g. 32)") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1 (e.g. 32)")
    return value


def main(argv: list[str] | None = None) -> None:
    """``python -m sharpening.tasks.demo build --out DIR [--seed N] [--force] [--head-dim D]``."""
    build_command("python -m sharpening.tasks.demo", "artifacts/demo", write_demo_data, build_demo_base, argv, __doc__)


if __name__ == "__main__":
    main()
