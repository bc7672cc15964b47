"""How many samples SFT-sharpening and XPO need on a low-coverage toy (method.md §2, §3.1, §3.2, §5).


The toy (``toy.LOW_COVERAGE_TABLES``) has an argmax y* that holds only ~4% of the base mass, so
C_cov = 1 / pi_base(y*) ~ 25. Everything is measured by enumeration:

- SFT-sharpening: the policy fitted to best-of-N winners puts, in expectation, P(BoN@N = y*) on y*;
  for a unique argmax this is 1 - (1 - p)^N, the chance that y* is among the N base samples.
  ``smallest_n`` gives the N at which it reaches 1/2; ``run_sft`` checks it through the real pipeline.
- RL (XPO, online policy gradient): ``run_rl`` trains through the real RLSharpeningModule and, after
  every round, enumerates the policy's mass on y*; it counts the samples drawn until that mass is >= 1/2.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch

from sharpening.policy import eval_mode
from sharpening.tasks import toy

PROMPT = "x="


# ---- the toy, enumerated ------------------------------------------------------------------------------
@dataclass
class CoverageToy:
    """The distilled low-coverage base, enumerated: every outcome's exact log-prob under the base."""

    directory: Path
    base: torch.nn.Module
    tokenizer: object
    outcomes: list[tuple[str, bool]]
    base_logprobs: torch.Tensor  # [O]

    @property
    def argmax(self) -> int:
        """Index of y* = argmax pi_base among the outcomes."""
        return int(self.base_logprobs.argmax())

    @property
    def p_star(self) -> float:
        """pi_base(y*)."""
        return float(self.base_logprobs[self.argmax].exp())

    def argmax_ids(self) -> list[int]:
        """y*'s response tokens, EOS included, as stored in buffers and XPO pairs."""
        text, truncated = self.outcomes[self.argmax]
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        return ids if truncated else ids + [self.tokenizer.eos_token_id]

    def summary(self, kl_coef: float) -> dict[str, float | str]:
        """pi_base(y*), C_cov, the runner-up's mass, the mass outside the outcomes, pi*_beta(y*)."""
        probs = self.base_logprobs.exp()
        return {
            "argmax": self.outcomes[self.argmax][0],
            "outcomes": len(self.outcomes),
            "p_star": self.p_star,
            "c_cov": 1.0 / self.p_star,
            "second_mass": float(probs.sort(descending=True).values[1]),
            "unlisted_mass": 1.0 - float(probs.sum()),
            "target_mass_on_argmax": float(toy.sharpened_target(self.base_logprobs, kl_coef)[self.argmax].exp()),
        }


def build_coverage_toy(out_dir: str | Path, steps: int = 2000, seed: int = 0) -> Path:
    """Distil the tiny Llama to the low-coverage table (2000 steps put pi_base(y*) within ~1e-3 of 0.04)."""
    tables, letters = toy.LOW_COVERAGE_TABLES, toy.LOW_COVERAGE_LETTERS
    toy.build_toy_base(out_dir, tables, steps=steps, seed=seed, letters=letters)
    return Path(out_dir)


@torch.no_grad()
def load_coverage_toy(toy_dir: str | Path) -> CoverageToy:
    """Load the distilled base and enumerate its log-probs over every outcome."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = Path(toy_dir) / "base"
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    outcomes = toy.toy_outcomes(toy.LOW_COVERAGE_LETTERS, toy.LOW_COVERAGE_MAX_NEW_TOKENS)
    logprobs = toy.outcome_logprobs(base, tokenizer, PROMPT, outcomes)
    return CoverageToy(Path(toy_dir), base, tokenizer, outcomes, logprobs)


@torch.no_grad()
def mass_on_argmax(policy: torch.nn.Module, coverage: CoverageToy) -> float:
    """pi(y*) by teacher forcing (policy in eval mode while measured)."""
    with eval_mode(policy):
        logprobs = toy.outcome_logprobs(policy, coverage.tokenizer, PROMPT, [coverage.outcomes[coverage.argmax]])
    return float(logprobs[0].exp())


# ---- SFT-sharpening, exactly -------------------------------------------------------------------------
def bon_cumulative(logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(F(y), F(y-), m_y / m_tie) for every outcome: F the cumulative base mass in ascending score order,
    m_tie the mass of y's tie group. The mass outside the listed outcomes (1 - sum) is placed below them
    all: exact for every outcome scoring above each unlisted response, e.g. the argmax.
    [O] -> 3 x [O] float64."""
    lp = logprobs.double()
    mass = lp.exp()
    leftover = (1.0 - mass.sum()).clamp(min=0.0)
    upto = (lp[None, :] <= lp[:, None]).double() @ mass + leftover  # F(y)
    tie = (lp[None, :] == lp[:, None]).double() @ mass
    return upto, upto - tie, mass / tie


def bon_probabilities(logprobs: torch.Tensor, n: int) -> torch.Tensor:
    """P(best-of-n by base log-prob = y) for every outcome (method.md §5): (F(y)^n - F(y-)^n) * m_y / m_tie;
    within a tie the first sample of the winning score is kept, as ``select_top_k`` does.
    [O] log-probs -> [O] probabilities (float64)."""
    upto, below, share = bon_cumulative(logprobs)
    return (upto.pow(n) - below.pow(n)) * share


def smallest_n(logprobs: torch.Tensor, index: int, target: float = 0.5, n_max: int = 100_000) -> int | None:
    """The smallest N with P(BoN@N = outcome ``index``) >= target, or None up to ``n_max``."""
    upto, below, share = (float(t[index]) for t in bon_cumulative(logprobs))
    for n in range(1, n_max + 1):
        if (upto**n - below**n) * share >= target:
            return n
    return None


def first_hit_quantile(p: float, q: float) -> int:
    """The q-quantile of the number of base draws until y* (mass p) first appears: the smallest N with
    1 - (1 - p)^N >= q. For q = 1/2 it is SFT's sample need when y* is the unique argmax."""
    return max(1, math.ceil(math.log(1.0 - q) / math.log(1.0 - p) - 1e-12))


def sft_need(coverage: CoverageToy, target: float = 0.5) -> dict[str, float | int | None]:
    """SFT-sharpening's sample need by enumeration: the smallest N, its closed form, and the 10%-90%
    range of the first-hit time (the spread over seeds of a single-winner run)."""
    p = coverage.p_star
    return {
        "samples_needed": smallest_n(coverage.base_logprobs, coverage.argmax, target),
        "closed_form": first_hit_quantile(p, target),
        "q10": first_hit_quantile(p, 0.1),
        "q90": first_hit_quantile(p, 0.9),
    }


# ---- RL-sharpening through the real module -------------------------------------------------------------
class ArgmaxMassTracker(L.Callback):
    """After every training batch (one XPO round, one online generation), enumerate the policy's mass on y*
    and count the samples drawn so far; stop once the mass reaches ``threshold``."""

    def __init__(self, coverage: CoverageToy, samples_per_round: int, threshold: float = 0.5) -> None:
        super().__init__()
        self.coverage, self.samples_per_round, self.threshold = coverage, samples_per_round, threshold
        self.masses: list[float] = []
        self.samples_needed: int | None = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        mass = mass_on_argmax(pl_module.policy, self.coverage)
        self.masses.append(mass)
        if mass >= self.threshold and self.samples_needed is None:
            self.samples_needed = len(self.masses) * self.samples_per_round
            trainer.should_stop = True


@dataclass
class RLSettings:
    """One RL run on the low-coverage toy (one prompt; a round is one training batch)."""

    algorithm: str = "xpo"  # xpo or online
    kl_coef: float = 0.1  # beta: pi*_beta(y*) = 0.80 on the distilled toy
    lr: float = 3e-3  # constant AdamW learning rate
    xpo_alpha: float = 0.01  # weight of alpha * log pi(y'), y' ~ base
    xpo_updates_per_round: int = 32  # optimizer steps over the growing dataset per round
    pairs_per_update: int = 64  # XPO minibatch (drawn with replacement from the dataset)
    group_size: int = 16  # online: samples per generation
    max_rounds: int = 300  # give up (count as failed) after this many rounds
    finetuning: str = "full"
    extra: dict = field(default_factory=dict)  # further RLConfig fields

    def samples_per_round(self) -> int:
        """XPO draws y ~ policy and y' ~ base per round; online draws a group (no held-out prompts)."""
        return 2 if self.algorithm == "xpo" else self.group_size


def run_rl(coverage: CoverageToy, settings: RLSettings, seed: int) -> dict:
    """Train through RLSharpeningModule until pi(y*) >= 1/2 (or ``max_rounds``); the samples that took."""
    from sharpening.engines import SamplingConfig
    from sharpening.optim import OptimizerConfig
    from sharpening.policy import PolicyConfig
    from sharpening.prompts import PromptDataModule
    from sharpening.rl import RLConfig, RLSharpeningModule

    s = settings
    rl = RLConfig(
        algorithm=s.algorithm,
        kl_coef=s.kl_coef,
        xpo_alpha=s.xpo_alpha,
        xpo_updates_per_round=s.xpo_updates_per_round,
        pairs_per_update=s.pairs_per_update,
        heldout_prompts=0,
        **s.extra,
    )
    base = str(coverage.directory / "base")
    module = RLSharpeningModule(
        PolicyConfig(model_name_or_path=base, finetuning=s.finetuning, dtype="float32", lora_r=8),
        rl=rl,
        sampling=SamplingConfig(samples_per_prompt=s.group_size, max_new_tokens=toy.LOW_COVERAGE_MAX_NEW_TOKENS),
        optimizer=OptimizerConfig(lr=s.lr, schedule="constant"),
        prompts_per_step=1,
        seed=seed,
    )
    tracker = ArgmaxMassTracker(coverage, s.samples_per_round())
    start = time.time()
    _trainer(s.max_rounds * module.updates_per_rollout(), seed, [tracker]).fit(
        module, datamodule=PromptDataModule(dataset=str(coverage.directory / "prompts.jsonl"))
    )
    return {
        "samples_needed": tracker.samples_needed,
        "first_seen": _first_seen(module.xpo_pairs, coverage) if s.algorithm == "xpo" else None,
        "rounds": len(tracker.masses),
        "final_mass": tracker.masses[-1] if tracker.masses else None,
        "masses": tracker.masses,
        "seconds": time.time() - start,
    }


# ---- SFT-sharpening through the real pipeline --------------------------------------------------------
def run_sft(coverage: CoverageToy, n: int, seed: int, copies: int = 256, steps: int = 150, lr: float = 3e-3) -> dict:
    """SFTSharpeningModule + SelfVerificationCallback on ``copies`` copies of the prompt: each copy draws its
    own N base samples (the paper's single round), keeps the best by base log-prob, and the policy is fitted
    to the ``copies`` winners (full batch, ``steps`` steps). Returns the measured pi(y*), the share of
    winners that are y*, and the exact prediction P(BoN@N = y*)."""
    from sharpening.callbacks import SelfVerificationCallback
    from sharpening.engines import SamplingConfig
    from sharpening.optim import OptimizerConfig
    from sharpening.policy import PolicyConfig
    from sharpening.prompts import PromptDataModule
    from sharpening.selection import SelectionConfig
    from sharpening.sft import SFTSharpeningModule

    dataset = coverage.directory / f"prompts_x{copies}.jsonl"
    dataset.write_text((json.dumps({"prompt": PROMPT}) + "\n") * copies)
    module = SFTSharpeningModule(
        PolicyConfig(model_name_or_path=str(coverage.directory / "base"), finetuning="full", dtype="float32"),
        optimizer=OptimizerConfig(lr=lr, schedule="constant"),
        batch_size=copies,
        shuffle_seed=seed,
    )
    sampling = SamplingConfig(
        samples_per_prompt=n, max_new_tokens=toy.LOW_COVERAGE_MAX_NEW_TOKENS, prompts_per_batch=copies
    )
    verifier = SelfVerificationCallback(
        sampling, SelectionConfig(truncated="keep"), greedy_accuracy=False, seed=seed, show_progress=False
    )
    start = time.time()
    _trainer(steps, seed, [verifier]).fit(module, datamodule=PromptDataModule(dataset=str(dataset)))
    star = coverage.argmax_ids()
    winners = [e.response_ids == star for e in verifier.buffer.examples]
    return {
        "n": n,
        "mass_on_argmax": mass_on_argmax(module.policy, coverage),
        "winner_share": sum(winners) / len(winners),
        "predicted": float(bon_probabilities(coverage.base_logprobs, n)[coverage.argmax]),
        "seconds": time.time() - start,
    }


def _first_seen(pairs: list, coverage: CoverageToy) -> dict[str, int | None]:
    """XPO: the sample count at which y* first entered the dataset, as a policy draw y or a base draw y'."""
    star = coverage.argmax_ids()
    hits = {"policy": None, "base": None}
    for i, pair in enumerate(pairs):
        for source, response in (("policy", pair.response_ids), ("base", pair.other_response_ids)):
            if response == star and hits[source] is None:
                hits[source] = 2 * (i + 1)
    return hits


def _trainer(max_steps: int, seed: int, callbacks: list) -> L.Trainer:
    """A quiet single-device CPU trainer that stops after ``max_steps`` optimizer steps."""
    L.seed_everything(seed, verbose=False)
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        reload_dataloaders_every_n_epochs=1,
    )


def spread(values: list[int | None]) -> dict[str, float | int | None]:
    """Median and range of per-seed sample counts; a run that never reached the threshold counts as
    infinite (so the median is None when half of them failed)."""
    finite = sorted(v for v in values if v is not None)
    ordered = finite + [math.inf] * (len(values) - len(finite))
    middle = len(ordered) // 2
    median = ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
    return {
        "median": None if math.isinf(median) else median,
        "min": finite[0] if finite else None,
        "max": None if len(finite) < len(values) else finite[-1],
        "failed": len(values) - len(finite),
    }


def coverage_experiment(
    work_dir: str | Path,
    rl_runs: dict[str, tuple[RLSettings, list[int]]],
    sft_ns: list[int],
    sft_seeds: list[int],
    sft_copies: int = 256,
    distil_steps: int = 2000,
    kl_coef: float = 0.1,
) -> dict:
    """The whole experiment: distil and enumerate the toy, SFT's exact need and its check through the real
    pipeline at each N in ``sft_ns``, then each RL run (name -> settings, seeds). One JSON-able dict."""
    start = time.time()
    build_coverage_toy(work_dir, steps=distil_steps)
    enumerated = load_coverage_toy(work_dir)
    result: dict = {"toy": enumerated.summary(kl_coef), "sft": sft_need(enumerated), "sft_runs": [], "rl": {}}
    result["toy"]["distil_seconds"] = time.time() - start
    for n in sft_ns:
        runs = [run_sft(enumerated, n, seed, copies=sft_copies) for seed in sft_seeds]
        result["sft_runs"].append(
            {
                "n": n,
                "predicted": runs[0]["predicted"],
                "mass_on_argmax": [r["mass_on_argmax"] for r in runs],
                "winner_share": [r["winner_share"] for r in runs],
                "seconds": sum(r["seconds"] for r in runs),
            }
        )
    for name, (settings, seeds) in rl_runs.items():
        settings = dataclasses.replace(settings, kl_coef=kl_coef)
        runs = [run_rl(enumerated, settings, seed) for seed in seeds]
        for r in runs:
            r.pop("masses")
        summary = spread([r["samples_needed"] for r in runs])
        result["rl"][name] = {"settings": dataclasses.asdict(settings), "seeds": seeds, "runs": runs, **summary}
    result["seconds"] = time.time() - start
    return result
