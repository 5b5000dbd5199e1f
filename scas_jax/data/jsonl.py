"""Read JSONL files row by row, with ``file:line`` in every error."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from scas_jax.errors import ScasError


def iter_jsonl(path: str | Path, limit: int | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, row)`` for each non-blank line (at most ``limit`` rows).

    Raises ScasError naming ``file:line`` for a line that is not valid UTF-8, not JSON,
    or not a JSON object; naming the file when it cannot be opened.
    """
    path = Path(path)
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
                raise ScasError(f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}")
            count += 1
            yield line_no, row


def read_json(path: str | Path, what: str = "") -> Any:
    """The JSON value of a whole file; ScasError naming the file (and line) when it is
    missing, unreadable or not JSON. ``what`` ("manifest", ...) goes into the message."""
    path = Path(path)
    label = f" {what}" if what else ""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ScasError(f"{path}: no such{label or ' file'}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ScasError(f"{path}: cannot read{label}: {getattr(e, 'strerror', None) or e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ScasError(f"{path}:{e.lineno}: invalid JSON{label and ' in' + label}: {e.msg}") from None
