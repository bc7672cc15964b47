"""The checkpoint stage's pure parts: atomic writes, trainable-only state, the resume lookup."""

import errno
import os

import pytest
import torch

import sharpening.checkpoint.files as checkpoint
from sharpening.checkpoint import (
    DiskFullError,
    last_checkpoint,
    load_trainable_state,
    only_trainable,
    run_checkpoints,
    trainable_state_dict,
    write_atomically,
)


def test_write_goes_through_a_hidden_partial_file_that_is_fsynced_then_renamed(tmp_path, monkeypatch):
    target = tmp_path / "results.json"
    target.write_text("earlier")
    seen, synced = [], []
    real_fsync = os.fsync
    monkeypatch.setattr(checkpoint.os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))

    def write(f):
        f.write("new")
        seen.append((sorted(os.listdir(tmp_path)), target.read_text()))

    assert write_atomically(str(target), write) == str(target)
    assert seen == [(sorted([f".results.json.{os.getpid()}.partial", "results.json"]), "earlier")]
    assert synced and target.read_text() == "new" and os.listdir(tmp_path) == ["results.json"]


def test_binary_writes_bytes_and_text_keeps_newlines_as_written(tmp_path):
    write_atomically(str(tmp_path / "a.bin"), lambda f: f.write(b"\x00\xff"), binary=True)
    write_atomically(str(tmp_path / "b.csv"), lambda f: f.write("x\r\ny\n"))
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\xff"
    assert (tmp_path / "b.csv").read_bytes() == b"x\r\ny\n"


def test_a_full_disk_keeps_the_earlier_file_and_leaves_nothing_behind(tmp_path):
    target = tmp_path / "cache.safetensors"
    target.write_bytes(b"earlier")

    def fills_up(f):
        f.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFullError) as err:
        write_atomically(str(target), fills_up, binary=True, what="writing the draw cache")
    assert "writing the draw cache" in str(err.value) and str(tmp_path) in str(err.value)
    assert target.read_bytes() == b"earlier" and os.listdir(tmp_path) == [target.name]


def test_other_errors_pass_through_and_leave_nothing_behind(tmp_path):
    def fails(f):
        f.write("{")
        raise ValueError("not serialisable")

    with pytest.raises(ValueError, match="not serialisable"):
        write_atomically(str(tmp_path / "r.json"), fails)
    assert os.listdir(tmp_path) == []


def _half_frozen() -> torch.nn.Module:
    module = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    module[0].requires_grad_(False)  # the frozen base; module[1] trains (the adapter)
    return module


def test_a_checkpoint_state_holds_the_trainable_parameters_only():
    module = _half_frozen()
    state = trainable_state_dict(module, prefix="m.")
    assert list(state) == ["m.1.weight", "m.1.bias"] and not state["m.1.weight"].requires_grad
    assert trainable_state_dict(module, keep_vars=True)["1.weight"] is module[1].weight
    assert list(only_trainable(module.state_dict(), module)) == ["1.weight", "1.bias"]


def test_loading_copies_trainable_weights_in_place_and_refuses_another_model_when_strict():
    module, source = _half_frozen(), _half_frozen()
    frozen_before = module[0].weight.clone()
    weight = module[1].weight
    load_trainable_state(module, trainable_state_dict(source), strict=True, model="tiny")
    assert module[1].weight is weight and torch.equal(weight, source[1].weight)  # copied into the same tensor
    result = load_trainable_state(module, source.state_dict(), strict=False, model="tiny")
    assert torch.equal(module[0].weight, frozen_before)  # the checkpoint's frozen entries are ignored
    assert result.missing_keys == [] and result.unexpected_keys == ["0.bias", "0.weight"]
    with pytest.raises(RuntimeError, match=r"unexpected \['0.bias', '0.weight'\]"):
        load_trainable_state(module, source.state_dict(), strict=True, model="tiny")
    with pytest.raises(RuntimeError, match=r"does not fit this model \(tiny\): missing \['1.bias'\]"):
        load_trainable_state(module, {"1.weight": source[1].weight}, strict=True, model="tiny")
    assert load_trainable_state(module, {}, strict=False, model="tiny").missing_keys == ["1.bias", "1.weight"]


def test_last_is_the_newest_checkpoint_of_any_logger_version_else_one_under_the_run(tmp_path):
    older = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "epoch=0.ckpt"
    newer = tmp_path / "checkpoints" / "epoch=1.ckpt"
    own = tmp_path / "elsewhere" / "deep" / "mine.ckpt"
    for i, path in enumerate((older, newer, own)):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"x")
        os.utime(path, (1000 + i, 1000 + i))
    assert run_checkpoints(str(tmp_path)) == [str(older), str(newer)]  # a dirpath of its own is no run layout
    assert last_checkpoint(str(tmp_path)) == str(newer)
    newer.unlink(), older.unlink()
    assert last_checkpoint(str(tmp_path)) == str(own)
    assert last_checkpoint(str(tmp_path / "empty")) is None
