"""Atomic file and directory writes: a temp path in the same directory, then a rename.

``publish_dir`` / ``publish_files`` write a set of output files all at once (every stage's
outputs), leaving nothing behind on failure."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from scas_jax.errors import ScasError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    mask = os.umask(0)  # mkstemp creates 0600; give the file the usual 0666 & ~umask
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    n = 0
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                n += 1
    return n


def refuse_non_empty(path: str | os.PathLike) -> None:
    """The one error for an output directory that already holds something."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ScasError(f"output directory {path} exists and is not empty: pass --overwrite to "
                        "replace it, or choose another directory")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Build a directory in a temp sibling; move it to ``path`` only if the block succeeds.

    On any exception the temp directory is removed and ``path`` is left as it was.
    """
    path = Path(path)
    if not overwrite:
        refuse_non_empty(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _first_missing(path: Path) -> Path | None:
    """The highest ancestor of ``path`` (or ``path`` itself) that does not exist yet."""
    missing = None
    for p in (path, *path.parents):
        if p.exists():
            break
        missing = p
    return missing


@contextlib.contextmanager
def cleanup_created(path: Path) -> Iterator[None]:
    """On error, remove the directories that ``path``'s creation added."""
    created = _first_missing(path.resolve())
    try:
        yield
    except BaseException:
        if created is not None and created.exists():
            shutil.rmtree(created, ignore_errors=True)
        raise


def _write(path: Path, content: Any) -> None:
    if isinstance(content, Mapping):
        write_json_atomic(path, content)
    else:
        write_jsonl_atomic(path, content)


def publish_dir(dest: str | Path, files: Mapping[str, Any], *, overwrite: bool) -> None:
    """Write ``files`` (name -> JSON object, or list of rows for JSONL) as the whole of ``dest``.

    ``dest`` must be absent or empty unless ``overwrite``, in which case it is replaced.
    """
    dest = Path(dest)
    if not overwrite:
        refuse_non_empty(dest)
    with cleanup_created(dest), atomic_dir(dest, overwrite=True) as tmp:
        for name, content in files.items():
            _write(tmp / name, content)


def publish_files(dest: str | Path, files: Mapping[str, Any], *, overwrite: bool) -> None:
    """Add ``files`` to directory ``dest`` (which may hold other outputs), all or none.

    Existing files of the same names are an error unless ``overwrite``.
    """
    dest = Path(dest)
    clash = sorted(name for name in files if (dest / name).exists())
    if clash and not overwrite:
        raise ScasError(f"{dest} already has {', '.join(clash)} (pass --overwrite to replace)")
    with cleanup_created(dest):
        dest.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging.", suffix=".tmp", dir=dest))
        try:
            for name, content in files.items():
                _write(staging / name, content)
            for name in files:
                os.replace(staging / name, dest / name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def append_json_line(handle, obj: Any) -> None:
    """Write ``obj`` as one JSON line to an open journal file and make it durable
    (flushed and fsynced) before returning: what a resumable job has recorded survives a
    crash."""
    handle.write(json.dumps(obj, ensure_ascii=False) + "\n")
    handle.flush()
    os.fsync(handle.fileno())
