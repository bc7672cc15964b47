"""The `sharpen` CLI end to end on a tiny model: every config, resume, outputs, bad input."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest
import torch

from sharpening.cli import main
from sharpening.errors import ConfigError
from tests.helpers import REPO_ROOT, verifier_callback, verifier_state

ROOT = str(REPO_ROOT)
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))


def _is_rl(config: str) -> bool:
    with open(config) as f:
        return "RLSharpeningModule" in f.read()


def tiny_overrides(model_path: str, prompts: str, root: str, rl: bool = False) -> list[str]:
    """Swap a config's hub model and dataset for the tiny ones, and shrink the work to seconds."""
    module = (
        [
            "--model.init_args.prompts_per_step=2",
            "--model.init_args.sampling.samples_per_prompt=3",
            "--model.init_args.sampling.max_new_tokens=5",
        ]
        if rl
        else ["--model.init_args.batch_size=2"]
    )
    return module + [
        f"--model.init_args.policy.model_name_or_path={model_path}",
        "--model.init_args.policy.dtype=float32",
        "--model.init_args.policy.gradient_checkpointing=false",
        f"--model.init_args.output_dir={root}/out",
        f"--data.dataset={prompts}",
        "--data.subset=null",
        "--data.prompt_column=prompt",
        "--data.answer_column=answer",
        "--data.prompt_template={prompt}",
        "--data.use_chat_template=false",
        "--data.max_prompts=4",
        "--verifier.sampling.samples_per_prompt=3",
        "--verifier.sampling.max_new_tokens=5",
        "--verifier.sampling.prompts_per_batch=4",
        "--verifier.power.max_new_tokens=5",  # read by configs that select by power (configs/power_distill.yaml)
        "--verifier.power.block_tokens=2",
        "--verifier.power.mcmc_steps=1",
        "--verifier.power.particles=3",
        "--verifier.selection.truncated=keep",
        "--verifier.selection.answer_extractor=strip",
        "--verifier.show_progress=false",
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.num_nodes=1",
        "--trainer.strategy=auto",  # configs/fsdp.yaml's FSDP needs CUDA (tests/gpu runs it there)
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={root}",
    ]


@pytest.mark.parametrize("config", CONFIGS, ids=os.path.basename)
def test_every_config_runs_on_a_tiny_model(config, tiny_model_path, prompts_file, tmp_path):
    rl = _is_rl(config)
    overrides = tiny_overrides(tiny_model_path, prompts_file, str(tmp_path), rl)
    cli = main(["fit", "--config", config, *overrides, "--trainer.fast_dev_run=1"])
    assert cli.trainer.global_step >= 1
    verifier = verifier_callback(cli.trainer)
    if not rl or cli.model.rl.algorithm == "offline":
        assert len(verifier.buffer) == (4 * 3 if rl else 4)  # 4 prompts; best-of-3 each (offline RL: all 3)
    assert os.path.isfile(os.path.join(tmp_path, "out", "config.json")) or os.path.isfile(
        os.path.join(tmp_path, "out", "adapter_config.json")
    )


@pytest.mark.slow
def test_rl_under_mixed_precision_clips_and_steps(tiny_model_path, prompts_file, tmp_path):
    """bf16-mixed with gradient clipping (RL clips by max_grad_norm): Lightning's mixed-precision clipping
    refuses a fused AdamW, so the module builds an unfused one there (configs/lora.yaml and qlora.yaml
    clip under bf16-mixed too, and run above with their own precision)."""
    overrides = tiny_overrides(tiny_model_path, prompts_file, str(tmp_path), rl=True)
    cli = main(
        [
            "fit",
            "--config",
            os.path.join(ROOT, "configs", "rl.yaml"),
            *overrides,
            "--trainer.precision=bf16-mixed",
            "--model.init_args.rl.max_grad_norm=0.1",
            "--trainer.max_steps=2",
        ]
    )
    assert cli.trainer.global_step == 2
    assert not cli.trainer.optimizers[0].defaults.get("fused")


def _fit(model_path, prompts, root, *extra):
    return main(
        [
            "fit",
            "--config",
            os.path.join(ROOT, "configs", "demo.yaml"),
            *tiny_overrides(model_path, prompts, root),
            "--model.init_args.policy.finetuning=lora",
            "--model.init_args.policy.lora_r=4",
            "--trainer.max_epochs=2",
            "--trainer.log_every_n_steps=1",
            "--verifier.resample_every_epoch=true",
            *extra,
        ]
    )


def _checkpoint_every_step_and_epoch(root) -> str:
    """An extra config adding two ModelCheckpoints: after every step, and at every epoch end."""
    path = os.path.join(root, "checkpoints.yaml")
    os.makedirs(root, exist_ok=True)
    with open(path, "w") as f:
        f.write(
            "trainer:\n  callbacks:\n"
            "    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
            f"      init_args: {{dirpath: {root}/steps, every_n_train_steps: 1, save_top_k: -1, "
            "filename: '{step}'}\n"
            "    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
            f"      init_args: {{dirpath: {root}/epochs, every_n_epochs: 1, save_top_k: -1, "
            "filename: 'end-{epoch}'}\n"
        )
    return path


@pytest.mark.slow
@pytest.mark.parametrize("checkpoint", ["steps/step=1.ckpt", "epochs/end-epoch=0.ckpt"], ids=["mid-epoch", "epoch-end"])
def test_resume_restores_the_buffer_and_round(checkpoint, tiny_model_path, prompts_file, tmp_path):
    root_a = str(tmp_path / "a")
    full_cli = _fit(tiny_model_path, prompts_file, root_a, "--config", _checkpoint_every_step_and_epoch(root_a))
    full = verifier_callback(full_cli.trainer)
    ckpt = os.path.join(root_a, checkpoint)
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)  # plain data: loads with weights_only
    state = verifier_state(saved)
    assert saved["state_dict"] and all("lora_" in k for k in saved["state_dict"])  # adapter only, no frozen base

    resumed_cli = _fit(tiny_model_path, prompts_file, str(tmp_path / "b"), f"--ckpt_path={ckpt}")
    resumed = verifier_callback(resumed_cli.trainer)
    # same steps and bitwise-equal weights as the run that was never stopped (CPU)
    assert resumed_cli.trainer.global_step == full_cli.trainer.global_step == 4
    for name in ("train/loss_step", "train/loss_epoch"):  # the losses logged after the resume point match
        assert float(resumed_cli.trainer.callback_metrics[name]) == float(full_cli.trainer.callback_metrics[name])
    for key, value in full_cli.model.state_dict().items():
        torch.testing.assert_close(resumed_cli.model.state_dict()[key], value, rtol=0, atol=0)
    # both checkpoints hold epoch 0's buffer: the resumed run reuses it for the rest of epoch 0 (mid-epoch)
    # and draws epoch 1's round when Lightning asks for epoch 1's data, exactly as the full run did
    assert state["buffer"]["epoch"] == 0 and state["rounds_done"] == 1
    assert resumed.rounds_done == full.rounds_done == 2
    assert resumed.buffer.state_dict() == full.buffer.state_dict()


@pytest.mark.slow
def test_resume_with_power_selection_redraws_the_uninterrupted_runs_buffer(tiny_model_path, prompts_file, tmp_path):
    """Power self-distillation seeds each round by (seed, epoch, prompt index): a run resumed from epoch 0's end
    draws epoch 1's power samples exactly as the run that was never stopped."""
    power = ["--verifier.select_by=power", "--verifier.power.method=mcmc"]
    root_a = str(tmp_path / "a")
    full_cli = _fit(tiny_model_path, prompts_file, root_a, "--config", _checkpoint_every_step_and_epoch(root_a), *power)
    full = verifier_callback(full_cli.trainer)
    ckpt = os.path.join(root_a, "epochs/end-epoch=0.ckpt")
    state = verifier_state(torch.load(ckpt, map_location="cpu", weights_only=True))
    assert state["buffer"]["epoch"] == 0 and len(state["buffer"]["examples"]) == 4  # one power sample per prompt
    resumed = verifier_callback(
        _fit(tiny_model_path, prompts_file, str(tmp_path / "b"), f"--ckpt_path={ckpt}", *power).trainer
    )
    assert resumed.rounds_done == full.rounds_done == 2
    assert resumed.buffer.state_dict() == full.buffer.state_dict()
    assert full.buffer.state_dict()["examples"] != state["buffer"]["examples"]  # epoch 1 drew anew


@pytest.mark.slow
def test_from_the_shell_a_stopped_run_and_bad_input_are_one_message_without_a_traceback(
    tiny_model_path, prompts_file, tmp_path, monkeypatch, capsys
):
    """`sharpen` as a command (main without arguments reads sys.argv): a round that keeps no sample (every score
    under min_score) exits with status 1, a value that does not parse with status 2; each prints its message."""
    run = ["sharpen", "fit", "--config", os.path.join(ROOT, "configs", "demo.yaml"),
           *tiny_overrides(tiny_model_path, prompts_file, str(tmp_path)), "--trainer.max_epochs=1"]  # fmt: skip
    for extra, status, message in [
        ("--verifier.selection.min_score=1.0", 1, "sharpen: self-verification kept no sample in epoch 0"),
        (
            "--verifier.sampling.max_new_tokens=abc",
            2,
            "--verifier.sampling.max_new_tokens='abc': must be a whole number",
        ),
    ]:
        monkeypatch.setattr(sys, "argv", [*run, extra])
        with pytest.raises(SystemExit) as done:
            main()
        assert done.value.code == status and message in capsys.readouterr().err


@pytest.mark.parametrize(
    "error, status, message",
    [
        (KeyboardInterrupt(), 130, "sharpen evaluate: interrupted; the draws made so far are cached"),
        (
            RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 576000000000 bytes"),
            1,
            "sharpen evaluate: out of memory (DefaultCPUAllocator: can't allocate memory",
        ),
        (RuntimeError("a bug"), None, None),  # not ours to explain: the traceback stays
    ],
)
def test_from_the_shell_ctrl_c_and_out_of_memory_are_one_message(error, status, message, monkeypatch, capsys):
    def fail(argv):
        raise error

    monkeypatch.setattr("sharpening.evaluate.dispatch", fail)
    monkeypatch.setattr(sys, "argv", ["sharpen", "evaluate", "--output_dir=out"])
    with pytest.raises(SystemExit if status else RuntimeError) as done:
        main()
    if status:
        assert done.value.code == status and message in capsys.readouterr().err


@pytest.mark.slow
def test_lora_adapter_output_loads_with_plain_peft(tiny_model_path, prompts_file, tmp_path):
    _fit(tiny_model_path, prompts_file, str(tmp_path), "--trainer.max_epochs=1")
    out = tmp_path / "out"
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    code = (
        "import sys, torch; from transformers import AutoModelForCausalLM, AutoTokenizer; from peft import PeftModel;"
        f"base = AutoModelForCausalLM.from_pretrained({tiny_model_path!r});"
        f"m = PeftModel.from_pretrained(base, {str(out)!r}); t = AutoTokenizer.from_pretrained({str(out)!r});"
        "ids = t('abcd=', return_tensors='pt').input_ids; m(ids);"
        "assert not any(k.startswith('sharpening') for k in sys.modules); print('ok')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("ok")


def test_full_finetuning_output_is_a_plain_transformers_directory(tiny_model_path, prompts_file, tmp_path):
    _fit(
        tiny_model_path,
        prompts_file,
        str(tmp_path),
        "--trainer.max_epochs=1",
        "--model.init_args.policy.finetuning=full",
    )
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    changed = [not torch.equal(a, b) for a, b in zip(trained.parameters(), base.parameters())]
    assert any(changed)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("--verifier.sampling.samples_per_prompt=0", "--verifier.sampling.samples_per_prompt=0"),
        ("--verifier.sampling.max_new_tokens=0", "--verifier.sampling.max_new_tokens=0"),
        ("--model.init_args.policy.model_name_or_path=./no/such/model", "no such directory"),
        ("--data.dataset=./missing.jsonl", "file not found"),
        ("--data.prompt_column=question", "no such column"),
        ("--model.init_args.policy.lora_r=0", "--model.policy.lora_r=0"),
    ],
)
def test_bad_input_fails_before_weights_load(override, fragment, tiny_model_path, prompts_file, tmp_path, monkeypatch):
    import sharpening.policy as policy

    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded before the configuration was checked")

    monkeypatch.setattr(policy, "load_policy", no_weights)
    monkeypatch.setattr("sharpening.module.load_policy", no_weights)
    with pytest.raises((ConfigError, SystemExit, ValueError)) as err:
        _fit(tiny_model_path, prompts_file, str(tmp_path), override)
    text = str(err.value) + str(getattr(err.value, "__context__", ""))
    assert fragment in text or isinstance(err.value, SystemExit)


def test_existing_output_dir_is_not_overwritten(tiny_model_path, prompts_file, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises((ConfigError, SystemExit, ValueError)):
        _fit(tiny_model_path, prompts_file, str(tmp_path))
    assert (out / "mine.txt").read_text() == "keep me"
    assert sorted(os.listdir(out)) == ["mine.txt"]


@pytest.mark.slow
def test_a_run_started_over_replaces_the_old_output_and_config(tiny_model_path, prompts_file, tmp_path):
    """--overwrite_run and --model.overwrite_output_dir: the new run's config.yaml replaces the old one (no
    crash in Lightning's SaveConfigCallback), and the output holds only the new policy's files (no earlier
    LoRA adapter beside new full weights, which transformers would load on top of them)."""
    _fit(tiny_model_path, prompts_file, str(tmp_path), "--trainer.max_epochs=1")
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    _fit(
        tiny_model_path,
        prompts_file,
        str(tmp_path),
        "--trainer.max_epochs=1",
        "--overwrite_run=true",
        "--model.init_args.policy.finetuning=full",
        "--model.init_args.overwrite_output_dir=true",
    )
    files = sorted(os.listdir(tmp_path / "out"))
    assert "model.safetensors" in files and not [f for f in files if f.startswith("adapter")], files
    assert "finetuning: full" in (tmp_path / "config.yaml").read_text()
    assert not [f for f in os.listdir(tmp_path) if f.endswith((".partial", ".previous"))]


@pytest.mark.slow
def test_callback_metrics_logged_each_round(tiny_model_path, prompts_file, tmp_path):
    cli = _fit(tiny_model_path, prompts_file, str(tmp_path))
    verifier = verifier_callback(cli.trainer)
    assert verifier.rounds_done == 2  # one round per epoch with resample_every_epoch
    scores = [e.score for e in verifier.buffer.examples]
    metrics = verifier.last_metrics
    assert metrics["sample/self_reward_selected_mean"] == pytest.approx(sum(scores) / len(scores), rel=1e-5)
    assert metrics["sample/selected_minus_random"] >= 0
    assert 0.0 <= metrics["sample/accuracy"] <= 1.0
    assert json.dumps(metrics)


@pytest.mark.slow
def test_round_metrics_can_be_monitored(tiny_model_path, prompts_file, tmp_path):
    """ModelCheckpoint (and EarlyStopping) can monitor a round's metrics, e.g. the sample accuracy."""
    cli = _fit(
        tiny_model_path,
        prompts_file,
        str(tmp_path),
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        "--trainer.callbacks.monitor=sample/accuracy",
        "--trainer.callbacks.mode=max",
        f"--trainer.callbacks.dirpath={tmp_path}/best",
    )
    verifier = verifier_callback(cli.trainer)
    assert float(cli.trainer.callback_metrics["sample/accuracy"]) == pytest.approx(
        verifier.last_metrics["sample/accuracy"]
    )
    best = [c for c in cli.trainer.callbacks if type(c).__name__ == "ModelCheckpoint" and c.monitor][0]
    assert best.best_model_path and best.best_model_score is not None


def test_only_fit_is_offered_and_help_shows_the_config_docs(capsys):
    with pytest.raises(ConfigError, match="invalid choice: 'validate'"):
        main(["validate", "--config", os.path.join(ROOT, "configs", "demo.yaml")])  # no validation_step to run
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    out = capsys.readouterr().out
    assert "draws exactly from the model" in out  # SamplingConfig.temperature's docstring


@pytest.mark.parametrize("module", ["SFTSharpeningModule", "RLSharpeningModule"])
def test_a_config_without_an_optimizer_section_uses_the_modules_default(
    module, tiny_model_path, prompts_file, tmp_path
):
    """jsonargparse passes None for a parameter the subclass forwards to PolicyModule: the module's own
    default must apply (RL: lr 1e-5, constant), not a crash."""
    config = tmp_path / "minimal.yaml"
    config.write_text(
        f"model:\n  class_path: sharpening.{module}\n  init_args:\n    policy:\n"
        f"      model_name_or_path: {tiny_model_path}\n"
        f"data:\n  dataset: {prompts_file}\n  max_prompts: 4\n"
    )
    rl = module.startswith("RL")
    extra = (
        ["--model.init_args.sampling.samples_per_prompt=2", "--model.init_args.sampling.max_new_tokens=4"]
        if rl
        else [
            "--verifier.sampling.max_new_tokens=4",
            "--verifier.selection.truncated=keep",
            "--verifier.show_progress=false",
        ]
    )
    cli = main(["fit", "--config", str(config), "--trainer.fast_dev_run=1", "--trainer.logger=false",
                "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}", *extra])  # fmt: skip
    assert cli.trainer.global_step >= 1
    want = (1e-5, "constant") if rl else (3e-4, "linear")
    assert (cli.model.optimizer_config.lr, cli.model.optimizer_config.schedule) == want


def test_the_modules_pickle_for_ddp_spawn(tiny_model_path):
    import pickle

    from sharpening import PolicyConfig, RLConfig, RLSharpeningModule, SFTSharpeningModule

    policy = PolicyConfig(model_name_or_path=tiny_model_path)
    for module in (SFTSharpeningModule(policy), RLSharpeningModule(policy, RLConfig(algorithm="offline"))):
        assert type(pickle.loads(pickle.dumps(module))) is type(module)


@pytest.mark.slow
def test_ckpt_path_last_without_a_root_dir_never_picks_another_run_below_it(
    tiny_model_path, prompts_file, tmp_path, monkeypatch
):
    other = tmp_path / "artifacts" / "runs" / "old" / "checkpoints"
    other.mkdir(parents=True)
    (other / "epoch=2-step=96.ckpt").write_bytes(b"another run's")
    monkeypatch.chdir(tmp_path)
    overrides = [o for o in tiny_overrides(tiny_model_path, prompts_file, str(tmp_path)) if "default_root_dir" not in o]
    cli = main(["fit", "--config", os.path.join(ROOT, "configs", "demo.yaml"), *overrides, "--trainer.max_epochs=1",
                "--ckpt_path=last"])  # fmt: skip
    assert cli.trainer.global_step >= 1  # a new run: nothing of the other one restored
    assert (other / "epoch=2-step=96.ckpt").read_bytes() == b"another run's"


@pytest.mark.slow
def test_round_metrics_stay_monitorable_after_a_mid_epoch_resume(tiny_model_path, prompts_file, tmp_path):
    """A resume that does not redraw the round (mid-epoch) still gives EarlyStopping its metric."""
    stopping = ["--trainer.callbacks+=lightning.pytorch.callbacks.EarlyStopping",
                "--trainer.callbacks.monitor=sample/accuracy", "--trainer.callbacks.mode=max",
                "--trainer.callbacks.patience=5"]  # fmt: skip
    every_step = ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                  f"--trainer.callbacks.dirpath={tmp_path}/steps", "--trainer.callbacks.every_n_train_steps=1",
                  "--trainer.callbacks.save_top_k=-1",
                  "--trainer.callbacks.filename={step}"]  # fmt: skip
    first = _fit(tiny_model_path, prompts_file, str(tmp_path / "first"), *stopping, *every_step)
    resumed = _fit(
        tiny_model_path, prompts_file, str(tmp_path / "again"), *stopping, f"--ckpt_path={tmp_path}/steps/step=1.ckpt"
    )
    assert resumed.trainer.global_step == first.trainer.global_step
    assert "sample/accuracy" in resumed.trainer.callback_metrics
