"""torchmetrics for sharpening rounds. States are sums, so DDP reduction is exact."""

from __future__ import annotations

import torch
from torchmetrics import Metric

from sharpening.diagnostics import distinct_ngram_ratio, majority_share
from sharpening.types import ScoredSamples


class SharpeningMetric(Metric):
    """Self-reward of all samples vs selected ones, accuracies, truncation and diversity of a round.

    ``compute()`` returns a dict keyed ``sample/...``; accuracy keys appear only when answers were given.
    When the sampler stopped samples that could not be kept (``SampleBatch.pruned``), statistics of a random
    sample (self-reward mean, truncation) come from each prompt's first draw, which always runs to its end;
    statistics that need every sample (distinct responses, pass@N) are left out, and the share of stopped
    samples is reported.

    Collapse diagnostics (``diagnostics``): ``sample/response_tokens`` (mean response length), the distinct 2- and
    3-gram ratios of each prompt's group averaged over prompts (``sample/distinct_2gram``, ``_3gram``; groups
    without an n-gram left out), and, when ``update`` is given them, ``sample/majority_share`` (the extracted
    answers) and ``sample/token_entropy`` (mean next-token entropy over response tokens, nats).
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
        "response_tokens",
        "distinct_2gram",
        "distinct_2gram_prompts",
        "distinct_3gram",
        "distinct_3gram_prompts",
        "majority_share",
        "majority_prompts",
        "token_entropy",
        "entropy_tokens",
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
        answers: list[list[str | None]] | None = None,
        token_entropy: torch.Tensor | None = None,
    ) -> None:
        """scored: one round's batch; correct [B, N] bool per sample; greedy_correct [B] bool; answers [B][N]
        extracted answers (default: ``scored.answers``); token_entropy [B, N, T] float next-token entropy
        (``TokenStats.entropy``)."""
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
        self.response_tokens += samples.lengths[:, population].sum().cpu()
        self._update_diagnostics(scored, scored.answers if answers is None else answers, token_entropy)
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

    def _update_diagnostics(
        self, scored: ScoredSamples, answers: list | None, token_entropy: torch.Tensor | None
    ) -> None:
        """The repetition and agreement sums: over every sample only (a stopped sample is partial)."""
        samples = scored.samples
        if samples.pruned is not None:
            return
        ids, mask = samples.response_ids, samples.response_mask
        bigrams, trigrams = distinct_ngram_ratio(ids, mask, 2), distinct_ngram_ratio(ids, mask, 3)  # [B], NaN: none
        self.distinct_2gram += bigrams.nan_to_num(0.0).sum()
        self.distinct_2gram_prompts += torch.isfinite(bigrams).sum()
        self.distinct_3gram += trigrams.nan_to_num(0.0).sum()
        self.distinct_3gram_prompts += torch.isfinite(trigrams).sum()
        if answers is not None:
            self.majority_share += majority_share(answers).double().sum()
            self.majority_prompts += len(answers)
        if token_entropy is not None:
            mask = samples.response_mask.to(token_entropy.device)
            self.token_entropy += (token_entropy.double() * mask).sum().cpu()
            self.entropy_tokens += mask.sum().cpu()

    def compute(self) -> dict[str, torch.Tensor]:
        out = {
            "sample/self_reward_mean": self.reward_all / self.finite.clamp(min=1),
            "sample/self_reward_selected_mean": self.reward_selected / self.selected.clamp(min=1),
            "sample/truncated_fraction": self.truncated / self.samples.clamp(min=1),
            "sample/kept_per_prompt": self.selected / self.prompts.clamp(min=1),
            "sample/response_tokens": self.response_tokens / self.samples.clamp(min=1),
        }
        out["sample/selected_minus_random"] = out["sample/self_reward_selected_mean"] - out["sample/self_reward_mean"]
        complete = bool(torch.isfinite(self.distinct))
        if complete:
            out["sample/distinct_per_prompt"] = self.distinct / self.prompts.clamp(min=1)
        else:
            out["sample/stopped_fraction"] = self.pruned / self.drawn.clamp(min=1)
        if self.distinct_2gram_prompts > 0:
            out["sample/distinct_2gram"] = self.distinct_2gram / self.distinct_2gram_prompts
        if self.distinct_3gram_prompts > 0:
            out["sample/distinct_3gram"] = self.distinct_3gram / self.distinct_3gram_prompts
        if self.majority_prompts > 0:
            out["sample/majority_share"] = self.majority_share / self.majority_prompts
        if self.entropy_tokens > 0:
            out["sample/token_entropy"] = self.token_entropy / self.entropy_tokens
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
