"""RLConfig: the RL-sharpening algorithm and its knobs, and their checks (used by RLSharpeningModule)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

from sharpening.engines import SamplingConfig, validate_sampling_config
from sharpening.selection import TRUNCATED_POLICIES, reward_problems
from sharpening.tasks.extractors import resolve_extractor


@dataclass
class RLConfig:
    """The RL-sharpening algorithm and its knobs."""

    algorithm: Literal["online", "offline", "xpo"] = "online"
    """online policy gradient, offline squared loss (paper Eq. 8), or xpo (paper Algorithm 1)."""
    kl_coef: float | None = None
    """beta: the optimum is pi_base^(1 + 1/beta); smaller is sharper. Give it or ``alpha`` (null and no alpha:
    0.05)."""
    alpha: float | None = None
    """The optimum's exponent instead of beta: pi_base^alpha, alpha = 1 + 1/beta > 1 (21 is beta 0.05)."""
    baseline: Literal["leave_one_out", "mean"] = "leave_one_out"
    """online: group baseline subtracted from each sample's reward."""
    normalize_advantages: bool = False
    """online: divide advantages by the group's reward std."""
    kl_estimator: Literal["sequence", "k3"] = "sequence"
    """online: ``sequence`` (default) folds the exact sequence log-ratio into the reward: an unbiased gradient of
    E[log pi_base] - beta KL(pi || pi_base), whose optimum is pi_base^(1+1/beta). ``k3`` adds GRPO's per-token k3
    penalty to the loss instead, for comparison with GRPO-style trainers: differentiated only through log pi,
    its expected gradient is that of a per-token KL(pi_base || pi), so it does NOT reach pi_base^(1+1/beta)
    (on the docs/rl.md toy it stalls at KL 0.06 from it, where ``sequence`` goes to 0.0003)."""
    inner_updates: int = 1
    """online: optimizer steps per generation (ratio clipped when > 1)."""
    clip_ratio: float = 0.2
    """online: importance ratios are clipped to [1 - clip_ratio, 1 + clip_ratio]."""
    max_grad_norm: float | None = 1.0
    """Gradient norm clipping for every update (null = off)."""
    xpo_alpha: float = 0.01
    """xpo: weight of the exploration term alpha * log pi(y'|x), y' from the base."""
    xpo_updates_per_round: int = 16
    """xpo: optimizer steps over the growing dataset after each round."""
    pairs_per_update: int = 64
    """offline batches / xpo minibatches: pairs per optimizer step."""
    heldout_prompts: int = 0
    """xpo: the last this-many prompts are held out to estimate J_beta and pick the best policy, the initial one
    (pi_base) or a round's (0 = last round)."""
    truncated: Literal["drop", "keep", "penalize"] = "keep"
    """online, xpo: responses cut at max_new_tokens (no EOS) score unfairly high: keep them (default: the objective
    of method.md §3.2 as written), drop them (online only: out of the loss and the group baseline), or penalize
    their reward (docs/rl.md)."""
    truncation_penalty: float = 10.0
    """Subtracted from a truncated response's reward (not from log pi_base in the KL) when truncated=penalize."""
    reward: str = "loglik"
    """online: the self-reward of each sample, a name in ``sharpening.rewards.REWARDS`` or an import path
    ('pkg.mod:func'); loglik (log pi_base(y|x)) is the paper's. A policy-scored one is computed from the weights
    that drew the rollout. offline and xpo fit log pi_base itself: loglik only."""
    answer_extractor: str = "strip"
    """online: how answers are read from responses for rewards of the answers (majority, majority_binary,
    soft_majority): a built-in name or an import path, as --verifier.selection.answer_extractor."""
    task_reward: str | None = None
    """online: an external task reward added to the self-reward, an import path to a function of (response
    text, reference answer or None) -> float (null = none)."""
    task_reward_weight: float = 1.0
    """online: the weight w of the task reward: the signal is self-reward + w * task reward, before the KL."""
    answer_entropy_band: tuple[float, float] | None = None
    """online: [low, high] nats (EMPO): prompts whose group's answer entropy (answers read by answer_extractor)
    is outside the band leave the loss, logged as train/band_skipped_fraction (null = every prompt trains)."""
    log_token_entropy: bool = False
    """online: log train/token_entropy, the drawing policy's mean next-token entropy over the rollout's
    responses; costs one no-grad teacher-forced policy pass per rollout."""


DEFAULT_KL_COEF = 0.05


def resolve_kl_coef(kl_coef: float | None, alpha: float | None) -> tuple[float | None, float | None]:
    """(beta, alpha) with the missing one derived by alpha = 1 + 1/beta; both given, or alpha <= 1: unchanged.

    >>> resolve_kl_coef(None, 3.0)
    (0.5, 3.0)
    >>> resolve_kl_coef(0.05, None)
    (0.05, 21.0)
    >>> resolve_kl_coef(None, None)
    (0.05, 21.0)
    """
    if kl_coef is None and alpha is None:
        kl_coef = DEFAULT_KL_COEF
    if alpha is None and kl_coef is not None and kl_coef > 0:
        alpha = 1.0 + 1.0 / kl_coef
    elif kl_coef is None and alpha is not None and alpha > 1:
        kl_coef = 1.0 / (alpha - 1.0)
    return kl_coef, alpha


def kl_coef_of(rl: RLConfig) -> float | None:
    """The objective's beta, whichever of ``kl_coef`` and ``alpha`` gave it: every objective (online, offline,
    xpo, the held-out J_beta) reads it here (None only for an alpha <= 1, which validation refuses).

    >>> kl_coef_of(RLConfig(alpha=3.0)), kl_coef_of(RLConfig())
    (0.5, 0.05)
    """
    return resolve_kl_coef(rl.kl_coef, rl.alpha)[0]


def with_both_coefficients(rl: RLConfig) -> RLConfig:
    """``rl`` with the missing one of ``kl_coef`` and ``alpha`` filled in, so the saved hyperparameters show both.
    The dataclass itself keeps what was given: a default instance filled in would read to the CLI as a given
    kl_coef, and ``--model.rl.alpha`` alone would then disagree with it."""
    kl_coef, alpha = resolve_kl_coef(rl.kl_coef, rl.alpha)
    return dataclasses.replace(rl, kl_coef=kl_coef, alpha=alpha)


def validate_rl_config(rl: RLConfig, sampling: SamplingConfig) -> list[str]:
    """Every problem with the RL settings, each naming its option."""
    o = "--model.rl"
    problems = validate_sampling_config(sampling, "--model.sampling")
    if rl.algorithm not in ("online", "offline", "xpo"):
        problems.append(f"{o}.algorithm={rl.algorithm!r}: unknown algorithm; choose online, offline or xpo")
    problems += _coefficient_problems(rl)
    if rl.algorithm == "online" and sampling.samples_per_prompt < 2:
        alone = {  # what each baseline does with a group of one sample
            "leave_one_out": "has no other sample to average",
            "mean": "is the sample's own reward, so every advantage is 0 (NaN with normalize_advantages)",
        }.get(rl.baseline, "needs a group")
        problems.append(
            f"--model.sampling.samples_per_prompt={sampling.samples_per_prompt}: a group baseline needs >= 2 "
            f"samples per prompt (with one, {o}.baseline={rl.baseline} {alone}); set it to 2 or more, e.g. 8"
        )
    inexact = {
        k: v
        for k, v in (("temperature", sampling.temperature), ("top_k", sampling.top_k), ("top_p", sampling.top_p))
        if v != {"temperature": 1.0, "top_k": 0, "top_p": 1.0}[k]
    }
    if inexact:
        given = ", ".join(f"--model.sampling.{k}={v}" for k, v in inexact.items())
        problems.append(
            f"{given}: RL-sharpening needs exact draws (temperature 1, top_k 0, top_p 1.0); other settings bias "
            "the gradient, so set them back"
        )
    for name in ("inner_updates", "xpo_updates_per_round", "pairs_per_update"):
        if getattr(rl, name) < 1:
            problems.append(f"{o}.{name}={getattr(rl, name)}: must be >= 1")
    if not 0 < rl.clip_ratio <= 1:  # a huge one overflowed float32 in the clamp
        problems.append(
            f"{o}.clip_ratio={rl.clip_ratio}: must be in (0, 1] "
            "(ratios are clipped to [1 - clip_ratio, 1 + clip_ratio]; e.g. 0.2)"
        )
    if rl.max_grad_norm is not None and not rl.max_grad_norm >= 0:
        problems.append(
            f"{o}.max_grad_norm={rl.max_grad_norm}: must be > 0, or null for no clipping; a negative bound reverses "
            "the gradient"
        )
    if rl.heldout_prompts > 0 and rl.algorithm != "xpo":
        problems.append(
            f"{o}.heldout_prompts={rl.heldout_prompts}: only xpo scores held-out prompts (to pick its best round); "
            f"with algorithm {rl.algorithm} they would just be left out of training: set it to 0"
        )
    for name in ("xpo_alpha", "heldout_prompts"):
        if getattr(rl, name) < 0:
            problems.append(f"{o}.{name}={getattr(rl, name)}: must be >= 0")
    problems += _truncated_problems(rl)
    problems += _reward_problems(rl)
    return problems


def _reward_problems(rl: RLConfig) -> list[str]:
    """The self-reward and the task reward resolve; offline and xpo fit log pi_base itself (paper Eq. 8), so
    they take loglik and no task reward."""
    o = "--model.rl"
    problems = reward_problems(rl.reward, rl.task_reward, rl.task_reward_weight, o)
    try:
        resolve_extractor(rl.answer_extractor)
    except ValueError as err:
        problems.append(f"{o}.answer_extractor: {err}")
    if rl.algorithm in ("offline", "xpo") and rl.reward != "loglik":
        problems.append(
            f"{o}.reward={rl.reward}: algorithm {rl.algorithm} regresses on log pi_base(y|x) itself (paper Eq. 8), so "
            f"it takes {o}.reward loglik only; use algorithm online for another self-reward"
        )
    band = rl.answer_entropy_band
    if band is not None and not (len(band) == 2 and 0 <= band[0] <= band[1]):
        problems.append(f"{o}.answer_entropy_band={list(band)}: must be [low, high] nats with 0 <= low <= high")
    if rl.algorithm in ("offline", "xpo") and band is not None:
        problems.append(
            f"{o}.answer_entropy_band={list(band)}: algorithm {rl.algorithm} draws no group to measure; unset it, "
            "or use algorithm online"
        )
    if rl.algorithm in ("offline", "xpo") and rl.task_reward is not None:
        problems.append(
            f"{o}.task_reward={rl.task_reward}: algorithm {rl.algorithm} regresses on log pi_base(y|x) itself, with "
            "no task reward; unset it, or use algorithm online"
        )
    return problems


def _coefficient_problems(rl: RLConfig) -> list[str]:
    """beta > 0, alpha > 1, and alpha = 1 + 1/beta when both are given."""
    o, problems = "--model.rl", []
    if rl.kl_coef is not None and not rl.kl_coef > 0:
        problems.append(f"{o}.kl_coef={rl.kl_coef}: beta must be > 0 (the optimum is pi_base^(1+1/beta)); try 0.05")
    if rl.alpha is not None and not rl.alpha > 1:
        problems.append(
            f"{o}.alpha={rl.alpha}: must be > 1 (the optimum is pi_base^alpha with alpha = 1 + 1/beta; alpha <= 1 "
            "flattens pi_base or is no KL-regularized optimum); try 21 (beta 0.05)"
        )
    if rl.kl_coef and rl.kl_coef > 0 and rl.alpha and rl.alpha > 1:
        implied = 1.0 + 1.0 / rl.kl_coef
        if not math.isclose(rl.alpha, implied, rel_tol=1e-6):
            problems.append(
                f"{o}.alpha={rl.alpha} and {o}.kl_coef={rl.kl_coef}: alpha must equal 1 + 1/beta ({implied:.6g} "
                f"for this beta); give one of them and set the other to null"
            )
    return problems


def _truncated_problems(rl: RLConfig) -> list[str]:
    """The truncation settings: a known treatment, a finite penalty >= 0, no drop for xpo, and none for offline
    (whose pairs are the verifier's samples: --verifier.selection.truncated treats them)."""
    o, problems = "--model.rl", []
    if rl.truncated not in TRUNCATED_POLICIES:
        problems.append(f"{o}.truncated={rl.truncated!r}: must be one of {', '.join(TRUNCATED_POLICIES)}")
    if not 0 <= rl.truncation_penalty < float("inf"):
        problems.append(
            f"{o}.truncation_penalty={rl.truncation_penalty}: must be a finite number >= 0 (log-prob units, e.g. 10)"
        )
    if rl.algorithm == "xpo" and rl.truncated == "drop":
        problems.append(
            f"{o}.truncated=drop: xpo would leave out the policy's own truncated draws, the only data that keeps it "
            "off them, and its exploration term pushes mass away from the responses it keeps (on the docs/rl.md toy "
            f"every run ended with its mass on dropped responses); use {o}.truncated penalize"
        )
    if rl.algorithm == "offline" and rl.truncated != "keep":  # two options would apply to the same samples
        fix = (
            "set --verifier.selection.truncated drop (its default) instead"
            if rl.truncated == "drop"
            else "use --verifier.selection.truncated drop instead (a penalty does not reach the offline loss: "
            "its pairs hold the verifier's samples' raw log pi_base), or algorithm online or xpo"
        )
        problems.append(
            f"{o}.truncated={rl.truncated}: offline RL-sharpening trains on the verifier's samples, whose truncated "
            f"ones --verifier.selection.truncated treats; leave {o}.truncated at keep and {fix}"
        )
    return problems
