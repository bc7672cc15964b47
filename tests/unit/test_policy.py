"""Policy loading: attention backend, dtype, validation, tokenizer, full / LoRA / QLoRA, frozen base."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from sharpening.policy import (
    PolicyConfig,
    count_trainable_parameters,
    eval_mode,
    frozen_base,
    is_peft_model,
    load_policy,
    load_tokenizer,
    resolve_dtype,
    select_attn_implementation,
    validate_policy_config,
)

OPTION = "--model.policy"


@pytest.mark.parametrize(
    "requested, cuda, flash, want",
    [
        ("auto", True, True, "flash_attention_2"),
        ("auto", True, False, "sdpa"),
        ("auto", False, True, "sdpa"),
        ("auto", False, False, "sdpa"),
        ("eager", True, True, "eager"),
        ("sdpa", True, True, "sdpa"),
        ("flash_attention_2", False, False, "flash_attention_2"),
    ],
)
def test_select_attn_implementation(requested, cuda, flash, want):
    assert select_attn_implementation(requested, cuda, flash) == want


@pytest.mark.parametrize(
    "name, want",
    [("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16), ("auto", torch.float32)],
)
def test_resolve_dtype_on_cpu(name, want):
    assert resolve_dtype(name, torch.device("cpu")) == want


def test_resolve_dtype_auto_on_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float32


# ---------------------------------------------------------------- validation


def test_valid_config_has_no_problems(tiny_model_path):
    for mode in ("full", "lora"):
        assert validate_policy_config(PolicyConfig(model_name_or_path=tiny_model_path, finetuning=mode)) == []


def test_missing_directory_names_option_and_value(tmp_path):
    missing = str(tmp_path / "no-such-model")
    problems = validate_policy_config(PolicyConfig(model_name_or_path=missing))
    assert len(problems) == 1
    assert problems[0].startswith(f"--model.policy.model_name_or_path={missing!r}")
    assert "no such directory" in problems[0]


def test_empty_model_name():
    problems = validate_policy_config(PolicyConfig(model_name_or_path=""))
    assert problems == [f"{OPTION}.model_name_or_path is empty: give a hub id or a local model directory"]


def test_directory_without_config_json_lists_what_was_found(tmp_path):
    (tmp_path / "weights.bin").write_text("x")
    (tmp_path / "notes.txt").write_text("x")
    problems = validate_policy_config(PolicyConfig(model_name_or_path=str(tmp_path)))
    assert len(problems) == 1
    assert "config.json" in problems[0] and "notes.txt" in problems[0] and "weights.bin" in problems[0]
    assert problems[0].startswith(f"{OPTION}.model_name_or_path=")


def test_hub_id_absent_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    problems = validate_policy_config(PolicyConfig(model_name_or_path="nobody-xyz/not-a-cached-model"))
    assert len(problems) == 1 and "HF_HUB_OFFLINE" in problems[0]


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (dict(lora_r=0), f"{OPTION}.lora_r=0: must be >= 1"),
        (dict(lora_alpha=0), f"{OPTION}.lora_alpha=0"),
        (dict(lora_dropout=1.0), f"{OPTION}.lora_dropout=1.0: must be in [0, 1)"),
        (dict(lora_dropout=-0.1), f"{OPTION}.lora_dropout=-0.1"),
        (dict(lora_target_modules=[]), f"{OPTION}.lora_target_modules is empty"),
        (dict(finetuning="prefix"), f"{OPTION}.finetuning='prefix'"),
        (dict(attn_implementation="flex"), f"{OPTION}.attn_implementation='flex'"),
        (dict(dtype="float8"), f"{OPTION}.dtype='float8'"),
    ],
)
def test_single_problems(tiny_model_path, overrides, fragment):
    problems = validate_policy_config(PolicyConfig(model_name_or_path=tiny_model_path, **overrides))
    assert len(problems) == 1 and problems[0].startswith(fragment), problems


def test_lora_fields_ignored_for_full_finetuning(tiny_model_path):
    cfg = PolicyConfig(model_name_or_path=tiny_model_path, finetuning="full", lora_r=0, lora_dropout=2.0)
    assert validate_policy_config(cfg) == []


def test_all_problems_at_once(tmp_path):
    cfg = PolicyConfig(model_name_or_path=str(tmp_path / "nope"), lora_r=0, lora_dropout=1.5, dtype="int8")
    problems = validate_policy_config(cfg)
    assert len(problems) == 4


def test_qlora_without_bitsandbytes(monkeypatch, tiny_model_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    problems = validate_policy_config(PolicyConfig(model_name_or_path=tiny_model_path, finetuning="qlora"))
    assert len(problems) == 1
    assert problems[0].startswith(f"{OPTION}.finetuning=qlora needs bitsandbytes")
    assert validate_policy_config(PolicyConfig(model_name_or_path=tiny_model_path, finetuning="lora")) == []


def test_qlora_with_bitsandbytes_installed(tiny_model_path):
    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes not installed")
    assert validate_policy_config(PolicyConfig(model_name_or_path=tiny_model_path, finetuning="qlora")) == []


# ---------------------------------------------------------------- tokenizer


def test_load_tokenizer_pads_left(tiny_model_path):
    tokenizer = load_tokenizer(PolicyConfig(model_name_or_path=tiny_model_path))
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token_id == 0 and tokenizer.eos_token_id == 2


def _save_tokenizer(path, pad: bool, eos: bool = True):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1, "a": 2, "b": 3}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    kwargs = dict(tokenizer_object=core, bos_token="<s>", padding_side="right")
    if eos:
        kwargs["eos_token"] = "</s>"
    if pad:
        kwargs["pad_token"] = "<s>"
    PreTrainedTokenizerFast(**kwargs).save_pretrained(path)
    return str(path)


def test_load_tokenizer_falls_back_to_eos_for_pad(tmp_path):
    path = _save_tokenizer(tmp_path, pad=False)
    tokenizer = load_tokenizer(PolicyConfig(model_name_or_path=path))
    assert tokenizer.pad_token == "</s>" and tokenizer.pad_token_id == tokenizer.eos_token_id == 1
    assert tokenizer.padding_side == "left"


def test_load_tokenizer_keeps_an_existing_pad(tmp_path):
    tokenizer = load_tokenizer(PolicyConfig(model_name_or_path=_save_tokenizer(tmp_path, pad=True)))
    assert tokenizer.pad_token_id == 0 and tokenizer.padding_side == "left"


def test_load_tokenizer_without_eos_is_a_config_error(tmp_path):
    from sharpening.errors import ConfigError

    with pytest.raises(ConfigError, match="no EOS token"):
        load_tokenizer(PolicyConfig(model_name_or_path=_save_tokenizer(tmp_path, pad=True, eos=False)))


# ---------------------------------------------------------------- loading


def _ids():
    return torch.tensor([[1, 3, 4, 5, 6], [1, 7, 8, 9, 10]])


def test_load_policy_full_returns_frozen_copy(tiny_model_path, tiny_model):
    policy, frozen = load_policy(PolicyConfig(model_name_or_path=tiny_model_path, finetuning="full", dtype="float32"))
    assert frozen is not None and frozen is not policy
    assert count_trainable_parameters(frozen) == 0
    assert not frozen.training
    assert count_trainable_parameters(policy) == sum(p.numel() for p in policy.parameters())
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(policy.parameters(), frozen.parameters()))
    with torch.no_grad():
        policy.get_output_embeddings().weight.add_(1.0)  # training the policy leaves the copy alone
        torch.testing.assert_close(frozen(input_ids=_ids()).logits, tiny_model(input_ids=_ids()).logits)
    with frozen_base(policy, frozen) as base:
        assert base is frozen
        assert not torch.is_grad_enabled()
    assert torch.is_grad_enabled()
    assert not is_peft_model(policy)
    with pytest.raises(RuntimeError, match="frozen copy"):
        with frozen_base(policy):
            pass


def _expected_lora_params(config, r: int) -> int:
    """r * (in + out) for every linear of every decoder layer (all-linear excludes the LM head)."""
    hidden, inter = config.hidden_size, config.intermediate_size
    head_dim = hidden // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    shapes = [
        (hidden, hidden),  # q_proj [out, in]
        (kv, hidden),  # k_proj
        (kv, hidden),  # v_proj
        (hidden, hidden),  # o_proj
        (inter, hidden),  # gate_proj
        (inter, hidden),  # up_proj
        (hidden, inter),  # down_proj
    ]
    return config.num_hidden_layers * sum(r * (out + inp) for out, inp in shapes)


@pytest.fixture(scope="module")
def lora_policy(tiny_model_path):
    policy, frozen = load_policy(PolicyConfig(model_name_or_path=tiny_model_path, finetuning="lora", lora_r=4))
    assert frozen is None
    return policy


def test_lora_trainable_parameter_count(lora_policy, tiny_model):
    c = tiny_model.config
    # worked example of the formula: hidden h, intermediate i, kv width k -> per layer, for rank r,
    # r * [(h+h) + (k+h) + (k+h) + (h+h) + (i+h) + (i+h) + (h+i)]
    h, i, k = c.hidden_size, c.intermediate_size, c.num_key_value_heads * c.hidden_size // c.num_attention_heads
    assert _expected_lora_params(c, 4) == c.num_hidden_layers * 4 * (7 * h + 2 * k + 2 * h + 3 * i)
    assert count_trainable_parameters(lora_policy) == _expected_lora_params(c, 4)
    trainable = [n for n, p in lora_policy.named_parameters() if p.requires_grad]
    assert all("lora_" in n for n in trainable)
    assert not any("lm_head" in n for n in trainable)
    assert is_peft_model(lora_policy)


def test_lora_named_targets(tiny_model_path, tiny_model):
    cfg = PolicyConfig(model_name_or_path=tiny_model_path, lora_r=2, lora_target_modules=["q_proj", "v_proj"])
    policy, _ = load_policy(cfg)
    c = tiny_model.config
    kv = c.num_key_value_heads * c.hidden_size // c.num_attention_heads
    h = c.hidden_size
    assert count_trainable_parameters(policy) == c.num_hidden_layers * 2 * ((h + h) + (h + kv))


def test_frozen_base_with_lora_gives_base_logits(lora_policy, tiny_model):
    with torch.no_grad():
        for name, p in lora_policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
        base_logits = tiny_model(input_ids=_ids()).logits
        adapted = lora_policy(input_ids=_ids()).logits
    assert (adapted - base_logits).abs().max() > 1e-3  # the adapter now changes the output
    lora_policy.train()
    with frozen_base(lora_policy) as base:
        assert base is lora_policy
        assert not torch.is_grad_enabled()
        with eval_mode(base):
            torch.testing.assert_close(base(input_ids=_ids()).logits, base_logits, atol=1e-6, rtol=0)
    assert lora_policy.training  # the mode survives
    with torch.no_grad():
        torch.testing.assert_close(lora_policy(input_ids=_ids()).logits, adapted)  # adapter back on


def test_eval_mode_restores_mode():
    model = torch.nn.Dropout(0.5)
    model.train()
    with eval_mode(model) as m:
        assert m is model and not model.training
    assert model.training
    model.eval()
    with eval_mode(model):
        pass
    assert not model.training


def test_qlora_loads_4bit_layers_on_cpu(tiny_model_path, tiny_model):
    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes not installed")
    import bitsandbytes as bnb

    policy, frozen = load_policy(PolicyConfig(model_name_or_path=tiny_model_path, finetuning="qlora", lora_r=2))
    assert frozen is None and is_peft_model(policy)
    four_bit = [n for n, m in policy.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) == 7 * 2  # every decoder linear of the two layers
    assert count_trainable_parameters(policy) == _expected_lora_params(tiny_model.config, 2)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for n, m in policy.named_modules() if "lm_head" in n)
    weight = next(m for m in policy.modules() if isinstance(m, bnb.nn.Linear4bit)).weight
    assert weight.quant_state.quant_type == "nf4"


def test_response_logprobs_through_lora_and_its_frozen_base(lora_policy, tiny_model):
    """Scoring a PEFT policy uses its adapter; inside frozen_base it is exactly the base model (method.md §4.3)."""
    from sharpening.logprobs import response_logprobs

    with torch.no_grad():
        for name, p in lora_policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    prompt_ids = torch.tensor([[0, 1, 3, 4], [1, 5, 6, 7]])
    prompt_mask = prompt_ids != 0
    prompt_mask[1, 0] = True
    response_ids = torch.tensor([[8, 9, 2], [10, 2, 0]])
    response_mask = torch.tensor([[True, True, True], [True, True, False]])

    def by_hand(model):
        out = torch.zeros(2, 3)
        for r in range(2):
            prompt, response = prompt_ids[r][prompt_mask[r]], response_ids[r][response_mask[r]]
            logits = model(input_ids=torch.cat([prompt, response])[None]).logits[0]
            rows = logits[len(prompt) - 1 : len(prompt) - 1 + len(response)]
            out[r, : len(response)] = rows.gather(-1, response[:, None]).squeeze(-1) - rows.logsumexp(-1)
        return out

    lora_policy.eval()
    with torch.no_grad():
        adapted = response_logprobs(lora_policy, prompt_ids, prompt_mask, response_ids, response_mask, 2)
        torch.testing.assert_close(adapted, by_hand(lora_policy), atol=1e-5, rtol=0)
        base_ref = by_hand(tiny_model)
    assert (adapted - base_ref).abs().max() > 1e-3
    with frozen_base(lora_policy) as base:
        scored = response_logprobs(base, prompt_ids, prompt_mask, response_ids, response_mask, 2)
    torch.testing.assert_close(scored, base_ref, atol=1e-5, rtol=0)


def test_load_policy_dtype(tiny_model_path):
    policy, frozen = load_policy(PolicyConfig(model_name_or_path=tiny_model_path, finetuning="full", dtype="bfloat16"))
    assert next(policy.parameters()).dtype == torch.bfloat16 and next(frozen.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("finetuning", ["full", "lora"])
def test_frozen_base_scores_without_dropout_even_when_the_module_trains(tmp_path, finetuning):
    """GPT-2-style configs have dropout 0.1: the verifier must still be deterministic in train mode."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from sharpening.tasks.chars import build_char_tokenizer

    tok = build_char_tokenizer("abcd=")
    config = GPT2Config(
        vocab_size=len(tok),
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=32,
        resid_pdrop=0.5,
        embd_pdrop=0.5,
        attn_pdrop=0.5,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    policy, frozen = load_policy(
        PolicyConfig(
            model_name_or_path=str(tmp_path),
            finetuning=finetuning,
            lora_r=2,
            lora_target_modules=["c_attn"],
            dtype="float32",
        )
    )
    assert policy.training  # ready to train: dropout on for the policy
    policy.train()
    if frozen is not None:
        frozen.train()  # what Lightning's module.train() does to every submodule
    ids = torch.tensor([[1, 3, 4, 5, 6]])
    with frozen_base(policy, frozen) as base:
        first, second = base(ids).logits, base(ids).logits
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert policy.training


def test_save_policy_replaces_the_directory_only_once_the_new_policy_is_written(tiny_model_path, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sharpening.checkpoint import save_policy

    model, tokenizer = (
        AutoModelForCausalLM.from_pretrained(tiny_model_path),
        AutoTokenizer.from_pretrained(tiny_model_path),
    )
    out = tmp_path / "out"
    out.mkdir()
    (out / "adapter_config.json").write_text("{}")  # an earlier run's LoRA output
    broken = type("Broken", (), {"save_pretrained": lambda self, path: (_ for _ in ()).throw(OSError("disk full"))})()
    with pytest.raises(OSError, match="disk full"):
        save_policy(model, broken, str(out))
    assert os.listdir(out) == ["adapter_config.json"]  # an error while writing leaves it as it was
    save_policy(model, tokenizer, str(out))
    assert "adapter_config.json" not in os.listdir(out) and (out / "model.safetensors").is_file()
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no staging directory left behind
    AutoModelForCausalLM.from_pretrained(out)


def test_unwritable_directory_problem(tmp_path, monkeypatch):
    from sharpening.errors import unwritable_directory_problem

    (tmp_path / "f").write_text("")
    assert unwritable_directory_problem("--o", str(tmp_path / "new" / "deeper")) is None
    assert "is a file, not a directory" in unwritable_directory_problem("--o", str(tmp_path / "f"))
    assert "cannot be made" in unwritable_directory_problem("--o", str(tmp_path / "f" / "x"))
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # a read-only mount (root ignores chmod)
    assert "is not writable by this user" in unwritable_directory_problem("--o", str(tmp_path / "new"))


def test_a_saved_adapter_names_a_local_base_by_its_absolute_path(tiny_model_path, tmp_path, monkeypatch):
    import json

    from transformers import AutoTokenizer

    from sharpening.checkpoint import save_policy

    monkeypatch.chdir(os.path.dirname(tiny_model_path))
    relative = os.path.basename(tiny_model_path)
    policy, _ = load_policy(PolicyConfig(model_name_or_path=relative, finetuning="lora", lora_r=4))
    save_policy(policy, AutoTokenizer.from_pretrained(relative), str(tmp_path / "adapter"))
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == os.path.abspath(tiny_model_path)  # loads from any directory


def test_model_source_problem_tells_a_local_typo_and_a_file_from_a_hub_id(tmp_path, monkeypatch):
    from sharpening.model_checks import model_source_problem

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "weights.safetensors").write_bytes(b"")
    assert model_source_problem("runs/mdl").startswith("no such directory")  # runs/ exists: a path, not a hub id
    assert model_source_problem("weights.safetensors").startswith("is a file")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "local Hugging Face cache" in model_source_problem("nobody/no-model")


def test_disable_dropout_makes_a_training_forward_deterministic(tmp_path):
    """RL-sharpening's policy: its gradient must use the log-probs of the policy that drew (in eval mode)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from sharpening.policy import disable_dropout
    from sharpening.tasks.chars import build_char_tokenizer

    tok = build_char_tokenizer("abcd=")
    config = GPT2Config(
        vocab_size=len(tok),
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=32,
        resid_pdrop=0.5,
        embd_pdrop=0.5,
        attn_pdrop=0.5,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    policy, _ = load_policy(
        PolicyConfig(
            model_name_or_path=str(tmp_path),
            finetuning="lora",
            lora_r=2,
            lora_dropout=0.3,
            lora_target_modules=["c_attn"],
            dtype="float32",
        )
    )
    ids = torch.tensor([[1, 3, 4, 5, 6]])
    assert disable_dropout(policy) > 0 and disable_dropout(policy) == 0
    policy.train()
    torch.testing.assert_close(policy(ids).logits, policy(ids).logits, rtol=0, atol=0)


# ---------------------------------------------------------------- model files, LoRA targets, attention


def _copy_model(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_model_weights_problem_whole_missing_and_truncated(tiny_model_path, tmp_path):
    from sharpening.model_checks import model_weights_problem

    assert model_weights_problem(tiny_model_path) is None
    model = _copy_model(tiny_model_path, tmp_path / "m")
    weights = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(weights[:-1])
    assert "model.safetensors is truncated" in model_weights_problem(str(model))
    (model / "model.safetensors").write_bytes(weights + b"\0")
    assert "model.safetensors is damaged" in model_weights_problem(str(model))
    (model / "model.safetensors").write_bytes(b"\x50\x4b\x03\x04 a zip file, not safetensors")
    assert "truncated or not a safetensors file" in model_weights_problem(str(model))
    (model / "model.safetensors").write_bytes(b"\x04\0\0\0\0\0\0\0[1]x")
    assert "damaged header" in model_weights_problem(str(model))
    os.remove(model / "model.safetensors")
    problem = model_weights_problem(str(model))
    assert "has config.json but no weights" in problem and "tokenizer.json" in problem


def test_model_weights_problem_sharded(tiny_model, tmp_path):
    from sharpening.model_checks import model_weights_problem

    tiny_model.save_pretrained(tmp_path, max_shard_size="100KB")
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1 and model_weights_problem(str(tmp_path)) is None
    last = (tmp_path / shards[-1]).read_bytes()
    (tmp_path / shards[-1]).write_bytes(last[:100])
    assert f"{shards[-1]} is truncated" in model_weights_problem(str(tmp_path))
    os.remove(tmp_path / shards[0])
    problem = model_weights_problem(str(tmp_path))
    assert f"names {len(shards)} shard file(s) and 1 are missing (['{shards[0]}'])" in problem


def test_lora_targets_that_match_no_module_are_named_without_loading_weights(tiny_model_path, tmp_path):
    model = _copy_model(tiny_model_path, tmp_path / "m")
    os.remove(model / "model.safetensors")  # the module names come from config.json alone
    from sharpening.model_checks import lora_target_problems

    cfg = PolicyConfig(model_name_or_path=str(model), lora_target_modules=["q_proj", "v_prj", "self_attn.k_proj"])
    problems = lora_target_problems(cfg, "--model.policy.lora_target_modules")
    assert len(problems) == 1 and problems[0].startswith("--model.policy.lora_target_modules=")
    assert "['v_prj'] match(es) no module" in problems[0] and "'v_proj'" in problems[0] and "lm_head" not in problems[0]
    cfg = PolicyConfig(model_name_or_path=tiny_model_path, lora_target_modules=["q_proj", "model.layers.0.mlp.up_proj"])
    assert lora_target_problems(cfg, "--o") == []
    assert validate_policy_config(PolicyConfig(model_name_or_path=tiny_model_path, lora_target_modules=["qkv"]))
    full = PolicyConfig(model_name_or_path=tiny_model_path, finetuning="full", lora_target_modules=["qkv"])
    assert validate_policy_config(full) == []  # LoRA fields are not read for full fine-tuning


@pytest.mark.parametrize(
    "requested, cuda, flash, missing",
    [
        ("flash_attention_2", False, False, "the flash-attn package and a CUDA device"),
        ("flash_attention_2", True, False, "the flash-attn package;"),
        ("flash_attention_2", False, True, "a CUDA device;"),
        ("flash_attention_2", True, True, None),
        ("auto", False, False, None),  # auto falls back to sdpa
        ("sdpa", False, False, None),
    ],
)
def test_flash_attention_asked_for_by_name_where_it_cannot_run(requested, cuda, flash, missing):
    from sharpening.model_checks import flash_attention_problem

    problem = flash_attention_problem(requested, cuda, flash)
    assert (problem is None) == (missing is None)
    if missing:
        assert f"this machine lacks {missing}" in problem and "use auto" in problem


def test_validate_policy_config_refuses_flash_attention_2_without_flash_attn(tiny_model_path, monkeypatch):
    import sharpening.policy as policy

    monkeypatch.setattr(policy, "flash_attn_installed", lambda: False)
    cfg = PolicyConfig(model_name_or_path=tiny_model_path, attn_implementation="flash_attention_2")
    problems = validate_policy_config(cfg)
    assert len(problems) == 1
    assert problems[0].startswith(f"{OPTION}.attn_implementation=flash_attention_2: needs flash-attn")
    assert validate_policy_config(PolicyConfig(model_name_or_path=tiny_model_path, attn_implementation="auto")) == []


def test_a_missing_demo_model_says_how_to_build_it(tmp_path):
    from sharpening.model_checks import model_source_problem

    problem = model_source_problem(str(tmp_path / "artifacts" / "demo" / "base"))
    assert "python -m sharpening.tasks.demo build --out artifacts/demo" in problem
    assert "demo" not in model_source_problem(str(tmp_path / "models" / "base"))
