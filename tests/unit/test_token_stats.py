"""Per-token statistics of the full next-token distribution (token_stats.sample_token_stats) and the rewards that
read them, against a softmax written out by hand on the tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from sharpening.logprobs import sample_logprobs
from sharpening.prompts import pad_prompts
from sharpening.rewards import REWARDS, score_samples
from sharpening.token_stats import response_token_stats, sample_token_stats
from sharpening.types import SampleBatch

PAD = 0
# 2 prompts of different lengths, 3 responses each of different lengths (one empty): T = 6
PROMPTS = [[1, 3, 4, 5], [1, 6]]
RESPONSES = [[[5, 6, 7, 2], [8], [9, 10, 11, 12, 13, 2]], [[14, 2], [], [15, 16, 17]]]


def _reference(model, prompt: list[int], response: list[int]) -> dict[str, list[float]]:
    """Per response token, from the full logits of the unpadded sequence with the softmax written out."""
    out = {"logprob": [], "entropy": [], "logsumexp": [], "mean_logit": [], "kl_uniform": []}
    if not response:
        return out
    logits = model(input_ids=torch.tensor([prompt + response])).logits[0].double()  # [L, V]
    for j, token in enumerate(response):
        z = logits[len(prompt) - 1 + j]  # [V]: the state before response token j predicts it
        probs = torch.exp(z) / torch.exp(z).sum()
        v = z.shape[0]
        out["logprob"].append(float(torch.log(probs[token])))
        out["entropy"].append(float(-(probs * torch.log(probs)).sum()))
        out["logsumexp"].append(float(torch.log(torch.exp(z).sum())))
        out["mean_logit"].append(float(z.sum() / v))
        out["kl_uniform"].append(float(((1.0 / v) * torch.log((1.0 / v) / probs)).sum()))
    return out


@pytest.fixture(scope="module")
def samples() -> SampleBatch:
    prompts = pad_prompts(PROMPTS, [0, 1], [None, None], PAD)
    b, n, t = len(RESPONSES), len(RESPONSES[0]), max(len(r) for g in RESPONSES for r in g)
    response_ids = torch.full((b, n, t), PAD, dtype=torch.long)
    response_mask = torch.zeros(b, n, t, dtype=torch.bool)
    for i, group in enumerate(RESPONSES):
        for j, r in enumerate(group):
            response_ids[i, j, : len(r)] = torch.tensor(r)
            response_mask[i, j, : len(r)] = True
    return SampleBatch(
        prompts, response_ids, response_mask, torch.zeros(b, n, t), torch.zeros(b, n, dtype=torch.bool), True
    )


@pytest.fixture(scope="module")
def references(tiny_model):
    with torch.no_grad():
        return [[_reference(tiny_model, PROMPTS[i], r) for r in group] for i, group in enumerate(RESPONSES)]


def _padded(references, key: str, t: int) -> torch.Tensor:
    out = torch.zeros(len(references), len(references[0]), t)
    for i, group in enumerate(references):
        for j, ref in enumerate(group):
            out[i, j, : len(ref[key])] = torch.tensor(ref[key])
    return out


@pytest.mark.parametrize("share_prompt", [True, False])
@pytest.mark.parametrize("chunk_size", [1, 4, 256])  # 1 and 4 are below T = 6 and below the 16 response tokens
def test_statistics_equal_the_written_out_softmax(tiny_model, samples, references, share_prompt, chunk_size):
    token_logprobs, stats = sample_token_stats(tiny_model, samples, chunk_size, share_prompt)
    t = samples.response_ids.shape[-1]
    for got, key in [
        (token_logprobs, "logprob"),
        (stats.entropy, "entropy"),
        (stats.logsumexp, "logsumexp"),
        (stats.mean_logit, "mean_logit"),
    ]:
        assert got.shape == samples.response_ids.shape and got.dtype == torch.float32
        torch.testing.assert_close(got, _padded(references, key, t), atol=1e-5, rtol=1e-5, msg=key)
    assert stats.vocab_size == tiny_model.get_output_embeddings().weight.shape[0]
    assert (stats.entropy[samples.response_mask] > 0).all()  # a random model's distribution is not one-hot


def test_log_probs_are_those_of_sample_logprobs(tiny_model, samples):
    token_logprobs, _ = sample_token_stats(tiny_model, samples, chunk_size=3)
    with torch.no_grad():
        want = sample_logprobs(tiny_model, samples, chunk_size=3)
    torch.testing.assert_close(token_logprobs, want, atol=1e-6, rtol=0)


def test_padding_is_zero_and_padded_ids_do_not_leak(tiny_model, samples):
    noisy = torch.where(samples.response_mask, samples.response_ids, torch.full_like(samples.response_ids, 17))
    flat = samples.response_mask.view(6, -1)  # [B, N, T] -> [B*N, T]
    prompt_ids = samples.prompts.prompt_ids.repeat_interleave(3, 0)  # [B, P] -> [B*N, P]
    prompt_mask = samples.prompts.prompt_mask.repeat_interleave(3, 0)
    clean_lp, clean = response_token_stats(tiny_model, prompt_ids, prompt_mask, samples.response_ids.view(6, -1), flat)
    noisy_lp, stats = response_token_stats(tiny_model, prompt_ids, prompt_mask, noisy.view(6, -1), flat, 2)
    for got, want in [(noisy_lp, clean_lp), (stats.entropy, clean.entropy), (stats.logsumexp, clean.logsumexp)]:
        assert (got[~flat] == 0).all()
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_no_gradient_is_recorded(tiny_model, samples):
    token_logprobs, stats = sample_token_stats(tiny_model, samples, chunk_size=2)
    assert not token_logprobs.requires_grad and not stats.entropy.requires_grad


# ---------------------------------------------------------------- each built-in reward against the reference


def _per_sample(references, reduce) -> torch.Tensor:
    return torch.tensor([[reduce(ref) for ref in group] for group in references], dtype=torch.float32)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


REFERENCE_REWARDS = {
    "loglik": lambda ref: sum(ref["logprob"]),
    "loglik_norm": lambda ref: _mean(ref["logprob"]),
    "policy_loglik": lambda ref: sum(ref["logprob"]),
    "neg_token_entropy": lambda ref: -sum(ref["entropy"]),
    "neg_mean_token_entropy": lambda ref: -_mean(ref["entropy"]),
    "self_certainty": lambda ref: _mean(ref["kl_uniform"]),  # KL(U || p) summed over the vocabulary as written
}


def test_every_model_scored_reward_has_a_reference():
    model_scored = {name for name, reward in REWARDS.items() if reward.needs_logprobs or reward.needs_stats}
    assert model_scored == set(REFERENCE_REWARDS)


@pytest.mark.parametrize("name", sorted(REFERENCE_REWARDS))
def test_reward_equals_brute_force(tiny_model, samples, references, name):
    token_logprobs, stats = sample_token_stats(tiny_model, samples, chunk_size=4)
    got = score_samples(name, token_logprobs, samples.response_mask, stats=stats)
    assert got.shape == (2, 3) and got.dtype == torch.float32
    torch.testing.assert_close(got, _per_sample(references, REFERENCE_REWARDS[name]), atol=2e-5, rtol=1e-5)


def test_self_certainty_is_zero_for_uniform_and_log_v_for_one_hot():
    from sharpening.rewards import self_certainty_reward
    from sharpening.types import TokenStats

    v = 8
    uniform = torch.zeros(v)
    peaked = torch.tensor([60.0] + [0.0] * (v - 1))  # softmax ~ one-hot: KL(U || p) -> large
    z = torch.stack([uniform, peaked])[None]  # [1, 2, V]
    stats = TokenStats(torch.zeros(1, 2), z.logsumexp(-1), z.mean(-1), v)
    mask = torch.tensor([[True, False]])
    assert abs(self_certainty_reward(mask, stats).item()) < 1e-6
    kl_peaked = float(z[0, 1].logsumexp(-1) - z[0, 1].mean() - math.log(v))
    assert kl_peaked > 40
    torch.testing.assert_close(
        self_certainty_reward(torch.tensor([[True, True]]), stats), torch.tensor([kl_peaked / 2])
    )
