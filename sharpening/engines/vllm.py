"""The ``vllm`` engine: vLLM draws the samples, colocated in this process, following the in-memory model."""

from __future__ import annotations

import torch

from sharpening.engines.config import SamplingConfig, VLLMConfig
from sharpening.types import PromptBatch, SampleBatch


class VLLMEngine:
    """``SamplingEngine`` over vLLM (being written: the interface is final)."""

    def __init__(self, model_path: str, cfg: VLLMConfig, *, seed: int = 0, lora_rank: int | None = None):
        self.model_path, self.cfg, self.seed, self.lora_rank = model_path, cfg, seed, lora_rank

    def generate(
        self,
        model: torch.nn.Module,
        prompts: PromptBatch,
        cfg: SamplingConfig,
        eos_token_id: int | list[int],
        pad_token_id: int,
        seed: int = 0,
        round_index: int = 0,
        stop_unselectable: int = 0,
    ) -> SampleBatch:
        raise NotImplementedError

    def metrics(self) -> dict[str, float]:
        return {}

    def close(self) -> None:
        pass
