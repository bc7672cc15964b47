"""The directories a run reads and writes: what output_dir must never be written over, and the locks
a run holds on its directories.

- Writing the policy replaces output_dir with everything in it, so output_dir may not be, contain or sit
  inside the base model, the prompts, the checkpoint to resume, or the run's checkpoints and logs (it may
  sit inside default_root_dir: ``runs/x/adapter``). Real paths are compared. An unwritable default_root_dir
  is refused too, before anything loads.
- A run holds ``<default_root_dir>/.sharpen.lock`` and ``.<output_dir name>.sharpen.lock`` beside its output
  directory (beside: writing the policy replaces the directory): a second run into either is refused,
  naming the holder; a dead holder's lock is taken over. Only the launching process (global rank 0)
  holds them.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import socket
import sys
import time

from lightning.pytorch.utilities import rank_zero_warn

from sharpening.checkpoint import leftovers, pid_alive, remove_leftovers
from sharpening.errors import ConfigError, unwritable_directory_problem

RUN_LOCK = ".sharpen.lock"


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


def run_directory_problems(
    trainer, output_dir: str | None, dataset: str | None, ckpt_path: str | None, base_model: str | None = None
) -> list[str]:
    """An unwritable run or checkpoint directory, or one that is or lies inside the base model's (checkpoints
    among the model's files), and an output_dir whose writing would destroy what the run reads or keeps: the
    prompts, the checkpoint to resume, this run's directory, checkpoints and logs (PolicyModule checks the base
    model). output_dir may sit inside default_root_dir (``runs/x/policy``), not in its checkpoints or logs."""
    root, dirpaths = trainer.default_root_dir, _checkpoint_dirpaths(trainer)
    dirpath_option = "--trainer.callbacks ModelCheckpoint dirpath"
    problems = [unwritable_directory_problem("--trainer.default_root_dir", root)]
    base = _real(base_model) if base_model and os.path.isdir(os.path.expanduser(base_model)) else None
    for option, directory in [("--trainer.default_root_dir", root), *((dirpath_option, d) for d in dirpaths)]:
        if base and (_real(directory) == base or _inside(_real(directory), base)):
            relation = "is" if _real(directory) == base else "lies inside"
            problems.append(
                f"{option}={directory!r} {relation} the base model {base_model!r} "
                "(from --model.policy.model_name_or_path): the run would write its checkpoints among the model's "
                "files; choose a directory of its own, e.g. --trainer.default_root_dir runs/my-run"
            )
    problems = [p for p in problems + [unwritable_directory_problem(dirpath_option, d) for d in dirpaths] if p]
    if not output_dir:
        return problems
    problems += interrupted_write_problems(output_dir)
    protected = [
        ("the run directory", root, "--trainer.default_root_dir", True),
        ("the run's checkpoints", os.path.join(root, "checkpoints"), "--trainer.default_root_dir", False),
        *(("a run's logs", d, "--trainer.default_root_dir", False) for d in _logger_versions(root)),
        *(("the checkpoint directory", d, dirpath_option, False) for d in dirpaths),
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


RUN_CONFIG_HEADER = b"# lightning.pytorch=="  # the first line of the configuration a run writes (and --print_config)


def saved_config_problem(path: str, overwrite: bool, config_files: list[str]) -> str | None:
    """Why the run may not write its configuration to ``path`` (Lightning writes it at fit start). A file that
    does not start as a written configuration does, or that is a --config file of this command, is the user's
    own: never replaced, even with --overwrite_run. An earlier run's is replaced only when asked."""
    if not os.path.isfile(path):
        return None
    directory = os.path.dirname(path)
    given = [f for f in config_files if os.path.isfile(f) and os.path.samefile(f, path)]
    with open(path, "rb") as f:
        written_by_a_run = f.read(len(RUN_CONFIG_HEADER)) == RUN_CONFIG_HEADER
    if given or not written_by_a_run:
        what = "is your --config file" if given else "was not written by a run"
        return (
            f"--trainer.default_root_dir={directory!r}: the run writes its configuration to {path!r}, which {what}; "
            "it is never replaced. Choose a directory for the run, e.g. --trainer.default_root_dir runs/my-run"
        )
    if not overwrite:
        return (
            f"--trainer.default_root_dir={directory!r}: {path!r} holds an earlier run's configuration; choose a new "
            "directory, or pass --overwrite_run true to start over in this one"
        )
    return None


def interrupted_write_problems(output_dir: str) -> list[str]:
    """A policy write killed between its two renames leaves output_dir missing and the earlier policy in
    ``.<name>.<pid>.previous`` (the new one in ``.partial``): which to keep is the user's choice."""
    parent, own = os.path.split(os.path.abspath(os.path.expanduser(output_dir)))
    if os.path.lexists(os.path.join(parent, own)):
        return []
    kept = sorted(name for name, match in leftovers(parent) if match["name"] == own and match["kind"] == "previous")
    return [
        f"--model.output_dir={output_dir!r} is missing, and {os.path.join(parent, name)!r} holds the policy that a "
        "killed run was replacing (its new one, if written whole, is in the .partial beside it): rename the one to "
        "keep to output_dir and delete the other, or choose another output_dir"
        for name in kept
    ]


def run_checkpoint_dirs(trainer) -> list[str]:
    """Where this run's checkpoints may be: <root>/checkpoints, a logger's version_*/checkpoints, and the
    directory of a ModelCheckpoint that names one."""
    root = trainer.default_root_dir
    found = [os.path.join(root, "checkpoints"), *(os.path.join(d, "checkpoints") for d in _logger_versions(root))]
    return found + _checkpoint_dirpaths(trainer)


def _logger_versions(root: str) -> list[str]:
    return glob.glob(os.path.join(root, "*", "version_*"))


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


@contextlib.contextmanager
def holding_lock(path: str, what: str):
    """Hold the lock at ``path`` for the block (``take_lock``; released on any exit)."""
    held = take_lock(path, what)
    try:
        yield
    finally:
        release_lock(*held)


def take_lock(path: str, what: str) -> tuple[str, str]:
    """Create the lock file at ``path`` (O_CREAT|O_EXCL: one run wins) holding this process's pid, host,
    start time and command; take over a lock whose holder died on this host. Returns (path, record)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    record = json.dumps(
        {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "time": time.time(),
            "command": " ".join(sys.argv),
        }
    )
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
