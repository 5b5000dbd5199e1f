"""A record of the stages of a run: the settings each ran with and whether it finished.

Used by ``scas-jax pipeline`` (``pipeline_state.json``) and ``scas-jax experiment``
(``experiment_state.json``) so that a rerun skips only what was finished with the same
settings and never reuses a stale result.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from scas_jax.io_utils import write_json_atomic

STATE_FILE = "pipeline_state.json"


class StageLog:
    """``OUT/<filename>`` (default ``pipeline_state.json``): for each stage, its settings and whether it finished.

    ``decide(name, settings)`` says what to do with a stage: ``"skip"`` (finished with
    these settings, and nothing before it was redone), ``"resume"`` (started with these
    settings but not finished) or ``"run"`` (never run, other settings, or an earlier
    stage was redone); it prints why when it is not a skip.
    """

    def __init__(self, out: Path, write: bool = True, filename: str = STATE_FILE):
        self.path = Path(out) / filename
        self.write = write  # multi-process runs: process 0 keeps the record
        self.stages: dict[str, dict] = {}
        if self.path.exists():
            self.stages = json.loads(self.path.read_text(encoding="utf-8")).get("stages", {})
        self._redone: str | None = None  # the first stage this run redid

    def decide(self, name: str, settings: dict, report=print) -> str:
        rec = self.stages.get(name)
        if self._redone is not None:
            if rec is not None:
                report(f"    redoing {name}: the {self._redone} stage before it was redone")
            return "run"
        if rec is None:
            return "run"
        if rec["settings"] != settings:
            changed = sorted(k for k in {*settings, *rec["settings"]}
                             if settings.get(k) != rec["settings"].get(k))
            what = ", ".join(f"{k}: {rec['settings'].get(k)!r} -> {settings.get(k)!r}" for k in changed)
            report(f"    settings changed ({what}): redoing {name} and every stage after it")
            return "run"
        return "skip" if rec["done"] else "resume"

    def start(self, name: str, settings: dict, redo: bool) -> None:
        if redo and self._redone is None:
            self._redone = name
        self.stages[name] = {"settings": settings, "done": False}
        self._save()

    def finish(self, name: str, result: Any = None) -> None:
        self.stages[name]["done"] = True
        if result is not None:
            self.stages[name]["result"] = result
        self._save()

    def _save(self) -> None:
        if self.write:
            write_json_atomic(self.path, {"stages": self.stages})
