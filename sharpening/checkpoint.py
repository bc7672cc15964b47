"""The run's files on disk: checksummed atomic checkpoints, the lock a run holds on its directories,
leftovers of killed writes, and the directories the policy must never be written over.

- A checkpoint is written beside its target and renamed into place, with its SHA-256 in ``<name>.ckpt.sha256``
  (``sha256sum -c`` reads it). Loading checks it: a flipped byte inside a weight still unpickles, so
  ``torch.load`` alone would hand back corrupted weights. A checkpoint without the file (another tool
  wrote it) loads with a warning.
- A run holds ``<default_root_dir>/.sharpen.lock`` and ``.<output_dir name>.sharpen.lock`` beside its output
  directory: a second run into either is refused, naming the holder; a dead holder's lock is taken over.
- Hidden ``.<name>.<pid>.partial`` / ``.previous`` leftovers of killed writes are removed when the next run
  starts (a policy write killed between its two renames is left for the user to settle).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import time

import torch
from lightning.pytorch.utilities import rank_zero_warn

from sharpening.errors import ConfigError, unwritable_directory_problem

CHECKSUM_SUFFIX = ".sha256"
RUN_LOCK = ".sharpen.lock"
_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)\.(?P<kind>partial|previous)")
_VERIFIED: set[tuple] = set()  # (real path, size, mtime) of checkpoints whose checksum matched


class DiskFullError(RuntimeError):
    """A write ran out of disk space or quota; the files it would have replaced are kept."""


@contextlib.contextmanager
def disk_full_explained(directory: str, what: str):
    """Turn ENOSPC / EDQUOT inside the block into a DiskFullError naming ``directory`` and its free space."""
    try:
        yield
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        free = shutil.disk_usage(directory).free if os.path.isdir(directory) else 0
        raise DiskFullError(
            f"{what}: no space left in {directory!r} ({free / 2**20:.1f} MiB free; {err.strerror}). Nothing was "
            "replaced: the earlier files there are intact. Free space there or choose a directory on another disk"
        ) from err


def _partial(path: str) -> str:
    """The hidden name a write to ``path`` goes through (the pattern remove_leftovers recognises)."""
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}.{os.getpid()}.partial")


class _HashingWriter:
    """A write-only file that hashes what passes through it (torch.save streams its archive in order)."""

    def __init__(self, file) -> None:
        self.file, self.sha256 = file, hashlib.sha256()

    def write(self, data) -> int:
        self.sha256.update(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


def write_checkpoint(checkpoint: dict, path: str) -> None:
    """``torch.save`` to ``path`` whole or not at all, then its checksum. The old checksum goes first and the
    new one comes last, so a process killed in between leaves a checkpoint without one, never a mismatch."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    sidecar = path + CHECKSUM_SUFFIX
    temporary, temporary_sidecar = _partial(path), _partial(sidecar)
    try:
        with disk_full_explained(directory, f"writing checkpoint {path!r}"):
            with open(temporary, "wb") as f:
                writer = _HashingWriter(f)
                torch.save(checkpoint, writer)
                f.flush()
                os.fsync(f.fileno())
            with open(temporary_sidecar, "w") as f:
                f.write(f"{writer.sha256.hexdigest()}  {os.path.basename(path)}\n")
                f.flush()
                os.fsync(f.fileno())
        with contextlib.suppress(FileNotFoundError):
            os.remove(sidecar)
        os.replace(temporary, path)
        os.replace(temporary_sidecar, sidecar)
    finally:
        for leftover in (temporary, temporary_sidecar):
            with contextlib.suppress(FileNotFoundError):
                os.remove(leftover)


def remove_checksum(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.fspath(path) + CHECKSUM_SUFFIX)


def checksum_problem(path: str, option: str = "--ckpt_path") -> str | None:
    """Why the checkpoint at ``path`` is corrupted (its bytes differ from its recorded SHA-256), or None.
    Warns when it has no checksum file. ``ckpt`` symlinks are checked through the file they point to."""
    path = os.fspath(path)
    sidecar = next((s for s in (path + CHECKSUM_SUFFIX, os.path.realpath(path) + CHECKSUM_SUFFIX) if os.path.isfile(s)), None)
    if sidecar is None:
        rank_zero_warn(f"{option}={path!r} has no checksum file ({path}{CHECKSUM_SUFFIX}): loading it unchecked for corruption")
        return None
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    with open(sidecar) as f:
        expected = f.read().split(" ", 1)[0].strip()
    if key in _VERIFIED:
        return None
    with open(path, "rb") as f:
        actual = hashlib.file_digest(f, "sha256").hexdigest()
    if actual != expected:
        return (
            f"{option}={path!r} is corrupted: its SHA-256 is {actual[:16]}..., but {sidecar!r} recorded "
            f"{expected[:16]}... when it was written (a disk or copy error changed it). Resume from another "
            "checkpoint, or copy it again from where it came from"
        )
    _VERIFIED.add(key)
    return None


def verify_checkpoint(path, option: str = "checkpoint_path") -> None:
    """Raise a ConfigError when the local checkpoint at ``path`` fails its checksum."""
    if isinstance(path, (str, os.PathLike)) and os.path.isfile(path):
        problem = checksum_problem(os.fspath(path), option)
        if problem:
            raise ConfigError([problem])


def output_dir_problems(output_dir: str, protected: list[tuple[str, str, str, bool]]) -> list[str]:
    """Why writing the policy to ``output_dir`` (which replaces that whole directory) would destroy a path
    in ``protected``: (what it is, its path, the option it comes from, whether output_dir may sit inside
    it). Real paths are compared (symlinks, ``..``, ``~``)."""
    out = _real(output_dir)
    for what, path, source, may_hold_output in protected:  # the first reason is enough
        other = _real(path)
        if out == other:
            relation = "is"
        elif _inside(other, out):
            relation = "contains"
        elif _inside(out, other) and not may_hold_output:
            relation = "is inside"
        else:
            continue
        return [
            f"--model.output_dir={output_dir!r} {relation} {what} {path!r} (from {source}): the policy is written by "
            "replacing output_dir with everything in it, whatever --model.overwrite_output_dir says. "
            "Choose a directory of its own, e.g. <default_root_dir>/policy"
        ]
    return []


def run_directory_problems(trainer, output_dir: str | None, dataset: str | None, ckpt_path: str | None) -> list[str]:
    """An unwritable run directory, and an output_dir whose writing would destroy what the run reads or
    keeps: the prompts, the checkpoint to resume, this run's directory, checkpoints and logs (PolicyModule
    checks the base model). output_dir may sit inside default_root_dir (``runs/x/policy``), not in its
    checkpoints or logs."""
    root = trainer.default_root_dir
    problems = [unwritable_directory_problem("--trainer.default_root_dir", root)]
    problems += [unwritable_directory_problem("--trainer.callbacks ModelCheckpoint dirpath", d) for d in _checkpoint_dirpaths(trainer)]
    problems = [p for p in problems if p]
    if not output_dir:
        return problems
    problems += interrupted_write_problems(output_dir)
    protected = [
        ("the run directory", root, "--trainer.default_root_dir", True),
        ("the run's checkpoints", os.path.join(root, "checkpoints"), "--trainer.default_root_dir", False),
        *(("a run's logs", logs, "--trainer.default_root_dir", False) for logs in glob.glob(os.path.join(root, "*", "version_*"))),
        *(("the checkpoint directory", d, "--trainer.callbacks ModelCheckpoint dirpath", False) for d in _checkpoint_dirpaths(trainer)),
    ]
    for logger in trainer.loggers:  # Lightning's file loggers write to <save_dir>/<name>/version_<n>
        logs = logger.root_dir if logger.root_dir and _real(logger.root_dir) != _real(root) else logger.log_dir
        if logs:
            protected.append(("the run's logs", logs, "--trainer.logger", False))
    if dataset and os.path.exists(os.path.expanduser(dataset)):
        protected.append(("the training prompts", dataset, "--data.dataset", False))
    if ckpt_path and os.path.isfile(ckpt_path):
        protected.append(("the checkpoint to resume", ckpt_path, "--ckpt_path", False))
    return problems + output_dir_problems(output_dir, protected)


def interrupted_write_problems(output_dir: str) -> list[str]:
    """A policy write killed between its two renames leaves output_dir missing and the earlier policy in
    ``.<name>.<pid>.previous`` (the new one in ``.partial``): which to keep is the user's choice."""
    parent, own = os.path.split(os.path.abspath(os.path.expanduser(output_dir)))
    if os.path.lexists(os.path.join(parent, own)):
        return []
    kept = sorted(name for name, match in _leftovers(parent) if match["name"] == own and match["kind"] == "previous")
    return [
        f"--model.output_dir={output_dir!r} is missing, and {os.path.join(parent, name)!r} holds the policy that a killed "
        f"run was replacing (its new one, if written whole, is in the .partial beside it): rename the one to keep "
        "to output_dir and delete the other, or choose another output_dir"
        for name in kept
    ]


def run_checkpoint_dirs(trainer) -> list[str]:
    """Where this run's checkpoints may be: <root>/checkpoints, a logger's version_*/checkpoints, and the
    directory of a ModelCheckpoint that names one."""
    root = trainer.default_root_dir
    found = [os.path.join(root, "checkpoints"), *glob.glob(os.path.join(root, "*", "version_*", "checkpoints"))]
    return found + _checkpoint_dirpaths(trainer)


def _checkpoint_dirpaths(trainer) -> list[str]:
    return [os.fspath(c.dirpath) for c in trainer.checkpoint_callbacks if getattr(c, "dirpath", None)]


def _real(path: str) -> str:
    return os.path.realpath(os.path.expanduser(path))


def _inside(path: str, directory: str) -> bool:
    return path != directory and os.path.commonpath([path, directory]) == directory


def is_launching_process() -> bool:
    """Whether this process is the one that holds the run's directories: global rank 0. Under torchrun,
    SLURM or Lightning's relaunch of the command for ranks > 0 every rank runs the CLI, with its rank in
    the environment; ddp_spawn's workers start inside fit and never run the CLI."""
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if os.environ.get(key):
            if int(os.environ[key]) != 0:
                return False
            break
    return all(int(os.environ.get(key) or 0) == 0 for key in ("NODE_RANK", "GROUP_RANK"))


def output_lock_path(output_dir: str) -> str:
    """Beside output_dir, not in it: writing the policy replaces the directory."""
    parent, name = os.path.split(os.path.abspath(os.path.expanduser(output_dir)))
    return os.path.join(parent, f".{name}{RUN_LOCK}")


@contextlib.contextmanager
def holding_run_directories(root: str, output_dir: str | None, checkpoint_dirs: list[str]):
    """Hold the run's locks for the block (released on any exit) and clear leftovers of killed writes.
    Only the launching process does it; the other ranks run under its lock."""
    if not is_launching_process():
        yield
        return
    held = []
    try:
        held.append(take_lock(os.path.join(root, RUN_LOCK), f"--trainer.default_root_dir={root!r}"))
        if output_dir:
            held.append(take_lock(output_lock_path(output_dir), f"--model.output_dir={output_dir!r}"))
        remove_leftovers(checkpoint_dirs, output_dir)
        yield
    finally:
        for path, record in held:
            release_lock(path, record)


def take_lock(path: str, what: str) -> tuple[str, str]:
    """Create the lock file at ``path`` (O_CREAT|O_EXCL: one run wins) holding this process's pid, host,
    start time and command; take over a lock whose holder died on this host. Returns (path, record)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    record = json.dumps({
        "pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "time": time.time(), "command": " ".join(sys.argv),
    })
    for _ in range(3):  # a holder can release or die between our attempts
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_lock(path)
            if holder is None:
                continue  # released meanwhile
            if not _held_by_dead_process(holder) or not _take_over(path, holder):
                raise ConfigError([_in_use_problem(what, path, holder)]) from None
            rank_zero_warn(f"{what}: took over the lock {path} of a run that is no longer running ({holder['text']})")
            continue
        with os.fdopen(fd, "w") as f:
            f.write(record)
        return path, record
    raise ConfigError([_in_use_problem(what, path, _read_lock(path) or {"text": "unknown"})])


def release_lock(path: str, record: str) -> None:
    """Remove the lock at ``path`` if it is still the one this run wrote."""
    holder = _read_lock(path)
    if holder is not None and holder["text"] == record:
        os.remove(path)


def _read_lock(path: str) -> dict | None:
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return None
    try:
        fields = json.loads(text)
    except ValueError:  # being written this instant, or not ours: never taken over
        fields = {}
    return {**(fields if isinstance(fields, dict) else {}), "text": text}


def _held_by_dead_process(holder: dict) -> bool:
    pid = holder.get("pid")
    return holder.get("host") == socket.gethostname() and isinstance(pid, int) and not pid_alive(pid)


def _take_over(path: str, holder: dict) -> bool:
    """Move the dead holder's lock aside and check it is the one read: another run taking it over at the
    same moment may have replaced it, and then that run keeps it."""
    aside = f"{path}.{os.getpid()}.stale"
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return True
    moved = _read_lock(aside)
    if moved is not None and moved["text"] != holder["text"]:
        with contextlib.suppress(FileExistsError):
            os.link(aside, path)  # give it back
        os.remove(aside)
        return False
    os.remove(aside)
    return True


def _in_use_problem(what: str, path: str, holder: dict) -> str:
    fields = {k: holder.get(k, "?") for k in ("pid", "host", "started", "command")}
    return (
        f"{what} is in use by another run (pid {fields['pid']} on {fields['host']}, started {fields['started']}: "
        f"{fields['command']}); its lock is {path}. Wait for that run to end or choose another directory; "
        "if that run is gone (on another host), delete the lock file"
    )


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_leftovers(checkpoint_dirs: list[str], output_dir: str | None) -> None:
    """Remove what a killed write left: ``.<name>.ckpt[.sha256].<pid>.partial`` files in the checkpoint
    directories and ``.<output name>.<pid>.partial`` / ``.previous`` directories beside output_dir, only when
    that pid is not running. A ``.previous`` is removed only beside an existing output_dir (the write got
    past its swap); without one the CLI refuses to start (``interrupted_write_problems``)."""
    for directory in checkpoint_dirs:
        for name, match in _leftovers(directory):
            if match["kind"] == "partial" and match["name"].endswith((".ckpt", ".ckpt" + CHECKSUM_SUFFIX)):
                os.remove(os.path.join(directory, name))
                rank_zero_warn(f"removed {os.path.join(directory, name)}, left by a checkpoint write that was killed")
    if not output_dir:
        return
    output_dir = os.path.abspath(os.path.expanduser(output_dir))
    parent, own = os.path.split(output_dir)
    for name, match in list(_leftovers(parent)):
        if match["name"] != own or (match["kind"] == "previous" and not os.path.lexists(output_dir)):
            continue
        path = os.path.join(parent, name)
        shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
        rank_zero_warn(f"removed {path}, left by a policy write that was killed")


def _leftovers(directory: str):
    """(name, match) of this module's and save_policy's hidden leftovers whose process is gone."""
    names = os.listdir(directory) if os.path.isdir(directory) else []
    for name in names:
        match = _LEFTOVER.fullmatch(name)
        if match and not pid_alive(int(match["pid"])):
            yield name, match
