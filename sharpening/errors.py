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


class RunStoppedError(RuntimeError):
    """A run stopped partway for a reason its message explains, with what to change; ``sharpen`` prints it
    without a traceback (exit status 1)."""


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


def parse_error_problem(message: str, help_command: str) -> str:
    """jsonargparse's report of a command line or config it cannot parse, as one problem: the option as
    typed (``--model.optimizer.lr``, without ``init_args``), the value and the rule. For a nested class it
    lists every union member it tried; what matters is the innermost ``Expected ...`` under the chain of
    ``Parser key`` lines that leads to it.

    >>> parse_error_problem(
    ...     'Parser key "verifier.seed":\\n  Expected a <class \\'int\\'>. Got value: abc', "sharpen fit"
    ... )
    "--verifier.seed='abc': must be a whole number (sharpen fit --help lists every option)"
    """
    import re

    see = f"({help_command} --help lists every option)"
    keys: list[tuple[int, str]] = []  # (indent, key) of the Parser key lines enclosing the current line
    found: dict[str, dict] = {}  # option -> {"depth", "expected": [...], "value", "detail": [...]}
    for line in (line for line in message.splitlines() if line.strip()):
        indent = len(line) - len(line.lstrip(" -"))
        keys = [(i, k) for i, k in keys if i < indent]
        if match := re.match(r"\s*(?:- )?Parser key \"([^\"]+)\":\s*(.*)$", line):
            keys.append((indent, match.group(1)))
            line = match.group(2)
        if not keys:
            continue
        entry = found.setdefault(".".join(k for _, k in keys), {"depth": len(keys), "expected": [], "detail": []})
        text = line.strip(" -")
        if not text:  # a Parser key line with nothing after its colon
            continue
        if match := re.match(r"Expected an? (.+?)(?:\. Got value:\s?(.*))?$", text):
            if "NoneType" not in match.group(1):
                entry["expected"].append(match.group(1))
            if match.group(2) is not None:
                entry["value"] = match.group(2)
        elif match := re.match(r"Given value: (.*)$", text):
            entry.setdefault("value", match.group(1))
        elif match := re.match(r"Problem with given class_path '([^']+)':$", text):
            entry["class_path"] = match.group(1)
        elif not text.startswith(("Does not validate", "Subtypes:", "Errors:", "Given value type")):
            entry["detail"].append(text)
    typed = [(option, e) for option, e in found.items() if e["expected"] and "value" in e]
    if typed:  # the deepest option whose value has the wrong type
        option, entry = max(typed, key=lambda item: item[1]["depth"])
        rules = list(dict.fromkeys(r for expected in entry["expected"] if (r := _rule(expected, entry["value"]))))
        rules = rules[:1] + [r.removeprefix("must be ") for r in rules[1:]]
        return f"--{option}={entry['value']!r}: {', or '.join(rules)} {see}"
    if match := re.search(r"does not accept option '([^']+)'", message):
        return (
            f"--{match.group(1)}: no such option; check its spelling on the command line or in the --config file {see}"
        )
    if match := re.match(r"unrecognized arguments: (.*)", message.strip()):
        return f"unknown option(s) {match.group(1)}: check the spelling {see}"
    if found:
        option, entry = max(found.items(), key=lambda item: item[1]["depth"])
        if "class_path" in entry or (match := re.search(r"Import path (\S+) does not", message)):
            option, value = f"{option}.class_path", entry.get("class_path") or match.group(1)
            detail = [d for d in entry["detail"] if not d.startswith("Given value")] or entry["detail"]
            return f"--{option}={value!r}: {'; '.join(detail[:2])} {see}"
        return f"--{option}: {'; '.join(entry['detail'][:3] or entry['expected'][:3])} {see}"
    first = message.strip().splitlines()[0] if message.strip() else "the command line could not be read"
    return f"{first} {see}"


def _rule(expected: str, value: str) -> str:
    """What a value of jsonargparse's ``expected`` type looks like, in words ("" for nothing to say)."""
    import re

    if choices := re.match(r"typing\.Literal\[(.*)\]$", expected):
        return "must be one of " + ", ".join(c.strip(" '\"") for c in choices.group(1).split(","))
    if expected.startswith("path but"):  # the same value read as a file name: not what was meant
        return ""
    if expected.startswith("dot import path string"):
        return "must be the import path of a class (package.module.Class)"
    words = {"int": "must be a whole number", "float": "must be a number", "bool": "must be true or false",
             "str": "must be text", "list": "must be a list, e.g. [1, 2]",
             "collections.abc.Iterable": "must be a list"}  # fmt: skip
    rule = words.get(expected.removeprefix("<class '").removesuffix("'>"), f"expected {expected}")
    if value.lower().lstrip("+-") in ("nan", "inf", "infinity") and rule == words["float"]:
        rule += " (nan and inf are refused)"
    return rule
