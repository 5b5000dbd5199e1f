"""Find the teacher files of a pool directory (candidates or scoring outputs).

File naming lives in :mod:`scas_jax.data.layout`; this module applies it to a directory:

* **candidate files** end in one of ``layout.CANDIDATE_SUFFIXES``, checked in that
  order; the teacher is the name without the suffix. When two files give the same
  teacher, the one found through the earlier suffix wins and the other is *shadowed*.
  Score files are never candidates. Candidate files are returned sorted by teacher.
* **score files** (``layout.is_score_file``) are returned sorted by file name, the
  order in which the reference's selection reads them.

Hidden files (names starting with ``.``), directories and files of other extensions
are ignored.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from scas_jax.data.layout import CANDIDATE_SUFFIXES, SCORE_SUFFIX, is_score_file, teacher_from_filename
from scas_jax.errors import ScasError

if TYPE_CHECKING:
    from scas_jax.data.rows import Candidate

SCORES = "scores"
CANDIDATES = "candidates"


@dataclass
class PoolFile:
    """One teacher file: where it is, the teacher its name implies, its kind, and, once
    read by :func:`scas_jax.data.pool.read_pool_file`, its kept rows and counts.

    rows: kept candidates in file order; n_read: rows read (after ``limit``, before the
    verification filter); skipped_unverified: rows dropped because they are flagged
    incorrect; errors: kept rows with ``error`` set; rows_without_id: kept rows with no id.
    """

    path: Path
    teacher: str
    kind: str = CANDIDATES
    rows: list[Candidate] = field(default_factory=list)
    n_read: int = 0
    skipped_unverified: int = 0
    errors: int = 0
    rows_without_id: int = 0


def check_dir(directory: str | Path, role: str = "input") -> Path:
    """``directory`` as a Path; ScasError when it is missing or not a directory."""
    directory = Path(directory)
    if not directory.exists():
        raise ScasError(f"{role} directory not found: {directory} does not exist")
    if not directory.is_dir():
        raise ScasError(f"{role} directory {directory} is not a directory")
    return directory


def _jsonl_files(directory: Path) -> list[Path]:
    return sorted(
        (p for p in directory.iterdir() if p.name.endswith(".jsonl") and not p.name.startswith(".") and p.is_file()),
        key=lambda p: p.name,
    )


def find_candidate_files(directory: str | Path, role: str = "candidate") -> tuple[list[PoolFile], list[Path]]:
    """``(candidate files sorted by teacher, shadowed files)`` of ``directory``."""
    paths = _jsonl_files(check_dir(directory, role))
    chosen: dict[str, Path] = {}
    shadowed: list[Path] = []
    for suffix in CANDIDATE_SUFFIXES:
        for path in paths:
            if not path.name.endswith(suffix) or is_score_file(path):
                continue
            teacher = teacher_from_filename(path.name)
            if teacher not in chosen:
                chosen[teacher] = path
            elif chosen[teacher] != path and path not in shadowed:
                shadowed.append(path)
    return [PoolFile(chosen[t], t, CANDIDATES) for t in sorted(chosen)], shadowed


def discover_candidate_files(directory: str | Path) -> list[PoolFile]:
    """Candidate files of ``directory``, one per teacher, sorted by teacher (shadowed ones left out)."""
    return find_candidate_files(directory)[0]


def discover_score_files(directory: str | Path) -> list[PoolFile]:
    """``*_scas_scores.jsonl`` files of ``directory``, sorted by file name."""
    return [
        PoolFile(p, teacher_from_filename(p.name), SCORES)
        for p in _jsonl_files(check_dir(directory))
        if is_score_file(p)
    ]


def discover_pool(directory: str | Path) -> list[PoolFile]:
    """Score files when the directory has any, else candidate files; an error if neither."""
    files = discover_score_files(directory) or find_candidate_files(directory, "input")[0]
    if not files:
        raise ScasError(
            f"no pool files in {directory}: expected <teacher>{SCORE_SUFFIX} score files "
            "or <teacher>.jsonl candidate files"
        )
    return files


def require_score_files(directory: str | Path) -> list[PoolFile]:
    """Score files of ``directory``; an error naming what was found instead when none."""
    files = discover_score_files(directory)
    if not files:
        others = [p.name for p in _jsonl_files(Path(directory))]
        hint = f" (found {', '.join(others[:5])}{'...' if len(others) > 5 else ''}: candidate files, not scores)" if others else ""
        raise ScasError(f"no *{SCORE_SUFFIX} score files in {directory}{hint}")
    return files


def sha256_file(path: str | Path) -> str:
    """``sha256:<hex>`` of a file's bytes."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()
