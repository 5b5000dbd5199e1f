"""The journal of a ``generate`` run: finished questions, so a killed run continues.

``DIR/.generate_journal/<teacher>.jsonl`` holds a header line with the run's settings
and then one line per finished question (all of its samples)::

    {"journal": 1, "settings": {...}}
    {"key": "<id key>", "rows": [{...pool row...}, ...]}

Every line is flushed and fsynced. A restarted run reads the journal, drops a torn
last line, compares the header's settings with its own (any difference is an error
naming the settings) and generates only the questions not listed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from scas_jax.errors import ScasError
from scas_jax.io_utils import append_json_line

JOURNAL_DIR = ".generate_journal"
VERSION = 1


def settings_error(where: Path, old: dict, new: dict) -> ScasError | None:
    """A ScasError naming every setting that differs between ``old`` and ``new``, or None."""
    from scas_jax.scoring.identity import differences

    diff = differences(old, new)
    if not diff:
        return None
    return ScasError(
        f"{where} was made with other settings ({'; '.join(diff)}): rerun with the same "
        "settings to continue it, or choose another --output-dir or --teacher-name")


class Journal:
    """Finished questions of one teacher file; ``done``: id key -> its rows."""

    def __init__(self, output_dir: Path, teacher: str, settings: dict[str, Any], write: bool = True):
        self.path = Path(output_dir) / JOURNAL_DIR / f"{teacher}.jsonl"
        self.settings = settings
        self.done: dict[str, list[dict]] = {}
        self._fh = None
        good_end = self._read()
        if write:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if good_end == 0:
                self._fh = open(self.path, "w", encoding="utf-8")
                self._append({"journal": VERSION, "settings": settings})
            else:
                self._fh = open(self.path, "r+", encoding="utf-8")
                self._fh.truncate(good_end)
                self._fh.seek(good_end)

    def _read(self) -> int:
        if not self.path.exists():
            return 0
        data = self.path.read_bytes()
        offset = good_end = 0
        for n, raw in enumerate(data.split(b"\n")[:-1]):  # after the last newline: torn
            offset += len(raw) + 1
            try:
                obj = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                break
            if n == 0:
                if not isinstance(obj, dict) or obj.get("journal") != VERSION:
                    return 0
                error = settings_error(self.path, obj.get("settings") or {}, self.settings)
                if error is not None:
                    raise error
            elif isinstance(obj, dict) and isinstance(obj.get("key"), str) and isinstance(obj.get("rows"), list):
                self.done[obj["key"]] = obj["rows"]
            else:
                break
            good_end = offset
        return good_end

    def _append(self, obj: dict) -> None:
        append_json_line(self._fh, obj)

    def record(self, key: str, rows: list[dict]) -> None:
        self.done[key] = rows
        if self._fh is not None:
            self._append({"key": key, "rows": rows})

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def remove(self) -> None:
        self.close()
        if self.path.exists():
            self.path.unlink()
        try:
            self.path.parent.rmdir()
        except OSError:  # other teachers' journals are still there
            pass
