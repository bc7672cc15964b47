"""What every sampling engine promises (``SamplingEngine``), and what engines share: per-prompt seeds and
turning drawn ids back into text."""

from __future__ import annotations

import hashlib
from typing import Protocol

import torch

from sharpening.engines.config import SamplingConfig
from sharpening.types import PromptBatch, SampleBatch


class SamplingEngine(Protocol):
    """Draws ``cfg.samples_per_prompt`` responses for every prompt of a batch.

    An engine must guarantee, for ``generate``'s result:

    - Seeds per prompt: prompt ``i``'s responses depend only on (``seed``, ``round_index``, ``i``, the model,
      ``cfg``), where ``i`` is ``prompts.prompt_indices``' entry, never on which prompts share the batch, the
      batch size, or the rank that draws it (``derive_seed`` makes the seed).
    - ``logprobs`` are the sampling model's temperature-1 log-probs of the drawn tokens, whatever
      temperature, top-k or top-p drew them; 0 after the response ends.
    - ``exact_draws`` is True only when the tokens follow the model's distribution: temperature 1, no top-k,
      no top-p (``is_exact_sampling``).
    - Layout as ``SampleBatch`` says: EOS kept and inside ``response_mask``, pad after it; ``truncated`` where
      ``max_new_tokens`` came before EOS.
    - With ``stop_unselectable = k > 0``, a sample may stop early once ``selection.mark_unselectable`` shows it
      cannot be among its prompt's k best by log-likelihood; it is then ``pruned`` (not truncated). With 0,
      ``pruned`` is None.
    """

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
    ) -> SampleBatch: ...

    def metrics(self) -> dict[str, float]:
        """What the last ``generate`` measured about the engine, to log as is (e.g. ``engine/parity_max_abs_diff``);
        empty when there is nothing to report."""
        ...

    def idle(self) -> None:
        """The trainer is about to use the device until the next draw: free what the engine can give back
        meanwhile (a vLLM engine on CUDA sleeps: KV cache freed, weights offloaded). The next draw wakes it."""
        ...

    def close(self) -> None:
        """Free what the engine holds (a vLLM engine's memory); a closed engine is not used again."""
        ...


def derive_seed(*parts: int) -> int:
    """A stable 63-bit seed from integers (seed, round, prompt index, ...); independent of Python's hash salt."""
    digest = hashlib.blake2b(":".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def decode_responses(tokenizer, samples: SampleBatch) -> list[list[str]]:
    """Response texts, [B][N], special tokens (EOS, pad) removed."""
    b, n, _ = samples.response_ids.shape
    flat = samples.response_ids.view(b * n, -1).tolist()  # [B, N, T] -> [B*N, T]
    texts = tokenizer.batch_decode(flat, skip_special_tokens=True)
    return [texts[i * n : (i + 1) * n] for i in range(b)]
