"""The vLLM engine against our own model: exact log-probs, per-prompt seeds, weight sync (full and LoRA), and
draws distributed as the model says (chi-square against exact enumeration). Needs vLLM (.venv-vllm)."""

from __future__ import annotations

import itertools

import pytest
import torch

from sharpening.engines import SamplingConfig, VLLMConfig, make_engine
from sharpening.logprobs import sample_logprobs
from sharpening.types import PromptBatch
from tests.helpers import build_tiny_model

pytestmark = pytest.mark.vllm

EOS, PAD = 2, 0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # head size 32: vLLM's CPU attention has no kernel for the default tiny model's 16
    return build_tiny_model(tmp_path_factory.mktemp("vllm") / "tiny", hidden=128, layers=2)


def load(path: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def prompt_batch(rows: list[list[int]], indices: list[int]) -> PromptBatch:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])  # left-padded [B, P]
    mask = torch.tensor([[False] * (width - len(r)) + [True] * len(r) for r in rows])
    return PromptBatch(ids, mask, torch.tensor(indices), [None] * len(rows))


PROMPTS = prompt_batch([[1, 5, 6, 7], [1, 9], [1, 12, 13, 4, 4]], [0, 1, 2])


def engine_for(path: str, lora_rank: int | None = None, **vllm):
    cfg = SamplingConfig(engine="vllm", vllm=VLLMConfig(max_model_len=64, **vllm))
    return make_engine(cfg, path, lora_rank=lora_rank)


@pytest.fixture(scope="module")
def full_engine(model_dir):
    engine = engine_for(model_dir)
    yield engine
    engine.close()


def draw(engine, model, prompts=PROMPTS, n=4, max_new_tokens=12, seed=0, round_index=0, **kw):
    cfg = SamplingConfig(samples_per_prompt=n, max_new_tokens=max_new_tokens, engine="vllm", **kw)
    with torch.no_grad():
        return engine.generate(model, prompts, cfg, EOS, PAD, seed=seed, round_index=round_index)


def masked(x, samples):
    return x * samples.response_mask


def served_exactly(engine) -> bool:
    """vLLM's own log-probs matched ours on the probed responses: the draw came from the model handed over (the
    probe would otherwise have rescored them, hiding a stale engine from a log-prob comparison)."""
    m = engine.metrics()
    return m["engine/parity_max_abs_diff"] < 1e-4 and m["engine/rescored"] == 0.0


def test_layout_and_logprobs_equal_teacher_forced(full_engine, model_dir):
    model = load(model_dir)
    samples = draw(full_engine, model)
    assert samples.response_ids.shape[:2] == (3, 4) and samples.exact_draws and samples.pruned is None
    lengths = samples.lengths
    for b, j in itertools.product(range(3), range(4)):
        row = samples.response_ids[b, j, : lengths[b, j]]
        ended = row[-1].item() == EOS
        assert ended != samples.truncated[b, j].item()  # EOS kept inside the mask, or truncated
        assert (samples.response_ids[b, j, lengths[b, j] :] == PAD).all()
    ours = sample_logprobs(model, samples)
    assert torch.allclose(masked(samples.logprobs, samples), masked(ours, samples), atol=1e-4)
    assert full_engine.metrics()["engine/parity_max_abs_diff"] < 1e-4


def test_per_prompt_seeds(full_engine, model_dir):
    model = load(model_dir)
    together = draw(full_engine, model)
    alone = draw(full_engine, model, prompts=prompt_batch([[1, 9]], [1]))  # prompt index 1 on its own
    t = alone.lengths.max()
    assert torch.equal(together.response_ids[1, :, :t], alone.response_ids[0, :, :t])
    again = draw(full_engine, model)
    assert torch.equal(again.response_ids, together.response_ids)
    other_round = draw(full_engine, model, round_index=1)
    assert not torch.equal(other_round.response_ids, together.response_ids)


def test_full_weight_sync_follows_the_updated_policy(full_engine, model_dir):
    base, policy = load(model_dir), load(model_dir)
    before = draw(full_engine, policy)
    with torch.no_grad():  # an optimizer step: in-place updates of the same tensors
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    after = draw(full_engine, policy)
    assert served_exactly(full_engine)
    assert not torch.equal(after.response_ids, before.response_ids)
    updated = sample_logprobs(policy, after)
    assert torch.allclose(masked(after.logprobs, after), masked(updated, after), atol=1e-4)
    as_base = sample_logprobs(base, after)
    assert (masked(after.logprobs - as_base, after)).abs().max() > 1e-2
    # handing the base back makes vLLM serve the base again
    again = draw(full_engine, base)
    assert served_exactly(full_engine)
    assert torch.allclose(masked(again.logprobs, again), masked(sample_logprobs(base, again), again), atol=1e-4)
    assert torch.equal(again.response_ids, before.response_ids)


def test_full_weight_sync_resets_cached_prompts(tmp_path):
    """A prompt longer than vLLM's KV block (128 tokens on CPU) is cached by prefix; after a weight push its cached
    keys and values belong to the old weights, so they must not be reused."""
    path = build_tiny_model(tmp_path / "long", hidden=128, max_positions=256)
    policy = load(path)
    long_prompt = prompt_batch([[1] + [5, 6, 7, 8, 9] * 30], [0])  # 151 tokens
    cfg = SamplingConfig(engine="vllm", vllm=VLLMConfig(max_model_len=256))
    engine = make_engine(cfg, path)
    try:
        draw(engine, policy, prompts=long_prompt, max_new_tokens=8)
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        after = draw(engine, policy, prompts=long_prompt, max_new_tokens=8)
        assert served_exactly(engine)
        ours = sample_logprobs(policy, after)
        assert torch.allclose(masked(after.logprobs, after), masked(ours, after), atol=1e-4)
    finally:
        engine.close()


def test_lora_sync_serves_the_current_adapter(model_dir):
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    policy = get_peft_model(load(model_dir), LoraConfig(r=8, lora_alpha=16, target_modules=targets)).eval()
    engine = engine_for(model_dir, lora_rank=8)
    try:
        for step in range(2):
            with torch.no_grad():
                for name, p in policy.named_parameters():
                    if "lora_B" in name:
                        p.add_(torch.randn_like(p) * 0.1)
            samples = draw(engine, policy, seed=step)
            assert served_exactly(engine), step
            ours = sample_logprobs(policy, samples)
            assert torch.allclose(masked(samples.logprobs, samples), masked(ours, samples), atol=1e-4), step
            with policy.disable_adapter():
                as_base = sample_logprobs(policy, samples)
            assert (masked(samples.logprobs - as_base, samples)).abs().max() > 1e-2
        with policy.disable_adapter():  # the frozen base of a LoRA run: no adapter served
            base_samples = draw(engine, policy)
            assert served_exactly(engine)
            as_base = sample_logprobs(policy, base_samples)
        assert torch.allclose(masked(base_samples.logprobs, base_samples), masked(as_base, base_samples), atol=1e-4)
    finally:
        engine.close()


def test_parity_probe_rescores_past_the_refuse_tolerance(model_dir):
    """A model that is not what vLLM serves (weights changed behind the engine's back, as a mismatched kernel
    would): the probe sees it, and the draw's log-probs become our teacher-forced ones."""
    engine = engine_for(model_dir, parity_refuse=0.05, parity_warn=0.01)
    try:
        model = load(model_dir)
        draw(engine, model)  # vLLM now holds these weights, with this checksum
        engine.sync.held = None  # forget them: the next draw pushes ...
        engine.sync._push_full = lambda m: None  # ... nothing, so vLLM keeps serving the old weights
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        with pytest.warns(UserWarning, match="parity_warn"):
            samples = draw(engine, model)
        assert engine.metrics()["engine/parity_max_abs_diff"] > 0.05
        assert engine.metrics()["engine/rescored"] == 1.0
        ours = sample_logprobs(model, samples)
        assert torch.allclose(masked(samples.logprobs, samples), masked(ours, samples), atol=1e-5)
    finally:
        engine.close()


# -- distribution: chi-square against exact enumeration ---------------------------------------------------


def chi_square_p_value(observed: torch.Tensor, expected: torch.Tensor) -> float:
    """P-value of Pearson's statistic, bins with expected count < 5 pooled into one."""
    small = expected < 5
    obs = torch.cat([observed[~small], observed[small].sum().view(1)])
    exp = torch.cat([expected[~small], expected[small].sum().view(1)])
    keep = exp > 0
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()
    dof = keep.sum() - 1
    return torch.special.gammaincc(dof.double() / 2, stat.double() / 2).item()  # chi2 survival function


def exact_distribution(model, prompt: list[int], length: int, top_k: int = 0) -> dict[tuple[int, ...], float]:
    """Every response of at most ``length`` tokens (EOS ends one) with its probability under ``model``,
    renormalised over the top-k tokens at each step when ``top_k`` > 0."""
    out: dict[tuple[int, ...], float] = {}
    frontier = [((), 1.0)]
    for step in range(length):
        nxt = []
        for prefix, prob in frontier:
            with torch.no_grad():
                logits = model(torch.tensor([prompt + list(prefix)])).logits[0, -1].double()
            p = logits.softmax(-1)
            if top_k:
                keep = torch.zeros_like(p, dtype=torch.bool)
                keep[p.topk(top_k).indices] = True
                p = torch.where(keep, p, 0.0)
                p = p / p.sum()
            for tok in torch.nonzero(p > 0).flatten().tolist():
                seq, q = (*prefix, tok), prob * p[tok].item()
                if tok == EOS or step == length - 1:
                    out[seq] = out.get(seq, 0.0) + q
                else:
                    nxt.append((seq, q))
        frontier = nxt
    return out


@pytest.mark.slow
@pytest.mark.parametrize("top_k", [0, 3])
def test_draws_follow_the_model_distribution(model_dir, tmp_path, top_k):
    model = load(model_dir)
    with torch.no_grad():  # a peaked head, so 2-token responses concentrate on few enough bins to test
        model.lm_head.weight.mul_(40.0)
    peaked = tmp_path / "peaked"
    model.save_pretrained(peaked)
    engine = engine_for(str(peaked))
    try:
        prompt, draws = [1, 5, 6], 3000
        samples = draw(engine, model, prompts=prompt_batch([prompt], [0]), n=draws, max_new_tokens=2, top_k=top_k)
        exact = exact_distribution(model, prompt, 2, top_k)
        support = sorted(exact)
        index = {seq: i for i, seq in enumerate(support)}
        observed = torch.zeros(len(support) + 1, dtype=torch.float64)  # last bin: outside the support
        for j in range(draws):
            seq = tuple(samples.response_ids[0, j, : samples.lengths[0, j]].tolist())
            observed[index.get(seq, len(support))] += 1
        assert observed[-1] == 0  # nothing outside the (truncated) support
        expected = torch.tensor([exact[s] for s in support], dtype=torch.float64) * draws
        assert len(support) >= 5 and (expected >= 5).sum() >= 5
        assert chi_square_p_value(observed[:-1], expected) > 1e-3
    finally:
        engine.close()


def test_starting_vllm_leaves_the_trainers_random_streams_alone(model_dir):
    import random

    engine = engine_for(model_dir)
    try:
        torch.manual_seed(1234)
        random.seed(1234)
        expected = (torch.rand(3), random.random())
        torch.manual_seed(1234)
        random.seed(1234)
        draw(engine, load(model_dir))  # vLLM starts here and seeds the global RNGs
        assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
    finally:
        engine.close()


def test_starting_vllm_leaves_the_trainers_threads_alone(model_dir):
    threads = torch.get_num_threads()
    engine = engine_for(model_dir)
    try:
        torch.set_num_threads(2)
        draw(engine, load(model_dir))  # vLLM's CPU worker starts here: one thread, set_num_threads disabled
        assert torch.get_num_threads() == 2
        torch.set_num_threads(1)
        assert torch.get_num_threads() == 1  # still the trainer's to set
    finally:
        engine.close()
        torch.set_num_threads(threads)
