"""What RL-sharpening keeps in a checkpoint besides the weights, and how each rank takes its share back.

Online RL keeps the rollout under way (a checkpoint between two updates of a rollout resumes on it, not on a
fresh draw); XPO keeps its growing dataset of pairs, the minibatches of the round under way and the best
round scored on the held-out prompts. Each rank draws its own rollouts and pairs, so those are saved per rank
(index r: rank r's), gathered on every rank because Lightning builds the checkpoint dict on every rank before
rank 0 writes it. Keys: ``rl_rollout_by_rank`` (online) and ``xpo`` (``pairs_by_rank``,
``minibatches_by_rank``, ``best_j_beta``, ``best_round``, ``best_state``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from sharpening.rl.pairs import PairExample, pairs_for_rank
from sharpening.rl.rollout import Rollout, rollout_from_state, rollout_state


@dataclass
class RLTrainingState:
    """The RL state a checkpoint holds for one rank (``None``: the checkpoint has none of that kind)."""

    rollout: Rollout | None  # online: the rollout of the updates under way, tensors on the CPU
    xpo_pairs: list[PairExample] | None  # xpo: the growing dataset
    xpo_minibatches: list[list[int]] | None  # xpo: the pair indices of each update of the round under way
    best: dict | None  # xpo: {"j_beta", "round", "state"} of the best round scored so far


def gather_by_rank(value, world_size: int) -> list:
    """``value`` of every rank, in rank order. Collective: every rank must call it."""
    if world_size == 1:
        return [value]
    gathered = [None] * world_size
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def save_rl_state(checkpoint: dict, algorithm: str, state: RLTrainingState, world_size: int) -> None:
    """Add ``algorithm``'s state of every rank to ``checkpoint`` (collective under several ranks)."""
    if algorithm == "online":
        rollout = None if state.rollout is None else rollout_state(state.rollout)
        checkpoint["rl_rollout_by_rank"] = gather_by_rank(rollout, world_size)
    if algorithm != "xpo":
        return
    best = state.best
    checkpoint["xpo"] = {
        # [world size][pairs]: each rank grew its own dataset; rank 0 alone writes the file
        "pairs_by_rank": gather_by_rank([dataclasses.asdict(p) for p in state.xpo_pairs], world_size),
        "minibatches_by_rank": gather_by_rank(state.xpo_minibatches, world_size),
        # the same on every rank: DDP keeps the weights equal, and each rank scores the same held-out draws
        "best_j_beta": best["j_beta"],
        "best_round": best["round"],
        "best_state": best["state"],
    }


def load_rl_state(checkpoint: dict, world_size: int, rank: int) -> RLTrainingState:
    """This rank's share of the state ``save_rl_state`` wrote. A rollout saved under another number of ranks is
    not taken (the next step draws it again); XPO's pairs are dealt out again (``pairs_for_rank``), and the
    round's minibatches are then drawn again."""
    rollouts = checkpoint.get("rl_rollout_by_rank")
    rollout = None
    if rollouts and len(rollouts) == world_size and rollouts[rank] is not None:
        rollout = rollout_from_state(rollouts[rank], torch.device("cpu"))
    xpo = checkpoint.get("xpo")
    if not xpo:
        return RLTrainingState(rollout, None, None, None)
    pairs_by_rank = xpo.get("pairs_by_rank", [xpo.get("pairs", [])])  # a single "pairs" list: one rank's
    pairs = [PairExample(**p) for p in pairs_for_rank(pairs_by_rank, world_size, rank)]
    minibatches = xpo.get("minibatches_by_rank")
    minibatches = minibatches[rank] if minibatches and len(minibatches) == world_size else []
    best = {"j_beta": xpo["best_j_beta"], "round": xpo["best_round"], "state": xpo["best_state"]}
    return RLTrainingState(rollout, pairs, minibatches, best)
