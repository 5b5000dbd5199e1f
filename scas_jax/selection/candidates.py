"""Load pool rows into per-item candidate lists, counting every row that is skipped.

A row is skipped, with a counted reason, when it has no ``id``, carries a
``scas_scoring_error``, lacks the score (when a score is required), has a score that
is not a number or not finite, or (only when asked) is not verified correct (its flag,
read by :mod:`scas_jax.data.verdicts`, is not "correct"; a pool without flags counts as
verified). A flag that is not a verdict is an error naming ``file:line``. Items are
keyed by :func:`scas_jax.data.rows.id_key`; candidates keep file order (score files
sorted by name, candidate files by teacher, then line order), which is what the
reference's stable sort sees.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable

from scas_jax.data.files import PoolFile, iter_rows
from scas_jax.data.rows import (
    MISSING_SCORE,
    NON_FINITE_SCORE,
    NON_NUMERIC_SCORE,
    Candidate,
    id_key,
    parse_score,
    row_teacher,
)
from scas_jax.data.verdicts import correctness_at, has_flag
from scas_jax.errors import ScasError

# Skip reasons, in the order they are checked (the score reasons come from data.rows).
MISSING_ID = "missing_id"
SCORING_ERROR = "scoring_error"
UNVERIFIED = "not_verified_correct"
__all__ = [
    "MISSING_ID", "SCORING_ERROR", "MISSING_SCORE", "NON_NUMERIC_SCORE", "NON_FINITE_SCORE", "UNVERIFIED",
    "Candidate", "Pool", "drop_unverified", "load_pool", "numeric_fields", "parse_score", "row_teacher",
    "skip_summary",
]


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
        for line_no, row in iter_rows(pf):
            pool.rows_read += 1
            source = f"{pf.path}:{line_no}"
            verdict = correctness_at(row, source)  # an invalid flag is an error in every mode
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
            if verified_only and not (verdict is True or not has_flag(row)):
                pool.skipped[UNVERIFIED] += 1
                continue
            key = id_key(row["id"])
            cand = Candidate(key, row, str(row_teacher(row, pf.teacher)), score, source, line_no)
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
        for i, (_, row) in enumerate(iter_rows(pf)):
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
        kept = [c for c in cands if c.verified]
        out.skipped[UNVERIFIED] += len(cands) - len(kept)
        if kept:
            out.items[key] = kept
    if out.skipped[UNVERIFIED] == 0:
        del out.skipped[UNVERIFIED]
    return out
