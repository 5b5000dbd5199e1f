"""Find the final answer in a solution text.

Markers, in priority order (the first kind present wins; within a kind, the last
occurrence wins):

1. ``\\boxed{...}`` (or ``\\fbox{...}``), braces matched so ``\\boxed{\\frac{1}{2}}`` works;
2. ``#### x`` (GSM8K's own marker), the rest of that line;
3. ``A: x`` / ``Answer: x`` / ``Final answer: x`` at the start of a line;
4. ``The answer is x`` / ``The final answer is x``, up to the end of the sentence.

There is deliberately no "last number in the text" fallback: a text with none of
these markers has no final answer, and the judge calls it undecided.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_BOX = re.compile(r"\\(?:boxed|fbox)\s*")
_HASHES = re.compile(r"####[ \t]*([^\n]*)")
_A_LINE = re.compile(r"(?im)^[ \t]*(?:final[ \t]+answer|answer|a)[ \t]*:[ \t]*([^\n]*)$")
_ANSWER_IS = re.compile(r"(?i)\bthe\s+(?:final\s+)?answer\s+is\s*:?\s*([^\n]*)")
_SENTENCE_END = re.compile(r"\.(?:\s+[A-Z(]|\s*$)")


@dataclass(frozen=True)
class Extraction:
    """The final answer's text and the marker that gave it."""

    answer: str
    marker: str  # "boxed", "####", "A:", "answer is"


def _braced(text: str, start: int) -> str | None:
    """The content of the ``{...}`` group opening at ``text[start]``, nested braces included."""
    if start >= len(text) or text[start] != "{":
        return None
    depth = 0
    for i in range(start, len(text)):
        ch = text[i]
        if ch == "{" and (i == 0 or text[i - 1] != "\\"):
            depth += 1
        elif ch == "}" and (i == 0 or text[i - 1] != "\\"):
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
    return None  # unbalanced


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\boxed x``) in ``text``."""
    found = None
    for m in _BOX.finditer(text):
        inner = _braced(text, m.end())
        if inner is None:
            bare = re.match(r"([^\s$]+)", text[m.end():])
            inner = bare.group(1) if bare and not text[m.end():].startswith("{") else None
        if inner is not None:
            found = inner
    return found


def _cut_sentence(text: str) -> str:
    m = _SENTENCE_END.search(text)
    return text[: m.start()] if m else text


def extract_final_answer(text: object) -> Extraction | None:
    """The final answer of a solution, or None when it has no recognised marker."""
    if not isinstance(text, str) or not text.strip():
        return None
    boxed = last_boxed(text)
    if boxed is not None:
        return Extraction(boxed.strip(), "boxed")
    hashes = _HASHES.findall(text)
    if hashes:
        return Extraction(hashes[-1].strip(), "####")
    a_lines = _A_LINE.findall(text)
    if a_lines:
        return Extraction(a_lines[-1].strip(), "A:")
    said = _ANSWER_IS.findall(text)
    if said:
        return Extraction(_cut_sentence(said[-1]).strip(), "answer is")
    return None
