"""What each selection picked, beside what it could have picked.

For a selection that ranks by a score (its rows carry ``score_key``), every item's
alternatives are the rows of the score set with the same id, ordered as selection
orders them: ascending ``(score, str(teacher))``, file order on ties
(scas_method.md, "Selection"). An alternative the selection could not use (no finite
score, a scoring error, or not verified correct when the run was ``verified_only``) is
listed without a rank, with the reason. The rank of the others is their 1-based place
among the usable ones, which is the ``score_rank`` selection wrote for the chosen one.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scas_jax.data.rows import id_key, parse_score
from scas_jax.data.verdicts import correctness, has_flag
from scas_jax.reporting.data import ScoreSet, Selection

CSV_COLUMNS = ("selection", "score_key", "id", "teacher", "score", "rank", "chosen", "skipped", "verdict")


@dataclass(frozen=True)
class Alternative:
    """One answer to an item: its teacher, score, rank (None when skipped), and verdict."""

    teacher: str
    score: float | None
    rank: int | None
    skipped: str  # "" when the selection could use it, else why not
    verdict: bool | None | str  # True / False / None (undecided) / "absent"
    chosen: bool


@dataclass(frozen=True)
class Pick:
    """One item of a selection: its id and every answer, cheapest first (skipped ones last)."""

    key: str
    id: Any
    answers: list[Alternative]

    @property
    def chosen(self) -> Alternative | None:
        return next((a for a in self.answers if a.chosen), None)


def _skip_reason(row: dict[str, Any], score_key: str, verified_only: bool) -> tuple[float | None, str]:
    if row.get("scas_scoring_error"):
        return None, "scoring error"
    score, reason = parse_score(row.get(score_key))
    if reason is not None:
        return None, reason.replace("_", " ")
    if verified_only and has_flag(row) and correctness(row) is not True:
        return score, "not verified"
    return score, ""


def item_index(scores: ScoreSet) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """``{id key: [(teacher, row), ...]}`` over the score set, in file order."""
    out: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for teacher in sorted(scores.rows):  # order matters only for one teacher answering twice
        for row in scores.rows[teacher]:
            if row.get("id") is not None:
                out.setdefault(id_key(row["id"]), []).append((teacher, row))
    return out


def picks_for(sel: Selection, index: dict[str, list[tuple[str, dict[str, Any]]]],
              verdicts: dict[tuple[str, str], bool | None]) -> list[Pick] | None:
    """Every item of ``sel`` with its alternatives; None when ``sel`` has no scores."""
    score_key = next((r.get("score_key") for r in sel.rows.values() if r.get("score_key")), None)
    if score_key is None:
        return None
    verified_only = bool(sel.manifest.get("parameters", {}).get("verified_only"))
    out = []
    for key in sorted(sel.rows):
        chosen_row = sel.rows[key]
        chosen_teacher = str(chosen_row.get("teacher_name"))
        usable, skipped = [], []
        for teacher, row in index.get(key, []):
            score, why = _skip_reason(row, score_key, verified_only)
            (skipped if why else usable).append((teacher, row, score, why))
        usable.sort(key=lambda x: (x[2], x[0]))
        answers, marked = [], False
        for rank, (teacher, _, score, _) in enumerate(usable, start=1):
            hit = not marked and teacher == chosen_teacher and score == chosen_row.get("score_value")
            marked |= hit
            answers.append(Alternative(teacher, score, rank, "", verdicts.get((key, teacher), "absent"), hit))
        for teacher, _, score, why in skipped:
            answers.append(Alternative(teacher, score, None, why, verdicts.get((key, teacher), "absent"), False))
        out.append(Pick(key, chosen_row.get("id"), answers))
    return out


def _verdict_text(v: bool | None | str) -> str:
    return {True: "correct", False: "incorrect", None: "undecided"}.get(v, "") if v != "absent" else ""


def write_csv(path: Path, table: dict[str, tuple[str, list[Pick]]]) -> int:
    """``picks.csv``: one line per (selection, item, answer); returns the number of lines written."""
    n = 0
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for label, (score_key, picks) in table.items():
            for p in picks:
                for a in p.answers:
                    w.writerow([label, score_key, p.id, a.teacher, "" if a.score is None else repr(a.score),
                                "" if a.rank is None else a.rank, int(a.chosen), a.skipped,
                                _verdict_text(a.verdict)])
                    n += 1
    return n


def markdown_rows(picks: list[Pick], limit: int = 10) -> list[list[str]]:
    """Table rows for the first ``limit`` items: id, the pick, and every answer cheapest first."""
    rows = []
    for p in picks[:limit]:
        c = p.chosen
        usable = sum(1 for a in p.answers if a.rank is not None)
        picked = "–" if c is None else f"**{c.teacher}** {c.score:.4g} (rank {c.rank} of {usable})"
        alts = []
        for a in p.answers:
            mark = "" if a.verdict in ("absent", True) else " ✗" if a.verdict is False else " ?"
            text = f"{a.teacher} {'–' if a.score is None else f'{a.score:.4g}'}{mark}"
            if a.chosen:
                text = f"**{text}**"
            elif a.skipped:
                text = f"~~{text}~~ ({a.skipped})"
            alts.append(text)
        rows.append([f"`{p.id}`", picked, " · ".join(alts)])
    return rows
