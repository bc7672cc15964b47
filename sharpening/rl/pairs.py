"""Pairs of responses to one prompt, scored by the frozen base: the data of offline RL-sharpening (every pair
of the verifier's samples of a prompt) and of XPO (y from the policy, y' from the base), their batches, and
each rank's share of a checkpoint's XPO pairs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sharpening.buffer import BufferExample
from sharpening.packing import collate_examples


@dataclass
class PairExample:
    """Two responses to one prompt with their frozen-base log-likelihoods (offline / XPO RL-sharpening)."""

    prompt_ids: list[int]
    response_ids: list[int]  # y (XPO: drawn from the policy)
    other_response_ids: list[int]  # y' (drawn from the base)
    base_logprob: float  # log pi_base(y|x), summed over response tokens
    other_base_logprob: float  # log pi_base(y'|x)
    prompt_index: int
    truncated: bool = False  # y hit max_new_tokens before EOS (XPO; offline pairs hold the verifier's choice)
    other_truncated: bool = False  # y' hit max_new_tokens before EOS


def pairs_from_buffer(examples: list[BufferExample]) -> list[PairExample]:
    """Every unordered pair of distinct samples of the same prompt (buffer examples hold base scores)."""
    by_prompt: dict[int, list[BufferExample]] = {}
    for e in examples:
        by_prompt.setdefault(e.prompt_index, []).append(e)
    pairs = []
    for index, group in sorted(by_prompt.items()):
        for i in range(len(group)):
            for j in range(i + 1, len(group)):
                a, b = group[i], group[j]
                pairs.append(PairExample(a.prompt_ids, a.response_ids, b.response_ids, a.score, b.score, index))
    return pairs


def collate_pairs(pairs: list[PairExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Both sides of P pairs in one batch of 2P rows (rows [0, P) are y, rows [P, 2P) are y')."""
    rows = [BufferExample(p.prompt_ids, p.response_ids, 0.0, p.prompt_index, 0) for p in pairs]
    rows += [BufferExample(p.prompt_ids, p.other_response_ids, 0.0, p.prompt_index, 1) for p in pairs]
    batch = dict(vars(collate_examples(rows, pad_token_id)))  # the PaddedBatch's fields, then the pairs'
    batch["base_logprob"] = torch.tensor([p.base_logprob for p in pairs], dtype=torch.float32)  # [P]
    batch["other_base_logprob"] = torch.tensor([p.other_base_logprob for p in pairs], dtype=torch.float32)
    batch["prompt_indices"] = torch.tensor([p.prompt_index for p in pairs], dtype=torch.long)  # [P]
    batch["truncated"] = torch.tensor([p.truncated for p in pairs], dtype=torch.bool)  # [P]
    batch["other_truncated"] = torch.tensor([p.other_truncated for p in pairs], dtype=torch.bool)  # [P]
    return batch


def pairs_for_rank(pairs_by_rank: list[list], world_size: int, rank: int) -> list:
    """This rank's share of a checkpoint's per-rank XPO pairs (``pairs_by_rank[r]``: rank r's, in its order).

    Written by as many ranks as now: rank r's own list, so the run goes on as if never stopped. Written by
    another number of ranks: all pairs in rank order, dealt out again (pair i to rank i mod ``world_size``),
    so none is lost or held twice; the run cannot be the one the old ranks would have made (a warning says so).
    """
    saved = len(pairs_by_rank)
    if saved == world_size:
        return list(pairs_by_rank[rank])
    if any(pairs_by_rank):
        from lightning.pytorch.utilities import rank_zero_warn

        rank_zero_warn(
            f"XPO resume: the checkpoint holds the pair datasets of {saved} rank(s), this run has {world_size} "
            f"(--trainer.devices x --trainer.num_nodes): its {sum(map(len, pairs_by_rank))} pairs are dealt out "
            f"again (pair i to rank i mod {world_size}), none lost or doubled, but the run will differ from one "
            f"that went on with {saved}; resume on {saved} rank(s) to continue it exactly"
        )
    return [p for rank_pairs in pairs_by_rank for p in rank_pairs][rank::world_size]
