"""SampleBuffer: the (prompt, response) pairs selected this round, which the module trains on.

The buffer is a map-style dataset. Its contents and the epoch they were built for travel in the
checkpoint (``state_dict``), so a resumed run trains on exactly the samples it had selected.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from sharpening.types import ScoredSamples


@dataclass
class BufferExample:
    """One selected sample, unpadded."""

    prompt_ids: list[int]  # prompt tokens exactly as sampled from (template, few-shot, BOS)
    response_ids: list[int]  # response tokens, EOS included when the response ended
    score: float  # self-reward under the frozen base
    prompt_index: int  # index of the prompt in its dataset
    sample_index: int  # which of the N samples it was


class SampleBuffer(torch.utils.data.Dataset):
    """Selected samples of the current round, ordered by (prompt_index, rank of selection)."""

    def __init__(self) -> None:
        self.examples: list[BufferExample] = []
        self.epoch: int | None = None  # epoch the contents were built for; None = never filled

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> BufferExample:
        return self.examples[index]

    def replace(self, examples: list[BufferExample], epoch: int) -> None:
        """New contents for ``epoch``, sorted so the order does not depend on ranks or batching."""
        self.examples = sorted(examples, key=lambda e: (e.prompt_index, e.sample_index))
        self.epoch = epoch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "examples": [asdict(e) for e in self.examples]}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = state["epoch"]
        self.examples = [BufferExample(**e) for e in state["examples"]]


def selected_examples(scored: ScoredSamples) -> list[BufferExample]:
    """The kept samples of a scored batch, with padding stripped."""
    samples = scored.samples
    prompts = samples.prompts
    out = []
    for b in range(len(prompts)):
        prompt = prompts.prompt_ids[b][prompts.prompt_mask[b]].tolist()
        for slot in range(scored.selected.shape[1]):
            if not bool(scored.selected_mask[b, slot]):
                continue
            n = int(scored.selected[b, slot])
            response = samples.response_ids[b, n][samples.response_mask[b, n]].tolist()
            out.append(BufferExample(prompt, response, float(scored.scores[b, n]), int(prompts.prompt_indices[b]), n))
    return out
