"""Small pools for tests: rows of the bundled GSM8K pool, written as teacher files."""

from __future__ import annotations

import json
from pathlib import Path

from scas_jax.assets import GSM8K_POOL


def gsm8k(teacher: str, n: int, start: int = 0) -> list[dict]:
    """Rows ``start .. start+n-1`` of a bundled teacher file."""
    with open(GSM8K_POOL / f"{teacher}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in list(f)[start : start + n]]


def write_pool(directory: Path, files: dict[str, list]) -> Path:
    """``{file name: rows}`` -> JSONL files (a str row is written verbatim)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, rows in files.items():
        lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows]
        (directory / name).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return directory
