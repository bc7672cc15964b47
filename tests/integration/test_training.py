"""One SFT step in each fine-tuning mode changes exactly what it should; the callback selects right."""

from __future__ import annotations

import pytest
import torch

from sharpening.buffer import BufferExample
from sharpening.callbacks import SelfVerificationCallback
from sharpening.engines import SamplingConfig
from sharpening.logprobs import sample_logprobs
from sharpening.packing import collate_examples
from sharpening.policy import PolicyConfig
from sharpening.prompts import pad_prompts
from sharpening.rewards import loglik_reward
from sharpening.selection import SelectionConfig
from sharpening.sft import SFTSharpeningModule
from sharpening.verifier import process_batch


def _module(path: str, finetuning: str) -> SFTSharpeningModule:
    module = SFTSharpeningModule(
        PolicyConfig(model_name_or_path=path, finetuning=finetuning, lora_r=4, dtype="float32")
    )
    module.configure_model()
    return module


def _batch(tokenizer) -> dict[str, torch.Tensor]:
    examples = [
        BufferExample(
            tokenizer("abcd=").input_ids, tokenizer("dcba", add_special_tokens=False).input_ids + [2], 0.0, 0, 0
        ),
        BufferExample(tokenizer("ab=").input_ids, tokenizer("ba", add_special_tokens=False).input_ids + [2], 0.0, 1, 0),
    ]
    return collate_examples(examples, tokenizer.pad_token_id)


def _parameters(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter but 4-bit packed storage, which bitsandbytes re-lays-out on its first CPU forward
    (the frozen-base logits check covers those weights)."""
    return {name: p.detach().clone() for name, p in module.named_parameters() if type(p).__name__ != "Params4bit"}


def _base_logits(module: SFTSharpeningModule) -> torch.Tensor:
    with module.frozen_base() as base:
        return base(torch.tensor([[1, 3, 4, 5, 6]])).logits


@pytest.mark.parametrize("finetuning", ["full", "lora", "qlora"])
def test_one_step_changes_only_trainable_weights(finetuning, tiny_model_path):
    module = _module(tiny_model_path, finetuning)
    module.eval()  # no dropout: the base logits must match exactly
    before, base_before = _parameters(module), _base_logits(module)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.5)
    # LoRA B starts at zero, so one step moves B only; a second step then moves A too
    for _ in range(2):
        _loss(module).backward()
        module.on_before_optimizer_step(optimizer)  # as Lightning calls it before every step
        optimizer.step()
        optimizer.zero_grad()
    after = _parameters(module)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # the verifier is untouched (for QLoRA this also covers the 4-bit weights and their quant state)
    torch.testing.assert_close(_base_logits(module), base_before, rtol=0, atol=0)
    assert changed, "nothing trained"
    assert changed <= trainable, f"frozen tensors changed: {sorted(changed - trainable)[:5]}"
    if finetuning == "full":
        assert all(k.startswith("policy.") for k in trainable) and not any(
            k.startswith("frozen_copy.") for k in changed
        )
        assert changed == trainable  # every policy weight that gets a gradient moves
    else:
        assert trainable and all("lora_" in k for k in trainable)
        assert module.frozen_copy is None  # the verifier is the same weights, adapter off


def _loss(module: SFTSharpeningModule) -> torch.Tensor:
    from sharpening.logprobs import response_logprobs
    from sharpening.losses import masked_nll

    batch = _batch(module.tokenizer)
    logprobs = response_logprobs(
        module.policy, batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask
    )
    return masked_nll(logprobs, batch.response_mask)


@pytest.mark.parametrize("finetuning", ["full", "lora"])
def test_frozen_base_stays_the_base_after_training(finetuning, tiny_model_path, tiny_model):
    module = _module(tiny_model_path, finetuning)
    optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=1.0)
    for _ in range(3):
        _loss(module).backward()
        module.on_before_optimizer_step(optimizer)  # as Lightning calls it before every step
        optimizer.step()
        optimizer.zero_grad()
    ids = torch.tensor([[1, 3, 4, 5]])
    with torch.no_grad():
        reference = tiny_model(ids).logits
        trained = module.policy(ids).logits
        with module.frozen_base() as base:
            verified = base(ids).logits
    assert not torch.allclose(trained, reference, atol=1e-4)
    torch.testing.assert_close(verified, reference, rtol=1e-5, atol=1e-5)


def test_full_finetuning_loads_its_frozen_base_only_once_the_policy_moved(tiny_model_path, tiny_model):
    """No frozen copy while the policy is the base (a one-round SFT run never holds two models); after the
    first optimizer step, or once a checkpoint's weights are loaded, the base comes again from the model path."""
    module = _module(tiny_model_path, "full")
    assert module.frozen_copy is None
    with module.frozen_base() as base:
        assert base is module.policy and not torch.is_grad_enabled() and not base.training
    assert module.policy.training  # restored
    optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=1.0)
    _loss(module).backward()
    module.on_before_optimizer_step(optimizer)
    optimizer.step()
    ids = torch.tensor([[1, 3, 4, 5]])
    with torch.no_grad(), module.frozen_base() as base:
        assert base is not module.policy and base is module.frozen_copy
        assert not any(p.requires_grad for p in base.parameters())
        torch.testing.assert_close(base(ids).logits, tiny_model(ids).logits, rtol=0, atol=0)
    resumed = _module(tiny_model_path, "full")
    resumed.load_state_dict(module.state_dict())
    with torch.no_grad(), resumed.frozen_base() as base:
        assert base is not resumed.policy
        torch.testing.assert_close(base(ids).logits, tiny_model(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("sample_from", ["base", "policy"])
def test_callback_selects_the_sample_the_frozen_base_likes_best(sample_from, tiny_model_path):
    module = _module(tiny_model_path, "lora")
    with torch.no_grad():  # make the policy differ from the base, so the two sources differ
        for name, p in module.policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    tok = module.tokenizer
    prompts = pad_prompts([tok("abcd=").input_ids, tok("ab=").input_ids], [0, 1], ["dcba", "ba"], tok.pad_token_id)
    verifier = SelfVerificationCallback(
        SamplingConfig(samples_per_prompt=6, max_new_tokens=6),
        SelectionConfig(keep_top_k=2, truncated="keep"),
        sample_from=sample_from,
        greedy_accuracy=False,
    )
    module.eval()
    scored, correct, _ = process_batch(verifier.round_models(module), prompts, verifier.round_settings(), epoch=0)
    with module.frozen_base() as base:
        expected = loglik_reward(sample_logprobs(base, scored.samples), scored.samples.response_mask)  # [B, N]
    if scored.samples.pruned is not None:  # a stopped sample is partial: not scored, never kept
        expected = expected.masked_fill(scored.samples.pruned, float("-inf"))
    torch.testing.assert_close(scored.scores, expected, rtol=1e-5, atol=1e-5)
    top2 = torch.sort(expected, dim=-1, descending=True, stable=True).indices[:, :2]
    assert torch.equal(scored.selected, top2)
    assert correct.shape == (2, 6)


@pytest.mark.parametrize("keep_top_k", [1, 2])
def test_stopping_unselectable_samples_keeps_the_same_buffer(keep_top_k, tiny_model_path):
    """The callback's default stopping of samples that cannot be kept selects exactly what drawing every
    sample to its end selects (indices, tokens, scores), with fewer tokens drawn."""
    from sharpening.buffer import selected_examples

    module = _module(tiny_model_path, "lora")
    module.eval()
    tok = module.tokenizer
    words = ["abcd=", "ab=", "hgf=", "a=", "cdeh=", "bb="]
    prompts = pad_prompts([tok(w).input_ids for w in words], list(range(6)), [None] * 6, tok.pad_token_id)
    runs = {}
    for stop in (False, True):
        verifier = SelfVerificationCallback(
            SamplingConfig(samples_per_prompt=16, max_new_tokens=12),
            SelectionConfig(keep_top_k=keep_top_k),
            greedy_accuracy=False,
            stop_unselectable=stop,
        )
        runs[stop] = process_batch(verifier.round_models(module), prompts, verifier.round_settings(), epoch=0)[0]
    assert runs[True].samples.pruned.any() and runs[False].samples.pruned is None
    want, got = selected_examples(runs[False]), selected_examples(runs[True])
    assert [(e.prompt_index, e.sample_index, e.response_ids) for e in want] == [
        (e.prompt_index, e.sample_index, e.response_ids) for e in got
    ]
    assert [e.score for e in got] == pytest.approx([e.score for e in want], abs=1e-5)
    assert runs[True].samples.response_mask.sum() < runs[False].samples.response_mask.sum()


@pytest.mark.parametrize("finetuning", ["lora", "qlora"])
def test_checkpoint_round_trip_holds_the_adapter_and_leaves_the_base_bit_identical(finetuning, tiny_model_path):
    module = _module(tiny_model_path, finetuning)
    module.eval()
    with torch.no_grad():
        for name, p in module.policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    base_before = _base_logits(module)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    assert state and all("lora_" in k for k in state)  # the adapter, never the frozen base
    restored = _module(tiny_model_path, finetuning)
    restored.eval()
    restored.load_state_dict(state)
    torch.testing.assert_close(_base_logits(module), base_before, rtol=0, atol=0)
    torch.testing.assert_close(_base_logits(restored), base_before, rtol=0, atol=0)
    ids = torch.tensor([[1, 3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(restored.policy(ids).logits, module.policy(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("finetuning", ["full", "lora"])
def test_onednn_linears_train_like_nn_linear(finetuning, tiny_model_path):
    """Three steps with every linear layer on oneDNN (cpu_linear=onednn) track nn.Linear's kernel: losses,
    weights and the frozen base agree to float32 rounding."""
    from sharpening.kernels.cpu_linear import OneDNNLinear, onednn_linear_available

    if not onednn_linear_available():
        pytest.skip("this PyTorch has no oneDNN linear")
    runs = {}
    for kernel in ("onednn", "torch"):
        torch.manual_seed(0)  # the same LoRA A initialisation on both sides
        module = SFTSharpeningModule(PolicyConfig(model_name_or_path=tiny_model_path, finetuning=finetuning, lora_r=4,
                                                  dtype="float32", cpu_linear=kernel))  # fmt: skip
        module.configure_model()
        module.eval()
        assert any(isinstance(m, OneDNNLinear) for m in module.policy.modules()) == (kernel == "onednn")
        optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.5)
        losses = []
        for _ in range(3):
            loss = _loss(module)
            loss.backward()
            module.on_before_optimizer_step(optimizer)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        runs[kernel] = losses, _parameters(module), _base_logits(module)
    (losses, weights, base), (ref_losses, ref_weights, ref_base) = runs["onednn"], runs["torch"]
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    for name, value in ref_weights.items():
        torch.testing.assert_close(weights[name], value, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(base, ref_base, rtol=1e-5, atol=1e-5)
