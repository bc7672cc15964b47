"""ConfigError lists every problem at once."""

from __future__ import annotations

import pytest

from sharpening.errors import ConfigError, raise_if_problems


def test_message_lists_every_problem():
    problems = ["--model.policy.lora_r=0: must be >= 1", "--data.dataset is empty: give a file", "--x=1: bad"]
    err = ConfigError(problems)
    message = str(err)
    assert message.startswith("3 configuration problem(s):")
    for p in problems:
        assert f"  - {p}" in message
    assert err.problems == problems
    assert message.splitlines()[1:] == [f"  - {p}" for p in problems]


def test_is_a_value_error_and_copies_the_list():
    problems = ["a"]
    err = ConfigError(problems)
    problems.append("b")
    assert isinstance(err, ValueError) and err.problems == ["a"]


def test_raise_if_problems():
    raise_if_problems([])
    with pytest.raises(ConfigError) as info:
        raise_if_problems(["one", "two"])
    assert info.value.problems == ["one", "two"]
    assert "2 configuration problem(s)" in str(info.value)
