"""Answer extractors and their resolution by name or import path."""

from __future__ import annotations

import pytest

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


# ---------------------------------------------------------------- phrasings real models produce
# (extractor, response, the answer a grader reads). The first four rows are the classic traps: a colon after 'is'
# with an article 'A' later, an 'Option A' after the answer, a leading verdict, a list of numbers.

PHRASINGS = [
    ("choice", "The answer is: C. A cell wall is absent.", "C"),
    ("choice", "The correct option is (B). Option A is a distractor.", "B"),
    ("bool", "False. The statement claims water boils at 50 C, which is true only at altitude.", "false"),
    ("last_number", "The values are 1,2,3", "3"),
    # MMLU-style multiple choice
    ("choice", "Answer: (B)", "B"),
    ("choice", "**Answer:** D", "D"),
    ("choice", "**Answer**: D", "D"),
    ("choice", "**Answer: D**", "D"),
    ("choice", "ANSWER: E", "E"),
    ("choice", "Answer - C", "C"),
    ("choice", "The answer is: **B**", "B"),
    ("choice", "The correct answer is: \n\n**(C) mitochondrion**", "C"),
    ("choice", "I think it's B) because the others are wrong.", "B"),
    ("choice", "(C) is correct.", "C"),
    ("choice", "Option C is correct; option A is a distractor.", "C"),
    ("choice", "C is the correct answer. A is wrong because it confuses mass and weight.", "C"),
    ("choice", "Final answer: \\boxed{C}", "C"),
    ("choice", "The final answer is $\\boxed{\\text{(D)}}$.", "D"),
    ("choice", "answer: c", "C"),
    ("choice", "the answer is b.", "B"),
    ("choice", "The answer is choice (b).", "B"),
    ("choice", "The answer is option D.", "D"),
    ("choice", "Correct option: B", "B"),
    ("choice", "The answer is A.", "A"),
    ("choice", "The answer is A because the nucleus holds the DNA.", "A"),
    ("choice", "The answer is C, the mitochondrion.", "C"),
    ("choice", "So the answer must be D, since force is mass times acceleration.", "D"),
    ("choice", "Answer: I think it is B.", "B"),
    ("choice", "The correct answer is not A but C.", "C"),
    ("choice", "The answer is (A). Wait, that ignores friction. The answer is (C).", "C"),
    ("choice", "Let's eliminate A and B. The best choice is D.", "D"),
    ("choice", "(A) is wrong, (B) is wrong, so (C).", "C"),
    ("choice", "Not (A). The right one is (D).", "D"),
    ("choice", "I'd say the answer is (B) ribosome, not (C).", "B"),
    ("choice", "C. The mitochondrion makes most of the ATP.", "C"),
    ("choice", "Based on the analysis, B.", "B"),
    ("choice", "I would go with C as the membrane is permeable.", "C"),
    ("choice", "A) 1\nB) 3.2\nC) 6.7\nD) 9.8\nThe answer is D.", "D"),
    ("choice", "Answer: F", "F"),  # MMLU-Pro: ten options, A-J
    ("choice", "The answer is (J).", "J"),
    ("choice", "The answer is I.", "I"),
    ("choice", "c", "C"),
    ("choice", "**E**", "E"),
    # ... and prose that names no choice
    ("choice", "A prokaryote lacks a nucleus. A cell wall is present.", None),
    ("choice", "Answer: A cell wall.", None),
    ("choice", "It is a prokaryote.", None),
    ("choice", "Neither I nor my notes say; I am unsure.", None),
    ("choice", "I think so too, more than I.", None),
    ("choice", "Vitamin C, found in citrus, prevents scurvy.", None),
    ("choice", "Therefore, the answer is B-cell activation.", None),
    ("choice", "(A) nucleus (B) ribosome (C) mitochondrion (D) vacuole", None),
    ("choice", "The options are (a) first, (b) second, (c) third.", None),
    # true / false, yes / no
    ("bool", "The answer is: no", "false"),
    ("bool", "Answer: Yes", "true"),
    ("bool", "**Answer:** False", "false"),
    ("bool", "The answer is $\\boxed{\\text{No}}$.", "false"),
    ("bool", "The answer is yes, although one might argue no.", "true"),
    ("bool", "True. Every wumpus is a tumpus, so it is not false.", "true"),
    ("bool", "No, it does not follow. It would be true only if Ann were small.", "false"),
    ("bool", "Sam is a zumpus, and no zumpus is a dumpus.\n**False**", "false"),
    ("bool", "If Ann were a rompus she would be small. She is not, so: False.", "false"),
    ("bool", "Does every prime exceed 1? Yes. So the statement is false.", "false"),
    ("bool", "True or false? Bo is a yumpus, so it is TRUE.", "true"),
    ("bool", "Answer yes or no: the claim holds, so yes.", "true"),
    ("bool", "The statement is not true.", "false"),
    ("bool", "The claim isn't true.", "false"),
    ("bool", 'The model said "true", but the claim is false.', "false"),
    ("bool", "The answer is no longer obvious; it is true.", "true"),
    ("bool", "There is no evidence either way.", None),
    # GSM8K-style numbers
    ("last_number", "The total is 1,234.", "1234"),
    ("last_number", "He has 1,000,000 dollars.", "1000000"),
    ("last_number", "1,2345", "2345"),
    ("last_number", "She pays $1,000.50 in all.", "1000.5"),
    ("last_number", "The discount is 50%.", "50"),
    ("last_number", "The temperature is -5 degrees.", "-5"),
    ("last_number", "Pages 10-20", "20"),
    ("last_number", "So x = 3/4", "0.75"),
    ("last_number", "x = -3/4", "-0.75"),
    ("last_number", "So x = \\frac{1}{3}", "1/3"),
    ("last_number", "A ratio of .5", "0.5"),
    ("last_number", "One part in 1/1024", "0.0009765625"),
    ("gsm8k", "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether.\n#### 72", "72"),
    ("gsm8k", "#### 1,000", "1000"),
    ("gsm8k", "The answer is 18.\n\nQuestion: Janet has 3 ducks and buys 5 more.", "18"),
    ("gsm8k", "The answer is 5 + 7 = 12", "12"),
    ("gsm8k", "The answer is 10. Wait: 4 * 3 = 12, so the answer is 12.", "12"),
    ("gsm8k", "So she earns $\\boxed{18}$ dollars a day, about 126 a week.", "18"),
    ("gsm8k", "**Answer:** $1,080", "1080"),
    ("gsm8k", "The answer is: $\\$18$.", "18"),
    ("gsm8k", "The final answer is \\boxed{\\frac{3}{4}}", "0.75"),
    # MATH-style boxes
    ("boxed", "so $x = \\boxed{\\dfrac{3}{4}}$", "\\frac{3}{4}"),
    ("boxed", "The answer is \\boxed 5.", "5"),
    ("boxed", "$\\boxed{\\left( 1, 2 \\right)}$", "(1,2)"),
    ("boxed", "\\fbox{7}", "7"),
]


@pytest.mark.parametrize("extractor, text, want", PHRASINGS, ids=lambda x: str(x)[:40])
def test_phrasings(extractor, text, want):
    assert EXTRACTORS[extractor](text) == want


@pytest.mark.parametrize(
    "extractor, reference, response",
    [
        ("choice", "c", "The answer is (C)."),
        ("choice", "(B)", "Answer: B"),
        ("bool", "Yes", "No. Wait, the premise holds, so yes."),
        ("gsm8k", "3 * 0.25 = 0.75\n#### 0.75", "Three quarters, 3/4 of a dollar."),
    ],
)
def test_references_read_like_responses(extractor, reference, response):
    extract = EXTRACTORS[extractor]
    assert answers_match(extract(response), reference, extract)


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
