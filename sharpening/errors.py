"""One error type for bad configuration, raised before any weights load or any sample is drawn."""

from __future__ import annotations


class ConfigError(ValueError):
    """Every problem found in a configuration, reported at once.

    Each problem names the option as the user types it, the value given, the rule and the fix, e.g.
    ``--model.policy.lora_r=0: must be >= 1; set it to 8 or 16``.
    """

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} configuration problem(s):\n{lines}")


_COLLECTING: list[list[str]] = []  # the problem lists of the open collect_problems blocks, innermost last


def raise_if_problems(problems: list[str]) -> None:
    """Raise one ConfigError listing ``problems`` when there is any (inside ``collect_problems``: record them)."""
    if problems and _COLLECTING:
        _COLLECTING[-1].extend(problems)
    elif problems:
        raise ConfigError(problems)


class collect_problems:
    """Check several sections of a configuration together: inside the block ``raise_if_problems`` records
    instead of raising, and on exit one ConfigError lists every problem recorded (with ``initial`` first).
    If the block fails otherwise after recording some (a constructor going on with a bad value), the
    ConfigError is raised from that failure, so the user still reads the problems, not the symptom."""

    def __init__(self, initial: list[str] | None = None) -> None:
        self.problems = list(initial or [])

    def __enter__(self) -> list[str]:
        _COLLECTING.append(self.problems)
        return self.problems

    def __exit__(self, kind, error, traceback) -> bool:
        _COLLECTING.remove(self.problems)
        if error is not None and not isinstance(error, Exception):
            return False  # KeyboardInterrupt, SystemExit: not ours to turn into a message
        if isinstance(error, ConfigError):
            self.problems.extend(p for p in error.problems if p not in self.problems)
        if self.problems:
            raise ConfigError(self.problems) from error
        return False


def unwritable_directory_problem(option: str, path: str) -> str | None:
    """Why a directory cannot be made or written at ``path`` (a file there, or its nearest existing
    ancestor not a writable directory), or None. Checked before training or drawing, not after."""
    import os

    path = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(path) and not os.path.isdir(path):
        return f"{option}={path!r} is a file, not a directory; name a directory"
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{option}={path!r}: {existing!r} is a file, so the directory cannot be made; choose another path"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{option}={path!r}: {existing!r} is not writable by this user; choose a writable directory"
    return None
