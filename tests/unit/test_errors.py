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


UNION_REPORT = """Parser key "model":
  Does not validate against any of the Union subtypes
  Subtypes: [<class 'sharpening.module.PolicyModule'>, <class 'NoneType'>]
  Errors:
    - Problem with given class_path 'sharpening.SFTSharpeningModule':
        Parser key "optimizer":
          Does not validate against any of the Union subtypes
          Errors:
            - Problem with given class_path 'sharpening.OptimizerConfig':
                Parser key "lr":
                  Expected a <class 'float'>. Got value: nan
            - Expected a <class 'NoneType'>
    - Expected a <class 'NoneType'>
  Given value: NestedArg(key='optimizer.lr', val='nan')"""


@pytest.mark.parametrize(
    "message, problem",
    [
        (UNION_REPORT, "--model.optimizer.lr='nan': must be a number (nan and inf are refused)"),
        (
            "Parser key \"model.dtype\":\n  Expected a typing.Literal['auto', 'float32']. Got value: x",
            "--model.dtype='x': must be one of auto, float32",
        ),
        (
            'Parser key "seed_everything":\n  Does not validate against any of the Union subtypes\n  Errors:\n'
            "    - Expected a <class 'bool'>\n    - Expected a <class 'int'>\n  Given value: abc",
            "--seed_everything='abc': must be true or false, or a whole number",
        ),
        ("Subcommand 'fit' does not accept option 'trainer.max_epochz'", "--trainer.max_epochz: no such option"),
        ("unrecognized arguments: --foo 1", "unknown option(s) --foo 1"),
        (
            'Parser key "model":\n  Does not validate against any of the Union subtypes\n  Errors:\n'
            "    - Problem with given class_path 'sharpening.NoSuch':\n"
            "        module 'sharpening' has no attribute 'NoSuch'",
            "--model.class_path='sharpening.NoSuch': module 'sharpening' has no attribute 'NoSuch'",
        ),
    ],
)
def test_a_parse_error_is_one_problem_naming_the_option_value_and_rule(message, problem):
    from sharpening.errors import parse_error_problem

    assert parse_error_problem(message, "sharpen fit").startswith(problem)
