"""SampleBuffer, selected_examples, collate_examples and the epoch order of training loaders."""

from __future__ import annotations

import torch
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

from sharpening.buffer import BufferExample, SampleBuffer, selected_examples
from sharpening.engines import derive_seed
from sharpening.packing import collate_examples
from sharpening.prompts import EpochSampler, batch_response_tokens
from sharpening.rl.pairs import pairs_for_rank
from sharpening.types import PromptBatch, SampleBatch, ScoredSamples

PAD = 0


def _scored() -> ScoredSamples:
    # two prompts (left-padded), three samples each (right-padded); prompt 1 keeps two, prompt 0 one
    prompts = PromptBatch(
        prompt_ids=torch.tensor([[0, 0, 1, 5], [1, 6, 7, 8]]),
        prompt_mask=torch.tensor([[False, False, True, True], [True, True, True, True]]),
        prompt_indices=torch.tensor([7, 3]),
        answers=[None, None],
    )
    response_ids = torch.tensor(
        [
            [[9, 2, 0], [10, 11, 2], [12, 0, 0]],
            [[13, 14, 15], [16, 2, 0], [2, 0, 0]],
        ]
    )
    response_mask = torch.tensor(
        [
            [[True, True, False], [True, True, True], [True, False, False]],
            [[True, True, True], [True, True, False], [True, False, False]],
        ]
    )
    samples = SampleBatch(
        prompts=prompts,
        response_ids=response_ids,
        response_mask=response_mask,
        logprobs=torch.zeros(2, 3, 3),
        truncated=torch.tensor([[False, False, True], [True, False, False]]),
        exact_draws=True,
    )
    return ScoredSamples(
        samples=samples,
        scores=torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -1.5, -0.25]]),
        selected=torch.tensor([[0, 2], [2, 1]]),
        selected_mask=torch.tensor([[True, False], [True, True]]),
    )


def test_selected_examples_strip_padding():
    examples = selected_examples(_scored())
    assert examples == [
        BufferExample(prompt_ids=[1, 5], response_ids=[9, 2], score=-1.0, prompt_index=7, sample_index=0),
        BufferExample(prompt_ids=[1, 6, 7, 8], response_ids=[2], score=-0.25, prompt_index=3, sample_index=2),
        BufferExample(prompt_ids=[1, 6, 7, 8], response_ids=[16, 2], score=-1.5, prompt_index=3, sample_index=1),
    ]
    assert all(isinstance(e.score, float) and isinstance(e.prompt_index, int) for e in examples)


def test_selected_examples_empty_when_nothing_kept():
    scored = _scored()
    scored.selected_mask = torch.zeros_like(scored.selected_mask)
    assert selected_examples(scored) == []


def _example(prompt_index, sample_index, prompt=(1, 4), response=(5, 2), score=-1.0):
    return BufferExample(list(prompt), list(response), score, prompt_index, sample_index)


def test_replace_sorts_by_prompt_then_sample_index():
    buffer = SampleBuffer()
    assert len(buffer) == 0 and buffer.epoch is None
    buffer.replace([_example(3, 1), _example(1, 2), _example(3, 0), _example(1, 0), _example(0, 5)], epoch=2)
    assert [(e.prompt_index, e.sample_index) for e in buffer.examples] == [(0, 5), (1, 0), (1, 2), (3, 0), (3, 1)]
    assert buffer.epoch == 2
    assert len(buffer) == 5
    assert buffer[1] == _example(1, 0)
    buffer.replace([_example(9, 9)], epoch=3)  # replaces, does not append
    assert len(buffer) == 1 and buffer.epoch == 3


def test_replace_order_does_not_depend_on_input_order():
    items = [_example(p, s, score=float(p * 10 + s)) for p in range(4) for s in range(3)]
    a, b = SampleBuffer(), SampleBuffer()
    a.replace(items, 0)
    b.replace(list(reversed(items)), 0)
    assert a.examples == b.examples


def test_state_dict_round_trip():
    buffer = SampleBuffer()
    buffer.replace([_example(2, 1, score=-0.5), _example(0, 0, response=(2,))], epoch=4)
    state = buffer.state_dict()
    restored = SampleBuffer()
    restored.load_state_dict(state)
    assert restored.epoch == 4 and restored.examples == buffer.examples
    # the state is a copy: changing the buffer later does not change the saved state
    buffer.replace([], epoch=5)
    assert len(state["examples"]) == 2


def test_state_dict_of_empty_buffer_round_trips():
    restored = SampleBuffer()
    restored.replace([_example(0, 0)], 1)
    restored.load_state_dict(SampleBuffer().state_dict())
    assert restored.epoch is None and len(restored) == 0


def test_state_dict_through_torch_save_weights_only(tmp_path):
    buffer = SampleBuffer()
    buffer.replace([_example(1, 0, prompt=(1, 3, 4), response=(7, 8, 2), score=-2.75), _example(0, 3)], epoch=1)
    path = tmp_path / "buffer.pt"
    torch.save({"buffer": buffer.state_dict()}, path)
    loaded = torch.load(path, weights_only=True)
    restored = SampleBuffer()
    restored.load_state_dict(loaded["buffer"])
    assert restored.epoch == 1
    assert restored.examples == buffer.examples


def test_collate_examples_layout():
    examples = [
        _example(0, 0, prompt=(1, 3), response=(4, 5, 2)),
        _example(1, 0, prompt=(1, 6, 7, 8), response=(9,)),
        _example(2, 0, prompt=(1,), response=(10, 2)),
    ]
    batch = collate_examples(examples, pad_token_id=PAD)
    assert batch.prompt_ids.tolist() == [[0, 0, 1, 3], [1, 6, 7, 8], [0, 0, 0, 1]]
    assert batch.prompt_mask.tolist() == [
        [False, False, True, True],
        [True, True, True, True],
        [False, False, False, True],
    ]
    assert batch.response_ids.tolist() == [[4, 5, 2], [9, 0, 0], [10, 2, 0]]
    assert batch.response_mask.tolist() == [
        [True, True, True],
        [True, False, False],
        [True, True, False],
    ]
    assert batch.prompt_ids.dtype == torch.long and batch.response_ids.dtype == torch.long
    assert batch.prompt_mask.dtype == torch.bool and batch.response_mask.dtype == torch.bool


def test_collate_uses_the_given_pad_id():
    batch = collate_examples([_example(0, 0, prompt=(1, 3)), _example(0, 1, prompt=(1,), response=(2,))], 99)
    assert batch.prompt_ids.tolist() == [[1, 3], [99, 1]]
    assert batch.response_ids.tolist() == [[5, 2], [2, 99]]


def test_collate_round_trips_selected_examples():
    examples = selected_examples(_scored())
    batch = collate_examples(examples, PAD)
    for i, e in enumerate(examples):
        assert batch.prompt_ids[i][batch.prompt_mask[i]].tolist() == e.prompt_ids
        assert batch.response_ids[i][batch.response_mask[i]].tolist() == e.response_ids


def test_epoch_sampler_shards_like_lightning_and_skips_within_each_shard():
    for size in (7, 8, 1):
        whole = EpochSampler(size, seed=3)
        for rank in (0, 1):
            lightning = list(DistributedSamplerWrapper(whole, num_replicas=2, rank=rank, shuffle=False))
            ours = EpochSampler(size, seed=3, num_replicas=2, rank=rank)
            assert list(ours) == lightning and len(ours) == len(lightning)
            # a mid-epoch restart that consumed 2 indices of this rank's shard resumes at the third
            assert list(EpochSampler(size, seed=3, skip=2, num_replicas=2, rank=rank)) == lightning[2:]
    assert list(EpochSampler(6, seed=3, skip=4)) == list(EpochSampler(6, seed=3))[4:]  # one process


def test_epoch_sampler_orders_each_epoch_by_its_own_seed_and_skips_only_in_the_restart_epoch():
    sampler = EpochSampler(10, seed=5, skip=3, skip_epoch=1)
    orders = []
    for epoch in range(3):
        sampler.set_epoch(epoch)  # Lightning, at each epoch start, on a loader it keeps
        orders.append(list(sampler))
    expected = [
        torch.randperm(10, generator=torch.Generator().manual_seed(derive_seed(5, e))).tolist() for e in range(3)
    ]
    assert orders == [expected[0], expected[1][3:], expected[2]]
    assert len(sampler) == 10  # the full shard: Lightning counts consumed batches itself


def test_pairs_for_rank_gives_each_rank_its_own_list_when_the_world_size_is_unchanged():
    by_rank = [["a0", "a1"], ["b0"]]
    assert [pairs_for_rank(by_rank, 2, r) for r in (0, 1)] == [["a0", "a1"], ["b0"]]
    assert pairs_for_rank([["a0", "a1"]], 1, 0) == ["a0", "a1"]


def test_pairs_for_rank_deals_all_pairs_out_again_when_the_world_size_changed():
    by_rank = [["a0", "a1", "a2"], ["b0", "b1"]]
    assert pairs_for_rank(by_rank, 1, 0) == ["a0", "a1", "a2", "b0", "b1"]  # rank order
    shares = [pairs_for_rank(by_rank, 3, r) for r in range(3)]
    assert shares == [["a0", "b0"], ["a1", "b1"], ["a2"]]  # pair i to rank i mod 3
    assert sorted(p for share in shares for p in share) == sorted(by_rank[0] + by_rank[1])  # none lost or doubled
    assert [pairs_for_rank([["a0"]], 2, r) for r in (0, 1)] == [["a0"], []]


def test_batch_response_tokens_counts_the_batches_each_rank_is_dealt():
    examples = [BufferExample([1], [5] * n, 0.0, i, 0) for i, n in enumerate([2, 2, 2, 30, 7])]
    for world_size in (1, 2):
        counts = batch_response_tokens(examples, seed=4, epoch=1, batch_size=2, world_size=world_size)
        for rank in range(world_size):
            sampler = EpochSampler(len(examples), seed=4, num_replicas=world_size, rank=rank)
            sampler.set_epoch(1)
            loader = torch.utils.data.DataLoader(examples, batch_size=2, sampler=sampler, collate_fn=list)
            assert counts[rank] == [sum(len(e.response_ids) for e in batch) for batch in loader]
    # every example once on one rank; with 2 ranks the shorter shard is padded by wrapping round, as trained
    assert sum(map(sum, batch_response_tokens(examples, 4, 1, 2, 1))) == 43
    assert [len(c) for c in batch_response_tokens(examples, 4, 1, 2, 2)] == [2, 2]
