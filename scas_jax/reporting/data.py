"""Load scores and selections for the report, and compute its tables (no plotting here)."""

from __future__ import annotations

import math
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from scas_jax.data.files import PoolFile, discover_pool, iter_rows
from scas_jax.data.jsonl import iter_jsonl, read_json
from scas_jax.data.rows import id_key, row_answer, row_teacher
from scas_jax.data.verdicts import correctness, correctness_at, has_flag
from scas_jax.errors import ScasError

# Score fields worth a distribution plot, in reading order (scas_method.md, step 8).
DEFAULT_FIELDS = (
    "scas_score",
    "scas_score_no_diag",
    "answer_mean_nll_score",
    "question_mean_nll",
    "nll_weight_score",
    "similarity_score",
    "answer_answer_similarity",
    "answer_question_similarity",
)
# Numeric fields that are not scores (never plotted unless asked for).
NOT_SCORES = {"id", "lambda_scas", "answer_answer_weight", "score_rank", "group", "score_value"}


@dataclass
class ScoreSet:
    """Every row of a score (or candidate) directory, by teacher, in file order."""

    input_dir: Path
    files: list[PoolFile]
    rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    verdicts: dict[tuple[str, str], bool | None] = field(default_factory=dict)  # (id key, teacher) -> flag

    @property
    def kind(self) -> str:
        return self.files[0].kind

    @property
    def teachers(self) -> list[str]:
        return sorted(self.rows)

    def numeric_fields(self) -> list[str]:
        """Fields with a finite number in at least one row (booleans excluded)."""
        found: set[str] = set()
        for rows in self.rows.values():
            for row in rows:
                found.update(k for k, v in row.items() if _finite(v))
        return sorted(found - NOT_SCORES)

    def values(self, name: str) -> tuple[dict[str, list[float]], int]:
        """``({teacher: finite values}, number of rows skipped)``: rows with a scoring
        error, a missing value or a non-finite value are skipped, as selection does."""
        out, skipped = {}, 0
        for teacher, rows in self.rows.items():
            vals = []
            for row in rows:
                v = row.get(name)
                if row.get("scas_scoring_error") or not _finite(v):
                    skipped += 1
                else:
                    vals.append(float(v))
            out[teacher] = vals
        return out, skipped


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def load_scores(input_dir: str | Path) -> ScoreSet:
    """Read every row of the score files (or, failing those, the candidate files) of a directory."""
    input_dir = Path(input_dir)
    files = discover_pool(input_dir)
    scores = ScoreSet(input_dir, files)
    for pf in files:
        for line, row in iter_rows(pf):
            teacher = str(row_teacher(row, pf.teacher))
            verdict = correctness_at(row, f"{pf.path}:{line}")
            scores.rows.setdefault(teacher, []).append(row)
            if row.get("id") is not None and has_flag(row):
                scores.verdicts.setdefault((id_key(row["id"]), teacher), verdict)
    if not scores.rows:
        raise ScasError(f"empty pool: no rows in {', '.join(pf.path.name for pf in files)}")
    return scores


# --- per-teacher summary ---------------------------------------------------------------


def answer_words(row: dict[str, Any]) -> int:
    """Whitespace-separated words of the row's answer."""
    return len(str(row_answer(row) or "").split())


@dataclass
class TeacherStats:
    """One teacher's rows in the score set: flag counts among them, lengths, scoring errors.

    The flags counted here are those of the *scored* rows only; they are not the
    teacher's accuracy (``score`` skips answers flagged incorrect). Accuracy over every
    answer comes from ``verify``'s output (:mod:`scas_jax.reporting.accuracy`).
    """

    rows: int
    correct: int
    incorrect: int
    undecided: int
    flagged: int
    words: list[int]
    scoring_errors: int


def teacher_stats(scores: ScoreSet) -> dict[str, TeacherStats]:
    """Flag counts, answer lengths and error counts per teacher (flags read by data.verdicts)."""
    out = {}
    for teacher in scores.teachers:
        rows = scores.rows[teacher]
        flags = Counter(correctness(r) if has_flag(r) else "absent" for r in rows)  # validated on load
        out[teacher] = TeacherStats(
            rows=len(rows),
            correct=flags[True],
            incorrect=flags[False],
            undecided=flags[None],
            flagged=len(rows) - flags["absent"],
            words=[answer_words(r) for r in rows],
            scoring_errors=sum(1 for r in rows if r.get("scas_scoring_error")),
        )
    return out


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


# --- selections ------------------------------------------------------------------------


@dataclass
class Selection:
    """One selection run: a label, its manifest and ``{item key: chosen row}``."""

    label: str
    manifest_path: Path
    manifest: dict[str, Any]
    rows: dict[str, dict[str, Any]]

    @property
    def strategy(self) -> str:
        return self.manifest.get("strategy", "?")


def selection_label(m: dict[str, Any]) -> str:
    """A short human label: ``groups scas_score G=5 g=1``, ``min scas_score``, ``teacher X``..."""
    s = m.get("strategy")
    p = m.get("parameters", {})
    if s == "groups":
        return f"groups {m.get('score_key')} G={m.get('num_groups')} g={m.get('selected_group')}"
    if s == "min":
        return f"min {m.get('score_key')}"
    if s == "teacher":
        return f"teacher {p.get('teacher')}"
    if s == "random":
        return f"random seed={p.get('seed')}"
    return str(s)


def find_manifests(path: str | Path) -> list[Path]:
    """``path`` itself when it is a file, else every selection ``manifest.json`` below it."""
    path = Path(path)
    if not path.exists():
        raise ScasError(f"selection path {path} does not exist")
    if path.is_file():
        return [path]
    found = sorted(path.rglob("manifest.json"))
    found = [p for p in found if "selected_file" in _read_json(p)]
    if not found:
        raise ScasError(f"no selection manifest.json (written by `scas-jax select`) under {path}")
    return found


def _read_json(path: Path) -> dict[str, Any]:
    data = read_json(path, "manifest")
    if not isinstance(data, dict):
        raise ScasError(f"{path}: a manifest must be a JSON object")
    return data


def load_selections(paths: Iterable[str | Path]) -> list[Selection]:
    """Every selection found under ``paths``, labelled uniquely, in a stable order."""
    out: list[Selection] = []
    seen: Counter = Counter()
    for mp in (m for p in paths for m in find_manifests(p)):
        manifest = _read_json(mp)
        if "selected_file" not in manifest:
            raise ScasError(f"{mp}: not a selection manifest (no 'selected_file')")
        data = mp.parent / manifest["selected_file"]
        if not data.exists():
            raise ScasError(f"{mp}: its selected file {data} is missing")
        rows = {}
        for line, row in iter_jsonl(data):
            if row.get("id") is None:
                raise ScasError(f"{data}:{line}: selected row without an id")
            rows[id_key(row["id"])] = row
        label = selection_label(manifest)
        seen[label] += 1
        if seen[label] > 1:
            label = f"{label} #{seen[label]}"
        out.append(Selection(label, mp, manifest, rows))
    order = {"min": 0, "groups": 1, "strongest": 2, "teacher": 3, "random": 4}
    return sorted(out, key=lambda s: (order.get(s.strategy, 9), s.label))


def share_table(selections: list[Selection]) -> dict[str, dict[str, float]]:
    """``{label: {teacher: share of selected rows}}``."""
    table = {}
    for sel in selections:
        counts = Counter(str(r.get("teacher_name")) for r in sel.rows.values())
        total = sum(counts.values()) or 1
        table[sel.label] = {t: n / total for t, n in counts.items()}
    return table


def agreement_matrix(selections: list[Selection]) -> list[list[tuple[int, int]]]:
    """``[i][j] = (items where both chose the same teacher, items both selected)``."""
    out = []
    for a in selections:
        row = []
        for b in selections:
            common = a.rows.keys() & b.rows.keys()
            same = sum(1 for k in common if a.rows[k].get("teacher_name") == b.rows[k].get("teacher_name"))
            row.append((same, len(common)))
        out.append(row)
    return out


def all_agree(selections: list[Selection]) -> tuple[int, int]:
    """``(items where every selection chose the same teacher, items every selection has)``."""
    if not selections:
        return 0, 0
    common = set.intersection(*(set(s.rows) for s in selections))
    same = sum(1 for k in common if len({s.rows[k].get("teacher_name") for s in selections}) == 1)
    return same, len(common)


def selected_quality(sel: Selection, verdicts: dict[tuple[str, str], bool | None]) -> dict[str, Any]:
    """Mean words, share verified correct and mean score of the chosen rows.

    ``verdicts``: ``{(id key, teacher): flag}``, from ``verify``'s output when the report
    has it, else from the score set; a chosen row absent from it is not counted.
    """
    looked = [verdicts.get((k, str(r.get("teacher_name"))), "absent") for k, r in sel.rows.items()]
    judged = [f for f in looked if f != "absent"]
    values = [r["score_value"] for r in sel.rows.values() if _finite(r.get("score_value"))]
    words = [answer_words(r) for r in sel.rows.values()]
    return {
        "rows": len(sel.rows),
        "mean_words": sum(words) / len(words) if words else None,
        "verified_share": sum(1 for f in judged if f is True) / len(judged) if judged else None,
        "mean_score": sum(values) / len(values) if values else None,
        "score_key": next((r.get("score_key") for r in sel.rows.values() if r.get("score_key")), None),
    }
