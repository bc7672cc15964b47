"""Answer extraction: response text -> canonical answer string (or None when there is none).

Built-ins are named in configs (``answer_extractor: gsm8k``); any callable ``str -> str | None`` can be
named by import path (``my_pkg.my_module:extract`` or ``my_pkg.my_module.extract``).
"""

from __future__ import annotations

import importlib
import re
from typing import Callable

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_MARKUP = r"[\s*_\"'`]"
"""A blank, or markdown emphasis / quotes that may wrap a multiple-choice letter."""


def _canonical_number(text: str) -> str:
    """'1,234.50' -> '1234.5'; '007' -> '7'."""
    text = text.replace(",", "")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    sign = "-" if text.startswith("-") else ""
    digits = text.lstrip("-").lstrip("0") or "0"
    if digits.startswith("."):
        digits = "0" + digits
    return sign + digits if digits != "0" else "0"


def extract_strip(text: str) -> str | None:
    """The whole response, stripped; None when empty.

    >>> extract_strip("  dcba ")
    'dcba'
    """
    text = text.strip()
    return text or None


def extract_last_number(text: str) -> str | None:
    """The last number in the text.

    >>> extract_last_number("3 apples and 1,200 pears")
    '1200'
    """
    found = _NUMBER.findall(text)
    return _canonical_number(found[-1]) if found else None


def extract_gsm8k(text: str) -> str | None:
    """The number after '####' (GSM8K reference format), else the last number.

    >>> extract_gsm8k("so 5 + 7 = 12\\n#### 12")
    '12'
    """
    if "####" in text:
        tail = extract_last_number(text.split("####", 1)[1].split("\n")[0])
        if tail is not None:
            return tail
    return extract_last_number(text)


def extract_boxed(text: str) -> str | None:
    """Contents of the last \\boxed{...} (MATH), braces balanced, spaces removed.

    >>> extract_boxed("so the answer is $\\\\boxed{\\\\frac{1}{2}}$")
    '\\\\frac{1}{2}'
    """
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].replace(" ", "") or None
    return None


def extract_choice(text: str) -> str | None:
    """A multiple-choice letter A-E: 'answer is (C)', 'Answer: C', else the last standalone capital.

    A lowercase letter counts only in parentheses, so the article in 'the answer is a cell' is no choice.
    Markdown emphasis and quotes around the letter ('the answer is **C**', 'Answer: "B"') are skipped.

    >>> extract_choice("The answer is (c).")
    'C'
    >>> extract_choice("The answer is a mitochondrion, so (C).")
    'C'
    >>> extract_choice("The answer is **C**.")
    'C'
    """
    hit = re.search(rf"(?i:answer)\s*(?i:is|:)?{_MARKUP}*(?:\(([A-Ea-e])\)|([A-E])\b)", text)
    if hit:
        return (hit.group(1) or hit.group(2)).upper()
    letters = re.findall(rf"\(([A-Ea-e])\)|(?:^|{_MARKUP})([A-E])(?=[).:]|{_MARKUP}|$)", text)
    return (letters[-1][0] or letters[-1][1]).upper() if letters else None


def extract_bool(text: str) -> str | None:
    """'true' or 'false' (also yes/no), the last one mentioned.

    >>> extract_bool("Step 1 ... so the claim is False.")
    'false'
    """
    words = re.findall(r"\b(true|false|yes|no)\b", text.lower())
    if not words:
        return None
    return "true" if words[-1] in ("true", "yes") else "false"


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
