"""Publish a set of output files all at once, leaving nothing behind on failure."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

from scas_jax.errors import ScasError
from scas_jax.io_utils import atomic_dir, write_json_atomic, write_jsonl_atomic


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
    if dest.exists() and any(dest.iterdir()) and not overwrite:
        raise ScasError(f"output directory {dest} exists and is not empty (pass --overwrite to replace it)")
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
