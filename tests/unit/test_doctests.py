"""Every module whose docstrings hold examples runs them here, and a listed module with no example fails.

The modules are listed by name: a module that moves fails to import here until the list names it again,
and a module whose examples were all deleted fails instead of passing with nothing run. A second test
finds every source file with a ``>>>`` prompt, so a module that gains examples must be listed too.
"""

from __future__ import annotations

import doctest
import importlib

import pytest

from tests.helpers import REPO_ROOT

DOCTEST_MODULES = [
    "sharpening.checkpoint.files",
    "sharpening.data_files",
    "sharpening.diagnostics",
    "sharpening.engines.vllm_sync",
    "sharpening.errors",
    "sharpening.evaluate.config",
    "sharpening.evaluate.power_rows",
    "sharpening.evaluate.protocol",
    "sharpening.evaluate.sources",
    "sharpening.losses",
    "sharpening.model_checks",
    "sharpening.optim",
    "sharpening.prompts",
    "sharpening.rewards",
    "sharpening.rewards.functions",
    "sharpening.rl.config",
    "sharpening.rl.rollout",
    "sharpening.tasks.chars",
    "sharpening.tasks.cot",
    "sharpening.tasks.demo",
    "sharpening.tasks.extractors",
    "sharpening.tasks.toy",
]


def count_examples(module) -> int:
    """Examples in the docstrings defined in ``module`` (DocTestFinder skips objects imported from elsewhere)."""
    return sum(len(test.examples) for test in doctest.DocTestFinder().find(module))


@pytest.mark.parametrize("name", DOCTEST_MODULES)
def test_doctests_run_and_pass(name):
    module = importlib.import_module(name)
    assert count_examples(module) > 0, f"{module.__name__} is listed in DOCTEST_MODULES but has no doctest"
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0


def test_count_examples_sees_a_module_without_examples():
    # The check above rests on this count: a module whose docstrings have no example counts 0.
    assert count_examples(importlib.import_module("tests.helpers")) == 0


def test_every_module_with_examples_is_listed():
    listed = set(DOCTEST_MODULES)
    package = REPO_ROOT / "sharpening"
    with_examples = set()
    for path in sorted(package.rglob("*.py")):
        if ">>> " in path.read_text(encoding="utf-8"):
            parts = path.relative_to(REPO_ROOT).with_suffix("").parts
            with_examples.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    assert sorted(with_examples - listed) == [], "modules with doctests missing from DOCTEST_MODULES"
