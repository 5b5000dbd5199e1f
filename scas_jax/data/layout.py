"""File names of pools and scoring outputs: the one place that knows them.

A candidate directory holds one JSONL file per teacher (method page, "Inputs"). File
names end in one of :data:`CANDIDATE_SUFFIXES`, checked in that order; the teacher name
is the file name without the first suffix that matches. Scoring writes
``<teacher>_scas_scores.jsonl`` (:func:`score_file_name`); such files are outputs and
are never read as candidates.
"""

from __future__ import annotations

from pathlib import Path

SCORE_SUFFIX = "_scas_scores.jsonl"
CANDIDATE_SUFFIXES: tuple[str, ...] = (
    "_teacher_responses_evaluated.jsonl",
    "_teacher_responses.jsonl",
    "_student_train.jsonl",
    ".jsonl",
)


def score_file_name(teacher: str) -> str:
    """``<teacher>_scas_scores.jsonl``: the file scoring writes for a teacher."""
    return f"{teacher}{SCORE_SUFFIX}"


def is_score_file(path: str | Path) -> bool:
    return Path(path).name.endswith(SCORE_SUFFIX)


def teacher_from_filename(name: str | Path) -> str:
    """The teacher a file name implies: the score suffix first, then the candidate suffixes."""
    name = Path(name).name
    for suffix in (SCORE_SUFFIX, *CANDIDATE_SUFFIXES):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem
