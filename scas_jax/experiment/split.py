"""The experiment's data: the configured teachers and questions of a pool, judged, split
into training and held-out questions (seeded, by id), written as small pools. The pool
may be a TFDS dataset directory built by ``scas-jax dataset build`` (its rows are read
through :func:`scas_jax.data.files.iter_rows`: the same rows as the JSONL pool).

``OUT/data/``:

- ``pool/<teacher>.jsonl``: the configured teachers' rows of the configured questions;
- ``verified/``: the same, judged (``scas-jax verify``);
- ``train_pool/<teacher>.jsonl``: the *verified* answers of the training questions (the
  candidates every arm chooses from, and what is scored);
- ``heldout_pool/<teacher>.jsonl``: the verified answers of the held-out questions (whose
  NLL is the evaluation);
- ``heldout_questions.jsonl``: one row per held-out question (for greedy accuracy);
- ``split.json``: the training and held-out ids; ``teacher_accuracy_train.json``: each
  teacher's accuracy over its answers to the training questions (``strongest`` ranks by it).
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from scas_jax.data.files import discover_pool, find_dataset_dir, iter_rows
from scas_jax.data.jsonl import iter_jsonl
from scas_jax.data.rows import id_key
from scas_jax.errors import ScasError
from scas_jax.experiment.config import ExperimentConfig, check_teachers
from scas_jax.io_utils import write_json_atomic, write_jsonl_atomic


def pool_teachers(pool: Path) -> list[str]:
    return sorted(pf.teacher for pf in discover_pool(pool))


def split_ids(eligible: list[str], heldout: int, train: int, seed: int, where: str) -> tuple[list[str], list[str]]:
    """Held-out and training ids: a seeded permutation of the sorted ids; the first
    ``heldout`` are held out, the next ``train`` (0: all the rest) train. Both sorted."""
    ids = sorted(eligible)
    need = heldout + max(train, 1)
    if len(ids) < need:
        raise ScasError(f"{where}: {len(ids)} questions take part (>= min_verified verified answers), "
                        f"fewer than heldout_questions + train_questions ({need})")
    order = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
    held = order[:heldout]
    rest = order[heldout:]
    return sorted(rest[:train] if train else rest), sorted(held)


def prepare_data(cfg: ExperimentConfig, out: Path, where: str) -> dict[str, Any]:
    """Write ``out`` (see module docs); returns counts for the record."""
    from scas_jax.judging.verify import verify

    src = cfg.pool_dir()
    teachers = check_teachers(cfg, pool_teachers(src), where)
    if out.exists():
        shutil.rmtree(out)
    files = {pf.teacher: pf for pf in discover_pool(src) if pf.teacher in teachers}
    rows = {t: [row for _, row in iter_rows(files[t])] for t in teachers}  # JSONL or TFDS pool
    all_ids = sorted({id_key(r["id"]) for rs in rows.values() for r in rs if r.get("id") is not None})
    chosen = set(all_ids[:cfg.questions] if cfg.questions else all_ids)
    for t in teachers:
        write_jsonl_atomic(out / "pool" / f"{t}.jsonl",
                           [r for r in rows[t] if r.get("id") is not None and id_key(r["id"]) in chosen])
    verify(out / "pool", out / "verified")
    judged = {t: [row for _, row in iter_jsonl(out / "verified" / f"{t}.jsonl")] for t in teachers}
    n_verified = Counter(id_key(r["id"]) for rs in judged.values() for r in rs if r.get("teacher_correct") is True)
    eligible = [k for k in chosen if n_verified[k] >= cfg.min_verified]
    train, held = split_ids(eligible, cfg.heldout_questions, cfg.train_questions, cfg.split_seed, where)
    train_set, held_set = set(train), set(held)
    questions: dict[str, dict] = {}
    accuracy = {}
    for t in teachers:
        ok = [r for r in judged[t] if r.get("teacher_correct") is True]
        write_jsonl_atomic(out / "train_pool" / f"{t}.jsonl", [r for r in ok if id_key(r["id"]) in train_set])
        write_jsonl_atomic(out / "heldout_pool" / f"{t}.jsonl", [r for r in ok if id_key(r["id"]) in held_set])
        on_train = [r for r in judged[t] if id_key(r["id"]) in train_set]
        correct = sum(r.get("teacher_correct") is True for r in on_train)
        accuracy[t] = {"correct": correct, "total": len(on_train),
                       "accuracy": correct / len(on_train) if on_train else 0.0}
        for r in judged[t]:
            k = id_key(r["id"])
            if k in held_set and k not in questions:
                questions[k] = {"id": r["id"], "system": r.get("system"), "instruction": r.get("instruction"),
                                "reference_answer": r.get("reference_answer")}
    write_jsonl_atomic(out / "heldout_questions.jsonl", [questions[k] for k in held])
    ids = {id_key(r["id"]): r["id"] for rs in rows.values() for r in rs if r.get("id") is not None}
    write_json_atomic(out / "split.json", {"train": [ids[k] for k in train], "heldout": [ids[k] for k in held],
                                           "teachers": teachers, "seed": cfg.split_seed})
    write_json_atomic(out / "teacher_accuracy_train.json", accuracy)
    return {"teachers": teachers, "questions": len(chosen), "eligible": len(eligible),
            "train_questions": len(train), "heldout_questions": len(held),
            "heldout_answers": sum(1 for t in teachers for _ in iter_jsonl(out / "heldout_pool" / f"{t}.jsonl"))}


def heldout_rows(data: Path, teachers: list[str]) -> list[dict]:
    """The held-out verified answers, in a fixed order (teacher, then file order), each
    with ``teacher_name`` set to its file's teacher."""
    return [{**row, "teacher_name": t} for t in teachers for _, row in iter_jsonl(data / "heldout_pool" / f"{t}.jsonl")]


def dir_digest(directory: Path, pattern: str = "*.jsonl") -> str:
    """sha256 over the names and contents of ``directory``'s files matching ``pattern``;
    for a TFDS pool dataset (no such file), over its source files' names and sha256s."""
    import hashlib

    h = hashlib.sha256()
    if (pattern == "*.jsonl" and not any(directory.glob(pattern))
            and (dataset := find_dataset_dir(directory)) is not None):
        from scas_jax.data.tfds_pool import teacher_slices

        h.update(b"tfds")
        for s in teacher_slices(dataset):
            h.update(s.file.encode())
            h.update(s.sha256.encode())
        return h.hexdigest()
    for p in sorted(directory.glob(pattern)):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()
