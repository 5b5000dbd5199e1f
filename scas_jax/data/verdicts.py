"""``teacher_correct``: the one reader of a row's correctness flag.

Every stage (score, select, verify, report, train, evaluate) asks this module what a
row's flag says, so ``"teacher_correct": "true"`` means the same thing everywhere.

The flag is the row's ``teacher_correct`` field, or, when the row has no such key,
its ``is_correct`` field. Its value reads as:

=====================================================  ===========
JSON value                                             verdict
=====================================================  ===========
``true``, ``1``, ``"true"``, ``"yes"``, ``"1"``        correct
``false``, ``0``, ``"false"``, ``"no"``, ``"0"``       incorrect
``null``, ``""``, ``"null"``, ``"none"``,              undecided
``"undecided"``, ``"unknown"``
=====================================================  ===========

Strings are compared after stripping and lower-casing. Anything else (another number,
another string, a list) is an error: :class:`VerdictError`, which callers turn into a
``file:line`` message. A row with neither key carries no flag (:func:`has_flag` is
False): a pool that was never judged.
"""

from __future__ import annotations

from typing import Any

from scas_jax.errors import ScasError

FLAG_FIELDS = ("teacher_correct", "is_correct")
_TRUE = frozenset({"true", "yes", "1"})
_FALSE = frozenset({"false", "no", "0"})
_UNDECIDED = frozenset({"", "null", "none", "undecided", "unknown"})


class VerdictError(ScasError):
    """A correctness flag with a value that is not a verdict."""


def flag_field(row: dict[str, Any]) -> str | None:
    """The field that holds the row's flag: ``teacher_correct``, else ``is_correct``, else None."""
    for name in FLAG_FIELDS:
        if name in row:
            return name
    return None


def has_flag(row: dict[str, Any]) -> bool:
    return flag_field(row) is not None


def parse_verdict(value: Any, field: str = "teacher_correct") -> bool | None:
    """True (correct), False (incorrect) or None (undecided) for one flag value."""
    if value is None:
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        if text in _UNDECIDED:
            return None
    raise VerdictError(
        f"{field}={value!r} is not a verdict: use true/false (also 1/0, \"yes\"/\"no\") "
        "or null for undecided"
    )


def correctness(row: dict[str, Any]) -> bool | None:
    """The row's verdict: True, False, or None when undecided or unflagged."""
    name = flag_field(row)
    return None if name is None else parse_verdict(row[name], name)


def is_rejected(row: dict[str, Any]) -> bool:
    """Flagged incorrect (``score`` skips such rows unless asked to include them)."""
    return correctness(row) is False


def is_verified(row: dict[str, Any]) -> bool:
    """Flagged correct, or from a pool that carries no flag at all (nothing to go by)."""
    return not has_flag(row) or correctness(row) is True


def correctness_at(row: dict[str, Any], where: str) -> bool | None:
    """:func:`correctness`, with ``where`` (``file:line``) leading the message of an invalid flag."""
    try:
        return correctness(row)
    except VerdictError as exc:
        raise VerdictError(f"{where}: {exc}" if where else str(exc)) from None
