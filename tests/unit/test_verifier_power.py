"""The self-verification round selecting by power sampling (power self-distillation), on the tiny model."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch

from sharpening.callbacks import SelfVerificationCallback
from sharpening.engines.power import PowerSamplingConfig, power_sample
from sharpening.errors import ConfigError
from sharpening.logprobs import sample_logprobs
from sharpening.policy import stop_token_ids
from sharpening.prompts import pad_prompts
from sharpening.selection import SelectionConfig
from sharpening.tasks.extractors import resolve_extractor
from sharpening.verifier import RoundModels, RoundSettings, process_power_batch, run_round
from tests.helpers import build_tiny_model

WORDS = ["abcd=", "ab=", "hgf="]


def _power(method: str) -> PowerSamplingConfig:
    return PowerSamplingConfig(
        method=method, alpha=4.0, block_tokens=2, mcmc_steps=2, particles=3, max_new_tokens=6, prompts_per_batch=4
    )


def _settings(method: str, sample_from: str = "base", **selection) -> RoundSettings:
    cfg = SelfVerificationCallback().sampling
    return RoundSettings(
        cfg,
        SelectionConfig(truncated="keep", **selection),
        resolve_extractor("strip"),
        sample_from=sample_from,
        seed=3,
        greedy_accuracy=True,
        select_by="power",
        power=_power(method),
    )


def _models(sampler, base, tokenizer) -> RoundModels:
    return RoundModels(lambda: contextlib.nullcontext(sampler), lambda: contextlib.nullcontext(base), tokenizer, 4)


def _prompts(tokenizer, indices=(0, 1, 2)):
    ids = [tokenizer(WORDS[i]).input_ids for i in indices]
    return pad_prompts(ids, list(indices), [WORDS[i][:-1][::-1] for i in indices], tokenizer.pad_token_id)


def _alone(model, tokenizer, index: int, settings: RoundSettings, epoch: int):
    """What power_sample draws for prompt ``index`` given on its own, with the round's seed and epoch."""
    prompts = _prompts(tokenizer, (index,))
    return power_sample(
        model, prompts, settings.power, stop_token_ids(model, tokenizer), tokenizer.pad_token_id,
        seed=settings.seed, round_index=epoch,
    ).samples  # fmt: skip


@pytest.mark.parametrize("method", ["mcmc", "smc"])
def test_each_kept_example_is_its_prompts_power_sample_scored_by_base_loglik(method, tiny_model, tiny_tokenizer):
    settings = _settings(method)
    result = run_round(_models(tiny_model, tiny_model, tiny_tokenizer), [_prompts(tiny_tokenizer)], settings, epoch=2)
    assert [e.prompt_index for e in result.examples] == [0, 1, 2]  # one kept example per prompt
    for example in result.examples:
        alone = _alone(tiny_model, tiny_tokenizer, example.prompt_index, settings, epoch=2)  # [1, 1, T]
        assert example.response_ids == alone.response_ids[0, 0][alone.response_mask[0, 0]].tolist()
        with torch.no_grad():
            base_logprobs = sample_logprobs(tiny_model, alone)  # [1, 1, T], teacher-forced under the base
        expected = float(base_logprobs[0, 0][alone.response_mask[0, 0]].sum())
        assert example.score == pytest.approx(expected, abs=1e-4)
    other_epoch = run_round(_models(tiny_model, tiny_model, tiny_tokenizer), [_prompts(tiny_tokenizer)], settings, 3)
    assert [e.response_ids for e in other_epoch.examples] != [e.response_ids for e in result.examples]


def test_a_policy_sample_is_rescored_by_the_frozen_base(tiny_model, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path / "policy", seed=1)).eval()
    settings = _settings("mcmc", sample_from="policy")
    drawn = process_power_batch(_models(policy, tiny_model, tiny_tokenizer), _prompts(tiny_tokenizer), settings, 0)
    samples = drawn.scored.samples  # [B, 1, T]
    with torch.no_grad():
        base_loglik = (sample_logprobs(tiny_model, samples) * samples.response_mask).sum(-1)  # [B, 1]
    sampler_loglik = (samples.logprobs * samples.response_mask).sum(-1)  # [B, 1], the policy's
    torch.testing.assert_close(drawn.scored.scores, base_loglik, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(drawn.scored.scores, sampler_loglik, atol=1e-2)


def test_round_metrics_report_tokens_per_kept_and_mcmc_acceptance(tiny_model, tiny_tokenizer):
    models, prompts = _models(tiny_model, tiny_model, tiny_tokenizer), _prompts(tiny_tokenizer)
    mcmc = _settings("mcmc")
    drawn = process_power_batch(models, prompts, mcmc, 0)
    metrics = run_round(models, [prompts], mcmc, 0).metric.compute()
    kept = int(drawn.scored.selected_mask.sum())
    assert float(metrics["sample/tokens_per_kept"]) == pytest.approx(float(drawn.tokens_spent.sum()) / kept)
    assert float(metrics["sample/acceptance_rate"]) == pytest.approx(float(drawn.acceptance_rate.double().mean()))
    correct = drawn.correct[:, 0].double().mean()  # the power sample's accuracy
    assert float(metrics["sample/accuracy"]) == pytest.approx(float(correct))
    assert "sample/greedy_accuracy" in metrics and "sample/bon_accuracy" not in metrics
    smc = run_round(models, [prompts], _settings("smc"), 0).metric.compute()
    assert "sample/acceptance_rate" not in smc and float(smc["sample/tokens_per_kept"]) > 0


def test_a_truncated_power_sample_is_dropped_under_truncated_drop(tiny_model, tiny_tokenizer):
    settings = _settings("smc")
    settings = dataclasses.replace(
        settings,
        selection=SelectionConfig(truncated="drop"),
        power=dataclasses.replace(settings.power, max_new_tokens=1),
    )
    drawn = process_power_batch(_models(tiny_model, tiny_model, tiny_tokenizer), _prompts(tiny_tokenizer), settings, 0)
    truncated = drawn.scored.samples.truncated[:, 0]  # [B]
    assert truncated.any()  # one token rarely ends a response of the random tiny model
    assert torch.equal(drawn.scored.selected_mask[:, 0], ~truncated)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"selection": SelectionConfig(keep_top_k=2)}, "--verifier.selection.keep_top_k=2: --verifier.select_by=power"),
        ({"select_by": "bon"}, "--verifier.select_by='bon': must be best_of_n or power"),
        ({"power": PowerSamplingConfig(alpha=0.0)}, "--verifier.power.alpha=0.0: must be"),
    ],
    ids=["keep_top_k", "select_by", "alpha"],
)
def test_the_callback_refuses_what_power_selection_cannot_do(kwargs, fragment):
    kwargs = {"select_by": "power", **kwargs}
    with pytest.raises(ConfigError) as err:
        SelfVerificationCallback(**kwargs)
    assert fragment in str(err.value)


def test_power_settings_are_not_checked_under_best_of_n():
    """A best-of-N run's power section is never read, so it does not stop the run."""
    verifier = SelfVerificationCallback(selection=SelectionConfig(keep_top_k=2), power=PowerSamplingConfig(alpha=0.0))
    assert verifier.select_by == "best_of_n"


def test_best_of_n_settings_left_unused_by_power_selection_are_warned_about():
    from types import SimpleNamespace

    from sharpening.engines import SamplingConfig
    from sharpening.run_checks import run_warnings

    def warnings(**kwargs):
        trainer = SimpleNamespace(callbacks=[SelfVerificationCallback(**kwargs)])
        return run_warnings(object(), trainer)  # not an RL module: the round feeds SFT

    assert warnings(select_by="power") == []
    (message,) = warnings(select_by="power", sampling=SamplingConfig(samples_per_prompt=4))
    assert "--verifier.select_by=power leaves these set but unused: --verifier.sampling" in message
    (message,) = warnings(select_by="power", selection=SelectionConfig(reward="loglik_norm"))
    assert "--verifier.selection.reward=loglik_norm" in message
    assert warnings(sampling=SamplingConfig(samples_per_prompt=4)) == []  # best-of-N reads them
