"""Selection strategies as pure functions of a :class:`Pool`.

``min`` and ``groups`` follow the reference exactly (scas_method.md, "Selection"):
items in ascending key order, candidates sorted by ``(score, str(teacher))``, one
``random.Random(seed)`` for the whole run, one ``rng.choice`` per non-empty group of
every item. The baselines (``strongest``, ``teacher``, ``random``) are ours.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass
from typing import Mapping

from scas_jax.errors import ScasError
from scas_jax.data.rows import Candidate
from scas_jax.data.verdicts import has_flag
from scas_jax.selection.candidates import Pool


@dataclass(frozen=True)
class Choice:
    """A chosen candidate with its 1-based score rank (None without scores) and group."""

    candidate: Candidate
    rank: int | None
    group: int


def ranked(cands: list[Candidate]) -> list[Candidate]:
    """Ascending ``(score, str(teacher))``; stable, so equal keys keep file order."""
    return sorted(cands, key=lambda c: (c.score, str(c.teacher)))


def group_for_rank(rank0: int, n: int, num_groups: int) -> int:
    """Group of the candidate with 0-based rank ``rank0`` among ``n``: ``min(G, max(1, ceil((r+1)G/n)))``."""
    return min(num_groups, max(1, math.ceil((rank0 + 1) * num_groups / n)))


def select_min(pool: Pool) -> list[Choice]:
    """The lowest-score candidate of every item (rank 1, group 0)."""
    return [Choice(ranked(cands)[0], 1, 0) for cands in pool.items.values() if cands]


def select_groups(pool: Pool, num_groups: int, seed: int) -> tuple[dict[int, list[Choice]], dict[int, int]]:
    """One random candidate per non-empty group of every item.

    Returns ``(rows_by_group, missing_groups)``; ``missing_groups[g]`` counts the items
    with no candidate in group ``g`` (items with fewer candidates than groups).
    """
    if num_groups < 1:
        raise ScasError(f"--num-groups must be >= 1, got {num_groups}")
    rng = random.Random(seed)
    by_group: dict[int, list[Choice]] = {g: [] for g in range(1, num_groups + 1)}
    missing = {g: 0 for g in range(1, num_groups + 1)}
    for cands in pool.items.values():
        order = ranked(cands)
        members: dict[int, list[tuple[int, Candidate]]] = {g: [] for g in by_group}
        for r, cand in enumerate(order):
            members[group_for_rank(r, len(order), num_groups)].append((r + 1, cand))
        for g in range(1, num_groups + 1):
            if not members[g]:
                missing[g] += 1
                continue
            rank, cand = rng.choice(members[g])
            by_group[g].append(Choice(cand, rank, g))
    return by_group, missing


def _score_rank(cands: list[Candidate], chosen: Candidate) -> int | None:
    """1-based position of ``chosen`` in the score order, when every candidate has a score."""
    if any(c.score is None for c in cands):
        return None
    for i, c in enumerate(ranked(cands)):
        if c is chosen:
            return i + 1
    return None


def teacher_accuracy_from_flags(pool: Pool) -> dict[str, float]:
    """Share of each teacher's rows whose flag says correct (undecided counts as not correct).

    Computed over every row read with an id (verified or not), so it needs the pool
    loaded with ``verified_only=False``. Raises when a teacher has no flags at all.
    """
    total: Counter = Counter()
    correct: Counter = Counter()
    flagged: Counter = Counter()
    for cands in pool.items.values():
        for c in cands:
            t = str(c.teacher)
            total[t] += 1
            if has_flag(c.row):
                flagged[t] += 1
                correct[t] += c.verdict is True
    unflagged = sorted(t for t in total if flagged[t] == 0)
    if unflagged:
        raise ScasError(
            f"teacher(s) {', '.join(unflagged)} have no teacher_correct/is_correct flags, so their "
            "accuracy is unknown: run `scas-jax verify` first or pass --teacher-accuracy FILE"
        )
    return {t: correct[t] / total[t] for t in sorted(total)}


def require_distinct_top(accuracy: Mapping[str, float]) -> None:
    """Raise unless one teacher is strictly the most accurate.

    With every teacher equally accurate (typically 1.0: a pool that holds only verified
    answers) or a tie at the top, the only thing left to order them by would be their
    names; ``strongest`` refuses and asks for an accuracy measured on the full pool.
    """
    if not accuracy:
        return
    best = max(accuracy.values())
    top = sorted(t for t, a in accuracy.items() if a == best)
    if len(top) < 2:
        return
    what = (f"every teacher has accuracy {best:.3f}" if len(top) == len(accuracy)
            else f"{', '.join(top)} share the top accuracy {best:.3f}")
    raise ScasError(
        f"the pool's teacher_correct/is_correct flags cannot tell the teachers apart: {what} "
        "(a pool that holds only verified answers gives every teacher 1.000), so `strongest` would "
        "rank them by name. Pass --teacher-accuracy FILE with accuracies measured on the full pool, "
        "e.g. OUT/teacher_accuracy.json written by `scas-jax verify --input-dir FULL_POOL --output-dir OUT`"
    )


def strength_order(accuracy: Mapping[str, float]) -> list[str]:
    """Teachers from strongest to weakest; equal accuracy breaks by name."""
    return sorted(accuracy, key=lambda t: (-accuracy[t], t))


def tied_teachers(accuracy: Mapping[str, float]) -> list[list[str]]:
    """Groups of two or more teachers with equal accuracy (ordered by name among themselves)."""
    groups: dict[float, list[str]] = {}
    for t in strength_order(accuracy):
        groups.setdefault(accuracy[t], []).append(t)
    return [g for g in groups.values() if len(g) > 1]


def select_strongest(pool: Pool, accuracy: Mapping[str, float]) -> list[Choice]:
    """Each item takes the answer of the most accurate teacher that has one for it."""
    missing = sorted(set(pool.teachers()) - set(accuracy))
    if missing:
        raise ScasError(f"no accuracy given for teacher(s): {', '.join(missing)}")
    position = {t: i for i, t in enumerate(strength_order(accuracy))}
    out = []
    for cands in pool.items.values():
        if not cands:
            continue
        best = min(cands, key=lambda c: position[str(c.teacher)])  # first in file order on ties
        out.append(Choice(best, _score_rank(cands, best), 0))
    return out


def select_teacher(pool: Pool, teacher: str) -> tuple[list[Choice], int]:
    """The fixed teacher's answer for every item it has one; returns ``(choices, items_without)``."""
    if teacher not in pool.teachers():
        raise ScasError(
            f"unknown teacher {teacher!r}; teachers with candidates: {', '.join(pool.teachers()) or 'none'}"
        )
    out, without = [], 0
    for cands in pool.items.values():
        own = [c for c in cands if str(c.teacher) == teacher]
        if not own:
            without += 1
            continue
        out.append(Choice(own[0], _score_rank(cands, own[0]), 0))
    return out, without


def select_random(pool: Pool, seed: int) -> list[Choice]:
    """A seeded uniform choice among each item's candidates (ordered by teacher, then file order)."""
    rng = random.Random(seed)
    out = []
    for cands in pool.items.values():
        if not cands:
            continue
        order = sorted(cands, key=lambda c: str(c.teacher))
        chosen = rng.choice(order)
        out.append(Choice(chosen, _score_rank(cands, chosen), 0))
    return out
