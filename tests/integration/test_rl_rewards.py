"""Online RL with a registered self-reward: a policy-scored reward is computed from the weights that drew the
rollout, neither the frozen base nor weights after an update (the tiny model, full fine-tuning, a large lr so the
policy moves away from the base after the first rollout)."""

from __future__ import annotations

import math

import lightning as L
import torch

import sharpening.rl.module as rl_module
from sharpening.engines import SamplingConfig
from sharpening.optim import OptimizerConfig
from sharpening.policy import PolicyConfig
from sharpening.prompts import PromptDataModule
from sharpening.rl import RLConfig, RLSharpeningModule


@torch.no_grad()
def brute_force_self_certainty(model: torch.nn.Module, samples) -> torch.Tensor:
    """Mean over response tokens of KL(uniform || p_t), from the full logits written out, sample by sample: [B, G]."""
    prompts = samples.prompts
    out = torch.zeros(samples.response_ids.shape[:2])
    for b in range(len(prompts)):
        prompt = prompts.prompt_ids[b][prompts.prompt_mask[b]]
        for g in range(samples.samples_per_prompt):
            response = samples.response_ids[b, g][samples.response_mask[b, g]]
            logits = model(torch.cat([prompt, response])[None]).logits[0].float()  # [P + T, V]
            at = logits[len(prompt) - 1 : len(prompt) - 1 + len(response)]  # the positions predicting the response
            probs = at.softmax(-1)
            kl = -math.log(at.shape[-1]) - probs.log().mean(-1)  # KL(U || p) = -log V - mean_v log p_v
            out[b, g] = kl.mean()
    return out


def test_a_policy_scored_reward_comes_from_the_weights_that_drew_the_rollout(
    tiny_model_path, prompts_file, monkeypatch
):
    module = RLSharpeningModule(
        PolicyConfig(model_name_or_path=tiny_model_path, dtype="float32"),
        rl=RLConfig(reward="self_certainty", inner_updates=2),
        sampling=SamplingConfig(samples_per_prompt=3, max_new_tokens=4),
        optimizer=OptimizerConfig(lr=0.05, schedule="constant"),
        prompts_per_step=2,
    )
    seen = []
    real_build = rl_module.build_rollout

    def build(samples, base_logprobs, rl, tokenizer=None, self_rewards=None, band_mask=None):
        # nothing has updated the policy since it drew these samples: its weights now ARE the drawing weights
        drawing = brute_force_self_certainty(module.policy, samples)
        with module.frozen_base() as base:
            frozen = brute_force_self_certainty(base, samples)
        seen.append((self_rewards.clone(), drawing, frozen, samples))
        return real_build(samples, base_logprobs, rl, tokenizer, self_rewards, band_mask)

    monkeypatch.setattr(rl_module, "build_rollout", build)
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)  # fmt: skip
    trainer.fit(module, datamodule=PromptDataModule(prompts_file, answer_column="answer"))
    assert len(seen) == 2  # two rollouts of two updates each
    for self_rewards, drawing, _, _ in seen:
        torch.testing.assert_close(self_rewards, drawing, rtol=1e-4, atol=1e-4)
    second, drawing, frozen, samples = seen[1]
    assert not torch.allclose(second, frozen, atol=1e-3)  # the policy has moved: the base would give other scores
    after = brute_force_self_certainty(module.policy, samples)  # the weights after the second rollout's updates
    assert not torch.allclose(second, after, atol=1e-3)
