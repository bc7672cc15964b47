"""Answer extraction: response text -> canonical answer string (or None when there is none).

Built-ins are named in configs (``answer_extractor: gsm8k``); any callable ``str -> str | None`` can be
named by import path (``my_pkg.my_module:extract`` or ``my_pkg.my_module.extract``).

The built-ins read a response the way a grader would. An explicit answer statement ('The answer is: C',
'**Answer:** (B)', '#### 72', '\\boxed{...}') wins over any other mention, the last statement over earlier
ones (models correct themselves). Without one, a fallback takes only what stands as an answer on its own
('(C)', '**E**', a leading 'False.'), never a word of prose (the article 'A', the pronoun 'I', the 'no' of
'no zumpus'), and gives None rather than a guess. tests/unit/test_extractors.py holds the table of
phrasings from GSM8K-, MATH- and MMLU-style outputs that they are written against.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from decimal import Decimal, localcontext
from fractions import Fraction

_SKIP = r"[\s*_\"'`“”‘’:$]*"
"""Blanks, markdown emphasis, quotes, '$' and a colon ('is: C') between an answer statement and its answer."""
_CLOSE = r"[*_\"'`”’$]*"
"""Emphasis, quotes or '$' that close an answer ('**C**', '"B"')."""
_ANSWER_IS = (
    r"(?i:\banswer\b(?:\s*(?:is|was|would\s+be|will\s+be|should\s+be|must\s+be)\b|[\s*_]*[:=\-–—])?"
    r"|\b(?:option|choice)\s+(?:is|would\s+be|will\s+be|should\s+be)\b|\b(?:option|choice)[\s*_]*:)"
)
"""The start of an answer statement: 'The answer is', '**Answer:**', 'Final answer =', 'the correct option is'."""

# ------------------------------------------------------------------------------------------------ numbers

_NUMBER = re.compile(
    r"(?P<fsign>[-−])?\\[dt]?frac\{\s*(?P<fnum>\d+)\s*\}\{\s*(?P<fden>\d+)\s*\}"  # \frac{3}{4}
    r"|(?<![\w./])(?P<num>(?:(?<![\w)])[-−])?\d+)/(?P<den>\d+)(?![\d/]|\.\d)"  # 3/4, not a date 3/4/2024
    # A minus sign but not the hyphen of '10-20' or 'COVID-19'; a thousands separator only before exactly three
    # digits, so '1,234' is one number and the list '1,2,3' three.
    r"|(?<![\d.])(?P<plain>(?:(?<![\w)])[-−])?(?:(?:\d{1,3}(?:,\d{3}(?!\d))+|\d+)(?:\.\d+)?|\.\d+))"
)
_ARITHMETIC_NEXT = re.compile(r"\s*(?:[-+*/×÷=^]|x\s*\d|,\s*\d)")
"""After 'The answer is 5', a continuation ('+ 7 = 12', ', 6') that makes the 5 an operand or one of a list."""


def _canonical_number(text: str) -> str:
    """'1,234.50' -> '1234.5'; '007' -> '7'; '.5' -> '0.5'."""
    text = text.replace(",", "").replace("−", "-")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    sign = "-" if text.startswith("-") else ""
    digits = text.lstrip("-").lstrip("0") or "0"
    if digits.startswith("."):
        digits = "0" + digits
    return sign + digits if digits != "0" else "0"


def _canonical_fraction(numerator: str, denominator: str) -> str:
    """'6/8' -> '0.75' and '4/2' -> '2' (exact decimals, as a reference '#### 0.75' is written); '2/6' -> '1/3'."""
    num, den = int(numerator.replace("−", "-")), int(denominator)
    if den == 0:
        return f"{num}/0"
    value = Fraction(num, den)
    rest = value.denominator
    for prime in (2, 5):
        while rest % prime == 0:
            rest //= prime
    if rest != 1:
        return f"{value.numerator}/{value.denominator}"
    with localcontext() as exact:  # p / (2^a 5^b) = p 5^a 2^b / 10^(a+b): under len(p) + 3 len(q) significant digits
        exact.prec = len(str(value.numerator)) + 3 * len(str(value.denominator)) + 2
        return _canonical_number(format(Decimal(value.numerator) / Decimal(value.denominator), "f"))


def _number_value(match: re.Match) -> str:
    if match.group("fnum") is not None:
        return _canonical_fraction((match.group("fsign") or "") + match.group("fnum"), match.group("fden"))
    if match.group("num") is not None:
        return _canonical_fraction(match.group("num"), match.group("den"))
    return _canonical_number(match.group("plain"))


def extract_strip(text: str) -> str | None:
    """The whole response, stripped; None when empty.

    >>> extract_strip("  dcba ")
    'dcba'
    """
    text = text.strip()
    return text or None


def extract_last_number(text: str) -> str | None:
    """The last number in the text: '1,234' is 1234 but '1,2,3' a list (3); '$1,000.50' -> '1000.5', '50%' -> '50',
    '-7' -> '-7' (not the hyphen of '10-20'), '3/4' and '\\frac{3}{4}' -> '0.75' (exact decimals; else '1/3').

    >>> extract_last_number("3 apples and 1,200 pears")
    '1200'
    >>> extract_last_number("The values are 1,2,3")
    '3'
    """
    found = _last_match(_NUMBER, text)
    return None if found is None else _number_value(found)


def _last_match(pattern: re.Pattern, text: str) -> re.Match | None:
    """The last of ``pattern``'s non-overlapping matches in ``text`` (scanned from the start, so an earlier
    match can consume the text a later one would start in); None when there is none."""
    matches = list(pattern.finditer(text))
    return matches[-1] if matches else None


def _stated_number(text: str) -> str | None:
    """The number of the last 'The answer is N' / 'Answer: $N' whose N is not an operand ('is 5 + 7 = 12')."""
    stated = None
    for lead in re.finditer(_ANSWER_IS + r"[\s*_\"'`:$\\(]*", text):
        number = _NUMBER.match(text, lead.end())
        if number is not None and not _ARITHMETIC_NEXT.match(text, number.end()):
            stated = _number_value(number)
    return stated


def extract_gsm8k(text: str) -> str | None:
    """The number after '####' (GSM8K reference format), else in the last \\boxed{}, else of the last
    'The answer is N', else the last number.

    >>> extract_gsm8k("so 5 + 7 = 12\\n#### 12")
    '12'
    >>> extract_gsm8k("The answer is 18.\\n\\nQuestion: Tom has 3 cats and 4 dogs.")
    '18'
    """
    if "####" in text:
        tail = extract_last_number(text.split("####", 1)[1].split("\n")[0])
        if tail is not None:
            return tail
    boxed = _last_boxed(text)
    if boxed is not None and (number := extract_last_number(boxed[1])) is not None:
        return number
    return _stated_number(text) or extract_last_number(text)


# ------------------------------------------------------------------------------------------------ \boxed{}

_BOX = re.compile(r"\\(?:boxed|fbox)\b\s*")


def _last_boxed(text: str) -> tuple[int, str] | None:
    """(position, raw contents) of the last \\boxed{...} ('\\boxed 5' too); None when absent or unclosed."""
    found = _last_match(_BOX, text)
    if found is None:
        return None
    start = found.end()
    if not text.startswith("{", start):
        token = re.match(r"[^\s$}]*[^\s$}.,;]", text[start:])  # '\boxed 5.' is 5
        return (found.start(), token.group()) if token and found.group().endswith(" ") else None
    depth = 0
    for j in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return found.start(), text[start + 1 : j]
    return None


def extract_boxed(text: str) -> str | None:
    """Contents of the last \\boxed{...} (MATH), braces balanced, spaces and spacing commands removed,
    \\dfrac and \\tfrac written \\frac, \\left( and \\right) as '(' and ')'.

    >>> extract_boxed("so the answer is $\\\\boxed{\\\\frac{1}{2}}$")
    '\\\\frac{1}{2}'
    >>> extract_boxed("\\\\boxed{\\\\dfrac{1}{2}} and \\\\boxed{\\\\left( 1, 2 \\\\right)}")
    '(1,2)'
    """
    boxed = _last_boxed(text)
    if boxed is None:
        return None
    content = re.sub(r"\\[dt]frac", r"\\frac", boxed[1])
    content = re.sub(r"\\(?:left|right)(?![a-zA-Z])|\\[!,;: ]|\s", "", content)
    return content or None


# ------------------------------------------------------------------------------------------------ choices

_CHOICE_TARGET = r"(?:(?i:option|choice)\s+)?(?P<open>[(\[])?(?P<letter>[A-Ja-j])(?P<close>[)\]])?(?![\w'’+#-])"
_CHOICE_STATED = re.compile(_ANSWER_IS + _SKIP + _CHOICE_TARGET)
_CHOICE_CORRECT = re.compile(
    r"(?<![\w'’*_\"`“‘])(?:(?i:option|choice)\s+)?[*_\"'`“‘]*"  # a markup run tried from its start only
    r"(?:[(\[](?P<bracketed>[A-Ja-j])[)\]]|(?P<letter>[A-J])\b)"
    + _CLOSE
    + r"\s+(?i:is|would\s+be|seems\s+to\s+be)\s+(?i:the\s+)?(?i:(?:most\s+)?(?:correct|right|best|accurate)\b|answer\b)"
)
"""'(C) is correct', 'C is the correct answer', 'Option B is the best answer' (not 'is not correct', 'is incorrect')."""
_CHOICE_WEAK = re.compile(
    r"(?i:\b(?:it's|it\s+is|i\s+pick|i\s+choose|i\s+select|go\s+with|going\s+with|opt\s+for)\b)"
    + _SKIP
    + _CHOICE_TARGET
)
_CHOICE_ALONE = re.compile(
    r"[(\[](?P<bracketed>[A-Ja-hj])[)\]]"  # '(C)', '[b]'; not '(i)', a roman numeral
    r"|(?<![\w'’(\[-])(?P<label>[A-J])\)"  # 'B) because'
    # A bare letter that opens a clause and stands alone in it ('C. The mitochondrion', 'clear: C,'), or that ends
    # a line ('**E**', 'so C.'), not 'vitamin C, found in'; never 'I'.
    r"|(?:^|(?<=[.!?:;,\n]))[ \t]*[*_\"'`“‘]*(?P<bare>[A-HJ])(?=" + _CLOSE + r"(?:[.,;:!?](?!\w)|[ \t]*(?:\n|$)))"
    r"|(?<![\w'’.-])(?P<last>[A-HJ])(?=" + _CLOSE + r"[.!]?" + _CLOSE + r"[ \t]*(?:\n|$))",
    re.M,
)
_CONNECTIVE = re.compile(r"\s+(?:because|since|as|for|[-–—(])")
_NOT_BEFORE = re.compile(r"(?i:\b(?:not|except|eliminate|rule\s+out)\s*[*_\"'`“‘(\[]*)$")
_NOT_AFTER = re.compile(
    r"[)\]]?" + _CLOSE + r"\s+(?i:is|are|was)\s+(?i:not\b|wrong|incorrect|false|a\s+distractor|eliminated|ruled\s+out)"
)


def _is_choice(match: re.Match, text: str) -> bool:
    """Whether the letter of a ``_CHOICE_TARGET`` match is a choice, not a word: 'is A.' and 'is A because' are,
    'is a cell' and 'Answer: I think' are not; a bracketed '(c)' always is, a lowercase one only before punctuation."""
    if match.group("open") and match.group("close"):
        return True
    letter, after = match.group("letter"), text[match.end() :]
    if match.group("close"):  # 'B) because'
        return letter.isupper()
    after = re.sub(f"^{_CLOSE}[ \t]*", "", after)
    if not after or after[0] in "\n.,;:!?":
        return not re.match(r"\.\w", after)  # 'i.e.', 'e.g.'
    if letter in "AI" or letter.islower():
        return bool(_CONNECTIVE.match(" " + after))
    return True


def _choice_fallback(text: str) -> str | None:
    """The last letter standing as an answer, skipping negated ones ('not (A)', '(B) is wrong') and echoed
    option lists ('(A) nucleus (B) ribosome (C) ...': three letters in a row, each followed by text)."""
    found = []  # (position, letter, labels a text)
    for m in _CHOICE_ALONE.finditer(text):
        letter = m.group("bracketed") or m.group("label") or m.group("bare") or m.group("last")
        labels = bool(re.match(r"[ \t]*[.:]?[ \t]*[A-Za-z0-9]", text[m.end() :]))
        if not _NOT_BEFORE.search(text[max(0, m.start() - 40) : m.start()]) and not _NOT_AFTER.match(text, m.end()):
            found.append((m.start(), letter.upper(), labels))
    found += [(m.start(), m.group("letter").upper(), False) for m in _CHOICE_WEAK.finditer(text) if _is_choice(m, text)]
    found.sort()
    keep, i = [], 0
    while i < len(found):
        j = i + 1
        while j < len(found) and found[j][2] and found[j - 1][2] and ord(found[j][1]) == ord(found[j - 1][1]) + 1:
            j += 1
        keep += found[i:j] if j - i < 3 else []
        i = j
    return keep[-1][1] if keep else None


def extract_choice(text: str) -> str | None:
    """A multiple-choice letter A-J (MMLU-Pro has ten options), upper case.

    First the last answer statement: 'The answer is: C', 'Answer: (b)', '**Answer:** D', 'the correct option is
    (B)', '(C) is correct', '\\boxed{C}'; else a letter standing alone ('(C)', 'B) because', '**E**', 'C.'),
    the last one; else None. A response that is just a letter counts in either case ('c', '(b)'); elsewhere a
    lowercase letter counts only in brackets or right before punctuation, and 'A' or 'I' before a word only
    in a statement before 'because' / 'since' / a dash, so neither an article nor a pronoun is taken.

    >>> extract_choice("The answer is: C. A cell wall is absent.")
    'C'
    >>> extract_choice("The correct option is (B). Option A is a distractor.")
    'B'
    >>> extract_choice("The answer is a mitochondrion, so (C).")
    'C'
    >>> extract_choice("The answer is **C**.")
    'C'
    """
    alone = re.fullmatch(r"[\s*_\"'`“”‘’(\[]*([A-Ja-j])[\s*_\"'`“”‘’)\].]*", text)
    if alone:
        return alone.group(1).upper()
    stated = [(m.start(), m.group("letter")) for m in _CHOICE_STATED.finditer(text) if _is_choice(m, text)]
    stated += [(m.start(), m.group("bracketed") or m.group("letter")) for m in _CHOICE_CORRECT.finditer(text)]
    boxed = _last_boxed(text)
    if boxed is not None:
        letter = re.fullmatch(r"[\s(\[{]*(?:\\text(?:bf)?\{)?[\s(\[]*([A-Ja-j])[\s)\]}]*", boxed[1])
        if letter:
            stated.append((boxed[0], letter.group(1)))
    if stated:
        return max(stated)[1].upper()
    return _choice_fallback(text)


# ------------------------------------------------------------------------------------------------ booleans

_BOOL = {"true": "true", "yes": "true", "false": "false", "no": "false"}
_BOOL_ECHO = re.compile(r"(?i:\b(?:true|yes)\s*(?:or|/)\s*(?:false|no)\b|\b(?:false|no)\s*(?:or|/)\s*(?:true|yes)\b)")
"""'True or false?', 'yes/no': the question's words, not a verdict."""
_BOOL_STATED = re.compile(
    _ANSWER_IS + _SKIP + r"(?:\\boxed\{\s*)?(?:\\text(?:bf)?\{\s*)?(?P<word>(?i:true|false|yes|no))\b"
    r"|\\boxed\{\s*(?:\\text(?:bf)?\{\s*)?(?P<boxed>(?i:true|false|yes|no))\s*\}"
)
_BOOL_WORD = r"[ \t*_\"'`“‘#>-]*\b(?P<word>(?i:true|false|yes|no))\b" + _CLOSE
_BOOL_LAST = re.compile(
    r"(?:^|(?<=[.!?:;,\n]))(?:[ \t]*(?i:so|thus|hence|therefore|wait)\b,?)?"
    + _BOOL_WORD
    + r"[ \t]*[.!]?"
    + _CLOSE
    + r"\s*\Z",
    re.M,
)
"""A verdict that ends the text as a clause of its own: '...\n**False**', 'so: False.', 'It holds, so yes.'"""
_BOOL_FIRST = re.compile(r"\s*" + _BOOL_WORD + r"(?=[ \t]*(?:[.!?,;:)\n]|$))")
"""A verdict that is the first sentence: 'False. The statement ...', 'No, it does not follow.'"""
_BOOL_MENTION = re.compile(
    r"(?P<neg>(?i:\bnot|n't|\bnever)\s+)?(?P<quote>[\"'`“‘])?"
    r"\b(?P<word>(?i:true|false|yes|no))\b(?P<unquote>[\"'`”’])?"
)


def extract_bool(text: str) -> str | None:
    """'true' or 'false' (also from yes/no).

    First the last answer statement ('The answer is: no', 'Answer: Yes', '\\boxed{True}'); else a verdict that is
    the last sentence ('...\\n**False**'), else one that is the first ('False. The statement ... is true.' is
    false; a 'Yes.' in the middle may answer a question of the reasoning's own); else the last mention, where
    'not true' reads false, and quoted words, 'no' before a noun ('no zumpus') and the question's own 'true or
    false' do not count; else None.

    >>> extract_bool("Step 1 ... so the claim is False.")
    'false'
    >>> extract_bool("False. The statement says the moon is made of cheese, which is true of no moon.")
    'false'
    """
    text = _BOOL_ECHO.sub(lambda m: " " * len(m.group()), text)
    stated = None
    for m in _BOOL_STATED.finditer(text):
        word = (m.group("word") or m.group("boxed")).lower()
        if word != "no" or m.group("boxed") or not re.match(_CLOSE + r"[ \t]*[a-z]", text[m.end() :]):
            stated = word
    if stated is not None:
        return _BOOL[stated]
    alone = _BOOL_LAST.search(text) or _BOOL_FIRST.match(text)
    if alone is not None:
        return _BOOL[alone.group("word").lower()]
    verdict = None
    for m in _BOOL_MENTION.finditer(text):
        word = m.group("word").lower()
        if m.group("quote") or m.group("unquote"):
            continue
        if word == "no" and not re.match(_CLOSE + r"[ \t]*(?:[.!?,;:)\n]|$)", text[m.end() :]):
            continue  # 'no zumpus is a dumpus', 'no wait'
        if m.group("neg"):
            if word in ("true", "false"):
                verdict = "false" if word == "true" else "true"
            continue
        verdict = _BOOL[word]
    return verdict


EXTRACTORS: dict[str, Callable[[str], str | None]] = {
    "strip": extract_strip,
    "last_number": extract_last_number,
    "gsm8k": extract_gsm8k,
    "boxed": extract_boxed,
    "choice": extract_choice,
    "bool": extract_bool,
}


def resolve_extractor(name: str) -> Callable[[str], str | None]:
    """A built-in extractor by name, or a callable by import path ('pkg.mod:func' or 'pkg.mod.func')."""
    if name in EXTRACTORS:
        return EXTRACTORS[name]
    module_name, _, attr = name.rpartition(":") if ":" in name else name.rpartition(".")
    if not module_name:
        raise ValueError(f"answer extractor {name!r}: not a built-in ({', '.join(EXTRACTORS)}) nor an import path")
    try:
        found = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"answer extractor {name!r}: cannot import it ({err})") from err
    if not callable(found):
        raise ValueError(f"answer extractor {name!r}: {type(found).__name__} is not callable")
    return found


def answers_match(predicted: str | None, reference: str | None, extractor: Callable[[str], str | None]) -> bool:
    """True when a prediction equals the reference after the same extraction."""
    if predicted is None or reference is None:
        return False
    return predicted == (extractor(reference) or reference.strip())
