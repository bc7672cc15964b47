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


def test_collect_problems_reports_every_section_at_once():
    from sharpening.errors import collect_problems

    with pytest.raises(ConfigError) as err:
        with collect_problems(["--a: first"]):
            raise_if_problems(["--b: second"])
            raise_if_problems([])
            raise_if_problems(["--c: third"])
    assert err.value.problems == ["--a: first", "--b: second", "--c: third"]
    with pytest.raises(ConfigError) as err:  # a constructor that went on with a bad value and failed
        with collect_problems():
            raise_if_problems(["--d: bad"])
            raise ZeroDivisionError("a symptom")
    assert err.value.problems == ["--d: bad"] and isinstance(err.value.__cause__, ZeroDivisionError)
    with pytest.raises(ZeroDivisionError):  # nothing recorded: the failure is the news
        with collect_problems():
            raise ZeroDivisionError("a real bug")
    with collect_problems():
        pass
    with pytest.raises(ConfigError):  # outside any block it raises at once again
        raise_if_problems(["--e: bad"])
