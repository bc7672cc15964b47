"""The checkpoint stage's pure parts: atomic writes."""

import doctest
import errno
import os

import pytest

import sharpening.checkpoint as checkpoint
from sharpening.checkpoint import DiskFullError, write_atomically


def test_doctests():
    result = doctest.testmod(checkpoint)
    assert result.attempted > 0 and result.failed == 0


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
