"""Every user of a self-reward reads the registry: the round's selection (which model scores, which pass it
takes, the task reward), RL's rollout signal, and the checks of both."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch

from sharpening.callbacks import SelfVerificationCallback
from sharpening.engines import SamplingConfig, generate_samples
from sharpening.errors import ConfigError
from sharpening.logprobs import sample_logprobs
from sharpening.policy import stop_token_ids
from sharpening.prompts import pad_prompts
from sharpening.rewards import self_reward
from sharpening.rl.config import RLConfig, validate_rl_config
from sharpening.selection import SelectionConfig, validate_selection_config
from sharpening.tasks.extractors import resolve_extractor
from sharpening.verifier import RoundModels, RoundSettings, score, stopping_top_k
from tests.helpers import build_tiny_model

WORDS = ["abcd=", "ab=", "hgf="]


def starts_with_a(text: str, answer: str | None) -> float:
    """A task reward for the tests: 1 for responses starting with 'a'."""
    return float(text.startswith("a"))


@self_reward("policy", "sample", "minus the response length (a test reward)")
def short(response_mask):
    return -response_mask.sum(-1).float()


class Counting:
    """A model context that counts how often it is entered (to see which model scored)."""

    def __init__(self, model):
        self.model, self.entered = model, 0

    @contextlib.contextmanager
    def __call__(self):
        self.entered += 1
        yield self.model


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path_factory.mktemp("p"), seed=1)).eval()


def _prompts(tokenizer):
    ids = [tokenizer(w).input_ids for w in WORDS]
    return pad_prompts(ids, [0, 1, 2], [w[:-1][::-1] for w in WORDS], tokenizer.pad_token_id)


def _draw(model, tokenizer, temperature: float = 1.0):
    cfg = SamplingConfig(samples_per_prompt=4, max_new_tokens=6, temperature=temperature)
    with torch.no_grad():
        return generate_samples(model, _prompts(tokenizer), cfg, stop_token_ids(model, tokenizer),
                                tokenizer.pad_token_id, seed=5)  # fmt: skip


def _settings(reward: str, sample_from: str = "policy", **selection) -> RoundSettings:
    return RoundSettings(
        SamplingConfig(samples_per_prompt=4, max_new_tokens=6),
        SelectionConfig(reward=reward, **selection),
        resolve_extractor("strip"),
        sample_from=sample_from,
    )


def _loglik(model, samples) -> torch.Tensor:
    with torch.no_grad():
        return (sample_logprobs(model, samples) * samples.response_mask).sum(-1)  # [B, N]


def test_policy_scored_reward_is_scored_by_the_model_that_drew(policy, tiny_model, tiny_tokenizer):
    samples = _draw(policy, tiny_tokenizer, temperature=0.7)  # not exact: the scorer must take a pass
    sampler, base = Counting(policy), Counting(tiny_model)
    models = RoundModels(sampler, base, tiny_tokenizer, 4)
    scores = score(models, samples, None, _settings("policy_loglik"))
    torch.testing.assert_close(scores, _loglik(policy, samples), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(scores, _loglik(tiny_model, samples), atol=1e-2)  # not the frozen base's
    assert (sampler.entered, base.entered) == (1, 0)
    base_scores = score(models, samples, None, _settings("loglik"))
    torch.testing.assert_close(base_scores, _loglik(tiny_model, samples), rtol=1e-4, atol=1e-4)
    assert base.entered == 1


def test_exact_draws_reuse_the_drawing_models_logprobs_and_answer_rewards_run_no_model(policy, tiny_tokenizer):
    samples = _draw(policy, tiny_tokenizer)
    sampler, base = Counting(policy), Counting(policy)
    models = RoundModels(sampler, base, tiny_tokenizer, 4)
    scores = score(models, samples, None, _settings("policy_loglik"))
    torch.testing.assert_close(scores, (samples.logprobs * samples.response_mask).sum(-1))
    answers = [["4", "4", "5", None]] * 3
    majority = score(models, samples, answers, _settings("majority_binary"))
    assert majority.tolist() == [[1.0, 1.0, 0.0, 0.0]] * 3
    assert (sampler.entered, base.entered) == (0, 0)


def test_a_policy_scored_reward_with_sample_from_base_is_scored_by_the_frozen_base(policy, tiny_model, tiny_tokenizer):
    samples = _draw(tiny_model, tiny_tokenizer, temperature=0.7)
    sampler, base = Counting(tiny_model), Counting(policy)  # sample_from base: the sampling model IS the base
    scores = score(RoundModels(sampler, base, tiny_tokenizer, 4), samples, None, _settings("policy_loglik", "base"))
    torch.testing.assert_close(scores, _loglik(tiny_model, samples), rtol=1e-4, atol=1e-4)


def test_task_reward_is_added_with_its_weight_and_turns_off_stopping(tiny_model, tiny_tokenizer):
    samples = _draw(tiny_model, tiny_tokenizer)
    models = RoundModels(Counting(tiny_model), Counting(tiny_model), tiny_tokenizer, 4)
    path = f"{__name__}:starts_with_a"
    settings = _settings("loglik", "base", task_reward=path, task_reward_weight=2.5)
    texts = [[tiny_tokenizer.decode(r[m]) for r, m in zip(ids, mask)]
             for ids, mask in zip(samples.response_ids, samples.response_mask)]  # fmt: skip
    task = torch.tensor([[float(t.startswith("a")) for t in group] for group in texts])
    expected = (samples.logprobs * samples.response_mask).sum(-1) + 2.5 * task
    assert task.sum() > 0  # the test draws some responses starting with "a"
    torch.testing.assert_close(score(models, samples, None, settings), expected)
    assert stopping_top_k(_settings("loglik", "base")) == 1
    assert stopping_top_k(settings) == 0  # the bound holds for log-likelihood alone


def test_selection_accepts_any_registered_reward_or_import_path_and_refuses_others():
    for reward in ("self_certainty", "soft_majority", f"{__name__}:short"):
        assert validate_selection_config(SelectionConfig(reward=reward), 4, "--verifier.selection") == []
    problems = validate_selection_config(
        SelectionConfig(reward="bleu", task_reward="no.such.module:f", task_reward_weight=float("nan")),
        4,
        "--verifier.selection",
    )
    assert problems[0].startswith("--verifier.selection.reward='bleu': unknown self-reward")
    assert problems[1].startswith("--verifier.selection.task_reward='no.such.module:f': cannot import it")
    assert problems[2].startswith("--verifier.selection.task_reward_weight=nan")
    with pytest.raises(ConfigError, match="starts_with_a"):  # a plain function declares no scored_by
        SelfVerificationCallback(selection=SelectionConfig(reward=f"{__name__}:starts_with_a"))


def test_rl_reward_options_are_checked_and_offline_keeps_loglik():
    sampling = SamplingConfig(samples_per_prompt=4)
    tilted = RLConfig(reward="self_certainty", task_reward=f"{__name__}:starts_with_a")
    assert validate_rl_config(tilted, sampling) == []
    assert validate_rl_config(RLConfig(reward="bleu"), sampling)[0].startswith("--model.rl.reward='bleu'")
    for algorithm in ("offline", "xpo"):
        problems = validate_rl_config(dataclasses.replace(RLConfig(algorithm=algorithm), reward="majority"), sampling)
        assert any(p.startswith("--model.rl.reward=majority: algorithm " + algorithm) for p in problems)
        tilted = RLConfig(algorithm=algorithm, task_reward=f"{__name__}:starts_with_a")
        assert any(p.startswith("--model.rl.task_reward=") for p in validate_rl_config(tilted, sampling))


def test_a_self_reward_replaces_log_pi_base_in_the_rl_signal_and_the_kl_stays(tiny_model, tiny_tokenizer):
    from sharpening.losses import group_advantages
    from sharpening.rl.rollout import build_rollout

    samples = _draw(tiny_model, tiny_tokenizer)
    base_logprobs = samples.logprobs - 0.1 * samples.response_mask  # a base unlike the sampler
    rl = RLConfig(kl_coef=0.5, baseline="mean")
    self_rewards = torch.arange(12.0).view(3, 4)  # [B, G]
    rollout = build_rollout(samples, base_logprobs, rl, tiny_tokenizer, self_rewards)
    base_seq = (base_logprobs * samples.response_mask).sum(-1)
    sampler_seq = (samples.logprobs * samples.response_mask).sum(-1)
    signal = self_rewards - 0.5 * (sampler_seq - base_seq)  # r(y) - beta (log pi(y) - log pi_base(y))
    torch.testing.assert_close(rollout.advantages, group_advantages(signal, "mean").flatten())
    paper = build_rollout(samples, base_logprobs, rl, tiny_tokenizer)  # None: log pi_base, the paper's
    signal = base_seq - 0.5 * (sampler_seq - base_seq)
    torch.testing.assert_close(paper.advantages, group_advantages(signal, "mean").flatten())


# ---------------------------------------------------------------- sharpen evaluate: best-of-N by any reward


def _brute_self_certainty(model, samples) -> torch.Tensor:
    """Mean over response tokens of logsumexp - mean logit - log V, from the full logits: [B, N]."""
    import math

    prompts, out = samples.prompts, torch.zeros(samples.response_ids.shape[:2])
    with torch.no_grad():
        for b in range(len(prompts)):
            prompt = prompts.prompt_ids[b][prompts.prompt_mask[b]]
            for n in range(samples.samples_per_prompt):
                response = samples.response_ids[b, n][samples.response_mask[b, n]]
                logits = model(torch.cat([prompt, response])[None]).logits[0].float()  # [P + T, V]
                at = logits[len(prompt) - 1 : len(prompt) - 1 + len(response)]  # [T, V]
                kl = at.logsumexp(-1) - at.mean(-1) - math.log(at.shape[-1])  # [T]
                out[b, n] = kl.mean()
    return out


def test_evaluate_scores_base_rewards_by_score_with_and_policy_rewards_by_the_evaluated_model(
    policy, tiny_model, tiny_tokenizer
):
    from sharpening.evaluate.draws import score_draws

    samples = _draw(policy, tiny_tokenizer)  # the evaluated model's exact draws
    answers = [["4", "5", "5", None]] * 3
    scores = score_draws(samples, policy, tiny_model, "base", ["self_certainty", "majority_binary"], answers)
    assert list(scores) == ["loglik", "self_certainty", "majority_binary"]  # loglik always: chosen_loglik reads it
    torch.testing.assert_close(scores["loglik"], _loglik(tiny_model, samples), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(scores["self_certainty"], _brute_self_certainty(policy, samples), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(scores["self_certainty"], _brute_self_certainty(tiny_model, samples), atol=1e-3)
    assert scores["majority_binary"].tolist() == [[0.0, 1.0, 1.0, 0.0]] * 3


def test_evaluate_rows_are_named_by_reward_and_only_rescored_rewards_pay_twice():
    from sharpening.evaluate.config import ProtocolConfig, validate_protocol_config
    from sharpening.evaluate.draws import rescored_rewards
    from sharpening.evaluate.protocol import SeedDraws, protocol_table, seed_metrics
    from sharpening.evaluate.report import format_table

    assert rescored_rewards(ProtocolConfig(), "self") == []  # exact draws scored by themselves: no pass
    assert rescored_rewards(ProtocolConfig(), "base") == ["loglik", "loglik_norm"]
    custom = ProtocolConfig(n_values=[1, 2], rewards=["self_certainty", "loglik", "majority"])
    assert rescored_rewards(custom, "self") == ["self_certainty"]  # statistics: a pass; answers: none
    draws = SeedDraws(
        correct=torch.tensor([[True, False], [False, True]]),
        answer_codes=torch.tensor([[0, 1], [0, 1]]),
        scores={"loglik": torch.tensor([[-1.0, -2.0], [-1.0, -2.0]]),
                "self_certainty": torch.tensor([[0.1, 0.9], [0.9, 0.1]]),
                "majority": torch.tensor([[0.5, 0.5], [0.5, 0.5]])},
        lengths=torch.tensor([[2, 4], [2, 4]]),
        truncated=torch.zeros(2, 2, dtype=torch.bool),
    )  # fmt: skip
    metrics = seed_metrics(draws, [1, 2], "drop", rescored_rewards(custom, "self"), custom.rewards)
    assert list(metrics) == ["sample", "bon_self_certainty", "bon_loglik", "bon_majority", "maj", "pass"]
    assert metrics["bon_self_certainty"][2] == {"accuracy": 0.0, "chosen_loglik": -1.5, "tokens": 12.0}
    assert metrics["bon_loglik"][2] == {"accuracy": 0.5, "chosen_loglik": -1.0, "tokens": 6.0}
    rows = protocol_table([metrics], {"accuracy": 0.5, "chosen_loglik": -1.0}, [1, 2])
    assert [r["method"] for r in rows if r["n"] == 2] == [
        "bon_self_certainty", "bon_loglik", "bon_majority", "maj", "pass"
    ]  # fmt: skip
    results = {"table": rows, "n_values": [1, 2], "seeds": [0], "samples_per_prompt": 2, "prompts": {"count": 2}}
    assert "BoN self_certainty" in format_table(results) and "lift self_certainty" in format_table(results)
    problems = validate_protocol_config(ProtocolConfig(rewards=["bleu", "loglik", "loglik"]))
    assert problems[0].startswith("--protocol.rewards[0]='bleu': unknown self-reward")
    assert problems[1].startswith("--protocol.rewards=['bleu', 'loglik', 'loglik']: a reward is listed twice")
    assert validate_protocol_config(ProtocolConfig(rewards=[]))[0].startswith("--protocol.rewards=[]")
