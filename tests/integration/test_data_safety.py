"""Nothing a user made is deleted or overwritten: output_dir never replaces the model, the prompts or the
run's checkpoints and logs; a second run into held directories is refused; corrupted checkpoints are
refused; leftovers of killed writes are cleared; a full disk keeps the last good files."""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from sharpening.checkpoint import AtomicCheckpointIO, DiskFullError, resume_problems, save_policy
from sharpening.cli import main
from sharpening.errors import ConfigError
from sharpening.module import PolicyModule
from sharpening.run_directories import (
    RUN_LOCK,
    holding_run_directories,
    is_launching_process,
    output_dir_problems,
    output_lock_path,
    run_directory_problems,
)
from tests.helpers import REPO_ROOT

ROOT = str(REPO_ROOT)
SFT = os.path.join(ROOT, "configs", "demo.yaml")


def _args(model, prompts, root, out, *extra):
    return [
        "fit", "--config", SFT, f"--model.init_args.policy.model_name_or_path={model}",
        "--model.init_args.policy.finetuning=lora", "--model.init_args.policy.lora_r=4",
        "--model.init_args.batch_size=2", f"--model.init_args.output_dir={out}", f"--data.dataset={prompts}",
        "--data.max_prompts=4",
        "--verifier.sampling.samples_per_prompt=2", "--verifier.sampling.max_new_tokens=4",
        "--verifier.selection.truncated=keep", "--verifier.show_progress=false", "--trainer.max_epochs=1",
        "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={root}", *extra,
    ]  # fmt: skip


def _files(*roots) -> dict[str, bytes]:
    """Every file under ``roots`` and its bytes."""
    found = {}
    for root in map(str, roots):
        for directory, _, names in os.walk(root):
            for name in names:
                path = os.path.join(directory, name)
                with open(path, "rb") as f:
                    found[path] = f.read()
    return found


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


@pytest.fixture
def no_weights(monkeypatch):
    monkeypatch.setattr("sharpening.module.load_policy", lambda *a, **k: pytest.fail("weights were loaded"))


# ---- output_dir never replaces what the run reads or keeps ----


def _demo_layout(tmp, model, prompts):
    """artifacts/demo: the base model and the prompts side by side, as the demo builds them."""
    shutil.copytree(model, tmp / "demo" / "base")
    shutil.copy(prompts, tmp / "demo" / "train.jsonl")
    (tmp / "runs" / "x" / "checkpoints").mkdir(parents=True)
    (tmp / "runs" / "x" / "checkpoints" / "epoch=0-step=2.ckpt").write_bytes(b"an earlier checkpoint")
    (tmp / "runs" / "x" / "lightning_logs" / "version_0").mkdir(parents=True)
    (tmp / "runs" / "x" / "lightning_logs" / "version_0" / "metrics.csv").write_text("step,loss\n0,1.0\n")
    (tmp / "link").symlink_to(tmp / "demo" / "base")
    return tmp / "demo" / "base", tmp / "demo" / "train.jsonl", tmp / "runs" / "x"


# (output_dir relative to tmp, fragment of the error)
OVERLAPS = [
    ("demo/base", "is the base model"),
    ("demo", "contains the base model"),
    ("demo", "contains the training prompts"),
    ("demo/base/sharpened", "is inside the base model"),
    ("link", "is the base model"),  # a symlink to it
    ("demo/../demo/base", "is the base model"),
    ("runs/x", "is the run directory"),
    ("runs", "contains the run directory"),
    ("runs/x/checkpoints", "is the run's checkpoints"),
    ("runs/x/checkpoints/policy", "is inside the run's checkpoints"),
    ("runs/x/lightning_logs/version_0", "is a run's logs"),
]


@pytest.mark.parametrize(("out", "fragment"), OVERLAPS, ids=[f"{o} {f}" for o, f in OVERLAPS])
def test_output_dir_over_the_model_prompts_or_run_is_refused_whatever_overwrite_says(
    out, fragment, tiny_model_path, prompts_file, tmp_path, no_weights
):
    model, prompts, root = _demo_layout(tmp_path, tiny_model_path, prompts_file)
    before = _files(tmp_path)
    with pytest.raises(ConfigError) as err:
        main(_args(model, prompts, root, tmp_path / out, "--model.init_args.overwrite_output_dir=true"))
    assert fragment in str(err.value) and f"--model.output_dir='{tmp_path / out}'" in str(err.value), str(err.value)
    assert _files(tmp_path) == before  # byte for byte, and nothing new


@pytest.mark.slow
def test_output_dir_inside_the_run_directory_is_the_shipped_layout(
    tiny_model_path, prompts_file, tmp_path, monkeypatch
):
    """configs/*.yaml write the policy to <default_root_dir>/adapter or /model: accepted."""
    model, prompts, root = _demo_layout(tmp_path, tiny_model_path, prompts_file)
    monkeypatch.setattr("sharpening.module.load_policy", _stop)
    with pytest.raises(_Stop):  # got past every check into fit
        main(_args(model, prompts, root, root / "adapter", "--overwrite_run=true"))


@pytest.mark.parametrize("config", sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))), ids=os.path.basename)
def test_the_shipped_configs_pass_the_directory_checks(config, tmp_path, monkeypatch):
    """Their relative paths, in an empty directory with the demo's artifacts built; demo.yaml and rl.yaml
    set no output_dir: their launch lines put it beside the demo's base model."""
    import lightning as L
    import yaml

    monkeypatch.chdir(tmp_path)
    (tmp_path / "artifacts" / "demo" / "base").mkdir(parents=True)
    (tmp_path / "artifacts" / "demo" / "train.jsonl").write_text("{}\n")
    with open(config) as f:
        settings = yaml.safe_load(f)
    root, model = (
        settings["trainer"]["default_root_dir"],
        settings["model"]["init_args"]["policy"]["model_name_or_path"],
    )
    output_dir = settings["model"]["init_args"].get("output_dir") or "artifacts/demo/my-run"
    trainer = L.Trainer(default_root_dir=root, logger=True, accelerator="cpu", enable_progress_bar=False)
    assert run_directory_problems(trainer, output_dir, settings["data"]["dataset"], None) == []
    assert (
        output_dir_problems(output_dir, [("the base model", model, "--model.policy.model_name_or_path", False)]) == []
    )


def test_the_logger_directory_is_protected(tiny_model_path, prompts_file, tmp_path, no_weights):
    root = tmp_path / "run"
    with pytest.raises(ConfigError, match="is the run's logs"):
        main([*_args(tiny_model_path, prompts_file, root, root / "lightning_logs"), "--trainer.logger=true"])


def test_read_only_run_directory_is_refused_before_loading(
    tiny_model_path, prompts_file, tmp_path, monkeypatch, no_weights
):
    root = tmp_path / "readonly"
    root.mkdir()
    (root / "notes.txt").write_text("mine")
    root.chmod(0o555)
    real_access = os.access  # root may write anywhere: the check sees what a normal user would
    monkeypatch.setattr(
        os, "access", lambda path, mode: False if str(path).startswith(str(root)) else real_access(path, mode)
    )
    try:
        with pytest.raises(ConfigError, match="default_root_dir=.*is not writable by this user") as err:
            main(_args(tiny_model_path, prompts_file, root / "run", tmp_path / "out"))
    finally:
        root.chmod(0o755)
    assert "--trainer.default_root_dir" in str(err.value)
    assert sorted(os.listdir(root)) == ["notes.txt"] and not (tmp_path / "out").exists()


def test_a_policy_write_killed_between_its_renames_is_left_to_the_user(
    tiny_model_path, prompts_file, tmp_path, no_weights
):
    pid = _dead_pid()
    (tmp_path / f".out.{pid}.previous").mkdir()
    (tmp_path / f".out.{pid}.previous" / "adapter_model.safetensors").write_bytes(b"the last policy")
    before = _files(tmp_path)
    with pytest.raises(ConfigError, match="holds the policy that a killed run was replacing"):
        main(_args(tiny_model_path, prompts_file, tmp_path / "run", tmp_path / "out"))
    assert _files(tmp_path) == before


# ---- one run at a time per directory ----


class _Stop(Exception):
    pass


def _stop(*args, **kwargs):
    raise _Stop


@pytest.mark.slow
def test_a_second_run_into_held_directories_is_refused(tiny_model_path, prompts_file, tmp_path, monkeypatch):
    """Run B starts while run A loads its weights: into A's root and output_dir, or only A's output_dir."""
    root, out = tmp_path / "run", tmp_path / "out"
    refused = {}

    def second_runs(*args, **kwargs):
        monkeypatch.setattr("sharpening.module.load_policy", _stop)  # B must not get this far
        held = json.loads((root / RUN_LOCK).read_text())
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
        for name, other_root in [("same root", root), ("same output_dir", tmp_path / "other")]:
            with pytest.raises(ConfigError) as err:
                main(_args(tiny_model_path, prompts_file, other_root, out))
            refused[name] = str(err.value)
        raise _Stop  # A fails too: its locks must still go

    monkeypatch.setattr("sharpening.module.load_policy", second_runs)
    with pytest.raises(_Stop):
        main(_args(tiny_model_path, prompts_file, root, out))
    assert f"pid {os.getpid()} on {socket.gethostname()}" in refused["same root"]
    assert f"its lock is {root / RUN_LOCK}" in refused["same root"]
    assert "--trainer.default_root_dir=" in refused["same root"]
    assert f"its lock is {output_lock_path(str(out))}" in refused["same output_dir"]
    assert "--model.output_dir=" in refused["same output_dir"]
    assert not (root / RUN_LOCK).exists() and not os.path.exists(output_lock_path(str(out)))  # released on error
    assert not (tmp_path / "other" / "config.yaml").exists()  # the refused run wrote nothing


def test_a_live_holder_on_this_host_keeps_its_lock(tiny_model_path, prompts_file, tmp_path, no_weights):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "run").mkdir()
        record = json.dumps({"pid": holder.pid, "host": socket.gethostname(), "started": "2024-05-01 09:00:00",
                             "command": "sharpen fit --config configs/demo.yaml"})  # fmt: skip
        (tmp_path / "run" / RUN_LOCK).write_text(record)
        with pytest.raises(ConfigError, match=f"pid {holder.pid} .*started 2024-05-01 09:00:00: sharpen fit"):
            main(_args(tiny_model_path, prompts_file, tmp_path / "run", tmp_path / "out"))
        assert (tmp_path / "run" / RUN_LOCK).read_text() == record
    finally:
        holder.kill()
        holder.wait()


def test_stale_lock_and_leftovers_of_killed_writes_are_cleared_by_the_next_run(
    tiny_model_path, prompts_file, tmp_path, monkeypatch
):
    root, out, dead = tmp_path / "run", tmp_path / "out", _dead_pid()
    (root / "checkpoints").mkdir(parents=True)
    (root / RUN_LOCK).write_text(
        json.dumps({"pid": dead, "host": socket.gethostname(), "started": "x", "command": "y"})
    )
    stale = [root / "checkpoints" / f".epoch=0-step=2.ckpt.{dead}.partial",
             root / "checkpoints" / f".epoch=0-step=2.ckpt.sha256.{dead}.partial",
             tmp_path / f".out.{dead}.partial"]  # fmt: skip
    kept = [root / "checkpoints" / f".epoch=0-step=2.ckpt.{os.getpid()}.partial",  # a live process's
            root / "checkpoints" / ".notes.partial", tmp_path / f".other.{dead}.partial"]  # not ours  # fmt: skip
    for path in stale + kept:
        path.write_bytes(b"partial")
    monkeypatch.setattr("sharpening.module.load_policy", _stop)
    with pytest.warns(UserWarning) as warned:
        with pytest.raises(_Stop):  # the run started: lock taken over, leftovers cleared
            main(_args(tiny_model_path, prompts_file, root, out, "--overwrite_run=true"))
    messages = " ".join(str(w.message) for w in warned)
    assert "took over the lock" in messages and f".out.{dead}.partial" in messages
    assert not any(p.exists() for p in stale), [p for p in stale if p.exists()]
    assert all(p.read_bytes() == b"partial" for p in kept)
    assert not (root / RUN_LOCK).exists()


def test_only_the_launching_process_holds_the_directories(tmp_path, monkeypatch):
    """Lightning relaunches the command for DDP ranks > 0 with LOCAL_RANK set; torchrun sets RANK."""
    variables = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK", "NODE_RANK", "GROUP_RANK")
    cases = [({}, True), ({"LOCAL_RANK": "0"}, True), ({"LOCAL_RANK": "1"}, False),
             ({"RANK": "2", "LOCAL_RANK": "0"}, False), ({"NODE_RANK": "1"}, False),
             ({"LOCAL_RANK": "0", "SLURM_PROCID": "1"}, True)]  # fmt: skip
    for environment, expected in cases:
        for variable in variables:
            monkeypatch.delenv(variable, raising=False)
        for variable, value in environment.items():
            monkeypatch.setenv(variable, value)
        assert is_launching_process() is expected, environment
    monkeypatch.setenv("RANK", "3")
    with holding_run_directories(str(tmp_path), str(tmp_path / "out"), []):
        assert os.listdir(tmp_path) == []  # no lock: rank 0 holds it


# ---- checksums ----


def _checkpoint_with_a_flipped_weight_byte(tmp_path):
    path = tmp_path / "ckpts" / "epoch=0-step=2.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.zeros(4096)}, "hyper_parameters": {}}, path)
    data = bytearray(path.read_bytes())
    data[data.index(bytes(4096)) + 100] = 0x40  # inside the tensor's bytes
    path.write_bytes(bytes(data))
    assert torch.load(path, weights_only=True)["state_dict"]["w"].abs().sum() > 0  # torch.load alone accepts it
    return path


def test_checkpoint_checksum_is_written_and_checked(tmp_path):
    path = tmp_path / "ckpts" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)
    digest, name = (tmp_path / "ckpts" / "last.ckpt.sha256").read_text().split()
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest() and name == "last.ckpt"  # sha256sum -c reads it
    assert torch.equal(io.load_checkpoint(path)["state_dict"]["w"], torch.ones(3))
    assert sorted(os.listdir(tmp_path / "ckpts")) == ["last.ckpt", "last.ckpt.sha256"]
    io.remove_checkpoint(path)
    assert os.listdir(tmp_path / "ckpts") == []


def test_corrupted_checkpoint_is_refused_on_every_load_path(tmp_path):
    path = _checkpoint_with_a_flipped_weight_byte(tmp_path)
    with pytest.raises(ConfigError, match="is corrupted") as err:
        AtomicCheckpointIO().load_checkpoint(path)
    assert str(path) in str(err.value)
    with pytest.raises(ConfigError, match="is corrupted"):
        PolicyModule.load_from_checkpoint(path)
    (problem,) = resume_problems(str(path), {"class_path": "sharpening.SFTSharpeningModule", "init_args": {}})
    assert problem.startswith(f"--ckpt_path={str(path)!r} is corrupted")


def test_resuming_a_corrupted_checkpoint_is_refused_before_loading(tiny_model_path, prompts_file, tmp_path, no_weights):
    path = _checkpoint_with_a_flipped_weight_byte(tmp_path)
    with pytest.raises(ConfigError, match="is corrupted"):
        main(_args(tiny_model_path, prompts_file, tmp_path / "run", tmp_path / "out", f"--ckpt_path={path}"))


def test_checkpoint_without_checksum_loads_with_a_warning(tmp_path):
    path = tmp_path / "other-tool.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, path)
    with pytest.warns(UserWarning, match="has no checksum file"):
        assert torch.equal(AtomicCheckpointIO().load_checkpoint(path)["state_dict"]["w"], torch.ones(2))


# ---- full disk ----


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_while_checkpointing_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpts" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)
    before = _files(tmp_path)

    def fills_up(obj, f, *args, **kwargs):
        f.write(b"the first bytes of the new checkpoint")
        _no_space()

    monkeypatch.setattr(torch, "save", fills_up)
    with pytest.raises(DiskFullError) as err:
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, path)
    assert f"writing checkpoint '{path}': no space left in '{tmp_path / 'ckpts'}' (" in str(err.value)
    assert "MiB free" in str(err.value)
    assert _files(tmp_path) == before  # no half-written last.ckpt, no hidden partial
    assert torch.equal(io.load_checkpoint(path)["state_dict"]["w"], torch.ones(3))


class _Saves:
    """A policy or tokenizer whose save_pretrained writes one file, or fills the disk half-way."""

    def __init__(self, name: str, full: bool = False) -> None:
        self.name, self.full = name, full

    def save_pretrained(self, directory, **kwargs) -> None:
        with open(os.path.join(directory, self.name), "wb") as f:
            f.write(b"new")
            if self.full:
                _no_space()


def test_full_disk_while_writing_the_policy_keeps_the_previous_one(tmp_path):
    out = tmp_path / "out"
    save_policy(_Saves("model.safetensors"), _Saves("tokenizer.json"), str(out))
    before = _files(tmp_path)
    with pytest.raises(DiskFullError) as err:
        save_policy(_Saves("model.safetensors", full=True), _Saves("tokenizer.json"), str(out))
    assert f"writing the policy to '{out}': no space left in '{tmp_path}'" in str(err.value)
    assert _files(tmp_path) == before and sorted(os.listdir(tmp_path)) == ["out"]


@pytest.mark.slow
def test_full_disk_during_training_stops_with_the_last_good_checkpoint(
    tiny_model_path, prompts_file, tmp_path, monkeypatch
):
    """The second epoch's checkpoint does not fit: the run stops naming the directory; the first one stays."""
    import sharpening.checkpoint.files as checkpoint

    real, saves = torch.save, []

    def second_fills_up(obj, f, *args, **kwargs):
        saves.append(isinstance(f, checkpoint._HashingWriter))  # a checkpoint, not another torch.save
        return real(obj, f, *args, **kwargs) if sum(saves) < 2 else _no_space()

    monkeypatch.setattr(checkpoint.torch, "save", second_fills_up)
    root = tmp_path / "run"
    with pytest.raises(DiskFullError) as err:
        main(_args(tiny_model_path, prompts_file, root, tmp_path / "out", "--trainer.max_epochs=2"))
    monkeypatch.undo()
    assert f"no space left in '{root / 'checkpoints'}'" in str(err.value)
    (first,) = (root / "checkpoints").glob("*.ckpt")
    assert sorted(os.listdir(root / "checkpoints")) == [first.name, first.name + ".sha256"]
    assert AtomicCheckpointIO().load_checkpoint(first)["epoch"] == 0
    assert not (tmp_path / "out").exists() and not (root / RUN_LOCK).exists()
