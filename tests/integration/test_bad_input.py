"""Bad input: a clear error (option as typed, value, rule, fix) before any weights load or sample is
drawn, and nothing written. One table; each row builds its overrides in a fresh directory."""

from __future__ import annotations

import inspect
import json
import os
import pickle
import shutil

import pytest

from sharpening.cli import main
from sharpening.errors import ConfigError
from tests.helpers import REPO_ROOT

ROOT = str(REPO_ROOT)
SFT, RL = os.path.join(ROOT, "configs", "demo.yaml"), os.path.join(ROOT, "configs", "rl.yaml")


def _long_prompt(tmp):
    path = tmp / "long.jsonl"
    path.write_text(json.dumps({"prompt": "ab" * 40, "answer": "x"}) + "\n")  # 81 tokens > context 64
    return [f"--data.dataset={path}"]


def _empty(tmp):
    (tmp / "empty.jsonl").write_text("")
    return [f"--data.dataset={tmp / 'empty.jsonl'}"]


def _no_eos_model(tmp, model):
    import shutil

    from transformers import AutoTokenizer

    shutil.copytree(model, tmp / "no-eos")
    tok = AutoTokenizer.from_pretrained(tmp / "no-eos")
    tok.eos_token = None
    tok.pad_token = None
    tok.save_pretrained(tmp / "no-eos")
    return [f"--model.init_args.policy.model_name_or_path={tmp / 'no-eos'}"]


def _corrupted_checkpoint(tmp):
    """A checkpoint written with its checksum, then one byte flipped inside a weight (torch.load accepts it)."""
    import torch

    from sharpening.checkpoint import AtomicCheckpointIO

    path = tmp / "ckpts" / "epoch=0-step=2.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.zeros(4096)}, "hyper_parameters": {}}, path)
    data = bytearray(path.read_bytes())
    data[data.index(bytes(4096)) + 100] = 0x40
    path.write_bytes(bytes(data))
    return [f"--ckpt_path={path}"]


def _run_directory_held(tmp):
    """Another live run (this test's own process stands in for it) holds the run directory."""
    import socket

    from sharpening.run_directories import RUN_LOCK

    (tmp / "root").mkdir()
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": "2026-01-01 00:00:00",
        "command": "sharpen fit",
    }
    (tmp / "root" / RUN_LOCK).write_text(json.dumps(record))
    return []


def _pickle_checkpoint(tmp):
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp / 'pwned'}",))

    with open(tmp / "evil.ckpt", "wb") as f:
        pickle.dump({"state_dict": Payload()}, f)
    return [f"--ckpt_path={tmp / 'evil.ckpt'}"]


def _other_runs_checkpoints(tmp):
    (tmp / "run" / "checkpoints").mkdir(parents=True)
    (tmp / "run" / "checkpoints" / "epoch=0-step=4.ckpt").write_bytes(b"not mine to overwrite")
    return [f"--trainer.default_root_dir={tmp / 'run'}"]


def _logger_checkpoints(tmp):
    """The default CSV logger's layout: root/lightning_logs/version_0/checkpoints."""
    (tmp / "run" / "lightning_logs" / "version_0" / "checkpoints").mkdir(parents=True)
    (tmp / "run" / "lightning_logs" / "version_0" / "checkpoints" / "last-preempted.ckpt").write_bytes(b"resume me")
    return [f"--trainer.default_root_dir={tmp / 'run'}"]


def _output_dir_is_a_file(tmp):
    (tmp / "notes.txt").write_text("mine")
    return [f"--model.init_args.output_dir={tmp / 'notes.txt'}"]


def _output_dir_inside_a_file(tmp):
    (tmp / "notes.txt").write_text("mine")
    return [f"--model.init_args.output_dir={tmp / 'notes.txt' / 'out'}"]


def _no_gpu():
    import torch

    if torch.cuda.is_available() or torch.backends.mps.is_available():
        pytest.skip("a GPU is here")
    return ["--trainer.accelerator=gpu"]


def _own_config(tmp):
    """The user's own YAML where the run would write its configuration (--overwrite_run replaces a run's only)."""
    (tmp / "root").mkdir()
    (tmp / "root" / "config.yaml").write_text("mine: true\n")
    return ["--overwrite_run=true"]


def _config_file(text):
    def build(tmp):
        (tmp / "bad.yaml").write_text(text)
        return ["--config", str(tmp / "bad.yaml")]

    return build


def _prompts(*prompts):
    def build(tmp):
        (tmp / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p, "answer": "x"}) + "\n" for p in prompts))
        return [f"--data.dataset={tmp / 'prompts.jsonl'}"]

    return build


def _dataset_directory(tmp):
    (tmp / "data").mkdir()
    (tmp / "data" / "notes.txt").write_text("mine")
    return [f"--data.dataset={tmp / 'data'}"]


def _damaged_model(damage):
    """A copy of the tiny model with ``damage(directory)`` done to it."""

    def build(tmp, model):
        shutil.copytree(model, tmp / "model")
        damage(tmp / "model")
        return [f"--model.init_args.policy.model_name_or_path={tmp / 'model'}"]

    return build


def _remove_weights(directory):
    os.remove(directory / "model.safetensors")


def _truncate_weights(directory):
    data = (directory / "model.safetensors").read_bytes()
    (directory / "model.safetensors").write_bytes(data[: len(data) // 2])


def _index_without_shards(directory):
    os.remove(directory / "model.safetensors")
    shards = {
        "lm_head.weight": "model-00001-of-00002.safetensors",
        "model.norm.weight": "model-00002-of-00002.safetensors",
    }
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": shards}))


def _edit_config(**changes):
    """A damage that rewrites config.json: ``changes`` set (None deletes the key)."""

    def damage(directory):
        config = json.loads((directory / "config.json").read_text())
        config.update(changes)
        (directory / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))

    return damage


def _latin1_prompts(tmp):
    (tmp / "latin1.jsonl").write_bytes(b'{"prompt": "abcd=", "answer": "x"}\n{"prompt": "ab\xe9=", "answer": "x"}\n')
    return [f"--data.dataset={tmp / 'latin1.jsonl'}"]


def _flash_attention(tmp):
    import torch

    from sharpening.model_checks import flash_attn_installed

    if torch.cuda.is_available() and flash_attn_installed():
        pytest.skip("flash-attn and a CUDA device are both here: flash_attention_2 can run")
    return ["--model.init_args.policy.attn_implementation=flash_attention_2"]


CASES = [
    # (id, config, overrides (list or builder), fragment expected in the error)
    ("checkpoint with a flipped byte", SFT, _corrupted_checkpoint, "is corrupted"),
    ("run directory held by a live run", SFT, _run_directory_held, "started 2026-01-01 00:00:00: sharpen fit"),
    ("template with a positional field", SFT, ["--data.prompt_template={0}"], "not a valid template"),
    ("template with a lone brace", SFT, ["--data.prompt_template=Q: {prompt"], "not a valid template"),
    (
        "template reading an attribute",
        SFT,
        ["--data.prompt_template={prompt.upper}"],
        "{prompt.upper} reads an attribute of the column's value",
    ),
    ("hub dataset offline", SFT, ["--data.dataset=nobody/no-such-dataset"], "cannot be read"),
    ("config file empty", SFT, _config_file(""), "the file is empty"),
    ("config file a list", SFT, _config_file("- trainer\n- model\n"), "the top level is a list"),
    ("config file not YAML", SFT, _config_file("trainer:\n  max_epochs: [1\n"), "flow sequence at line 2"),
    ("prompts that are lists", SFT, _prompts(["abcd=", "bcde="]), "--data.prompt_column='prompt': 1 row(s) of"),
    ("prompts all empty", SFT, _prompts("  ", "", "\n"), "all 3 prompt(s) in column 'prompt' are empty or whitespace"),
    ("dataset is a directory", SFT, _dataset_directory, "is a directory with no .jsonl/.json/.csv/.parquet file"),
    ("characters the tokenizer lacks", SFT, _prompts("abcd=", "abZ=\u00e9"), "prompt 1 (row 1): ['Z', '\u00e9']"),
    ("model without weights", SFT, _damaged_model(_remove_weights), "has config.json but no weights"),
    ("truncated safetensors", SFT, _damaged_model(_truncate_weights), "model.safetensors is truncated"),
    ("shards missing", SFT, _damaged_model(_index_without_shards), "names 2 shard file(s) and 2 are missing"),
    (
        "config.json not JSON",
        SFT,
        _damaged_model(lambda d: (d / "config.json").write_text("{not json")),
        "its config.json is not valid JSON",
    ),
    (
        "config.json without model_type",
        SFT,
        _damaged_model(_edit_config(model_type=None)),
        "its config.json has no model_type",
    ),
    (
        "config.json of an unknown architecture",
        SFT,
        _damaged_model(_edit_config(model_type="nosuchmodel")),
        "names model_type 'nosuchmodel', which transformers",
    ),
    (
        "tokenizer.json damaged",
        SFT,
        _damaged_model(lambda d: (d / "tokenizer.json").write_text("{broken")),
        "its tokenizer cannot be read",
    ),
    (
        "tokenizer files missing",
        SFT,
        _damaged_model(lambda d: [os.remove(d / f) for f in ("tokenizer.json", "tokenizer_config.json")]),
        "its tokenizer cannot be read (the directory holds ['config.json'",
    ),
    (
        "tokenizer ids past the model's vocabulary",
        SFT,
        _damaged_model(_edit_config(vocab_size=10)),
        "but the model has an embedding for ids below vocab_size=10 only",
    ),
    ("prompts not UTF-8", SFT, _latin1_prompts, "latin1.jsonl' is not UTF-8 text (byte e9 on line 2)"),
    ("no chat template", SFT, ["--data.use_chat_template=true"], "has no chat template"),
    (
        "LoRA targets match nothing",
        SFT,
        ["--model.init_args.policy.finetuning=lora", "--model.init_args.policy.lora_target_modules=[qkv]"],
        "['qkv'] match(es) no module",
    ),
    ("flash_attention_2 unavailable", SFT, _flash_attention, "attn_implementation=flash_attention_2: needs flash-attn"),
    ("model path missing", SFT, ["--model.init_args.policy.model_name_or_path=./no/such/model"], "no such directory"),
    ("hub id offline", SFT, ["--model.init_args.policy.model_name_or_path=nobody/no-model"], "HF_HUB_OFFLINE"),
    ("dataset file missing", SFT, ["--data.dataset=./missing.jsonl"], "file not found"),
    ("prompt column missing", SFT, ["--data.prompt_column=question"], "found ['prompt', 'answer']"),
    ("empty dataset", SFT, _empty, "no rows"),
    ("samples per prompt < 1", SFT, ["--verifier.sampling.samples_per_prompt=0"], "samples_per_prompt=0: must be >= 1"),
    ("group baseline needs 2", RL, ["--model.init_args.sampling.samples_per_prompt=1"], "group baseline needs >= 2"),
    ("max_new_tokens <= 0", SFT, ["--verifier.sampling.max_new_tokens=0"], "max_new_tokens=0: must be > 0"),
    ("prompt longer than context", SFT, _long_prompt, "context of 64"),
    ("temperature <= 0 with sampling", SFT, ["--verifier.sampling.temperature=0"], "temperature=0 is greedy"),
    ("negative temperature", SFT, ["--verifier.sampling.temperature=-1"], "temperature=-1.0: must be >= 0"),
    ("unknown decode loop", SFT, ["--verifier.sampling.decode=fast"], "decode='fast': must be one of"),
    ("CUDA graphs off CUDA", RL, ["--model.init_args.sampling.decode=compiled"], "CUDA graphs need a CUDA device"),
    (
        "held-out prompts leave none",
        RL,
        ["--model.init_args.rl.algorithm=xpo", "--model.init_args.rl.heldout_prompts=8", "--data.max_prompts=8"],
        "heldout_prompts=8: leaves no training prompt of the 6 read",
    ),
    (
        "held-out prompts outside xpo",
        RL,
        ["--model.init_args.rl.heldout_prompts=2"],
        "heldout_prompts=2: only xpo scores held-out prompts",
    ),
    (
        "offline RL needs loglik scores",
        RL,
        ["--model.init_args.rl.algorithm=offline", "--verifier.selection.reward=loglik_norm"],
        "offline RL-sharpening uses each sample's score as log pi_base",
    ),
    (
        "offline RL cannot penalize",
        RL,
        ["--model.init_args.rl.algorithm=offline", "--verifier.selection.truncated=penalize"],
        "--verifier.selection.truncated=penalize: offline RL-sharpening keeps every sample",
    ),
    (
        "offline RL cannot select by power",
        RL,
        ["--model.init_args.rl.algorithm=offline", "--verifier.select_by=power"],
        "--verifier.select_by=power: offline RL-sharpening forms pairs from all N samples",
    ),
    (
        "power selection keeps one sample",
        SFT,
        ["--verifier.select_by=power", "--verifier.selection.keep_top_k=2"],
        "--verifier.selection.keep_top_k=2: --verifier.select_by=power draws one sample per prompt",
    ),
    ("power alpha <= 0", SFT, ["--verifier.select_by=power", "--verifier.power.alpha=0"], "--verifier.power.alpha=0.0"),
    (
        "power particles < 1",
        SFT,
        ["--verifier.select_by=power", "--verifier.power.particles=0"],
        "--verifier.power.particles=0: must be >= 1",
    ),
    ("beta <= 0", RL, ["--model.init_args.rl.kl_coef=0"], "kl_coef=0.0: beta must be > 0"),
    (
        "negative RL clipping bound",
        RL,
        ["--model.init_args.rl.max_grad_norm=-1"],
        "--model.rl.max_grad_norm=-1.0: must be > 0, or null for no clipping; a negative bound reverses the gradient",
    ),
    (
        "huge clip_ratio",
        RL,
        ["--model.init_args.rl.clip_ratio=1e308"],
        "--model.rl.clip_ratio=1e+308: must be in (0, 1]",
    ),
    (
        "unknown truncated treatment",
        RL,
        ["--model.init_args.rl.truncated=cut"],
        "--model.rl.truncated='cut': must be one of drop, keep, penalize",
    ),
    (
        "negative truncation penalty",
        RL,
        ["--model.init_args.rl.truncated=penalize", "--model.init_args.rl.truncation_penalty=-1"],
        "--model.rl.truncation_penalty=-1.0: must be a finite number >= 0",
    ),
    (
        "xpo cannot drop truncated",
        RL,
        ["--model.init_args.rl.algorithm=xpo", "--model.init_args.rl.truncated=drop"],
        "--model.rl.truncated=drop: xpo would leave out the policy's own truncated draws",
    ),
    (
        "offline RL's truncated set twice",
        RL,
        ["--model.init_args.rl.algorithm=offline", "--model.init_args.rl.truncated=drop"],
        "leave --model.rl.truncated at keep and set --verifier.selection.truncated drop (its default) instead",
    ),
    (
        "qlora without lora settings",
        SFT,
        ["--model.init_args.policy.finetuning=qlora", "--model.init_args.policy.lora_r=0"],
        "lora_r=0",
    ),
    (
        "unknown self-reward",
        SFT,
        ["--verifier.selection.reward=bleu"],
        "--verifier.selection.reward='bleu': unknown self-reward; choose one of loglik, loglik_norm, majority",
    ),
    (
        "a self-reward that declares nothing",
        SFT,
        ["--verifier.selection.reward=os.path:join"],
        "--verifier.selection.reward='os.path:join': function join declares no scored_by / per",
    ),
    (
        "a task reward that does not import",
        SFT,
        ["--verifier.selection.task_reward=no_such_module:reward"],
        "--verifier.selection.task_reward='no_such_module:reward': cannot import it",
    ),
    (
        "offline RL with a task reward",
        RL,
        ["--model.init_args.rl.algorithm=offline", "--verifier.selection.task_reward=os.path:isabs"],
        "offline RL-sharpening uses each sample's score as log pi_base(y|x) in its squared loss, so no task reward",
    ),
    (
        "unknown RL self-reward",
        RL,
        ["--model.init_args.rl.reward=bleu"],
        "--model.rl.reward='bleu': unknown self-reward",
    ),
    (
        "xpo with another self-reward",
        RL,
        ["--model.init_args.rl.algorithm=xpo", "--model.init_args.rl.reward=self_certainty"],
        "--model.rl.reward=self_certainty: algorithm xpo regresses on log pi_base(y|x) itself",
    ),
    ("overfit_batches replaces the SFT order", SFT, ["--trainer.overfit_batches=1"], "--trainer.overfit_batches=1"),
    (
        "unknown algorithm",
        RL,
        ["--model.init_args.rl.algorithm=ppo"],
        "--model.rl.algorithm='ppo': must be one of online, offline, xpo",
    ),
    # a value that does not parse: the option without init_args, the value and the rule (not a union report)
    (
        "text for a whole number",
        SFT,
        ["--verifier.sampling.max_new_tokens=abc"],
        "--verifier.sampling.max_new_tokens='abc': must be a whole number",
    ),
    (
        "nan learning rate",
        SFT,
        ["--model.init_args.optimizer.lr=nan"],
        "--model.optimizer.lr='nan': must be a number (nan and inf",
    ),
    (
        "unknown schedule",
        SFT,
        ["--model.init_args.optimizer.schedule=foo"],
        "--model.optimizer.schedule='foo': must be one of constant, linear, cosine",
    ),
    (
        "nan min_score",
        SFT,
        ["--verifier.selection.min_score=nan"],
        "--verifier.selection.min_score='nan': must be a number",
    ),
    ("unknown option", SFT, ["--verifier.sampling.tmperature=1"], "unknown option(s) --verifier.sampling.tmperature=1"),
    (
        "unknown key in a config file",
        SFT,
        _config_file("trainer:\n  max_epochz: 1\n"),
        "--trainer.max_epochz: no such option",
    ),
    ("config file missing", SFT, ["--config=./no/such.yaml"], "--config: File does not exist"),
    # trainer settings: Lightning's refusals named as typed; settings that would train nothing, or in reverse
    (
        "max_epochs below -1",
        SFT,
        ["--trainer.max_epochs=-5"],
        "--trainer.max_epochs=-5: must be >= 1, or -1 for no limit",
    ),
    ("max_epochs 0 trains nothing", SFT, ["--trainer.max_epochs=0"], "--trainer.max_epochs=0: no step would train"),
    (
        "no batch trains",
        SFT,
        ["--trainer.limit_train_batches=0"],
        "--trainer.limit_train_batches=0: no batch would train",
    ),
    (
        "accumulate 0 batches",
        SFT,
        ["--trainer.accumulate_grad_batches=0"],
        "--trainer.accumulate_grad_batches=0: must be >= 1",
    ),
    ("negative clipping bound", SFT, ["--trainer.gradient_clip_val=-1"], "a negative bound reverses the gradient"),
    ("GPU that is not there", SFT, lambda tmp: _no_gpu(), "--trainer.accelerator=gpu: no GPU is visible"),
    (
        "unknown strategy",
        SFT,
        ["--trainer.strategy=bogus"],
        "--trainer.strategy='bogus': refused by Lightning's Trainer",
    ),
    ("zero devices", SFT, ["--trainer.devices=0"], "--trainer.devices='0': refused by Lightning's Trainer"),
    ("seed out of range", SFT, ["--seed_everything=99999999999999999999"], "--seed_everything=99999999999999999999: "),
    (
        "no algorithm class",
        SFT,
        ["--model.class_path=sharpening.module.PolicyModule"],
        "--model.class_path=sharpening.module.PolicyModule: PolicyModule is the algorithms' base class",
    ),
    (
        "resume the best checkpoint",
        SFT,
        ["--ckpt_path=best"],
        "--ckpt_path='best': a new `sharpen fit` has no best checkpoint",
    ),
    ("resume an empty path", SFT, ["--ckpt_path="], "--ckpt_path='': empty"),
    (
        "resume a SLURM checkpoint that is not there",
        SFT,
        ["--ckpt_path=hpc"],
        "--ckpt_path=hpc: no SLURM requeue checkpoint",
    ),
    (
        "config.yaml of the user's own in the run directory",
        SFT,
        lambda tmp: _own_config(tmp),
        "which was not written by a run",
    ),
    ("crafted pickle checkpoint", SFT, _pickle_checkpoint, "refused"),
    ("other run's checkpoints", SFT, _other_runs_checkpoints, "holds another run's checkpoints"),
    ("a logger's checkpoints", SFT, _logger_checkpoints, "(lightning_logs/version_0/checkpoints/last-preempted.ckpt"),
    ("output_dir is a file", SFT, _output_dir_is_a_file, "is a file, not a directory"),
    ("empty output_dir", SFT, ["--model.init_args.output_dir="], "--model.output_dir='': empty"),
    ("output_dir inside a file", RL, _output_dir_inside_a_file, "is a file, so the directory cannot be made"),
    ("tokenizer without EOS", SFT, "no-eos", "no EOS token"),
    # writing the policy replaces output_dir: never over what the run reads or keeps, whatever overwrite says
    ("policy over the base model", SFT, lambda tmp, model: _demo_folder(tmp, model, "demo/base"), "is the base model"),
    (
        "policy over the model and prompts folder",
        SFT,
        lambda tmp, model: _demo_folder(tmp, model, "demo"),
        "contains the base model",
    ),
    (
        "policy over the run directory",
        SFT,
        lambda tmp: [f"--model.init_args.output_dir={tmp / 'root'}", OVERWRITE],
        "is the run directory",
    ),
    (
        "policy inside the run's checkpoints",
        SFT,
        lambda tmp: [f"--model.init_args.output_dir={tmp / 'root' / 'checkpoints' / 'policy'}", OVERWRITE],
        "is inside the run's checkpoints",
    ),
    (
        "run directory inside the base model",
        SFT,
        lambda tmp, model: (
            _demo_folder(tmp, model, "out") + [f"--trainer.default_root_dir={tmp / 'demo' / 'base' / 'run'}"]
        ),
        "lies inside the base model",
    ),
    (
        "checkpoints into the base model",
        SFT,
        lambda tmp, model: (
            _demo_folder(tmp, model, "out")
            + [
                "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                f"--trainer.callbacks.dirpath={tmp / 'demo' / 'base'}",
            ]
        ),
        "ModelCheckpoint dirpath=",
    ),
    (
        "run directory inside the policy",
        SFT,
        lambda tmp: [f"--trainer.default_root_dir={tmp / 'out' / 'run'}", OVERWRITE],
        "contains the run directory",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_early_and_nothing_is_written(case, tiny_model_path, prompts_file, tmp_path, monkeypatch):
    name, config, overrides, expected = case
    if callable(overrides):  # a builder with a ``model`` parameter gets the tiny model's path (to copy and damage)
        wants_model = "model" in inspect.signature(overrides).parameters
        overrides = overrides(tmp_path, tiny_model_path) if wants_model else overrides(tmp_path)
    elif overrides == "no-eos":
        overrides = _no_eos_model(tmp_path, tiny_model_path)

    def no_weights(*args, **kwargs):
        raise AssertionError("model weights were loaded before the input was checked")

    monkeypatch.setattr("sharpening.module.load_policy", no_weights)
    monkeypatch.setattr("sharpening.engines.hf.generate_samples", no_weights)
    args = [
        "fit",
        "--config",
        config,
        f"--model.init_args.policy.model_name_or_path={tiny_model_path}",
        f"--model.init_args.output_dir={tmp_path / 'out'}",
        f"--data.dataset={prompts_file}",
        f"--trainer.default_root_dir={tmp_path / 'root'}",
        "--trainer.logger=false",
        *overrides,
    ]
    with pytest.raises(ConfigError) as err:
        main(args)
    assert expected in str(err.value), str(err.value)
    assert "--" in str(err.value)  # names the option as typed
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "pwned").exists()
    if name == "other run's checkpoints":
        assert (tmp_path / "run" / "checkpoints" / "epoch=0-step=4.ckpt").read_bytes() == b"not mine to overwrite"
    if name.startswith("output_dir"):
        assert (tmp_path / "notes.txt").read_text() == "mine"
    if name.startswith("config.yaml"):
        assert (tmp_path / "root" / "config.yaml").read_text() == "mine: true\n"


@pytest.mark.slow
def test_resume_checkpoint_from_another_model_or_algorithm_is_refused(tiny_model_path, prompts_file, tmp_path):
    run = [
        "fit",
        "--config",
        SFT,
        f"--model.init_args.policy.model_name_or_path={tiny_model_path}",
        f"--data.dataset={prompts_file}",
        "--trainer.logger=false",
        "--trainer.max_epochs=1",
        "--trainer.enable_progress_bar=false",
        "--verifier.show_progress=false",
        "--verifier.sampling.max_new_tokens=4",
        "--verifier.selection.truncated=keep",
        "--model.init_args.policy.finetuning=lora",
    ]
    main([*run, f"--trainer.default_root_dir={tmp_path / 'a'}"])
    ckpt = next((tmp_path / "a" / "checkpoints").glob("*.ckpt"))
    for change, fragment in [
        ("--model.init_args.policy.finetuning=full", "policy.finetuning='lora'"),
        ("--model.init_args.policy.lora_r=4", "policy.lora_r=16"),
    ]:
        with pytest.raises(ConfigError, match="resume with the settings that wrote it") as err:
            main([*run, f"--trainer.default_root_dir={tmp_path / 'b'}", f"--ckpt_path={ckpt}", change])
        assert fragment in str(err.value)
    with pytest.raises(ConfigError, match="SFTSharpeningModule") as err:  # another algorithm's module
        main(
            [
                "fit",
                "--config",
                RL,
                f"--model.init_args.policy.model_name_or_path={tiny_model_path}",
                "--model.init_args.policy.finetuning=lora",
                f"--data.dataset={prompts_file}",
                "--trainer.logger=false",
                f"--trainer.default_root_dir={tmp_path / 'c'}",
                f"--ckpt_path={ckpt}",
            ]
        )
    assert "--model.class_path" in str(err.value)


def test_problems_of_every_section_are_reported_together(tiny_model_path, prompts_file, tmp_path, monkeypatch):
    """Model, data and verifier sections and the run directory, in one error (not one fix-and-rerun each)."""
    monkeypatch.setattr("sharpening.module.load_policy", lambda *a, **k: pytest.fail("weights loaded"))
    _other_runs_checkpoints(tmp_path)
    with pytest.raises(ConfigError) as err:
        main(["fit", "--config", SFT, f"--model.init_args.policy.model_name_or_path={tiny_model_path}",
              f"--data.dataset={prompts_file}", f"--trainer.default_root_dir={tmp_path / 'run'}",
              "--trainer.logger=false", "--model.init_args.optimizer.lr=0", "--model.init_args.batch_size=0",
              "--data.max_prompts=0",
              "--verifier.sampling.samples_per_prompt=-1", "--verifier.sampling.max_new_tokens=0"])  # fmt: skip
    problems = err.value.problems
    assert len(problems) == 6, problems
    assert "holds another run's checkpoints" in problems[0]
    for fragment in ("--model.optimizer.lr=0.0", "--model.batch_size=0", "--data.max_prompts=0",
                     "--verifier.sampling.samples_per_prompt=-1", "--verifier.sampling.max_new_tokens=0"):  # fmt: skip
        assert any(p.startswith(fragment) for p in problems), (fragment, problems)


OVERWRITE = "--model.init_args.overwrite_output_dir=true"


def _demo_folder(tmp, model, output_dir: str) -> list[str]:
    """artifacts/demo's layout: the base model and the prompts in one folder; the policy goes to ``output_dir``."""
    shutil.copytree(model, tmp / "demo" / "base")
    (tmp / "demo" / "train.jsonl").write_text(json.dumps({"prompt": "abcd=", "answer": "dcba"}) + "\n")
    return [f"--model.init_args.policy.model_name_or_path={tmp / 'demo' / 'base'}",
            f"--data.dataset={tmp / 'demo' / 'train.jsonl'}", f"--model.init_args.output_dir={tmp / output_dir}",
            OVERWRITE]  # fmt: skip
