"""Self-rewards, and the enumeration checks of method.md §5 on a toy model whose responses can all be listed."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from sharpening.engines import SamplingConfig, generate_samples
from sharpening.errors import ConfigError
from sharpening.logprobs import response_logprobs
from sharpening.prompts import pad_prompts
from sharpening.rewards import (
    REWARDS,
    SelfReward,
    combined_reward,
    extract_answers,
    length_normalized_reward,
    loglik_reward,
    majority_answer,
    majority_binary_reward,
    majority_vote_reward,
    resolve_reward,
    resolve_task_reward,
    score_samples,
    self_reward,
    soft_majority_reward,
    task_reward_scores,
)
from sharpening.selection import best_of_n

# ---------------------------------------------------------------- log-likelihood


def test_loglik_sums_response_tokens_only():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0, -4.0], [-0.5, -0.25, -7.0, -9.0]])
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    torch.testing.assert_close(loglik_reward(logprobs, mask), torch.tensor([-6.0, -0.75]))


def test_loglik_keeps_leading_dims_and_is_float32():
    logprobs = -torch.rand(2, 3, 5, dtype=torch.float64)
    mask = torch.rand(2, 3, 5) > 0.3
    got = loglik_reward(logprobs.to(torch.bfloat16), mask)
    assert got.shape == (2, 3) and got.dtype == torch.float32
    want = (logprobs.to(torch.bfloat16).float() * mask).sum(-1)
    torch.testing.assert_close(got, want)


def test_loglik_of_empty_response_is_zero():
    assert loglik_reward(torch.tensor([[-3.0, -1.0]]), torch.tensor([[False, False]])).item() == 0.0


# ---------------------------------------------------------------- length-normalized


def test_length_normalized_counts_eos_as_a_token():
    # three response tokens, the last one being EOS: |y| = 3
    logprobs = torch.tensor([[-1.0, -2.0, -0.3, -5.0]])
    mask = torch.tensor([[True, True, True, False]])
    torch.testing.assert_close(length_normalized_reward(logprobs, mask), torch.tensor([-3.3 / 3]))


def test_length_normalized_table():
    logprobs = torch.tensor([[-2.0, -2.0, -2.0], [-6.0, 0.0, 0.0], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[True, True, True], [True, False, False], [False, False, False]])
    torch.testing.assert_close(length_normalized_reward(logprobs, mask), torch.tensor([-2.0, -6.0, 0.0]))


def test_length_normalization_can_reverse_the_raw_order():
    logprobs = torch.tensor([[-1.0, 0.0, 0.0, 0.0], [-0.6, -0.6, -0.6, -0.6]])
    mask = torch.tensor([[True, False, False, False], [True, True, True, True]])
    raw = loglik_reward(logprobs, mask)
    norm = length_normalized_reward(logprobs, mask)
    assert raw[0] > raw[1]  # raw log-prob favours the short answer (method.md §4.6)
    assert norm[1] > norm[0]


# ---------------------------------------------------------------- majority vote


@pytest.mark.parametrize(
    "answers, want",
    [
        ([["4", "4", "5", None]], [[0.5, 0.5, 0.25, 0.0]]),
        ([["4", "5", "4", "5"]], [[0.5, 0.5, 0.5, 0.5]]),  # a tie: both answers equally rewarded
        ([[None, None, None]], [[0.0, 0.0, 0.0]]),
        ([["a", "b", "c"]], [[1 / 3, 1 / 3, 1 / 3]]),
        ([["x", "x"], ["y", None]], [[1.0, 1.0], [0.5, 0.0]]),
        ([["7", " 7", "7"]], [[2 / 3, 1 / 3, 2 / 3]]),  # exact string match: extractors canonicalize
    ],
)
def test_majority_vote_table(answers, want):
    got = majority_vote_reward(answers)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.tensor(want))


def test_majority_vote_none_counts_in_the_denominator():
    # frequency among the N samples (method.md §2), not among the answered ones
    torch.testing.assert_close(majority_vote_reward([["1", None, None, None]]), torch.tensor([[0.25, 0.0, 0.0, 0.0]]))


# ---------------------------------------------------------------- dispatch


def test_score_samples_dispatch():
    logprobs = torch.tensor([[[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]]])
    mask = torch.tensor([[[True, True, False], [True, False, False]]])
    torch.testing.assert_close(score_samples("loglik", logprobs, mask), torch.tensor([[-3.0, -0.5]]))
    torch.testing.assert_close(score_samples("loglik_norm", logprobs, mask), torch.tensor([[-1.5, -0.5]]))
    torch.testing.assert_close(score_samples("majority", answers=[["a", "a"]]), torch.tensor([[1.0, 1.0]]))
    assert set(REWARDS) == {
        *("loglik", "loglik_norm", "majority"),
        *("majority_binary", "soft_majority", "policy_loglik", "neg_token_entropy", "neg_mean_token_entropy"),
        "self_certainty",
    }


def test_score_samples_unknown_name_lists_choices():
    with pytest.raises(ValueError) as info:
        score_samples("perplexity", torch.zeros(1, 1, 1), torch.ones(1, 1, 1, dtype=torch.bool))
    message = str(info.value)
    assert "'perplexity'" in message
    for name in REWARDS:
        assert name in message


def test_extract_answers_keeps_shape():
    texts = [["a 1", "b"], ["c 22", "3 d"]]
    got = extract_answers(texts, lambda t: t.split()[-1] if " " in t else None)
    assert got == [["1", None], ["22", "d"]]


# ---------------------------------------------------------------- majority as binary (TTRL/SRT), soft majority (EMPO)


@pytest.mark.parametrize(
    "answers, majority, want",
    [
        ([["4", "4", "5", None]], ["4"], [[1.0, 1.0, 0.0, 0.0]]),
        ([["5", "4", "4", "5"]], ["5"], [[1.0, 0.0, 0.0, 1.0]]),  # a tie goes to the answer reached first
        ([["4", "5", "5", "4"]], ["4"], [[1.0, 0.0, 0.0, 1.0]]),  # ... whichever it is
        ([[None, "3", None, "2"]], ["3"], [[0.0, 1.0, 0.0, 0.0]]),  # None never wins nor ties
        ([[None, None]], [None], [[0.0, 0.0]]),
        ([["a", "b"], ["b", "b"]], ["a", "b"], [[1.0, 0.0], [1.0, 1.0]]),  # each group has its own majority
    ],
)
def test_majority_binary_table(answers, majority, want):
    assert [majority_answer(group) for group in answers] == majority
    got = majority_binary_reward(answers)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.tensor(want))


@pytest.mark.parametrize(
    "answers, want",
    [
        ([["4", "4", "5", None]], [[2 / 3, 2 / 3, 1 / 3, 0.0]]),  # frequency among the ANSWERED samples
        ([["4", "5", "4", "5"]], [[0.5, 0.5, 0.5, 0.5]]),
        ([[None, None, None]], [[0.0, 0.0, 0.0]]),  # no answer: 0, not a division by zero
        ([["x", None], ["y", "z"]], [[1.0, 0.0], [0.5, 0.5]]),
    ],
)
def test_soft_majority_table(answers, want):
    got = soft_majority_reward(answers)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.tensor(want))


def test_soft_majority_differs_from_majority_only_by_the_unanswered():
    answers = [["1", "1", "2", None, None]]
    torch.testing.assert_close(soft_majority_reward(answers) * 3, majority_vote_reward(answers) * 5)


def test_declarations_of_the_built_ins():
    assert {n for n, r in REWARDS.items() if r.per == "group"} == {"majority", "majority_binary", "soft_majority"}
    assert {n for n, r in REWARDS.items() if r.needs_stats} == {
        "neg_token_entropy",
        "neg_mean_token_entropy",
        "self_certainty",
    }
    assert REWARDS["loglik"].scored_by == "base" and REWARDS["policy_loglik"].scored_by == "policy"
    for name, reward in REWARDS.items():
        assert reward.name == name and reward.description
        assert reward.needs_answers == (reward.per == "group")


def test_score_samples_names_a_missing_input():
    with pytest.raises(ValueError, match="'self_certainty' reads stats"):
        score_samples("self_certainty", response_mask=torch.ones(1, 1, 2, dtype=torch.bool))


# ---------------------------------------------------------------- a user's own reward, by import path


@self_reward("policy", "sample", "minus the response length, for the tests")
def short_responses(response_mask):
    return -response_mask.sum(-1).float()


def plain_function(response_mask):
    return response_mask.sum(-1).float()


NOT_CALLABLE = 3
BAD_PER = SelfReward("bad", plain_function, "policy", "batch", False, False, "per is wrong")
LYING = SelfReward("lying", plain_function, "base", "sample", True, False, "says it needs stats; does not")
UNKNOWN_INPUT = self_reward("base", "sample", "reads logits")(lambda logits: logits)
OPTION = "--verifier.selection.reward"


@pytest.mark.parametrize("path", [f"{__name__}:short_responses", f"{__name__}.short_responses"])
def test_import_path_registration(path):
    reward = resolve_reward(path, OPTION)
    assert reward is short_responses and reward.scored_by == "policy" and not reward.needs_stats
    mask = torch.tensor([[[True, True, False], [True, False, False]]])
    torch.testing.assert_close(score_samples(path, response_mask=mask), torch.tensor([[-2.0, -1.0]]))


@pytest.mark.parametrize(
    "attr, expected",
    [
        ("plain_function", "declares no scored_by / per; wrap it with @sharpening.rewards.self_reward"),
        ("NOT_CALLABLE", "is not callable"),
        ("BAD_PER", "per='batch' must be 'sample' or 'group'"),
        ("LYING", "needs_stats / needs_answers disagree"),
        ("UNKNOWN_INPUT", "fn takes logits"),
        ("missing_name", "cannot import it"),
    ],
)
def test_import_path_refusals_name_the_option(attr, expected):
    path = f"{__name__}:{attr}"
    with pytest.raises(ConfigError) as info:
        resolve_reward(path, OPTION)
    message = str(info.value)
    assert f"{OPTION}={path!r}" in message and expected in message


def test_unknown_name_without_a_path_lists_the_built_ins():
    with pytest.raises(ConfigError) as info:
        resolve_reward("entropy", OPTION)
    assert f"{OPTION}='entropy': unknown self-reward" in str(info.value) and "self_certainty" in str(info.value)


# ---------------------------------------------------------------- combined with a task reward


def contains_answer(text: str, answer: str | None) -> float:
    return float(answer is not None and answer in text)


def test_combined_reward_adds_the_weighted_task_reward():
    task_reward = resolve_task_reward(f"{__name__}:contains_answer", "--model.task_reward")
    task = task_reward_scores([["x=42", "x=41"], ["no", "7"]], ["42", None], task_reward)
    torch.testing.assert_close(task, torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    self_scores = torch.tensor([[-3.0, -1.0], [-2.0, -5.0]])
    got = combined_reward(self_scores, task, 2.5)
    torch.testing.assert_close(got, torch.tensor([[-0.5, -1.0], [-2.0, -5.0]]))
    torch.testing.assert_close(combined_reward(self_scores, task, 0.0), self_scores)  # weight 0: the self-reward
    with pytest.raises(ConfigError, match="--model.task_reward='.*:NOT_CALLABLE'.*not callable"):
        resolve_task_reward(f"{__name__}:NOT_CALLABLE", "--model.task_reward")


# ---------------------------------------------------------------- method.md §5: enumeration on a toy

PAD, BOS, EOS, A = 0, 1, 2, 3
NON_EOS = (PAD, BOS, A)  # the sampler may draw any vocabulary token, special ones included
MAX_NEW = 3
PROMPT = [BOS, A, A]


@pytest.fixture(scope="module")
def toy_model():
    """Llama with vocab 4 (0 pad, 1 bos, 2 eos, 3 'a'); a wide init so the distribution is far from uniform."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=4,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16,
        initializer_range=0.5,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )
    return LlamaForCausalLM(config).eval()


def _all_responses():
    complete = [tuple(p) + (EOS,) for length in range(MAX_NEW) for p in itertools.product(NON_EOS, repeat=length)]
    truncated = [tuple(p) for p in itertools.product(NON_EOS, repeat=MAX_NEW)]
    return complete, truncated


@pytest.fixture(scope="module")
def enumerated(toy_model):
    """Exact log pi(y|x) of every response, by teacher forcing with log-softmax written out."""
    complete, truncated = _all_responses()
    logp = {}
    with torch.no_grad():
        for y in complete + truncated:
            logits = toy_model(input_ids=torch.tensor([PROMPT + list(y)])).logits[0].float()
            total = 0.0
            for j, token in enumerate(y):
                row = logits[len(PROMPT) - 1 + j]
                total += float(row[token] - torch.logsumexp(row, -1))
            logp[y] = total
    return logp


def test_enumeration_is_complete_and_sums_to_one(enumerated):
    complete, truncated = _all_responses()
    assert len(complete) == 1 + 3 + 9 and len(truncated) == 27
    mass = sum(math.exp(v) for v in enumerated.values())
    assert abs(mass - 1.0) < 1e-5
    truncated_mass = sum(math.exp(enumerated[y]) for y in truncated)
    assert 0.0 < truncated_mass < 1.0
    probs = sorted(math.exp(v) for v in enumerated.values())
    assert probs[-1] > 5 * probs[0]  # the toy is far from uniform


def test_response_logprobs_equals_enumeration(toy_model, enumerated):
    responses = list(enumerated)
    width = max(len(y) for y in responses)
    response_ids = torch.full((len(responses), width), PAD, dtype=torch.long)
    response_mask = torch.zeros(len(responses), width, dtype=torch.bool)
    for i, y in enumerate(responses):
        response_ids[i, : len(y)] = torch.tensor(y)
        response_mask[i, : len(y)] = True
    prompt_ids = torch.tensor([PROMPT] * len(responses))
    with torch.no_grad():
        token_logprobs = response_logprobs(
            toy_model, prompt_ids, torch.ones_like(prompt_ids, dtype=torch.bool), response_ids, response_mask, 5
        )
    scores = loglik_reward(token_logprobs, response_mask)
    torch.testing.assert_close(scores, torch.tensor([enumerated[y] for y in responses]), atol=1e-5, rtol=0)
    assert abs(torch.logsumexp(scores.double(), 0).item()) < 1e-5


def _toy_samples(model, prompts_count, n, seed=0):
    prompts = pad_prompts([PROMPT] * prompts_count, list(range(prompts_count)), [None] * prompts_count, PAD)
    cfg = SamplingConfig(samples_per_prompt=n, max_new_tokens=MAX_NEW)
    return generate_samples(model, prompts, cfg, EOS, PAD, seed=seed)


def _tuples(samples):
    b, n, _ = samples.response_ids.shape
    return [
        [tuple(samples.response_ids[i, j][samples.response_mask[i, j]].tolist()) for j in range(n)] for i in range(b)
    ]


def test_self_reward_of_samples_equals_enumerated_logprob(toy_model, enumerated):
    samples = _toy_samples(toy_model, 2, 400)
    scores = loglik_reward(samples.logprobs, samples.response_mask)  # [B, N]
    norm = length_normalized_reward(samples.logprobs, samples.response_mask)
    for i, group in enumerate(_tuples(samples)):
        for j, y in enumerate(group):
            assert y in enumerated
            assert abs(scores[i, j].item() - enumerated[y]) < 1e-5
            assert abs(norm[i, j].item() - enumerated[y] / len(y)) < 1e-5
            assert bool(samples.truncated[i, j]) == (EOS not in y)


def _grouped_chi2(counts: dict, probs: dict, total: int) -> tuple[float, int]:
    """Chi-square statistic with cells of expected count < 5 merged into one; returns (stat, dof)."""
    stat, cells, small_obs, small_exp = 0.0, 0, 0, 0.0
    for y, p in probs.items():
        expected = p * total
        if expected < 5:
            small_obs, small_exp = small_obs + counts.get(y, 0), small_exp + expected
            continue
        stat += (counts.get(y, 0) - expected) ** 2 / expected
        cells += 1
    if small_exp > 0:
        stat += (small_obs - small_exp) ** 2 / small_exp
        cells += 1
    return stat, cells - 1


def _chi2_critical(df: int, z: float = 3.09) -> float:
    """Upper quantile of chi-square (Wilson-Hilferty); z=3.09 is p=0.001."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def test_sample_frequencies_match_enumerated_probabilities(toy_model, enumerated):
    samples = _toy_samples(toy_model, 1, 4000, seed=5)
    counts = {}
    for y in _tuples(samples)[0]:
        counts[y] = counts.get(y, 0) + 1
    stat, dof = _grouped_chi2(counts, {y: math.exp(v) for y, v in enumerated.items()}, 4000)
    assert dof >= 10
    assert stat < _chi2_critical(dof)


def test_best_of_n_distribution_matches_exact_formula(toy_model, enumerated):
    """P(BoN = y) = F(y)^N - F(y-)^N, responses sorted by self-reward, F the cumulative base mass."""
    n, rounds = 4, 1500
    samples = _toy_samples(toy_model, rounds, n, seed=11)
    scores = loglik_reward(samples.logprobs, samples.response_mask)
    best = best_of_n(scores, samples.truncated, "keep")
    tuples = _tuples(samples)
    counts = {}
    for i, j in enumerate(best.tolist()):
        counts[tuples[i][j]] = counts.get(tuples[i][j], 0) + 1
    ordered = sorted(enumerated, key=lambda y: enumerated[y])  # ascending self-reward
    exact, cumulative = {}, 0.0
    for y in ordered:
        below = cumulative
        cumulative += math.exp(enumerated[y])
        exact[y] = cumulative**n - below**n
    assert abs(sum(exact.values()) - 1.0) < 1e-5
    stat, dof = _grouped_chi2(counts, exact, rounds)
    assert stat < _chi2_critical(max(dof, 1))
    # best-of-N moves mass toward the argmax y*(x)
    y_star = ordered[-1]
    assert counts.get(y_star, 0) / rounds > math.exp(enumerated[y_star])
