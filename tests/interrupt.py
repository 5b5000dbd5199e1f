"""A scoring run stopped after a given number of journaled batches (resume tests)."""

from __future__ import annotations


class Interrupted(Exception):
    pass


def stop_after(n: int):
    """A ``score(on_batch=...)`` callback that raises :class:`Interrupted` once ``n``
    batches are journaled."""
    def on_batch(done, total):
        if done >= n:
            raise Interrupted(f"{done}/{total}")
    return on_batch
