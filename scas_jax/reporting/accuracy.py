"""Teacher accuracy for the report: the judge's verdicts over *every* answer.

The score files hold only the answers that were scored (``score`` skips answers
flagged incorrect), so the share flagged correct among them says nothing about a
teacher's accuracy. The report takes accuracy from ``scas-jax verify``'s output
directory instead: its rows carry the judge's ``teacher_correct`` for every answer and
its ``verify_manifest.json`` the same counts per teacher, which are cross-checked here.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scas_jax.data.files import discover_pool, iter_rows
from scas_jax.data.jsonl import read_json
from scas_jax.data.rows import id_key, row_teacher
from scas_jax.data.verdicts import correctness_at, has_flag
from scas_jax.errors import ScasError

VERIFY_MANIFEST = "verify_manifest.json"  # the name ``scas_jax.judging.verify`` writes


@dataclass(frozen=True)
class TeacherAccuracy:
    """Verdicts over all of one teacher's answers; ``accuracy`` = correct / total."""

    correct: int
    incorrect: int
    undecided: int

    @property
    def total(self) -> int:
        return self.correct + self.incorrect + self.undecided

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.total if self.total else None

    def as_dict(self) -> dict[str, Any]:
        return {"correct": self.correct, "incorrect": self.incorrect, "undecided": self.undecided,
                "total": self.total, "accuracy": self.accuracy}


@dataclass
class VerifiedSet:
    """A ``verify`` output directory: per-teacher accuracy and every verdict by (id key, teacher).

    manifest_check: None when the directory has no ``verify_manifest.json``, else the
    list of differences between the rows and the manifest's per-teacher counts (empty:
    they agree).
    """

    directory: Path
    teachers: dict[str, TeacherAccuracy]
    verdicts: dict[tuple[str, str], bool | None] = field(default_factory=dict)
    manifest_check: list[str] | None = None


def load_verified(directory: str | Path) -> VerifiedSet:
    """Read ``verify``'s output; every row must carry a flag (``teacher_correct``)."""
    directory = Path(directory)
    counts: dict[str, Counter] = {}
    verdicts: dict[tuple[str, str], bool | None] = {}
    for pf in discover_pool(directory):
        for line, row in iter_rows(pf):
            where = f"{pf.path}:{line}"
            if not has_flag(row):
                raise ScasError(f"{where}: no teacher_correct field; --verified expects the output "
                                "directory of `scas-jax verify`")
            verdict = correctness_at(row, where)
            teacher = str(row_teacher(row, pf.teacher))
            counts.setdefault(teacher, Counter())[verdict] += 1
            if row.get("id") is not None:
                verdicts.setdefault((id_key(row["id"]), teacher), verdict)
    teachers = {t: TeacherAccuracy(c[True], c[False], c[None]) for t, c in sorted(counts.items())}
    out = VerifiedSet(directory, teachers, verdicts)
    manifest = directory / VERIFY_MANIFEST
    if manifest.exists():
        out.manifest_check = compare_with_manifest(teachers, _read_manifest(manifest))
    return out


def _read_manifest(path: Path) -> dict[str, Any]:
    data = read_json(path, "verify manifest")
    if not isinstance(data, dict) or not isinstance(data.get("teachers"), dict):
        raise ScasError(f"{path}: not a verify manifest (no \"teachers\" object)")
    return data


def compare_with_manifest(teachers: dict[str, TeacherAccuracy], manifest: dict[str, Any]) -> list[str]:
    """Differences between the counts read from the rows and the manifest's ``teachers``."""
    listed = manifest["teachers"]
    diffs = []
    for t in sorted(set(teachers) | set(listed)):
        mine, theirs = teachers.get(t), listed.get(t)
        if mine is None or theirs is None:
            diffs.append(f"teacher {t} is only in the {'manifest' if mine is None else 'rows'}")
            continue
        for name, value in (("rows", mine.total), ("correct", mine.correct),
                            ("incorrect", mine.incorrect), ("undecided", mine.undecided)):
            if theirs.get(name) != value:
                diffs.append(f"{t}: {name} {value} in the rows, {theirs.get(name)} in the manifest")
    return diffs
