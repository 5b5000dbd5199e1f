"""Find the JSONL files of a candidate pool or of a scoring run, and read them.

Self-contained on purpose: selection, verification and reporting only need file
names and JSON rows, never the tokenizer or the model.

Naming rules (scas_method.md, "Inputs"):

- scoring outputs are ``<teacher>_scas_scores.jsonl``;
- candidate files end in ``_teacher_responses_evaluated.jsonl``,
  ``_teacher_responses.jsonl``, ``_student_train.jsonl`` or ``.jsonl``, checked in
  that order; the teacher name is the file name without the suffix. Score files are
  never candidates.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from scas_jax.data.pool import iter_jsonl
from scas_jax.errors import ScasError

SCORED_SUFFIX = "_scas_scores.jsonl"
CANDIDATE_SUFFIXES = (
    "_teacher_responses_evaluated.jsonl",
    "_teacher_responses.jsonl",
    "_student_train.jsonl",
    ".jsonl",
)

SCORES = "scores"
CANDIDATES = "candidates"


@dataclass(frozen=True)
class PoolFile:
    """One teacher's file: where it is, the teacher its name implies, and its kind."""

    path: Path
    teacher: str
    kind: str  # SCORES or CANDIDATES


def teacher_from_filename(name: str) -> str:
    """The teacher name a file name implies (score suffix first, then candidate suffixes)."""
    for suffix in (SCORED_SUFFIX, *CANDIDATE_SUFFIXES):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def _jsonl_files(input_dir: Path) -> list[Path]:
    if not input_dir.exists():
        raise ScasError(f"input directory {input_dir} does not exist")
    if not input_dir.is_dir():
        raise ScasError(f"{input_dir} is not a directory")
    return sorted(
        (p for p in input_dir.iterdir() if p.is_file() and p.name.endswith(".jsonl") and not p.name.startswith(".")),
        key=lambda p: p.name,
    )


def discover_score_files(input_dir: str | Path) -> list[PoolFile]:
    """``*_scas_scores.jsonl`` in ``input_dir``, sorted by name (the reference's order)."""
    input_dir = Path(input_dir)
    return [
        PoolFile(p, teacher_from_filename(p.name), SCORES)
        for p in _jsonl_files(input_dir)
        if p.name.endswith(SCORED_SUFFIX)
    ]


def discover_candidate_files(input_dir: str | Path) -> list[PoolFile]:
    """Candidate files in ``input_dir`` (every ``*.jsonl`` that is not a score file)."""
    input_dir = Path(input_dir)
    return [
        PoolFile(p, teacher_from_filename(p.name), CANDIDATES)
        for p in _jsonl_files(input_dir)
        if not p.name.endswith(SCORED_SUFFIX)
    ]


def discover_pool(input_dir: str | Path) -> list[PoolFile]:
    """Score files when the directory has any, else candidate files; an error if neither."""
    input_dir = Path(input_dir)
    files = discover_score_files(input_dir) or discover_candidate_files(input_dir)
    if not files:
        raise ScasError(
            f"no pool files in {input_dir}: expected <teacher>{SCORED_SUFFIX} score files "
            "or <teacher>.jsonl candidate files"
        )
    return files


def require_score_files(input_dir: str | Path) -> list[PoolFile]:
    """Score files of ``input_dir``; an error naming what was found instead when none."""
    input_dir = Path(input_dir)
    files = discover_score_files(input_dir)
    if not files:
        others = [p.name for p in _jsonl_files(input_dir)]
        hint = f" (found {', '.join(others[:5])}{'...' if len(others) > 5 else ''}: candidate files, not scores)" if others else ""
        raise ScasError(f"no *{SCORED_SUFFIX} score files in {input_dir}{hint}")
    return files


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, row)`` for each non-blank line; ``file:line: message`` on bad
    input (the pool reader's, so every stage reports bad JSONL the same way)."""
    return iter_jsonl(Path(path))


def sha256_file(path: str | Path) -> str:
    """``sha256:<hex>`` of a file's bytes."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()
