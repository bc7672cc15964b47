"""SFT-sharpening rounds by a policy-scored self-reward plus a task reward, from the command line on the tiny
model: every round's scores are the drawing policy's self-certainty (a brute-force softmax) plus w times the task
reward, and after training they are not the frozen base's."""

from __future__ import annotations

import pytest
import torch

import sharpening.verifier as verifier_module
from sharpening.engines import decode_responses
from tests.integration.test_cli import _fit
from tests.unit.test_reward_users import _brute_self_certainty


@pytest.mark.slow
def test_rounds_score_by_the_drawing_policy_and_add_the_weighted_task_reward(tiny_model_path, prompts_file, tmp_path,
                                                                            monkeypatch):  # fmt: skip
    seen = []
    real_score = verifier_module.score

    def score(models, samples, answers, settings):
        scores = real_score(models, samples, answers, settings)
        with models.sampling_model() as policy:
            drawing = _brute_self_certainty(policy, samples)
        with models.frozen_base() as base:
            frozen = _brute_self_certainty(base, samples)
        texts = decode_responses(models.tokenizer, samples)
        task = torch.tensor([[float(t.startswith("a")) for t in group] for group in texts])  # [B, N]
        seen.append((scores.cpu(), drawing + 3.0 * task, frozen + 3.0 * task, int(task.sum())))
        return scores

    monkeypatch.setattr(verifier_module, "score", score)
    _fit(tiny_model_path, prompts_file, str(tmp_path), "--verifier.sample_from=policy",
         "--verifier.selection.reward=self_certainty", "--verifier.selection.task_reward_weight=3",
         "--verifier.selection.task_reward=tests.unit.test_reward_users:starts_with_a",
         "--model.init_args.optimizer.lr=0.05")  # fmt: skip
    assert len(seen) >= 2  # a round per epoch
    for scores, expected, _, _ in seen:
        torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-4)
    assert sum(s[3] for s in seen) > 0  # some responses earned the task reward
    last, _, frozen, _ = seen[-1]
    assert not torch.allclose(last, frozen, atol=1e-3)  # the policy has trained: the base would score otherwise
