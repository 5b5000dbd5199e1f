"""Candidate pools: discover, read and validate teacher JSONL files (no model work).

A candidate directory holds one JSONL file per teacher (method page, "Inputs"):

* File names end in ``_teacher_responses_evaluated.jsonl``, ``_teacher_responses.jsonl``,
  ``_student_train.jsonl`` or plain ``.jsonl``, checked in that order; the file's teacher
  name is the name without the first suffix that matches. ``*_scas_scores.jsonl`` files
  are outputs and are never read. When two files give the same teacher name, the file
  found through the earlier suffix wins (as in the reference); the other is listed in
  ``PoolSummary.shadowed``. Files are returned sorted by teacher name.
* A row's teacher is its ``teacher_name``, else ``teacher``, else the file's teacher
  (falsy values fall through, as in the reference).
* The answer is ``teacher_output``, else ``output``.

Validation happens here, before any model work:

* malformed JSON (or a line that is not a JSON object) raises :class:`ScasError` naming
  ``file:line`` and the parser's message;
* a duplicated ``id`` within one file raises :class:`ScasError` naming both lines;
* a row without an instruction or an answer is kept as an *error row*
  (``Candidate.error`` set, scored with every metric 0) and counted;
* a row whose ``teacher_correct`` (or, when that key is absent, ``is_correct``) is false
  is skipped unless ``include_unverified=True``, and counted;
* ids present in only some teachers are reported in the summary, not an error.

``limit`` keeps the first N rows of each file (blank lines are not rows), before the
verification filter, like the reference's ``rows[:limit]``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from scas_jax.errors import ScasError

CANDIDATE_SUFFIXES: tuple[str, ...] = (
    "_teacher_responses_evaluated.jsonl",
    "_teacher_responses.jsonl",
    "_student_train.jsonl",
    ".jsonl",
)
OUTPUT_SUFFIX = "_scas_scores.jsonl"
MISSING_FIELDS_ERROR = "Missing instruction or teacher_output/output."
_FALSE_STRINGS = frozenset({"false", "no", "0"})


@dataclass(frozen=True)
class Candidate:
    """One kept row of a teacher file.

    row: the original row, every field kept (never mutated here).
    line: 1-based line number in its file.
    teacher: the row's teacher name (row-level ``teacher_name``/``teacher``, else file's).
    error: why this row cannot be scored (it is then an error row), else None.
    """

    row: dict[str, Any]
    line: int
    teacher: str
    error: str | None = None

    @property
    def id(self) -> Any:
        return self.row.get("id")


@dataclass
class PoolFile:
    """One teacher file after validation.

    path: the file; teacher: the file-level teacher name (output is
    ``<teacher>_scas_scores.jsonl``); rows: kept candidates in file order;
    n_read: rows read (after ``limit``, before the verification filter);
    skipped_unverified: rows dropped because ``teacher_correct``/``is_correct`` is false;
    errors: kept rows with ``error`` set; rows_without_id: kept rows with no ``id``.
    """

    path: Path
    teacher: str
    rows: list[Candidate]
    n_read: int = 0
    skipped_unverified: int = 0
    errors: int = 0
    rows_without_id: int = 0


@dataclass
class PoolSummary:
    """Counts over the whole pool and the ids that only some teachers answered.

    partial_ids: id key (``json.dumps(id, ensure_ascii=False, sort_keys=True)``) ->
    the sorted file-level teachers whose files contain that id (computed on all rows
    read, before the verification filter). shadowed: files ignored because an earlier
    suffix gave the same teacher name.
    """

    files: int = 0
    rows_read: int = 0
    rows: int = 0
    errors: int = 0
    skipped_unverified: int = 0
    rows_without_id: int = 0
    ids: int = 0
    partial_ids: dict[str, tuple[str, ...]] = field(default_factory=dict)
    shadowed: list[Path] = field(default_factory=list)

    def lines(self, max_examples: int = 5) -> list[str]:
        """Human-readable summary lines for logs and the CLI."""
        out = [
            f"{self.files} teacher files, {self.rows_read} rows read, {self.rows} kept, "
            f"{self.errors} error rows, {self.skipped_unverified} skipped as unverified, "
            f"{self.ids} distinct ids"
        ]
        if self.rows_without_id:
            out.append(f"{self.rows_without_id} kept rows have no id (not selectable)")
        if self.partial_ids:
            examples = list(self.partial_ids.items())[:max_examples]
            shown = ", ".join(f"{k} ({', '.join(v)})" for k, v in examples)
            out.append(
                f"{len(self.partial_ids)} ids are present in only some teachers, e.g. {shown}"
            )
        for path in self.shadowed:
            out.append(f"ignored {path}: another file has the same teacher name")
        return out


@dataclass
class Pool:
    """A validated candidate directory: one :class:`PoolFile` per teacher, sorted."""

    directory: Path
    files: list[PoolFile]
    summary: PoolSummary

    def candidates(self) -> Iterator[tuple[PoolFile, Candidate]]:
        for pool_file in self.files:
            for cand in pool_file.rows:
                yield pool_file, cand


def teacher_name_from_path(path: Path | str) -> str:
    """The file-level teacher name: the file name without its candidate suffix."""
    name = Path(path).name
    for suffix in CANDIDATE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def _discover(directory: Path) -> tuple[list[Path], list[Path]]:
    chosen: dict[str, Path] = {}
    shadowed: list[Path] = []
    for suffix in CANDIDATE_SUFFIXES:
        for path in sorted(directory.glob(f"*{suffix}")):
            if path.name.endswith(OUTPUT_SUFFIX) or not path.is_file():
                continue
            teacher = teacher_name_from_path(path)
            if teacher not in chosen:
                chosen[teacher] = path
            elif chosen[teacher] != path and path not in shadowed:
                shadowed.append(path)
    return [chosen[t] for t in sorted(chosen)], shadowed


def discover_candidate_files(directory: Path | str) -> list[Path]:
    """Candidate files of ``directory``, one per teacher name, sorted by teacher name."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ScasError(f"candidate directory not found: {directory}")
    return _discover(directory)[0]


def row_teacher(row: dict[str, Any], file_teacher: str) -> str:
    """``teacher_name``, else ``teacher``, else the file's teacher name."""
    return str(row.get("teacher_name") or row.get("teacher") or file_teacher)


def row_answer(row: dict[str, Any]) -> Any:
    """``teacher_output``, else ``output`` (None when both are missing or empty)."""
    return row.get("teacher_output") or row.get("output") or None


def missing_fields_error(row: dict[str, Any]) -> str | None:
    """The reference's error message when the instruction or the answer is missing/empty."""
    if not row.get("instruction") or row_answer(row) is None:
        return MISSING_FIELDS_ERROR
    return None


def is_unverified(row: dict[str, Any]) -> bool:
    """True when ``teacher_correct`` (or, if absent, ``is_correct``) says false.

    False values: ``false``, ``0`` and the strings "false"/"no"/"0" (any case).
    Missing or null means unknown, and the row is kept.
    """
    value = row["teacher_correct"] if "teacher_correct" in row else row.get("is_correct")
    if value is None:
        return False
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value == 0
    if isinstance(value, str):
        return value.strip().lower() in _FALSE_STRINGS
    return False


def id_key(value: Any) -> str:
    """The grouping key of an id (same as selection's)."""
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def iter_jsonl(path: Path, limit: int | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, row)`` for each non-blank line; ScasError on bad input."""
    count = 0
    try:
        handle = path.open("r", encoding="utf-8")
    except OSError as exc:
        raise ScasError(f"{path}: cannot read: {exc}") from exc
    with handle:
        line_no = 0
        while True:
            if limit is not None and count >= limit:
                return
            try:
                line = handle.readline()
            except UnicodeDecodeError as exc:
                raise ScasError(f"{path}:{line_no + 1}: not valid UTF-8: {exc}") from exc
            if not line:
                return
            line_no += 1
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ScasError(f"{path}:{line_no}: malformed JSON: {exc}") from exc
            if not isinstance(row, dict):
                raise ScasError(
                    f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}"
                )
            count += 1
            yield line_no, row


def read_pool_file(
    path: Path | str,
    *,
    include_unverified: bool = False,
    limit: int | None = None,
    teacher: str | None = None,
    ids_seen: dict[str, set[str]] | None = None,
) -> PoolFile:
    """Read and validate one teacher file.

    ``teacher`` overrides the file-level name (default: from the path). When
    ``ids_seen`` is given, every id read is recorded as ``ids_seen[id_key] |= {teacher}``.
    """
    path = Path(path)
    if limit is not None and limit < 0:
        raise ScasError(f"limit must be >= 0, got {limit}")
    teacher = teacher or teacher_name_from_path(path)
    first_line: dict[str, int] = {}
    out = PoolFile(path=path, teacher=teacher, rows=[])
    for line_no, row in iter_jsonl(path, limit):
        out.n_read += 1
        if row.get("id") is not None:
            key = id_key(row["id"])
            if key in first_line:
                raise ScasError(
                    f"{path}:{line_no}: duplicate id {key} (first at line {first_line[key]})"
                )
            first_line[key] = line_no
            if ids_seen is not None:
                ids_seen.setdefault(key, set()).add(teacher)
        if not include_unverified and is_unverified(row):
            out.skipped_unverified += 1
            continue
        error = missing_fields_error(row)
        out.errors += error is not None
        out.rows_without_id += row.get("id") is None
        out.rows.append(Candidate(row=row, line=line_no, teacher=row_teacher(row, teacher), error=error))
    return out


def read_pool(
    directory: Path | str,
    *,
    include_unverified: bool = False,
    limit: int | None = None,
    teachers: Sequence[str] | None = None,
) -> Pool:
    """Discover, read and validate every teacher file of ``directory``.

    teachers: if given, keep only files whose file-level teacher name is listed.
    Raises ScasError when the directory is missing, holds no candidate file, or any
    file is invalid (every file is validated before returning).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ScasError(f"candidate directory not found: {directory}")
    paths, shadowed = _discover(directory)
    if teachers is not None:
        wanted = set(teachers)
        paths = [p for p in paths if teacher_name_from_path(p) in wanted]
    if not paths:
        raise ScasError(f"no candidate JSONL files in {directory}")
    ids_seen: dict[str, set[str]] = {}
    files = [
        read_pool_file(p, include_unverified=include_unverified, limit=limit, ids_seen=ids_seen)
        for p in paths
    ]
    return Pool(directory=directory, files=files, summary=summarize(files, ids_seen, shadowed))


def summarize(
    files: Iterable[PoolFile], ids_seen: dict[str, set[str]], shadowed: list[Path]
) -> PoolSummary:
    files = list(files)
    all_teachers = {f.teacher for f in files}
    partial = {
        key: tuple(sorted(have)) for key, have in ids_seen.items() if have != all_teachers
    }
    return PoolSummary(
        files=len(files),
        rows_read=sum(f.n_read for f in files),
        rows=sum(len(f.rows) for f in files),
        errors=sum(f.errors for f in files),
        skipped_unverified=sum(f.skipped_unverified for f in files),
        rows_without_id=sum(f.rows_without_id for f in files),
        ids=len(ids_seen),
        partial_ids=partial,
        shadowed=list(shadowed),
    )
