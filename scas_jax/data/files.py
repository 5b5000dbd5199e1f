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

A directory may also be a TFDS dataset built by ``scas-jax dataset build``
(:mod:`scas_jax.data.tfds_pool`): the data dir, ``<name>`` or ``<name>/<version>``
(:func:`find_dataset_dir`; looked for only when the directory holds no JSONL file, so a
dataset built inside a JSONL pool directory never hides its files). Its teachers are then the source files it was built from
(same names, kinds and sha256); :func:`iter_rows` yields a teacher's rows, from a JSONL
file or from the dataset alike, and every stage reads pool rows through it.
tensorflow_datasets is imported only when a directory is such a dataset.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

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

    rows: kept candidates in file order (empty when read with ``keep_rows=False``);
    n_kept: how many rows were kept; n_read: rows read (after ``limit``, before the
    verification filter); skipped_unverified: rows dropped because they are flagged
    incorrect; errors: kept rows with ``error`` set; rows_without_id: kept rows with no id.
    """

    path: Path
    teacher: str
    kind: str = CANDIDATES
    rows: list[Candidate] = field(default_factory=list)
    n_kept: int = 0
    n_read: int = 0
    skipped_unverified: int = 0
    errors: int = 0
    rows_without_id: int = 0
    # set for a teacher of a TFDS dataset (path is then <version dir>/<source file name>)
    dataset: Any = None  # scas_jax.data.tfds_pool.TeacherSlice
    sha256: str | None = None  # hex sha256 of the source file (TFDS teachers)


INFO_FILES = ("dataset_info.json", "features.json")


def _is_version_dir(d: Path) -> bool:
    return (all((d / f).is_file() for f in INFO_FILES)
            and any(".array_record" in p.name for p in d.iterdir()))


def find_dataset_dir(directory: str | Path) -> Path | None:
    """The version directory of the one TFDS dataset at ``directory`` (itself, a
    ``<version>`` or a ``<name>/<version>`` below it: ``dataset_info.json``,
    ``features.json`` and array_record files), else None. Reads no dataset and imports no
    TFDS. ScasError when several datasets are found."""
    d = Path(directory)
    if not d.is_dir():
        return None
    if _is_version_dir(d):
        return d
    found = []
    for child in sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if _is_version_dir(child):
            found.append(child)
            continue
        found += [g for g in sorted(child.iterdir())
                  if g.is_dir() and not g.name.startswith(".") and _is_version_dir(g)]
    if len(found) > 1:
        shown = ", ".join(str(f.relative_to(d)) for f in found)
        raise ScasError(f"{d} holds several TFDS datasets ({shown}): pass the directory of one")
    return found[0] if found else None


def _dataset_files(version_dir: Path, kind: str) -> list[PoolFile]:
    from scas_jax.data.tfds_pool import teacher_slices

    return [PoolFile(version_dir / s.file, s.teacher, kind, dataset=s, sha256=s.sha256)
            for s in teacher_slices(version_dir) if s.kind == kind]


def iter_rows(pf: PoolFile, limit: int | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, row)`` of a teacher file: :func:`scas_jax.data.jsonl.iter_jsonl` of
    its JSONL file, or the same rows from the TFDS dataset it was built into."""
    if pf.dataset is not None:
        return pf.dataset.iter_rows(limit)
    from scas_jax.data.jsonl import iter_jsonl

    return iter_jsonl(pf.path, limit)


def dataset_file(path: str | Path, role: str = "input") -> PoolFile | None:
    """The one source file of the TFDS dataset at ``path`` (a directory that holds no
    JSONL file; see :func:`find_dataset_dir`), as a :class:`PoolFile` whose rows
    :func:`iter_rows` reads through Grain; None when ``path`` is not such a directory.
    A dataset built from several files (a pool) is an error naming ``role``: a file
    input (``--data``, ``--questions``) takes a dataset of one file
    (``scas-jax dataset build --data FILE``, or a pool of one teacher)."""
    d = Path(path)
    if not d.is_dir() or _jsonl_files(d):
        return None
    version = find_dataset_dir(d)
    if version is None:
        return None
    from scas_jax.data.tfds_pool import teacher_slices

    slices = teacher_slices(version)
    if len(slices) != 1:
        names = ", ".join(s.file for s in slices[:5]) + ("..." if len(slices) > 5 else "")
        raise ScasError(f"{role} {path}: a dataset of {len(slices)} files ({names}); {role} takes a "
                        "dataset of one file (scas-jax dataset build --data FILE)")
    s = slices[0]
    return PoolFile(version / s.file, s.teacher, s.kind, dataset=s, sha256=s.sha256)


def input_sha256(pf: PoolFile) -> str:
    """Hex sha256 of a teacher file's bytes (of its source file, for a TFDS teacher)."""
    if pf.sha256 is not None:
        return pf.sha256
    return sha256_file(pf.path).split(":", 1)[1]


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
    dataset = None if paths else find_dataset_dir(directory)
    if dataset is not None:
        return sorted(_dataset_files(dataset, CANDIDATES), key=lambda f: f.teacher), []
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
    paths = _jsonl_files(check_dir(directory))
    dataset = None if paths else find_dataset_dir(directory)
    if dataset is not None:
        return sorted(_dataset_files(dataset, SCORES), key=lambda f: f.path.name)
    return [
        PoolFile(p, teacher_from_filename(p.name), SCORES)
        for p in paths
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
        dataset = find_dataset_dir(directory)
        others = ([f.path.name for f in _dataset_files(dataset, CANDIDATES)] if dataset is not None
                  else [p.name for p in _jsonl_files(Path(directory))])
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
