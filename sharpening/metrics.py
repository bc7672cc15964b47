"""torchmetrics for sharpening rounds. States are sums, so DDP reduction is exact."""

from __future__ import annotations

import torch
from torchmetrics import Metric

from sharpening.types import ScoredSamples


class SharpeningMetric(Metric):
    """Self-reward of all samples vs selected ones, accuracies, truncation and diversity of a round.

    ``compute()`` returns a dict keyed ``sample/...``; accuracy keys appear only when answers were given.
    When the sampler stopped samples that could not be kept (``SampleBatch.pruned``), statistics of a random
    sample (self-reward mean, truncation) come from each prompt's first draw, which always runs to its end;
    statistics that need every sample (distinct responses, pass@N) are left out, and the share of stopped
    samples is reported.
    """

    full_state_update = False
    _sums = (
        "prompts",
        "samples",
        "finite",
        "reward_all",
        "selected",
        "reward_selected",
        "truncated",
        "distinct",
        "answered",
        "correct_sample",
        "correct_any",
        "correct_bon",
        "greedy_answered",
        "correct_greedy",
        "drawn",
        "pruned",
    )

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in self._sums:
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(
        self,
        scored: ScoredSamples,
        correct: torch.Tensor | None = None,
        greedy_correct: torch.Tensor | None = None,
    ) -> None:
        """scored: one round's batch; correct [B, N] bool per sample; greedy_correct [B] bool."""
        samples, scores = scored.samples, scored.scores.double().cpu()
        b, n = scores.shape
        complete = samples.pruned is None
        population = slice(None) if complete else slice(0, 1)  # every sample, or each prompt's first draw
        self.prompts += b
        self.drawn += b * n
        self.samples += b * (n if complete else 1)
        population_scores = scores[:, population]
        finite = torch.isfinite(population_scores)
        self.finite += finite.sum()
        self.reward_all += population_scores[finite].sum()
        kept = scored.selected_mask.cpu()
        kept_scores = scores.gather(-1, scored.selected.cpu())[kept]
        self.selected += kept.sum()
        self.reward_selected += kept_scores.sum()
        self.truncated += samples.truncated[:, population].sum().cpu()
        if complete:
            self.distinct += _distinct_responses(samples.response_ids, samples.response_mask)
        else:
            self.pruned += samples.pruned.sum().cpu()
            self.distinct += float("nan")  # not known: stopped samples are partial
        if correct is not None:
            correct = correct.cpu()
            best = scored.selected[:, 0].cpu()
            self.answered += b
            self.correct_sample += correct[:, 0].sum()  # the first draw is a fair single sample
            self.correct_any += correct.any(-1).sum()
            self.correct_bon += (correct.gather(-1, best[:, None]).squeeze(-1) & kept[:, 0]).sum()
        if greedy_correct is not None:
            self.greedy_answered += greedy_correct.numel()
            self.correct_greedy += greedy_correct.cpu().sum()

    def compute(self) -> dict[str, torch.Tensor]:
        out = {
            "sample/self_reward_mean": self.reward_all / self.finite.clamp(min=1),
            "sample/self_reward_selected_mean": self.reward_selected / self.selected.clamp(min=1),
            "sample/truncated_fraction": self.truncated / self.samples.clamp(min=1),
            "sample/kept_per_prompt": self.selected / self.prompts.clamp(min=1),
        }
        out["sample/selected_minus_random"] = out["sample/self_reward_selected_mean"] - out["sample/self_reward_mean"]
        complete = bool(torch.isfinite(self.distinct))
        if complete:
            out["sample/distinct_per_prompt"] = self.distinct / self.prompts.clamp(min=1)
        else:
            out["sample/stopped_fraction"] = self.pruned / self.drawn.clamp(min=1)
        if self.answered > 0:
            out["sample/accuracy"] = self.correct_sample / self.answered
            if complete:
                out["sample/pass_at_n"] = self.correct_any / self.answered
            out["sample/bon_accuracy"] = self.correct_bon / self.answered
        if self.greedy_answered > 0:
            out["sample/greedy_accuracy"] = self.correct_greedy / self.greedy_answered
        return {k: v.float() for k, v in out.items()}


def _distinct_responses(response_ids: torch.Tensor, response_mask: torch.Tensor) -> int:
    """Sum over prompts of the number of distinct responses. [B, N, T] -> int."""
    masked = torch.where(response_mask, response_ids, -1).cpu()
    return sum(len({tuple(row.tolist()) for row in group}) for group in masked)
