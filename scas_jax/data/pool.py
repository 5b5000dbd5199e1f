"""Candidate pools for scoring and training: read and validate teacher files (no model work).

Discovery (which files, which teacher) is :mod:`scas_jax.data.files`; what a row says
(id key, teacher, answer) is :mod:`scas_jax.data.rows`; its correctness flag is
:mod:`scas_jax.data.verdicts`. Files shadowed by an earlier suffix are listed in
``PoolSummary.shadowed``; files are read in teacher-name order.

Validation happens here, before any model work:

* malformed JSON (or a line that is not a JSON object) raises :class:`ScasError` naming
  ``file:line`` and the parser's message;
* a duplicated ``id`` within one file raises :class:`ScasError` naming both lines;
* a row without an instruction or an answer is kept as an *error row*
  (``Candidate.error`` set, scored with every metric 0) and counted;
* a row whose flag (``teacher_correct``, else ``is_correct``, read by
  :mod:`scas_jax.data.verdicts`) says incorrect is skipped unless
  ``include_unverified=True``, and counted; a flag that is not a verdict is an error
  naming ``file:line`` and the field;
* ids present in only some teachers are reported in the summary, not an error.

``limit`` keeps the first N rows of each file (blank lines are not rows), before the
verification filter, like the reference's ``rows[:limit]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from scas_jax.data.files import PoolFile, find_candidate_files, iter_rows
from scas_jax.data.layout import teacher_from_filename
from scas_jax.data.rows import (
    Candidate,
    id_key,
    missing_fields_error,
    row_teacher,
)
from scas_jax.data.verdicts import correctness_at
from scas_jax.errors import ScasError



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


def read_pool_file(
    path: Path | str | PoolFile,
    *,
    include_unverified: bool = False,
    limit: int | None = None,
    teacher: str | None = None,
    ids_seen: dict[str, set[str]] | None = None,
    keep_rows: bool = True,
) -> PoolFile:
    """Read and validate one teacher file.

    ``path`` is a JSONL file or a discovered :class:`PoolFile` (which may be a teacher of
    a TFDS dataset). ``teacher`` overrides the file-level name (default: from the path).
    When ``ids_seen`` is given, every id read is recorded as ``ids_seen[id_key] |= {teacher}``.
    ``keep_rows=False``: validate and count only (``rows`` stays empty, ``n_kept`` counts
    them); :func:`iter_candidates` reads the same candidates again, one at a time.
    """
    source = path if isinstance(path, PoolFile) else PoolFile(Path(path), "")
    teacher = teacher or source.teacher or teacher_from_filename(source.path)
    out = PoolFile(path=source.path, teacher=teacher, kind=source.kind, dataset=source.dataset,
                   sha256=source.sha256)
    for cand in _validated(source, out, include_unverified, limit, ids_seen):
        out.n_kept += 1
        out.errors += cand.error is not None
        out.rows_without_id += cand.key is None
        if keep_rows:
            out.rows.append(cand)
    return out


def iter_candidates(pf: PoolFile, *, include_unverified: bool = False,
                    limit: int | None = None) -> Iterator[Candidate]:
    """The kept candidates of a teacher file validated by :func:`read_pool_file` (same
    settings), read again one at a time, in file order: a pool of 10^6 answers is never
    held in memory. ScasError when the file no longer yields the ``pf.n_kept`` candidates
    it had (it changed between the reads)."""
    probe = PoolFile(path=pf.path, teacher=pf.teacher, kind=pf.kind, dataset=pf.dataset,
                     sha256=pf.sha256)
    n = 0
    for cand in _validated(pf, probe, include_unverified, limit, None):
        n += 1
        if n > pf.n_kept:
            break
        yield cand
    if n != pf.n_kept:
        raise ScasError(f"{pf.path}: changed while being read (it had {pf.n_kept} candidates "
                        f"to score, now {'more' if n > pf.n_kept else n}); run again")


def _validated(source: PoolFile, counts: PoolFile, include_unverified: bool, limit: int | None,
               ids_seen: dict[str, set[str]] | None) -> Iterator[Candidate]:
    """The kept candidates of ``source`` with every check of the module docstring;
    ``counts.n_read`` and ``counts.skipped_unverified`` are counted as rows are read."""
    path, teacher = source.path, counts.teacher
    if limit is not None and limit < 0:
        raise ScasError(f"limit must be >= 0, got {limit}")
    first_line: dict[str, int] = {}
    for line_no, row in iter_rows(source, limit):
        counts.n_read += 1
        key = None if row.get("id") is None else id_key(row["id"])
        if key is not None:
            if key in first_line:
                raise ScasError(
                    f"{path}:{line_no}: duplicate id {key} (first at line {first_line[key]})"
                )
            first_line[key] = line_no
            if ids_seen is not None:
                ids_seen.setdefault(key, set()).add(teacher)
        where = f"{path}:{line_no}"
        if correctness_at(row, where) is False and not include_unverified:
            counts.skipped_unverified += 1
            continue
        yield Candidate(key=key, row=row, teacher=str(row_teacher(row, teacher)), source=where,
                        line=line_no, error=missing_fields_error(row))


def read_pool(
    directory: Path | str,
    *,
    include_unverified: bool = False,
    limit: int | None = None,
    teachers: Sequence[str] | None = None,
    keep_rows: bool = True,
) -> Pool:
    """Discover, read and validate every teacher file of ``directory``.

    teachers: if given, keep only files whose file-level teacher name is listed.
    keep_rows: False keeps counts, ids and the summary only (no row in memory; read the
    candidates again with :func:`iter_candidates`).
    Raises ScasError when the directory is missing, holds no candidate file, or any
    file is invalid (every file is validated before returning).
    """
    directory = Path(directory)
    found, shadowed = find_candidate_files(directory, "candidate")
    if teachers is not None:
        wanted = set(teachers)
        found = [f for f in found if f.teacher in wanted]
    if not found:
        raise ScasError(f"no candidate JSONL files in {directory}")
    ids_seen: dict[str, set[str]] = {}
    files = [
        read_pool_file(f, include_unverified=include_unverified, limit=limit, teacher=f.teacher,
                       ids_seen=ids_seen, keep_rows=keep_rows)
        for f in found
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
        rows=sum(f.n_kept for f in files),
        errors=sum(f.errors for f in files),
        skipped_unverified=sum(f.skipped_unverified for f in files),
        rows_without_id=sum(f.rows_without_id for f in files),
        ids=len(ids_seen),
        partial_ids=partial,
        shadowed=list(shadowed),
    )
