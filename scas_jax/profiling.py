"""``--profile DIR``: a :mod:`jax.profiler` trace of a few steps of a loop.

Shared by ``scas-jax score`` and ``scas-jax train``. The trace covers ``count`` steps
starting after ``start`` steps have finished (so the first, compiling step is left
out), or from the first step when the loop is shorter. It is written under ``DIR`` as
``plugins/profile/<run>/<host>.xplane.pb`` (TensorBoard's profile plugin:
``tensorboard --logdir DIR``, Profile tab; needs ``pip install tensorboard
tensorboard-plugin-profile``) and ``<host>.trace.json.gz`` (drag it onto
https://ui.perfetto.dev).

Usage::

    prof = StepProfiler(directory, total=n_steps)
    prof.after(0)                   # before the loop
    for i, step in enumerate(steps, 1):
        ...                         # the step, results on the host
        prof.after(i)               # i steps finished
    prof.close()                    # in a finally: stops a trace still running

The caller makes sure a step's results are ready before calling :meth:`after`
(fetching them to the host does), so the trace holds whole steps.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

START, COUNT = 2, 3


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def view_hint(directory: Path) -> str:
    return (f"view: tensorboard --logdir {directory} (Profile tab; pip install tensorboard "
            f"tensorboard-plugin-profile), or open {directory}/plugins/profile/*/*.trace.json.gz "
            "in https://ui.perfetto.dev")


class StepProfiler:
    """Trace steps ``[begin, begin + count)`` of a loop of ``total`` steps into ``directory``;
    ``begin`` is ``start``, or earlier when the loop is too short. A ``directory`` of None
    makes every call a no-op."""

    def __init__(self, directory: str | Path | None, total: int | None = None, start: int = START,
                 count: int = COUNT, say: Callable[[str], None] = _stderr, what: str = "step"):
        self.directory = Path(directory) if directory else None
        self.begin = start if total is None else max(0, min(start, total - count, total - 1))
        self.end = self.begin + max(1, count)
        self.say, self.what = say, what
        self.active = False
        self.done = False

    def after(self, finished: int) -> None:
        """Call with the number of steps finished so far (0 before the first)."""
        if self.directory is None or self.done:
            return
        if not self.active and finished == self.begin:
            import jax

            self.directory.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.directory), create_perfetto_trace=True)
            self.active = True
            self.traced_from = finished
        elif self.active and finished >= self.end:
            self._stop(finished)

    def _stop(self, finished: int) -> None:
        import jax

        jax.profiler.stop_trace()
        self.active, self.done = False, True
        n = finished - self.traced_from
        self.say(f"profile: trace of {n} {self.what}{'s' if n != 1 else ''} "
                 f"({self.what}s {self.traced_from}..{finished - 1}, 0-based) written under "
                 f"{self.directory}; {view_hint(self.directory)}")

    def close(self, finished: int | None = None) -> None:
        """Stop a trace still running (the loop ended early or raised)."""
        if self.active:
            self._stop(self.end if finished is None else finished)

    def __enter__(self) -> "StepProfiler":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def trace_files(self) -> list[Path]:
        if self.directory is None:
            return []
        return sorted(self.directory.glob("plugins/profile/*/*.xplane.pb"))
