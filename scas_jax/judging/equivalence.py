"""Normalise answer strings and decide whether two answers are equivalent.

Numbers are parsed exactly (``fractions.Fraction``): integers with thousands commas,
decimals, ``a/b``, ``\\frac{a}{b}`` (also ``\\dfrac``, ``\\tfrac``, ``\\frac12``), mixed
numbers (``1 1/2``), percentages, a leading currency sign and trailing unit words
(``$1,200.50``, ``18 dollars``, ``5 cm^2``). The verdict is three-valued: True, False or
None (undecided), never a guess.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

REL_TOL = Fraction(1, 10**6)

_WRAPPERS = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_SPACING = re.compile(r"\\[,;:! ]|\\quad|\\qquad|\\left|\\right")
_DEGREES = re.compile(r"\^\s*\{?\\circ\}?|°")
_ASSIGN = re.compile(r"^[A-Za-z][A-Za-z0-9_]*\s*=\s*(?=[-+$\\.\d])")
_CURRENCY = re.compile(r"^(?:\\\$|\$|€|£|USD|Rs\.?)\s*")
_PERCENT = re.compile(r"\s*(?:\\%|%|percent|per\s*cent)$", re.I)
_UNIT = re.compile(r"^(.*?\d\}?)\s*([A-Za-z][A-Za-z .'/²³-]*(?:\^\{?\d\}?)?)$")
_NUM = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|\.\d+"
_DECIMAL = re.compile(rf"^([-+]?)({_NUM})$")
_SLASH = re.compile(rf"^([-+]?)({_NUM})\s*/\s*({_NUM})$")
_FRAC = re.compile(r"^([-+]?)\\frac\s*(?:\{\s*([-+]?" + _NUM + r")\s*\}|(\d))\s*(?:\{\s*(" + _NUM + r")\s*\}|(\d))$")
_MIXED = re.compile(r"^([-+]?)(\d+)\s*(?:\s(\d+)\s*/\s*(\d+)|\\frac\s*\{(\d+)\}\s*\{(\d+)\})$")


@dataclass(frozen=True)
class Number:
    """A parsed numeric answer: its exact value and whether it was written as a percentage."""

    value: Fraction
    percent: bool = False


def clean(text: object) -> str:
    """Strip LaTeX wrappers, math delimiters, spacing commands, degrees and a final period."""
    s = "" if text is None else str(text)
    s = s.strip()
    for left, right in (("$$", "$$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(left) and s.endswith(right) and len(s) >= len(left) + len(right):
            s = s[len(left) : len(s) - len(right)].strip()
    if len(s) >= 2 and s.startswith("$") and s.endswith("$") and s.count("$") == 2:
        s = s[1:-1].strip()
    prev = None
    while prev != s:
        prev, s = s, _WRAPPERS.sub(r"\1", s)
    s = _SPACING.sub("", s)
    s = _DEGREES.sub("", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("−", "-")
    s = re.sub(r"\s+", " ", s).strip()
    s = s.rstrip(".").strip()
    return s


def _to_fraction(token: str) -> Fraction:
    return Fraction(token.replace(",", ""))


def _parse_plain(s: str) -> Fraction | None:
    m = _DECIMAL.match(s)
    if m:
        v = _to_fraction(m.group(2))
        return -v if m.group(1) == "-" else v
    m = _SLASH.match(s)
    if m:
        den = _to_fraction(m.group(3))
        if den == 0:
            return None
        v = _to_fraction(m.group(2)) / den
        return -v if m.group(1) == "-" else v
    m = _FRAC.match(s)
    if m:
        num = _to_fraction(m.group(2) or m.group(3))
        den = _to_fraction(m.group(4) or m.group(5))
        if den == 0:
            return None
        v = num / den
        return -v if m.group(1) == "-" else v
    m = _MIXED.match(s)
    if m:
        whole = int(m.group(2))
        num, den = (m.group(3), m.group(4)) if m.group(3) else (m.group(5), m.group(6))
        if int(den) == 0:
            return None
        v = whole + Fraction(int(num), int(den))
        return -v if m.group(1) == "-" else v
    return None


def parse_number(text: object) -> Number | None:
    """The number an answer string states, or None when it is not exactly one number."""
    s = clean(text)
    if not s:
        return None
    s = _ASSIGN.sub("", s)
    sign = ""
    if s[:1] in "-+" and _CURRENCY.match(s[1:].lstrip()):
        sign, s = s[0], s[1:].lstrip()
    s = _CURRENCY.sub("", s)
    s = sign + s
    percent = False
    if _PERCENT.search(s):
        s, percent = _PERCENT.sub("", s), True
    value = _parse_plain(s)
    if value is None:
        m = _UNIT.match(s)
        if m and not re.search(r"\d", m.group(2).split("^")[0]):
            head = m.group(1).strip()
            if _PERCENT.search(head):
                head, percent = _PERCENT.sub("", head), True
            value = _parse_plain(head)
    return None if value is None else Number(value, percent)


def normalise_text(text: object) -> str:
    """Lower-cased, space-free form of a non-numeric answer, for string comparison."""
    return re.sub(r"\s+", "", clean(text)).lower()


def numbers_equal(pred: Number, ref: Number) -> tuple[bool, str]:
    """Exact equality, or within a relative 1e-6; a percentage also matches its /100 value."""
    def close(a: Fraction, b: Fraction) -> bool:
        return a == b or abs(a - b) <= REL_TOL * max(1, abs(b))

    if close(pred.value, ref.value):
        return True, "equal"
    if pred.percent != ref.percent:
        p = pred.value / 100 if pred.percent else pred.value
        r = ref.value / 100 if ref.percent else ref.value
        if close(p, r):
            return True, "equal as a percentage"
    return False, "different"


def fmt(x: Fraction) -> str:
    """A short decimal (or a/b) rendering of an exact value, for judge reasons."""
    if x.denominator == 1:
        return str(x.numerator)
    d = float(x)
    return f"{d:g}" if Fraction(d).limit_denominator(10**9) == x else f"{x.numerator}/{x.denominator}"
