"""The cot task's distribution, its answer extractor, and the property it exists for: majority over
extracted answers is right where likelihood over whole responses is wrong (exact, no training)."""

import itertools
import random
import re

import pytest
import torch

from sharpening.tasks import cot
from sharpening.tasks.demo import split_demo_prompts


def test_distribution_sums_to_one_with_the_wrong_answer_as_the_likeliest_response():
    dist = cot.cot_response_distribution("abcd=")
    assert sum(dist.values()) == pytest.approx(1.0)
    assert max(dist, key=dist.get) == "ab;abcd"
    assert dist["ab;abcd"] == pytest.approx(0.35)
    assert dist["ab;dcba"] == pytest.approx(0.65 / 64)
    assert all(re.fullmatch(r"[a-h]{2};[a-h]{4}", r) for r in dist)
    assert cot.answer_distribution("abcd=") == pytest.approx({"dcba": 0.65, "abcd": 0.35})


def test_extract_answer_reads_after_the_last_separator():
    assert cot.extract_answer("gc;dcba") == "dcba"
    assert cot.extract_answer(" a;b;dcba ") == "dcba"
    assert cot.extract_answer("gcdcba") is None
    assert cot.extract_answer("gc;") is None


@pytest.mark.parametrize("n", [4, 8, 16])
def test_majority_is_right_where_best_of_n_by_likelihood_is_wrong(n):
    acc = cot.exact_accuracies("abcd=", n)
    assert acc["majority"] > acc["sample"] > 0.5 > acc["bon_loglik"]
    assert acc["greedy"] == 0.0
    # the binomial written out for n = 4: 3 or 4 right, or a 2-2 tie decided by the first draw
    if n == 4:
        p = 0.65
        assert acc["majority"] == pytest.approx(p**4 + 4 * p**3 * (1 - p) + 0.5 * 6 * p**2 * (1 - p) ** 2)
        assert acc["bon_loglik"] == pytest.approx(0.65**4)


def test_exact_accuracies_match_simulated_draws():
    """Monte Carlo over the distribution, with majority and best-of-n computed the plain way."""
    rng = random.Random(0)
    dist = cot.cot_response_distribution("abcd=")
    responses, probs = zip(*dist.items())
    n, trials, majority_right, bon_right = 8, 4000, 0, 0
    for _ in range(trials):
        drawn = rng.choices(responses, probs, k=n)
        answers = [cot.extract_answer(r) for r in drawn]
        counts = {a: answers.count(a) for a in answers}
        top = max(counts.values())
        majority_right += next(a for a in answers if counts[a] == top) == "dcba"
        bon_right += cot.extract_answer(max(drawn, key=dist.get)) == "dcba"
    acc = cot.exact_accuracies("abcd=", n)
    assert majority_right / trials == pytest.approx(acc["majority"], abs=0.03)
    assert bon_right / trials == pytest.approx(acc["bon_loglik"], abs=0.02)


def test_sampled_training_batch_follows_the_distribution():
    tok = cot.build_char_tokenizer(cot.DEMO_ALPHABET + cot.SEPARATOR + cot.WORK_END)
    prompt_ids = torch.tensor(tok(["abcd="])["input_ids"])
    letter_ids = torch.tensor(tok.convert_tokens_to_ids(list(cot.DEMO_ALPHABET)))
    gen = torch.Generator().manual_seed(0)
    end_id = tok.convert_tokens_to_ids(cot.WORK_END)
    ids = cot._sample_cot_batch(prompt_ids, letter_ids, end_id, tok.eos_token_id, 2000, gen)
    assert ids.shape == (2000, 6 + cot.RESPONSE_TOKENS + 1)
    texts = tok.batch_decode(ids, skip_special_tokens=True)
    assert all(t.startswith("abcd=") for t in texts)
    answers = [cot.extract_answer(t[len("abcd=") :]) for t in texts]
    assert answers.count("dcba") / len(answers) == pytest.approx(0.65, abs=0.04)
    assert texts.count("abcd=ab;abcd") == answers.count("abcd")  # the wrong answer has one work string
    assert len({t for t in texts if t.endswith("dcba")}) > 50  # the right one is spread over many notes


def test_every_prompt_has_the_disagreement():
    prompts = list(itertools.chain(*split_demo_prompts(0)))[::97]
    for prompt in prompts:
        acc = cot.exact_accuracies(prompt, 8)
        assert acc["majority"] == pytest.approx(0.8, abs=1e-3) and acc["bon_loglik"] < 0.05
