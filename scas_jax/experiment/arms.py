"""One training answer per training question for each arm (pure functions of the scored
and verified training pool, written as SFT files).

- ``scas_min`` / ``nll_min`` / ``scas_no_diag_min``: the answer with the lowest
  ``scas_score`` / ``answer_mean_nll`` / ``scas_score_no_diag`` under the base student
  (``select --strategy min``: ties by teacher name);
- ``scas_groups``: a seeded random answer of the lowest-cost *non-empty* group
  (``num_groups`` groups by rank as ``select --strategy groups``; a question with fewer
  answers than groups has an empty group 1, so it takes its lowest occupied group);
- ``scas_min_other``: the answer with the lowest ``scas_score`` under the OTHER student
  (``other_student``, scored into ``OUT/scored_other``): the student trained on another
  student's SCAS selection;
- ``strongest``: the answer of the teacher with the highest accuracy on the training split
  (the next one where it has no verified answer);
- ``random``: a seeded uniform choice among the verified answers (``select --strategy random``);
- ``teacher:<name>``: that teacher's answer; where it has no verified answer, the
  strongest teacher's that has one (``teacher_shares`` shows how often);
- ``base`` trains nothing; ``dynamic`` chooses during training (no file).
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

from scas_jax.data.files import discover_pool, require_score_files
from scas_jax.data.jsonl import read_json
from scas_jax.experiment.config import (
    OTHER_ARMS,
    SCORED_ARMS,
    SEEDED_ARMS,
    TEACHER_PREFIX,
)
from scas_jax.selection.candidates import Pool, load_pool
from scas_jax.selection.rows import output_row
from scas_jax.selection.strategies import (
    Choice,
    group_for_rank,
    ranked,
    select_min,
    select_random,
    select_strongest,
)

NO_FILE_ARMS = ("base", "dynamic")


def lowest_group(pool: Pool, num_groups: int, seed: int) -> list[Choice]:
    """Per item (ascending key), a ``random.Random(seed)`` choice within its lowest
    non-empty score group."""
    rng = random.Random(seed)
    out = []
    for cands in pool.items.values():
        if not cands:
            continue
        order = ranked(cands)
        groups = [group_for_rank(r, len(order), num_groups) for r in range(len(order))]
        low = min(groups)
        members = [(r + 1, c) for r, (c, g) in enumerate(zip(order, groups)) if g == low]
        rank, cand = rng.choice(members)
        out.append(Choice(cand, rank, low))
    return out


def arm_file_name(arm: str, seed: int) -> str:
    """``<arm>.jsonl`` (``teacher:X`` -> ``teacher_X``), ``<arm>_seed<s>.jsonl`` for seeded arms."""
    from scas_jax.selection.api import safe_name

    name = safe_name(arm.replace(":", "_"))
    return f"{name}_seed{seed}.jsonl" if arm in SEEDED_ARMS else f"{name}.jsonl"


def score_key(arm: str) -> str | None:
    """The score field ``arm`` ranks by (None: it ranks by none)."""
    return "scas_score" if arm in OTHER_ARMS else SCORED_ARMS.get(arm)


def choose(arm: str, seed: int, scored: Path, train_pool: Path, accuracy_file: Path,
           num_groups: int, scored_other: Path | None = None) -> list[Choice]:
    accuracy = {t: v["accuracy"] for t, v in read_json(accuracy_file, "teacher accuracy").items()}
    if arm in OTHER_ARMS:
        if scored_other is None:
            raise ValueError(f"arm {arm!r} needs the other student's scores (other_student)")
        pool = load_pool(require_score_files(scored_other), score_key="scas_score", require_score=True,
                         verified_only=True)
        return select_min(pool)
    if arm in SCORED_ARMS:
        pool = load_pool(require_score_files(scored), score_key=SCORED_ARMS[arm], require_score=True,
                         verified_only=True)
        return lowest_group(pool, num_groups, seed) if arm == "scas_groups" else select_min(pool)
    pool = load_pool(discover_pool(train_pool), score_key=None, require_score=False, verified_only=True)
    if arm == "random":
        return select_random(pool, seed)
    if arm == "strongest":
        return select_strongest(pool, accuracy)
    if arm.startswith(TEACHER_PREFIX):
        first = arm[len(TEACHER_PREFIX):]
        return select_strongest(pool, {**accuracy, first: 2.0})  # ``first`` ahead of everyone
    raise ValueError(f"arm {arm!r} has no training file")


def write_arm_file(arm: str, seed: int, dest: Path, **kw) -> dict:
    """Choose and write ``dest``; returns ``{"rows", "teacher_shares"}``."""
    from scas_jax.io_utils import write_jsonl_atomic

    choices = choose(arm, seed, **kw)
    write_jsonl_atomic(dest, [output_row(c, score_key(arm)) for c in choices])
    return {"rows": len(choices), "teacher_shares": shares(str(c.candidate.teacher) for c in choices)}


def shares(teachers) -> dict[str, float]:
    counts = Counter(teachers)
    total = sum(counts.values())
    return {t: round(n / total, 6) for t, n in sorted(counts.items())} if total else {}
