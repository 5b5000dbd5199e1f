"""Load pool rows into per-item candidate lists, counting every row that is skipped.

A row is skipped, with a counted reason, when it has no ``id``, carries a
``scas_scoring_error``, lacks the score (when a score is required), has a score that
is not a number or not finite, or (only when asked) is not verified correct. Items are
keyed by ``json.dumps(id, ensure_ascii=False, sort_keys=True)``; candidates keep file
order (files sorted by name, then line order), which is what the reference's stable
sort sees.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

from scas_jax.errors import ScasError
from scas_jax.selection.files import PoolFile, read_jsonl

# Skip reasons, in the order they are checked.
MISSING_ID = "missing_id"
SCORING_ERROR = "scoring_error"
MISSING_SCORE = "missing_score"
NON_NUMERIC_SCORE = "non_numeric_score"
NON_FINITE_SCORE = "non_finite_score"
UNVERIFIED = "not_verified_correct"

VERIFICATION_FIELDS = ("teacher_correct", "is_correct")


@dataclass
class Candidate:
    """One teacher answer to one item."""

    key: str
    row: dict[str, Any]
    teacher: Any  # as in the row (normally a string); compare with str(teacher)
    score: float | None
    source: str  # "file:line", for messages


@dataclass
class Pool:
    """Candidates grouped by item key, plus what was read and skipped."""

    files: list[PoolFile]
    items: dict[str, list[Candidate]] = field(default_factory=dict)
    rows_read: int = 0
    skipped: Counter = field(default_factory=Counter)
    score_key: str | None = None

    @property
    def candidates(self) -> int:
        return sum(len(c) for c in self.items.values())

    def teachers(self) -> list[str]:
        """Every teacher with at least one kept candidate, sorted."""
        return sorted({str(c.teacher) for cands in self.items.values() for c in cands})


def canonical_id(value: Any) -> str:
    """The grouping key of an item id (the reference's)."""
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def row_teacher(row: dict[str, Any], file_teacher: str) -> Any:
    """``teacher_name``, else ``teacher``, else the file's teacher (falsy values fall through)."""
    return row.get("teacher_name") or row.get("teacher") or file_teacher


def parse_score(value: Any) -> tuple[float | None, str | None]:
    """``(score, None)`` for a finite number, else ``(None, skip_reason)``.

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


def verification_flag(row: dict[str, Any]) -> bool | None | str:
    """The row's correctness flag: True, False, None (undecided) or ``"absent"``."""
    for name in VERIFICATION_FIELDS:
        if name in row:
            value = row[name]
            return value if isinstance(value, bool) else None
    return "absent"


def is_verified(row: dict[str, Any]) -> bool:
    """A row counts as verified when flagged True, or when the pool carries no flag at all."""
    flag = verification_flag(row)
    return flag is True or flag == "absent"


def load_pool(
    files: Iterable[PoolFile],
    *,
    score_key: str | None,
    require_score: bool,
    verified_only: bool,
) -> Pool:
    """Read ``files`` into a :class:`Pool`.

    With ``require_score``, rows without a finite ``score_key`` are skipped (the
    reference's rule); without it the score is kept when present and ignored when not.
    Rows with ``scas_scoring_error`` are always skipped, as in the reference.
    """
    files = list(files)
    pool = Pool(files=files, score_key=score_key)
    items: dict[str, list[Candidate]] = {}
    key_seen = False
    for pf in files:
        for line_no, row in read_jsonl(pf.path):
            pool.rows_read += 1
            if score_key is not None and score_key in row:
                key_seen = True
            if row.get("id") is None:
                pool.skipped[MISSING_ID] += 1
                continue
            if row.get("scas_scoring_error"):
                pool.skipped[SCORING_ERROR] += 1
                continue
            score = None
            if score_key is not None:
                score, reason = parse_score(row.get(score_key))
                if reason is not None and require_score:
                    pool.skipped[reason] += 1
                    continue
            if verified_only and not is_verified(row):
                pool.skipped[UNVERIFIED] += 1
                continue
            key = canonical_id(row["id"])
            cand = Candidate(key, row, row_teacher(row, pf.teacher), score, f"{pf.path}:{line_no}")
            items.setdefault(key, []).append(cand)
    if pool.rows_read == 0:
        names = ", ".join(pf.path.name for pf in files)
        raise ScasError(f"empty pool: no rows in {names}")
    if require_score and score_key is not None and not key_seen:
        raise ScasError(
            f"score key {score_key!r} is in no row of {', '.join(pf.path.name for pf in files)}; "
            f"numeric fields of the first rows: {', '.join(numeric_fields(files)) or 'none'}"
        )
    pool.items = {k: items[k] for k in sorted(items)}
    return pool


def numeric_fields(files: Iterable[PoolFile], max_rows: int = 20) -> list[str]:
    """Fields holding finite numbers in the first rows of each file (for error hints)."""
    found: set[str] = set()
    for pf in files:
        for i, (_, row) in enumerate(read_jsonl(pf.path)):
            if i >= max_rows:
                break
            found.update(
                k for k, v in row.items()
                if k != "id" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            )
    return sorted(found)


def skip_summary(skipped: Counter) -> str:
    """``reason=n, ...`` for messages."""
    return ", ".join(f"{k}={v}" for k, v in sorted(skipped.items())) or "none"


def drop_unverified(pool: Pool) -> Pool:
    """A copy of ``pool`` without candidates that are not verified correct (counted as skipped)."""
    out = Pool(files=pool.files, rows_read=pool.rows_read, skipped=Counter(pool.skipped), score_key=pool.score_key)
    for key, cands in pool.items.items():
        kept = [c for c in cands if is_verified(c.row)]
        out.skipped[UNVERIFIED] += len(cands) - len(kept)
        if kept:
            out.items[key] = kept
    if out.skipped[UNVERIFIED] == 0:
        del out.skipped[UNVERIFIED]
    return out
