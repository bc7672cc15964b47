"""A built-in task with a short chain of thought, where majority over answers and likelihood disagree.

A prompt is a demo prompt (4 letters of ``DEMO_ALPHABET``, not a palindrome, then ``=``, e.g. ``abcd=``);
the correct answer is ``reverse(s)``. A response is ``<work>;<answer>``: two letters of work, ``;``, four
letters of answer. The base model is trained on a distribution in which, for each prompt,

* with probability ``CORRECT_PROB`` (0.65) the work is a *note*: two uniformly random letters (64 notes),
  followed by the correct answer, e.g. ``gc;dcba``; and
* with probability ``1 - CORRECT_PROB`` (0.35) the work is the fixed ``s[0] + s[1]`` followed by the wrong
  answer ``s`` (a copy of the prompt), e.g. ``ab;abcd``.

So the correct *answer* carries 0.65 of the mass, spread over 64 distinct whole responses of ~0.010 each,
while the wrong answer is one whole response of 0.35 (0.35 + 0.65/64 counted by its work string). Majority
over extracted answers (``extract_answer``: the text after ``;``) is right; likelihood over whole responses
is wrong. Exactly, under the base distribution (``exact_accuracies``; majority ties go to the answer drawn
first, which is right half the time since both answers are exchangeable across draws):

======  ===============  ============  ======================  =================
N       one sample       majority@N    best-of-N by loglik     greedy
======  ===============  ============  ======================  =================
1       0.650            0.650         0.650                   0.000
4       0.650            0.718         0.179                   0.000
8       0.650            0.800         0.032                   0.000
16      0.650            0.887         0.001                   0.000
======  ===============  ============  ======================  =================

(Greedy starts with ``s[0]``, the likeliest first letter at 0.35 + 0.65/8, then ``s[1]``, after which the
wrong answer has posterior 0.35 / (0.35 + 0.65/64) ~ 0.97.) TTRL-style majority rewards should therefore
sharpen towards the right answer; likelihood-based sharpening towards the wrong one.

Prompts split as the demo's (``split_demo_prompts``); build with
``python -m sharpening.tasks.cot build --out artifacts/cot``.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import math
from pathlib import Path

import torch

from sharpening.tasks.chars import build_char_tokenizer
from sharpening.tasks.demo import (
    DEMO_ALPHABET,
    PROMPT_LETTERS,
    SEPARATOR,
    build_command,
    build_is_current,
    check_prompt,
    split_demo_prompts,
    train_and_save_base,
)

log = logging.getLogger(__name__)

WORK_END = ";"
"""Ends the work; the answer follows it."""
WORK_LETTERS = 2
"""Letters of work before ``WORK_END``."""
CORRECT_PROB = 0.65
"""Probability (per prompt) that a base response is a random note followed by the correct answer."""
RESPONSE_TOKENS = WORK_LETTERS + 1 + PROMPT_LETTERS
"""Tokens of a response without EOS (``ab;dcba``: 7)."""


def correct_answer(prompt: str) -> str:
    """The correct answer to a cot prompt: its letters reversed ('abcd=' -> 'dcba')."""
    return check_prompt(prompt)[::-1]


def extract_answer(text: str) -> str | None:
    """The answer in a response: the text after the last ``;``, stripped; None without a ``;`` or after it.

    >>> extract_answer("gc;dcba"), extract_answer("gcdcba"), extract_answer("ab;")
    ('dcba', None, None)
    """
    if WORK_END not in text:
        return None
    return text.rsplit(WORK_END, 1)[1].strip() or None


def cot_response_distribution(prompt: str) -> dict[str, float]:
    """The exact data-generating distribution over whole responses (without EOS) for one prompt.

    >>> dist = cot_response_distribution("abcd=")
    >>> round(dist["ab;abcd"], 2), len(dist), round(sum(dist.values()), 6)
    (0.35, 65, 1.0)
    """
    s = check_prompt(prompt)
    notes = ["".join(n) for n in itertools.product(DEMO_ALPHABET, repeat=WORK_LETTERS)]
    dist = {s[:WORK_LETTERS] + WORK_END + s: 1.0 - CORRECT_PROB}
    for note in notes:
        response = note + WORK_END + s[::-1]
        dist[response] = dist.get(response, 0.0) + CORRECT_PROB / len(notes)
    return dist


def answer_distribution(prompt: str) -> dict[str, float]:
    """The base distribution over extracted answers: ``cot_response_distribution`` summed by answer."""
    answers: dict[str, float] = {}
    for response, prob in cot_response_distribution(prompt).items():
        answer = extract_answer(response)
        answers[answer] = answers.get(answer, 0.0) + prob
    return answers


def exact_accuracies(prompt: str, n: int) -> dict[str, float]:
    """Exact accuracies under the base distribution of one sample, majority over ``n`` extracted answers,
    best-of-``n`` by whole-response likelihood, and greedy decoding (token by token).

    Majority: the group's most frequent answer, a tie going to the answer drawn first. Best-of-n: the drawn
    response of highest probability (all correct responses are equally likely here, so ties among them do
    not change correctness).
    """
    answer = correct_answer(prompt)
    dist = cot_response_distribution(prompt)
    p_right = answer_distribution(prompt)[answer]
    wrong = [a for a in answer_distribution(prompt) if a != answer]
    if len(wrong) != 1:
        raise ValueError(f"exact_accuracies expects exactly one wrong answer, got {wrong}")
    binom = [math.comb(n, k) * p_right**k * (1 - p_right) ** (n - k) for k in range(n + 1)]
    majority = sum(binom[k] for k in range(n + 1) if 2 * k > n)
    if n % 2 == 0:
        majority += 0.5 * binom[n // 2]  # a tie: the first draw decides, right with probability 1/2
    ranked = sorted(dist.items(), key=lambda kv: -kv[1])
    # best-of-n is right iff no response more likely than the best correct one was drawn
    best_right = max(p for r, p in dist.items() if extract_answer(r) == answer)
    more_likely = sum(p for r, p in ranked if p > best_right)
    return {
        "sample": p_right,
        "majority": majority,
        "bon_loglik": (1.0 - more_likely) ** n,
        "greedy": float(extract_answer(_greedy_response(dist)) == answer),
    }


def _greedy_response(dist: dict[str, float]) -> str:
    """The response greedy decoding draws from ``dist``: at each position the likeliest next character
    given the prefix (ties to the smallest character)."""
    prefix = ""
    while len(prefix) < RESPONSE_TOKENS:
        mass: dict[str, float] = {}
        for response, prob in dist.items():
            if response.startswith(prefix):
                mass[response[len(prefix)]] = mass.get(response[len(prefix)], 0.0) + prob
        prefix += min(mass, key=lambda c: (-mass[c], c))
    return prefix


def write_cot_data(out_dir: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Write ``train.jsonl`` (sharpening prompts) and ``eval.jsonl`` under ``out_dir``; return both paths.

    Each line is ``{"prompt": "abcd=", "answer": "dcba"}`` (the answer as ``extract_answer`` reads it).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _, sharpen_train, eval_prompts = split_demo_prompts(seed)
    paths = out / "train.jsonl", out / "eval.jsonl"
    for path, prompts in zip(paths, (sharpen_train, eval_prompts)):
        rows = (json.dumps({"prompt": p, "answer": correct_answer(p)}) for p in prompts)
        path.write_text("".join(row + "\n" for row in rows))
    return paths


def _sample_cot_batch(
    prompt_ids: torch.Tensor, letter_ids: torch.Tensor, end_id: int, eos_id: int, batch_size: int, gen: torch.Generator
) -> torch.Tensor:
    """Token ids ``<s> s = work ; answer </s>`` [batch, 14]: prompts drawn uniformly, responses from the base
    distribution. ``prompt_ids`` is [num_prompts, 6] tokenised prompts; ``letter_ids`` the alphabet's ids."""
    prompts = prompt_ids[torch.randint(len(prompt_ids), (batch_size,), generator=gen)]
    s = prompts[:, 1 : 1 + PROMPT_LETTERS]  # [B, 4]
    note = letter_ids[torch.randint(len(letter_ids), (batch_size, WORK_LETTERS), generator=gen)]
    end = torch.full((batch_size, 1), end_id)
    right = torch.cat([note, end, s.flip(1)], 1)  # [B, 7]
    wrong = torch.cat([s[:, :WORK_LETTERS], end, s], 1)  # [B, 7]
    is_right = torch.rand(batch_size, 1, generator=gen) < CORRECT_PROB
    response = torch.where(is_right, right, wrong)
    return torch.cat([prompts, response, torch.full((batch_size, 1), eos_id)], 1)


def build_cot_base(
    out_dir: str | Path,
    seed: int = 0,
    steps: int = 2000,
    batch_size: int = 128,
    lr: float = 3e-3,
    hidden_size: int = 64,
    num_layers: int = 2,
    force: bool = False,
) -> Path:
    """Train the cot base model on the base-train prompts; save it and its tokenizer to ``out_dir/base``.

    The demo's model and training loop (``sharpening.tasks.demo``) on the cot distribution; training is
    skipped when ``out_dir/base/demo_build.json`` records the same parameters, unless ``force``.
    """
    params = {
        "task": "cot",
        "seed": seed,
        "correct_prob": CORRECT_PROB,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "hidden_size": hidden_size,
        "num_layers": num_layers,
    }
    base_dir = Path(out_dir) / "base"
    if not force and build_is_current(base_dir, params):
        log.info("base model in %s is up to date (seed %d): not rebuilt", base_dir, seed)
        return base_dir
    tokenizer = build_char_tokenizer(DEMO_ALPHABET + SEPARATOR + WORK_END)
    prompt_ids = torch.tensor(tokenizer(split_demo_prompts(seed)[0])["input_ids"])
    letter_ids = torch.tensor(tokenizer.convert_tokens_to_ids(list(DEMO_ALPHABET)))
    end_id = tokenizer.convert_tokens_to_ids(WORK_END)

    def sampler(gen: torch.Generator):
        return functools.partial(
            _sample_cot_batch, prompt_ids, letter_ids, end_id, tokenizer.eos_token_id, batch_size, gen
        )

    return train_and_save_base(
        base_dir, tokenizer, params, sampler, seed, steps, lr, hidden_size, num_layers, RESPONSE_TOKENS + 1
    )


def main(argv: list[str] | None = None) -> None:
    """``python -m sharpening.tasks.cot build --out DIR [--seed N] [--force]``."""
    build_command("python -m sharpening.tasks.cot", "artifacts/cot", write_cot_data, build_cot_base, argv, __doc__)


if __name__ == "__main__":
    main()
