"""Crash-safe progress of a scoring run: a journal of finished batches.

The batch plan of a run is a pure function of its inputs and settings
(:func:`scas_jax.data.packing.plan_batches`), so "how far did we get" is just the set of
finished batch indices. A run appends one JSON line per finished batch to
``OUTPUT_DIR/.scas_journal/<fingerprint>.jsonl``::

    {"journal": 2, "fingerprint": "<hex>", "batches": N, "parts": {...}}  # header, line 1
    {"batch": k, "items": [[item_index, {field: value, ...}], ...]}      # one per batch

and flushes + fsyncs every line. A restarted run with the same fingerprint reads the
journal, drops a truncated (or otherwise unreadable) tail, truncates the file back to
its last complete line, skips the batches it lists and appends the rest. Floats are
written by ``json.dumps`` (``repr``), which round-trips every float64 exactly, so a
resumed run produces the same bytes as an uninterrupted one.

The fingerprint (:func:`fingerprint`) hashes ``parts``: everything that changes
results, identified by *content* (:mod:`scas_jax.scoring.identity`): the sha256 of each
candidate file scored, the student's content identity, the settings, and a digest of
every tokenized sequence and of the plan. Copying or touching a pool therefore
resumes; editing one row starts over. A journal written under other parts has another
name and is never read; :func:`stale_reasons` compares the header ``parts`` of such
journals with the current ones so the run can say in one line why it starts over.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Iterable

from scas_jax.io_utils import append_json_line

JOURNAL_DIR = ".scas_journal"
JOURNAL_VERSION = 2


def fingerprint(parts: dict[str, Any]) -> str:
    """sha256 (first 24 hex digits) of the canonical JSON of ``parts``."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:24]


def read_header(path: Path) -> dict | None:
    """The header line of a journal file, or None when it has no readable one."""
    try:
        with open(path, "rb") as f:
            obj = json.loads(f.readline().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return obj if isinstance(obj, dict) and "fingerprint" in obj else None


def _headers(output_dir: Path):
    """``(path, header)`` of every journal file in ``output_dir``, sorted; ``header`` is
    None when the file has no readable header of this journal version."""
    folder = Path(output_dir) / JOURNAL_DIR
    for path in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
        header = read_header(path)
        yield path, (header if header is not None and header.get("journal") == JOURNAL_VERSION else None)


def stale_reasons(output_dir: Path, fp: str, parts: dict[str, Any]) -> dict[Path, str]:
    """``{journal path: why it is not resumed}`` for every journal in ``output_dir`` other
    than ``fp``'s: the parts that differ (``"inputs.a changed; lambda_scas 0.3 -> 0.5"``)."""
    from scas_jax.scoring.identity import differences

    out = {}
    for path, header in _headers(output_dir):
        if path.stem == fp:
            continue
        if header is None:
            out[path] = "written by another version of scas_jax"
        else:
            out[path] = "; ".join(differences(header.get("parts") or {}, parts)) or "other settings"
    return out


def recorded_inputs(output_dir: Path) -> dict[Path, dict[str, str]]:
    """``{journal path: {teacher: input sha256}}`` as recorded in the header of every
    journal of this version in ``output_dir`` (unreadable ones left out)."""
    out = {}
    for path, header in _headers(output_dir):
        inputs = None if header is None else (header.get("parts") or {}).get("inputs")
        if isinstance(inputs, dict):
            out[path] = {str(k): v for k, v in inputs.items()}
    return out


class Journal:
    """Append-only record of finished batches for one run fingerprint.

    ``done`` maps batch index -> ``[(item_index, fields), ...]`` as read at open time plus
    everything recorded since. ``write=False`` (non-main processes of a multi-host run)
    reads but never writes.

    ``sink``: a callable ``sink(batch, items)`` that takes each batch's items instead
    (read at open time or recorded); ``done`` then maps batch index -> its number of
    items, so a journal of 10^6 rows is not held as 10^6 dicts
    (``scas-jax score`` keeps the fields as columns).
    """

    def __init__(self, output_dir: Path, fp: str, n_batches: int, write: bool = True,
                 parts: dict | None = None, sink: Callable[[int, list], None] | None = None):
        self.path = Path(output_dir) / JOURNAL_DIR / f"{fp}.jsonl"
        self.fingerprint = fp
        self.n_batches = n_batches
        self.header = {"journal": JOURNAL_VERSION, "fingerprint": fp, "batches": n_batches,
                       "parts": parts or {}}
        self.write = write
        self.sink = sink
        self.done: dict[int, Any] = {}
        self._fh = None
        good_end = self._read()
        self.resumed = len(self.done)
        if write:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if good_end == 0:
                self._fh = open(self.path, "w", encoding="utf-8")
                self._append(self.header)
            else:
                self._fh = open(self.path, "r+", encoding="utf-8")
                self._fh.truncate(good_end)  # drop a torn last line before appending
                self._fh.seek(good_end)

    def _read(self) -> int:
        """Load finished batches; return the byte offset after the last good line (0: no
        usable journal)."""
        if not self.path.exists():
            return 0
        offset, good_end = 0, 0
        header_ok = False
        with open(self.path, "rb") as fh:  # line by line: a journal of 10^6 rows is ~1 GB
            for line in fh:
                if not line.endswith(b"\n"):  # the part after the last newline is torn
                    break
                offset += len(line)
                try:
                    obj = json.loads(line[:-1].decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    break
                if not header_ok:
                    if not isinstance(obj, dict) or any(
                            obj.get(k) != self.header[k] for k in ("journal", "fingerprint", "batches")):
                        return 0
                    header_ok = True
                else:
                    k = obj.get("batch") if isinstance(obj, dict) else None
                    if not isinstance(k, int) or not 0 <= k < self.n_batches:
                        break
                    self._keep(k, [(int(i), f) for i, f in obj["items"]])
                good_end = offset
        return good_end

    def _keep(self, batch: int, items: list[tuple[int, dict]]) -> None:
        if self.sink is None:
            self.done[batch] = items
        else:
            self.sink(batch, items)
            self.done[batch] = len(items)

    def rows_done(self) -> int:
        """How many items the finished batches hold."""
        return sum(v if isinstance(v, int) else len(v) for v in self.done.values())

    def _append(self, obj: dict) -> None:
        append_json_line(self._fh, obj)

    def record(self, batch: int, items: Iterable[tuple[int, dict]]) -> None:
        """Durably record one finished batch."""
        items = [(int(i), f) for i, f in items]
        self._keep(batch, items)
        if self._fh is not None:
            self._append({"batch": batch, "items": [[i, f] for i, f in items]})

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def remove(self) -> None:
        """Delete the journal (after the outputs are written), and its folder if empty."""
        self.close()
        if self.write:
            self.path.unlink(missing_ok=True)
            try:
                self.path.parent.rmdir()
            except OSError:
                pass
