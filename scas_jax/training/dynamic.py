"""In-training SCAS (``selection: dynamic``): re-score the candidates of the upcoming
questions with the current parameters and train each question on the chosen answer.

Data order. The unit of the epoch order is the *question* (a candidate id): questions
are sorted by their key (``json.dumps(id, ensure_ascii=False, sort_keys=True)``, as
``select`` groups them) and epoch ``e`` visits them in the order
``default_rng([seed, e]).permutation``. Each step consumes a fixed number ``Q`` of
questions (``questions_per_step``, default ``batch_size``); the last step of an epoch
takes the remainder, so an epoch is ``ceil(n_questions / Q)`` steps and step ``s``'s
questions depend on ``s`` alone, never on the chosen answers.

Chunks. Steps are cut into chunks ``[cK, (c+1)K)`` (``K = rescore_every``). Before the
first step of a chunk the candidates of every question of the chunk's steps are scored
with the current float32 master parameters by the scoring engine
(:func:`scas_jax.scoring.scorer.iter_scored_batches`), and the selection module's own
``select_min`` / ``select_groups`` choose one candidate per question (groups: one
``random.Random(selection_seed + c)`` per chunk, items in ascending key order). A step's
chosen answers are packed first-fit into ``batch_size`` rows of ``seq_len`` tokens;
with ``Q <= batch_size`` everything fits (each answer is at most ``seq_len``), with a
larger ``Q`` sequences that do not fit are dropped and counted.

Resume. The checkpoint meta holds the current chunk (its steps and choices); a resume
inside a chunk restores those choices, a resume at a chunk boundary re-scores with the
restored (bit-identical) parameters, which is what the uninterrupted run did.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from scas_jax.data.chat import ChatEncoder, Encoded, RowError
from scas_jax.data.packing import BatchPlan
from scas_jax.data.layout import score_file_name
from scas_jax.data.pool import read_pool
from scas_jax.data.rows import Candidate, id_key, parse_score, row_teacher
from scas_jax.errors import ScasError
from scas_jax.selection.candidates import Pool as SelectionPool
from scas_jax.selection.strategies import Choice, select_groups, select_min
from scas_jax.training.config import TrainConfig
from scas_jax.training.data import Example, example_from_ids, make_batch, pack_rows


# ------------------------------------------------------------------ the candidate pool


@dataclasses.dataclass
class CandidatePool:
    """Encoded candidates grouped by question.

    keys[q]: question ``q``'s key (ascending); members[q]: its candidate indices, in the
    order ``select`` reads score files (by ``<teacher>_scas_scores.jsonl`` name, then line);
    rows/teachers/sources/encoded: per candidate.
    """

    keys: list[str]
    members: list[list[int]]
    rows: list[dict]
    teachers: list[Any]
    sources: list[str]
    encoded: list[Encoded]
    stats: dict[str, int]

    def example(self, c: int) -> Example:
        e = self.encoded[c]
        return example_from_ids(e.ids, e.n_prompt)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for q, key in enumerate(self.keys):
            h.update(key.encode())
            for c in self.members[q]:
                h.update(str(self.teachers[c]).encode())
                h.update(self.encoded[c].ids.tobytes())
                h.update(np.int64(self.encoded[c].n_prompt).tobytes())
        return h.hexdigest()[:16]


def load_candidates(directory: str | Path, tokenizer: Any, cfg: TrainConfig) -> CandidatePool:
    """Read, validate and encode a candidate directory for dynamic selection.

    Dropped, and counted in ``stats``: rows without an id, rows without an instruction or
    answer, rows failing the chat template, and (``drop_long``) candidates longer than
    ``seq_len`` (with ``drop_long: false`` those are an error naming ``file:line``).
    """
    if tokenizer is None:
        raise ScasError("the student has no tokenizer; training needs its chat template")
    pool = read_pool(directory, include_unverified=cfg.include_unverified)
    if pool.summary.rows == 0:
        raise ScasError(f"empty pool: no candidate rows in {directory} "
                        f"({pool.summary.rows_read} rows read, {pool.summary.skipped_unverified} unverified)")
    stats = Counter(rows_read=pool.summary.rows_read, skipped_unverified=pool.summary.skipped_unverified)
    files = sorted(pool.files, key=lambda f: score_file_name(f.teacher))
    kept: list[tuple[Any, Any]] = []
    for pf in files:
        for cand in pf.rows:
            if cand.id is None:
                stats["missing_id"] += 1
            elif cand.error:
                stats["missing_fields"] += 1
            else:
                kept.append((pf, cand))
    encoded = ChatEncoder(tokenizer).encode_rows([c.row for _, c in kept]) if kept else []
    out = CandidatePool([], [], [], [], [], [], {})
    by_key: dict[str, list[int]] = {}
    for (pf, cand), enc in zip(kept, encoded):
        where = f"{pf.path}:{cand.line}"
        if isinstance(enc, RowError):
            stats["template_errors"] += 1
            continue
        if enc.length > cfg.seq_len:
            if not cfg.drop_long:
                raise ScasError(f"{where}: {enc.length} tokens exceed seq_len={cfg.seq_len} "
                                "(raise seq_len or set drop_long=true)")
            stats["dropped_long"] += 1
            continue
        by_key.setdefault(id_key(cand.id), []).append(len(out.rows))
        out.rows.append(cand.row)
        out.teachers.append(row_teacher(cand.row, pf.teacher))
        out.sources.append(where)
        out.encoded.append(enc)
    if not by_key:
        raise ScasError(f"empty pool: no usable candidates in {directory} ({dict(sorted(stats.items()))})")
    out.keys = sorted(by_key)
    out.members = [by_key[k] for k in out.keys]
    stats["candidates"] = len(out.rows)
    stats["questions"] = len(out.keys)
    out.stats = dict(sorted(stats.items()))
    return out


# ------------------------------------------------------------------ data order


class QuestionOrder:
    """Step ``s`` -> question indices: ``Q`` per step over a seeded order per epoch."""

    def __init__(self, n_questions: int, per_step: int, seed: int):
        self.n, self.per_step, self.seed = n_questions, per_step, seed
        self.steps_per_epoch = -(-n_questions // per_step)
        self._perms: dict[int, np.ndarray] = {}

    def epoch(self, step: int) -> int:
        return step // self.steps_per_epoch

    def questions(self, step: int) -> np.ndarray:
        """int64[<= Q] question indices of global step ``step`` (0-based)."""
        e, j = divmod(step, self.steps_per_epoch)
        if e not in self._perms:
            self._perms[e] = np.random.default_rng([self.seed, e]).permutation(self.n)
        return self._perms[e][j * self.per_step:(j + 1) * self.per_step]


# ------------------------------------------------------------------ scoring and choosing


class _CachedEncoder:
    """Duck-types ``ChatEncoder.encode_rows`` for :func:`scoring.scorer.prepare`: rows are
    ``{"candidate": index}`` and map to the pool's pre-computed encodings."""

    def __init__(self, pool: CandidatePool):
        self.pool = pool

    def encode_rows(self, rows: Sequence[dict]) -> list[Encoded]:
        return [self.pool.encoded[r["candidate"]] for r in rows]


def score_config(cfg: TrainConfig):
    """The scorer settings of dynamic selection (``max_length`` = ``seq_len``)."""
    from scas_jax.scoring.scorer import ScoreConfig

    return ScoreConfig(lambda_scas=cfg.lambda_scas, target_layer=cfg.target_layer,
                       batch_tokens=max(cfg.score_batch_tokens, cfg.seq_len), max_length=cfg.seq_len,
                       max_segments=cfg.score_max_segments, dtype=cfg.score_dtype)


def score_candidates(params, model_cfg, pool: CandidatePool, cands: Sequence[int], cfg: TrainConfig,
                     mesh=None) -> dict[int, dict]:
    """SCAS fields of candidates ``cands`` under ``params``: ``{candidate: fields}``."""
    from scas_jax.scoring.scorer import iter_scored_batches, prepare

    row_multiple = 1
    if mesh is not None:
        from scas_jax.parallel import batch_divisor

        row_multiple = batch_divisor(mesh)
    scfg = score_config(cfg)
    rows = [{"candidate": c} for c in cands]
    prepared = prepare(rows, None, scfg, row_multiple, encoder=_CachedEncoder(pool))
    out: dict[int, dict] = {}
    for _, items in iter_scored_batches(params, model_cfg, prepared, scfg, mesh):
        for i, fields in items:
            out[cands[i]] = fields
    return out


def choose(pool: CandidatePool, questions: Sequence[int], fields: dict[int, dict], cfg: TrainConfig,
           event: int) -> dict[int, int | None]:
    """One candidate per question with the selection module's strategies.

    Candidates whose ``score_key`` is not a finite number are skipped, as ``select`` does.
    Returns ``{question: candidate or None}`` (None: no candidate in ``selected_group``).
    """
    items: dict[str, list[Candidate]] = {}
    index: dict[int, int] = {}
    for q in sorted(set(int(q) for q in questions), key=lambda q: pool.keys[q]):
        cands = []
        for c in pool.members[q]:
            score, reason = parse_score(fields[c].get(cfg.score_key))
            if reason is not None:
                continue
            sc = Candidate(pool.keys[q], pool.rows[c], pool.teachers[c], score, pool.sources[c])
            index[id(sc)] = c
            cands.append(sc)
        if cands:
            items[pool.keys[q]] = cands
    spool = SelectionPool(files=[], items=items, score_key=cfg.score_key)
    if cfg.dynamic_strategy == "min":
        chosen: list[Choice] = select_min(spool)
    else:
        by_group, _ = select_groups(spool, cfg.num_groups, cfg.selection_seed + event)
        chosen = by_group[cfg.selected_group]
    key_to_q = {pool.keys[q]: int(q) for q in questions}
    out: dict[int, int | None] = {int(q): None for q in questions}
    for ch in chosen:
        out[key_to_q[ch.candidate.key]] = index[id(ch.candidate)]
    return out


# ------------------------------------------------------------------ the stream


@dataclasses.dataclass
class Chunk:
    """Steps ``[start, stop)`` and their choices ``{question: candidate or None}``."""

    start: int
    stop: int
    choices: dict[int, int | None]


class DynamicStream:
    """Batches of dynamic selection; ``rescore`` must have covered a step before ``batch``."""

    def __init__(self, pool: CandidatePool, cfg: TrainConfig, model_cfg, mesh=None):
        self.pool, self.cfg, self.model_cfg, self.mesh = pool, cfg, model_cfg, mesh
        self.order = QuestionOrder(len(pool.keys), cfg.step_questions, cfg.seed)
        self.chunk: Chunk | None = None
        self.overflow_dropped = 0

    def steps_for_epochs(self, epochs: int) -> int:
        return self.order.steps_per_epoch * epochs

    def locate(self, step: int) -> tuple[int, int]:
        return self.order.epoch(step), step % self.order.steps_per_epoch

    def fingerprint(self) -> str:
        return self.pool.fingerprint()

    def needs_rescore(self, step: int) -> bool:
        return self.chunk is None or not self.chunk.start <= step < self.chunk.stop

    def rescore(self, step: int, params, total_steps: int) -> dict[str, Any]:
        """Score the chunk containing ``step`` with ``params``; returns the event's record:
        ``index, steps, questions, candidates, unselected, score_seconds`` and ``teacher_share``
        (every teacher of the pool: its share of the chunk's trained questions, 0 if none)."""
        k = self.cfg.rescore_every
        event = step // k
        start, stop = event * k, min((event + 1) * k, total_steps)
        questions = np.concatenate([self.order.questions(s) for s in range(start, stop)])
        distinct = sorted(set(int(q) for q in questions))
        cands = [c for q in distinct for c in self.pool.members[q]]
        t0 = time.perf_counter()
        fields = score_candidates(params, self.model_cfg, self.pool, cands, self.cfg, self.mesh)
        seconds = time.perf_counter() - t0
        choices = choose(self.pool, distinct, fields, self.cfg, event)
        self.chunk = Chunk(start, stop, choices)
        counts = Counter(str(self.pool.teachers[choices[int(q)]]) for q in questions
                         if choices[int(q)] is not None)
        trained = sum(counts.values())
        teachers = sorted({str(t) for t in self.pool.teachers})
        share = {t: counts[t] / trained if trained else 0.0 for t in teachers}
        return {"index": event, "steps": [start, stop], "questions": len(distinct),
                "candidates": len(cands), "unselected": sum(v is None for v in choices.values()),
                "score_seconds": seconds, "teacher_share": share}

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """Arrays ``[batch_size, seq_len]`` (see :func:`scas_jax.training.data.make_batch`)."""
        if self.needs_rescore(step):
            raise RuntimeError(f"step {step} is outside the scored chunk")
        chosen = [self.chunk.choices[int(q)] for q in self.order.questions(step)]
        examples = [self.pool.example(c) for c in chosen if c is not None]
        rows = pack_rows([e.length for e in examples], range(len(examples)),
                         self.cfg.seq_len, self.cfg.max_segments)
        b = self.cfg.batch_size
        if len(rows) > b:
            self.overflow_dropped += sum(len(r) for r in rows[b:])
            rows = rows[:b]
        rows += [()] * (b - len(rows))
        return make_batch(BatchPlan(self.cfg.seq_len, tuple(rows)), examples)

    # checkpoint meta
    def state(self) -> dict[str, Any] | None:
        """The current chunk for the checkpoint meta (JSON)."""
        if self.chunk is None:
            return None
        return {"start": self.chunk.start, "stop": self.chunk.stop,
                "choices": [[self.pool.keys[q], -1 if c is None else c,
                             None if c is None else str(self.pool.teachers[c])]
                            for q, c in sorted(self.chunk.choices.items())]}

    def restore(self, saved: dict[str, Any] | None) -> None:
        if not saved:
            return
        q_of = {k: q for q, k in enumerate(self.pool.keys)}
        choices = {q_of[key]: (None if c < 0 else int(c)) for key, c, _ in saved["choices"]}
        self.chunk = Chunk(int(saved["start"]), int(saved["stop"]), choices)


def chosen_teachers(saved: dict[str, Any]) -> dict[str, str | None]:
    """``{question key: teacher}`` of a saved chunk (for tests and inspection)."""
    return {key: teacher for key, _, teacher in saved["choices"]}


def share_scalars(event: dict[str, Any]) -> dict[str, float]:
    """Flat scalars of a rescoring event for TensorBoard (``share/<teacher>``)."""
    out = {f"share/{t}": v for t, v in event["teacher_share"].items()}
    out["score_seconds"] = event["score_seconds"]
    return out

