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
