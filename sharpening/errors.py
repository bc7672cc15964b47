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


def raise_if_problems(problems: list[str]) -> None:
    """Raise one ConfigError listing ``problems`` when there is any."""
    if problems:
        raise ConfigError(problems)


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
