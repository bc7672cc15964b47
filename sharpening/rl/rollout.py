"""Trajectories of RL-sharpening and the maths of one update on them, apart from Lightning.

A rollout is drawn once (``draw_rollout``: G samples per prompt from the policy, ONE frozen-base pass for
reward and KL, group advantages) and then serves ``inner_updates`` optimizer steps (``online_loss``). XPO
draws a pair per prompt (``draw_xpo_pairs``) and refits on minibatches of all its pairs (``pair_residuals_of``,
``xpo_minibatches``). Every draw is seeded by (seed, the optimizer step its rollout starts at, a ``SeedStream``,
prompt index), so a draw does not depend on which rank or process makes it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from enum import IntEnum

import torch

from sharpening.diagnostics import (
    Answers,
    answer_entropy,
    distinct_ngram_ratio,
    entropy_band_mask,
    majority_share,
    mean_token_entropy,
)
from sharpening.engines import SamplingConfig, SamplingEngine, derive_seed
from sharpening.logprobs import response_logprobs, sample_logprobs
from sharpening.losses import (
    apply_truncated_policy,
    group_advantages,
    kl_regularized_rewards,
    pair_residuals,
    policy_gradient_loss,
)
from sharpening.rewards import SelfReward, loglik_reward, resolve_task_reward, score_samples, task_reward_scores
from sharpening.rl.config import RLConfig, kl_coef_of
from sharpening.rl.pairs import PairExample
from sharpening.scoring import score_reward
from sharpening.tasks.extractors import answers_match
from sharpening.token_stats import sample_token_stats
from sharpening.types import PromptBatch, SampleBatch

BaseContext = Callable[[], AbstractContextManager[torch.nn.Module]]
"""The frozen base as a context (``PolicyModule.frozen_base``): entered only after the policy has drawn."""


class SeedStream(IntEnum):
    """Which draw of an optimizer step a seed is for: ``derive_seed(step, stream)`` (values fixed: they seed)."""

    POLICY_ROLLOUT = 0  # online: the G samples per prompt of a rollout
    XPO_POLICY = 1  # xpo: y ~ policy
    XPO_BASE = 2  # xpo: y' ~ base
    HELDOUT = 3  # xpo: the held-out prompts' draws that score a round
    ON_POLICY_ESTIMATE = 4  # offline: draws from the policy for its logged reward, KL and J_beta


XPO_MINIBATCH = 1
"""xpo: the stream of a round's minibatch picks, ``derive_seed(seed, step, XPO_MINIBATCH)`` (a seed tree of its
own: the draws' seeds are ``(seed, derive_seed(step, stream))``)."""


@dataclass
class Rollout:
    """One online rollout: the samples and everything the updates on them need."""

    samples: SampleBatch  # [B, G, T] responses, drawn from the policy at the rollout's first step
    base_logprobs: torch.Tensor  # [B, G, T] float32, log pi_base per response token (the k3 term)
    base_seq: torch.Tensor  # [B, G] float32, log pi_base(y|x): the reward before the KL
    sampler_seq: torch.Tensor  # [B, G] float32, log pi(y|x) of the policy that drew y (exact draws: free)
    advantages: torch.Tensor  # [B*G] float32, group-baselined rewards
    in_loss: torch.Tensor | None  # [B*G] bool, False for dropped samples (truncated, outside the band); None: all

    def to(self, device: torch.device) -> Rollout:
        """The rollout with every tensor on ``device``."""
        return rollout_from_state(rollout_state(self), device)


def sequence_logprobs(token_logprobs: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """log p(y|x): the sum of the response tokens' log-probs. [..., T] -> [...].

    >>> sequence_logprobs(torch.tensor([[-1.0, -0.5, 0.0]]), torch.tensor([[True, True, False]]))
    tensor([-1.5000])
    """
    return loglik_reward(token_logprobs, response_mask)


def draw_samples(
    engine: SamplingEngine,
    model: torch.nn.Module,
    tokenizer,
    prompts: PromptBatch,
    sampling: SamplingConfig,
    samples_per_prompt: int,
    seed: int,
    step: int,
    stream: SeedStream,
    stop_ids: list[int],
) -> SampleBatch:
    """Exact draws from ``model`` by ``engine`` (gradients off, eval mode entered by the caller), seeded by (seed,
    step, stream, prompt index)."""
    cfg = dataclasses.replace(sampling, samples_per_prompt=samples_per_prompt)
    round_index = derive_seed(step, stream)
    with torch.no_grad():
        return engine.generate(model, prompts, cfg, stop_ids, tokenizer.pad_token_id, seed, round_index)


def base_sequence_logprobs(
    base: BaseContext, samples: SampleBatch, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One frozen-base pass over the samples: per-token [B, N, T] and sequence [B, N] log pi_base."""
    with base() as model:
        token_logprobs = sample_logprobs(model, samples, chunk_size)  # [B, N, T]
    return token_logprobs, sequence_logprobs(token_logprobs, samples.response_mask)


def task_reward_tilt(samples: SampleBatch, tokenizer, rl: RLConfig) -> torch.Tensor | None:
    """w r(y): ``rl.task_reward`` of each response's text against its prompt's answer, times
    ``task_reward_weight`` (method.md §3.2: the optimum becomes pi_base^alpha exp(w r / beta)); [B, G] float32
    on the samples' device, or None without a task reward."""
    if rl.task_reward is None:
        return None
    texts = [
        [tokenizer.decode(ids[mask].tolist(), skip_special_tokens=True) for ids, mask in zip(row_ids, row_mask)]
        for row_ids, row_mask in zip(samples.response_ids, samples.response_mask, strict=True)
    ]  # [B][G]
    scores = task_reward_scores(texts, samples.prompts.answers, resolve_task_reward(rl.task_reward))  # [B, G]
    return rl.task_reward_weight * scores.to(samples.response_ids.device)


def rollout_self_rewards(
    reward: SelfReward,
    samples: SampleBatch,
    base_logprobs: torch.Tensor,
    base: BaseContext,
    policy: BaseContext,
    chunk_size: int,
    answers: list[list[str | None]] | None = None,
) -> torch.Tensor:
    """``reward`` of a rollout's samples, [B, G] float32. A base-scored reward reads the rollout's base pass
    ``base_logprobs`` [B, G, T] (a base pass with statistics when it needs them); a policy-scored one is scored by
    ``policy``, the weights that drew the rollout, entered before any update on it: its exact draws' log-probs
    are its own, and the statistics come from a teacher-forced pass now."""
    if reward.scored_by == "base" and not reward.needs_stats:
        return score_samples(reward, base_logprobs, samples.response_mask, answers)
    scorer = base if reward.scored_by == "base" else policy
    return score_reward(reward, samples, answers, scorer, chunk_size, scorer_drew=reward.scored_by == "policy")


def entropy_band_prompts(answers: Answers | None, band: tuple[float, float] | None) -> torch.Tensor | None:
    """Which prompts the answer-entropy ``band`` [low, high] keeps in the loss (EMPO: a group that agrees is too
    easy to learn from, one that does not agree at all too hard); [B] bool, or None without a band.

    >>> entropy_band_prompts([["1", "1"], ["1", "2"]], (0.1, 1.0))
    tensor([False,  True])
    """
    if band is None:
        return None
    return entropy_band_mask(answer_entropy(answers), *band)


def with_prompts_left_out(
    in_loss: torch.Tensor | None, prompt_mask: torch.Tensor | None, shape: torch.Size
) -> torch.Tensor | None:
    """The samples in the loss: those of ``in_loss`` [B, G] (None: all) of the prompts of ``prompt_mask`` [B]
    (None: all); None when every sample counts either way.

    >>> with_prompts_left_out(torch.tensor([[True, False], [True, True]]), torch.tensor([True, False]), (2, 2))
    tensor([[ True, False],
            [False, False]])
    """
    if prompt_mask is None:
        return in_loss
    inside = prompt_mask[:, None].expand(shape)  # [B] -> [B, G]
    return inside if in_loss is None else in_loss & inside.to(in_loss.device)


def answer_metrics(answers: Answers, references: list[str | None], extractor) -> dict[str, torch.Tensor]:
    """The ``train/`` metrics of a rollout's extracted answers [B][G]: the majority answer's share, and, when
    every prompt has a reference answer, the share of samples that match it (``train/accuracy``: logged, never
    trained on). Text only: no model pass."""
    metrics = {"train/majority_share": majority_share(answers).mean()}
    if references and all(ref is not None for ref in references):
        matches = [[answers_match(a, ref, extractor) for a in group] for group, ref in zip(answers, references)]
        metrics["train/accuracy"] = torch.tensor(matches, dtype=torch.float32).mean()  # [B, G] -> []
    return metrics


def policy_token_entropy(policy: BaseContext, samples: SampleBatch, chunk_size: int) -> torch.Tensor:
    """Mean next-token entropy (nats) of the drawing ``policy`` over the samples' response tokens: one no-grad
    teacher-forced pass (the sampler does not return the full distribution), the cost of
    ``--model.rl.log_token_entropy``. [] float32."""
    with policy() as model:
        _, stats = sample_token_stats(model, samples, chunk_size)  # TokenStats [B, G, T]
    return mean_token_entropy(stats.entropy, samples.response_mask)


def build_rollout(
    samples: SampleBatch,
    base_logprobs: torch.Tensor,
    rl: RLConfig,
    tokenizer=None,
    self_rewards: torch.Tensor | None = None,
    band_mask: torch.Tensor | None = None,
) -> Rollout:
    """Rewards (log pi_base, plus w r with a task reward; the sequence KL folded in unless k3), the truncation
    policy and group advantages. ``tokenizer`` decodes the responses for the task reward (unused without one).
    ``self_rewards`` [B, G]: another self-reward (``rollout_self_rewards``) in place of log pi_base; the KL
    stays to pi_base (None: log pi_base, the paper's objective). ``band_mask`` [B] bool: the prompts inside the
    answer-entropy band (``entropy_band_prompts``); the others' samples leave the loss, as dropped ones do."""
    base_seq = sequence_logprobs(base_logprobs, samples.response_mask)  # [B, G]
    sampler_seq = sequence_logprobs(samples.logprobs, samples.response_mask)  # [B, G]
    tilt = task_reward_tilt(samples, tokenizer, rl)  # [B, G] or None
    if rl.kl_estimator == "sequence":
        rewards = kl_regularized_rewards(base_seq, sampler_seq, kl_coef_of(rl), tilt)
    else:
        rewards = base_seq if tilt is None else base_seq + tilt
    if self_rewards is not None:  # r(y) in place of log pi_base(y); the KL terms are unchanged
        rewards = rewards - base_seq + self_rewards.to(rewards.device)
    # truncated responses: penalty on the reward after the KL is folded in; drop: in_loss [B, G], else None
    rewards, in_loss = apply_truncated_policy(rewards, samples.truncated, rl.truncated, rl.truncation_penalty)
    band_mask = None if band_mask is None else band_mask.to(rewards.device)
    in_loss = with_prompts_left_out(in_loss, band_mask, rewards.shape)  # [B, G] or None
    advantages = group_advantages(rewards, rl.baseline, rl.normalize_advantages, in_loss).flatten()  # [B, G] -> [B*G]
    in_loss = None if in_loss is None else in_loss.flatten()  # [B, G] -> [B*G]
    return Rollout(samples, base_logprobs, base_seq, sampler_seq, advantages, in_loss)


def online_loss(policy: torch.nn.Module, rollout: Rollout, rl: RLConfig, chunk_size: int) -> torch.Tensor:
    """The loss of one update on ``rollout``: one policy pass (each prompt once for its group), then the clipped
    importance-weighted policy gradient. With one update per rollout the ratio is exactly 1 (the policy's own
    log-probs, detached); with more, the ratio is to the sampler's log-probs."""
    samples = rollout.samples
    logprobs = sample_logprobs(policy, samples, chunk_size).flatten(0, 1)  # [B, G, T] -> [B*G, T]
    old = logprobs.detach() if rl.inner_updates == 1 else samples.logprobs.flatten(0, 1)  # [B*G, T]
    k3 = kl_coef_of(rl) if rl.kl_estimator == "k3" else 0.0
    mask = samples.response_mask.flatten(0, 1)  # [B, G, T] -> [B*G, T]
    base = rollout.base_logprobs.flatten(0, 1)  # [B, G, T] -> [B*G, T]
    return policy_gradient_loss(logprobs, old, rollout.advantages, mask, rl.clip_ratio, base, k3, rollout.in_loss)


def policy_estimates(
    base_seq: torch.Tensor, policy_seq: torch.Tensor, samples: SampleBatch, kl_coef: float
) -> dict[str, torch.Tensor]:
    """The ``train/`` metrics of draws from the current policy: reward, KL, J_beta, entropy, lengths, and the
    distinct 2- and 3-gram ratios of each prompt's draws (``diagnostics.distinct_ngram_ratio``).
    ``base_seq``, ``policy_seq``: [B, G] log pi_base(y|x) and log pi(y|x) of the G draws per prompt."""
    metrics = {
        "train/reward": base_seq.mean(),  # E[log pi_base(y|x)]
        "train/kl": (policy_seq - base_seq).mean(),  # sequence KL(pi || pi_base), one-sample estimate
        "train/j_beta": kl_regularized_rewards(base_seq, policy_seq, kl_coef).mean(),
        "train/entropy": -policy_seq.mean(),  # sequence entropy estimate E[-log pi(y|x)]
        "train/response_tokens": samples.lengths.float().mean(),
        "train/truncated_fraction": samples.truncated.float().mean(),
    }
    for n in (2, 3):  # repetition; a group with no n-gram repeats nothing (1), so every rank logs every key
        ratios = distinct_ngram_ratio(samples.response_ids, samples.response_mask, n).nan_to_num(1.0)  # [B]
        metrics[f"train/distinct_{n}gram"] = ratios.mean().to(base_seq.device)
    if base_seq.shape[-1] > 1:
        metrics["train/reward_best_minus_mean"] = (base_seq.max(-1).values - base_seq.mean(-1)).mean()
    return metrics


def pair_residuals_of(
    policy: torch.nn.Module, batch: dict[str, torch.Tensor], rl: RLConfig, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paper Eq. 8 residuals of a ``collate_pairs`` batch [P], and log pi(y'|x) [P] (XPO's exploration term)."""
    logprobs = response_logprobs(
        policy,
        batch["prompt_ids"],
        batch["prompt_mask"],
        batch["response_ids"],
        batch["response_mask"],
        chunk_size=chunk_size,
    )  # [2P, T]
    policy_y, policy_y2 = sequence_logprobs(logprobs, batch["response_mask"]).chunk(2)  # [2P] -> [P], [P]
    # xpo with penalize: the penalty lowers r(y), r(y'), not log pi_base in the KL terms (offline: always keep)
    reward_y, _ = apply_truncated_policy(batch["base_logprob"], batch["truncated"], rl.truncated, rl.truncation_penalty)
    reward_y2, _ = apply_truncated_policy(
        batch["other_base_logprob"], batch["other_truncated"], rl.truncated, rl.truncation_penalty
    )
    residuals = pair_residuals(
        policy_y, batch["base_logprob"], policy_y2, batch["other_base_logprob"], kl_coef_of(rl), reward_y, reward_y2
    )
    return residuals, policy_y2


def xpo_minibatches(pair_count: int, rl: RLConfig, seed: int, step: int) -> list[list[int]]:
    """The pairs each update of an XPO round trains on: ``xpo_updates_per_round`` draws with replacement of
    ``pairs_per_update`` indices, seeded by (seed, the round's first step)."""
    generator = torch.Generator().manual_seed(derive_seed(seed, step, XPO_MINIBATCH))
    size = (min(rl.pairs_per_update, pair_count),)
    return [torch.randint(pair_count, size, generator=generator).tolist() for _ in range(rl.xpo_updates_per_round)]


def pairs_of(
    prompts: PromptBatch, y: SampleBatch, y2: SampleBatch, base_y: torch.Tensor, base_y2: torch.Tensor
) -> list[PairExample]:
    """One PairExample per prompt from one draw each of y and y' ([B, 1, T]) and their base scores [B, 1]."""
    pairs = []
    for b in range(len(prompts)):
        pairs.append(
            PairExample(
                prompts.prompt_ids[b][prompts.prompt_mask[b]].tolist(),
                y.response_ids[b, 0][y.response_mask[b, 0]].tolist(),
                y2.response_ids[b, 0][y2.response_mask[b, 0]].tolist(),
                float(base_y[b, 0]),
                float(base_y2[b, 0]),
                int(prompts.prompt_indices[b]),
                bool(y.truncated[b, 0]),
                bool(y2.truncated[b, 0]),
            )
        )
    return pairs


def rollout_state(rollout: Rollout) -> dict:
    """The rollout as plain tensors and lists on the CPU (a checkpoint loads it with ``weights_only=True``)."""
    s, p = rollout.samples, rollout.samples.prompts
    cpu = {
        "prompt_ids": p.prompt_ids,
        "prompt_mask": p.prompt_mask,
        "prompt_indices": p.prompt_indices,
        "response_ids": s.response_ids,
        "response_mask": s.response_mask,
        "logprobs": s.logprobs,
        "truncated": s.truncated,
        "pruned": s.pruned,
        "base_logprobs": rollout.base_logprobs,
        "base_seq": rollout.base_seq,
        "sampler_seq": rollout.sampler_seq,
        "advantages": rollout.advantages,
        "in_loss": rollout.in_loss,
    }
    state = {k: None if v is None else v.detach().cpu() for k, v in cpu.items()}
    return {**state, "answers": list(p.answers), "exact_draws": s.exact_draws}


def rollout_from_state(state: dict, device: torch.device) -> Rollout:
    """The ``rollout_state`` dict back as a Rollout with its tensors on ``device``."""
    t = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in state.items()}
    prompts = PromptBatch(t["prompt_ids"], t["prompt_mask"], t["prompt_indices"], list(t["answers"]))
    samples = SampleBatch(
        prompts, t["response_ids"], t["response_mask"], t["logprobs"], t["truncated"], t["exact_draws"], t["pruned"]
    )
    return Rollout(samples, t["base_logprobs"], t["base_seq"], t["sampler_seq"], t["advantages"], t["in_loss"])
