"""Answer extractors and their resolution by name or import path."""

from __future__ import annotations

import doctest

import pytest

import sharpening.tasks.extractors as extractors_module
from sharpening.tasks.extractors import (
    EXTRACTORS,
    answers_match,
    extract_bool,
    extract_boxed,
    extract_choice,
    extract_gsm8k,
    extract_last_number,
    extract_strip,
    resolve_extractor,
)


def test_doctests():
    assert doctest.testmod(extractors_module).failed == 0


@pytest.mark.parametrize("text, want", [("  dcba ", "dcba"), ("", None), ("  \n", None), ("a b", "a b")])
def test_strip(text, want):
    assert extract_strip(text) == want


@pytest.mark.parametrize(
    "text, want",
    [
        ("3 apples and 1,200 pears", "1200"),
        ("the answer is 42.", "42"),
        ("-7 degrees", "-7"),
        ("pi is 3.14", "3.14"),
        ("1.50 dollars", "1.5"),
        ("10.0", "10"),
        ("007", "7"),
        ("0.0", "0"),
        ("-0.50", "-0.5"),
        ("cost: $1,234.50", "1234.5"),
        ("100", "100"),
        ("no digits", None),
        ("", None),
    ],
)
def test_last_number(text, want):
    assert extract_last_number(text) == want


@pytest.mark.parametrize(
    "text, want",
    [
        ("so 5 + 7 = 12\n#### 12", "12"),
        ("Natalia sold 48/2 = 24 clips.\n#### 72\nextra 5", "72"),
        ("#### 1,000", "1000"),
        ("no marker, last is 9 then 3", "3"),
        ("#### none\nbut 8 later", "8"),
        ("nothing", None),
    ],
)
def test_gsm8k(text, want):
    assert extract_gsm8k(text) == want


@pytest.mark.parametrize(
    "text, want",
    [
        ("so the answer is $\\boxed{\\frac{1}{2}}$", "\\frac{1}{2}"),
        ("\\boxed{1} then \\boxed{ 2 + 3 }", "2+3"),
        ("\\boxed{x^{2}}", "x^{2}"),
        ("\\boxed{}", None),
        ("\\boxed{unclosed", None),
        ("no box 5", None),
    ],
)
def test_boxed(text, want):
    assert extract_boxed(text) == want


@pytest.mark.parametrize(
    "text, want",
    [
        ("The answer is (c).", "C"),
        ("Answer: B", "B"),
        ("answer:D", "D"),
        ("I think B is wrong; the answer is E", "E"),
        ("Between A and C, I pick C.", "C"),
        ("(A) is right", "A"),
        ("nothing here", None),
        ("lowercase a alone", None),
    ],
)
def test_choice(text, want):
    assert extract_choice(text) == want


def test_choice_does_not_take_an_article_for_a_letter():
    assert extract_choice("The answer is a mitochondrion, so (C).") == "C"


@pytest.mark.parametrize(
    "text, want",
    [
        ("Step 1 ... so the claim is False.", "false"),
        ("True", "true"),
        ("yes", "true"),
        ("No.", "false"),
        ("it is not true, so false... no wait, yes", "true"),
        ("I know nothing", None),
        ("", None),
    ],
)
def test_bool(text, want):
    assert extract_bool(text) == want


def test_resolve_builtins():
    for name, fn in EXTRACTORS.items():
        assert resolve_extractor(name) is fn
    assert set(EXTRACTORS) == {"strip", "last_number", "gsm8k", "boxed", "choice", "bool"}


@pytest.mark.parametrize(
    "path", ["sharpening.tasks.extractors:extract_boxed", "sharpening.tasks.extractors.extract_boxed"]
)
def test_resolve_by_import_path(path):
    assert resolve_extractor(path) is extract_boxed


def test_resolve_stdlib_callable():
    assert resolve_extractor("os.path:basename")("/a/b") == "b"


@pytest.mark.parametrize(
    "name, fragment",
    [
        ("nonsense", "not a built-in"),
        ("no_such_module_xyz:f", "cannot import"),
        ("sharpening.tasks.extractors:nope", "cannot import"),
        ("sharpening.tasks.extractors:EXTRACTORS", "not callable"),
    ],
)
def test_resolve_errors(name, fragment):
    with pytest.raises(ValueError, match=fragment) as info:
        resolve_extractor(name)
    assert repr(name) in str(info.value)


@pytest.mark.parametrize(
    "predicted, reference, extractor, want",
    [
        ("72", "Natalia ... #### 72", extract_gsm8k, True),
        ("71", "#### 72", extract_gsm8k, False),
        (None, "72", extract_last_number, False),
        ("72", None, extract_last_number, False),
        ("dcba", " dcba ", extract_strip, True),
        ("x", "free text", extract_boxed, False),
        ("free text", " free text ", extract_boxed, True),  # falls back to the stripped reference
    ],
)
def test_answers_match(predicted, reference, extractor, want):
    assert answers_match(predicted, reference, extractor) is want
