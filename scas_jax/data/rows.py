"""What a pool row says: its id key, teacher, answer and score, and the candidate type.

Every stage reads rows through these functions, so a row means the same thing to
``score``, ``select``, ``verify``, ``report`` and ``train`` (scas_method.md, "Inputs"):

* the item key is ``json.dumps(id, ensure_ascii=False, sort_keys=True)`` (:func:`id_key`);
* the teacher is ``teacher_name``, else ``teacher``, else the file's teacher (falsy
  values fall through, as in the reference) (:func:`row_teacher`);
* the answer is ``teacher_output``, else ``output`` (:func:`row_answer`);
* a score is a finite number or numeric string, never a boolean (:func:`parse_score`).

The correctness flag has its own reader, :mod:`scas_jax.data.verdicts`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from scas_jax.data.verdicts import correctness_at, has_flag

MISSING_FIELDS_ERROR = "Missing instruction or teacher_output/output."

# Why a score cannot be used (selection's skip reasons).
MISSING_SCORE = "missing_score"
NON_NUMERIC_SCORE = "non_numeric_score"
NON_FINITE_SCORE = "non_finite_score"


def id_key(value: Any) -> str:
    """The grouping key of an item id: ``json.dumps(id, ensure_ascii=False, sort_keys=True)``."""
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def row_teacher(row: dict[str, Any], file_teacher: Any) -> Any:
    """``teacher_name``, else ``teacher``, else ``file_teacher`` (falsy values fall through).

    The value is returned as the row spells it (the reference writes it back unchanged
    and compares ``str(teacher)``); use ``str()`` for a name.
    """
    return row.get("teacher_name") or row.get("teacher") or file_teacher


def row_answer(row: dict[str, Any]) -> Any:
    """``teacher_output``, else ``output`` (None when both are missing or empty)."""
    return row.get("teacher_output") or row.get("output") or None


def missing_fields_error(row: dict[str, Any]) -> str | None:
    """The reference's error message when the instruction or the answer is missing/empty."""
    if not row.get("instruction") or row_answer(row) is None:
        return MISSING_FIELDS_ERROR
    return None


def parse_score(value: Any) -> tuple[float | None, str | None]:
    """``(score, None)`` for a finite number, else ``(None, reason)``.

    Numbers and numeric strings are accepted (as ``float()`` does in the reference);
    booleans, other types, NaN and infinities are not.
    """
    if value is None:
        return None, MISSING_SCORE
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None, NON_NUMERIC_SCORE
    try:
        out = float(value)
    except ValueError:
        return None, NON_NUMERIC_SCORE
    if not math.isfinite(out):
        return None, NON_FINITE_SCORE
    return out, None


@dataclass(frozen=True)
class Candidate:
    """One teacher answer read from a pool file.

    key: the item key (:func:`id_key` of the row's id; None when the row has no id).
    row: the original row, every field kept (never mutated).
    teacher: the row's teacher (:func:`row_teacher`); compare with ``str(teacher)``.
    score: the ranking score when one was asked for and is usable, else None.
    source: ``"file:line"``, for messages.
    line: 1-based line number in its file (0 when not read from a file).
    error: why this row cannot be scored (missing instruction/answer), else None.
    """

    key: str | None
    row: dict[str, Any]
    teacher: Any
    score: float | None = None
    source: str = ""
    line: int = 0
    error: str | None = None

    @property
    def id(self) -> Any:
        return self.row.get("id")

    @property
    def verdict(self) -> bool | None:
        """The row's correctness flag (True, False, None); ``file:line`` error when invalid."""
        return correctness_at(self.row, self.source)

    @property
    def verified(self) -> bool:
        """Flagged correct, or from a pool without flags (see :func:`verdicts.is_verified`)."""
        return not has_flag(self.row) or self.verdict is True
