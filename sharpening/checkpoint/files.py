"""Files on disk whole or not at all: atomic writes (``write_atomically``), checksummed checkpoints
(``AtomicCheckpointIO``, Lightning's checkpoint IO), a full disk explained, and the leftovers of killed writes.

- A checkpoint is written beside its target and renamed into place, with its SHA-256 in ``<name>.ckpt.sha256``
  (``sha256sum -c`` reads it). Loading checks it: a flipped byte inside a weight still unpickles, so
  ``torch.load`` alone would hand back corrupted weights. A checkpoint without the file (another tool
  wrote it) loads with a warning.
- Hidden ``.<name>.<pid>.partial`` / ``.previous`` leftovers of killed writes are removed when the next run
  starts (a policy write killed between its two renames is left for the user to settle).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
from collections.abc import Callable, Iterator
from typing import IO

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn

from sharpening.errors import ConfigError

CHECKSUM_SUFFIX = ".sha256"
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


def hidden_name(path: str, kind: str = "partial") -> str:
    """The hidden ``.<name>.<pid>.<kind>`` beside ``path`` that a write to it goes through (``partial``) or moves
    the earlier file or directory aside to (``previous``): the pattern remove_leftovers recognises."""
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}.{os.getpid()}.{kind}")


@contextlib.contextmanager
def _written_beside(path: str, write: Callable[[IO], object], binary: bool) -> Iterator[str]:
    """``write(file)`` into the hidden ``.<name>.<pid>.partial`` beside ``path``, flushed and fsync'd; yields
    its name for the caller to rename, and removes it on the way out if it is still there (an error)."""
    temporary = hidden_name(path)
    try:
        with open(temporary, "wb") if binary else open(temporary, "w", newline="") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        yield temporary
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)


def write_atomically(path: str, write: Callable[[IO], object], binary: bool = False, what: str | None = None) -> str:
    """Write ``path`` whole or not at all: ``write(file)`` fills a temporary file in the same directory (text,
    newlines written as given, as the csv module wants; or ``binary``), which is flushed to disk and renamed
    over ``path`` (``os.replace`` is atomic on one filesystem). A reader, or a run killed mid-write, sees the
    earlier file or the new one; a full disk raises DiskFullError (``what`` names the write) and keeps the
    earlier file. Returns ``path``.

    >>> import tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "notes.txt")
    >>> os.path.basename(write_atomically(path, lambda f: f.write("sharp\\n")))
    'notes.txt'
    >>> open(path).read(), os.listdir(os.path.dirname(path))
    ('sharp\\n', ['notes.txt'])
    """
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    with disk_full_explained(directory, what or f"writing {path!r}"), _written_beside(path, write, binary) as temporary:
        os.replace(temporary, path)
    return path


class _HashingWriter:
    """A write-only file that feeds what passes through it to ``sha256`` (torch.save streams its archive in order)."""

    def __init__(self, file, sha256) -> None:
        self.file, self.sha256 = file, sha256

    def write(self, data) -> int:
        self.sha256.update(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


def write_checkpoint(checkpoint: dict, path: str) -> None:
    """``torch.save`` to ``path`` whole or not at all, then its checksum. Both are written before either is
    renamed into place; the old checksum goes first and the new one comes last, so a process killed in
    between leaves a checkpoint without one, never a mismatch."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    sidecar = path + CHECKSUM_SUFFIX
    sha256 = hashlib.sha256()

    def save(f) -> None:
        torch.save(checkpoint, _HashingWriter(f, sha256))

    def record_checksum(f) -> None:  # runs after save: the checkpoint's bytes are all hashed
        f.write(f"{sha256.hexdigest()}  {os.path.basename(path)}\n")

    with (
        disk_full_explained(directory, f"writing checkpoint {path!r}"),
        _written_beside(path, save, binary=True) as temporary,
        _written_beside(sidecar, record_checksum, binary=False) as temporary_sidecar,
    ):
        with contextlib.suppress(FileNotFoundError):
            os.remove(sidecar)
        os.replace(temporary, path)
        os.replace(temporary_sidecar, sidecar)


def remove_checksum(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.fspath(path) + CHECKSUM_SUFFIX)


def checksum_problem(path: str, option: str = "--ckpt_path") -> str | None:
    """Why the checkpoint at ``path`` is corrupted (its bytes differ from its recorded SHA-256), or None.
    Warns when it has no checksum file. A symlink (``save_last="link"``) is checked through its target's."""
    path = os.fspath(path)
    candidates = (path + CHECKSUM_SUFFIX, os.path.realpath(path) + CHECKSUM_SUFFIX)
    sidecar = next((s for s in candidates if os.path.isfile(s)), None)
    if sidecar is None:
        rank_zero_warn(f"{option}={path!r} has no checksum file ({candidates[0]}): loading it unchecked for corruption")
        return None
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    if key in _VERIFIED:  # the resume check and the checkpoint IO read one file: hashed once
        return None
    with open(sidecar) as f:
        expected = f.read().split(" ", 1)[0].strip()
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


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints appear whole or not at all: written to a hidden temporary file in the SAME directory,
    flushed to disk, then renamed over the target (``os.replace`` is atomic on one filesystem). A process
    killed while saving, or a full disk, leaves the previous checkpoint in place, and no partial ``*.ckpt``.
    Each checkpoint gets its SHA-256 beside it, checked when it loads."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        write_checkpoint(checkpoint, os.fspath(path))

    def load_checkpoint(self, path, *args, **kwargs):
        verify_checkpoint(path, "--ckpt_path")
        return super().load_checkpoint(path, *args, **kwargs)

    def remove_checkpoint(self, path) -> None:
        super().remove_checkpoint(path)
        remove_checksum(path)


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
        for name, match in leftovers(directory):
            if match["kind"] == "partial" and match["name"].endswith((".ckpt", ".ckpt" + CHECKSUM_SUFFIX)):
                os.remove(os.path.join(directory, name))
                rank_zero_warn(f"removed {os.path.join(directory, name)}, left by a checkpoint write that was killed")
    if not output_dir:
        return
    output_dir = os.path.abspath(os.path.expanduser(output_dir))
    parent, own = os.path.split(output_dir)
    for name, match in list(leftovers(parent)):
        if match["name"] != own or (match["kind"] == "previous" and not os.path.lexists(output_dir)):
            continue
        path = os.path.join(parent, name)
        shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
        rank_zero_warn(f"removed {path}, left by a policy write that was killed")


def leftovers(directory: str):
    """(name, match) of this module's and save_policy's hidden leftovers whose process is gone."""
    names = os.listdir(directory) if os.path.isdir(directory) else []
    for name in names:
        match = _LEFTOVER.fullmatch(name)
        if match and not pid_alive(int(match["pid"])):
            yield name, match
