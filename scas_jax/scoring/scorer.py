"""Scoring in-memory rows with given parameters: the library call behind ``scas-jax score``
and the training loop's in-training selection.

:func:`prepare` tokenizes rows into memory; :func:`prepare_stream` (``scas-jax
score``) reads them once, keeps per-row numbers and spills the token ids, so a pool of
10^6 answers never has all its arrays in memory (same plan, digest and scores). Batches
are built (in a background thread) from their own items only, packed into a few static
shapes (:mod:`scas_jax.data.packing`), sharded over the mesh's batch axes, and reduced
on device by the jitted core (:mod:`scas_jax.scoring.core`). While the device works on
batch ``k``, the host builds batch ``k + 1`` and turns batch ``k - 1``'s statistics
into SCAS fields.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import hashlib
import threading
from typing import Any, Callable, Iterable, Iterator, Sequence

import jax
import numpy as np

from scas_jax.data.chat import ChatEncoder, Encoded, RowError
from scas_jax.data.packing import BatchPlan, materialise, padding_stats, plan_batches
from scas_jax.host_memory import release as release_host_memory
from scas_jax.models.loss import LOGIT_POSITIONS
from scas_jax.models.precision import matmul_precision
from scas_jax.parallel import mesh_context
from scas_jax.scoring.core import DEFAULT_TAP, compiled_stats
from scas_jax.scoring.fields import check_lambda, error_fields, fields_from_batch

_SEQ_KEYS = ("tokens", "question_mask", "answer_mask", "nll_question_mask", "nll_answer_mask")


@dataclasses.dataclass(frozen=True)
class ScoreConfig:
    """Settings of a scoring run (all static: they fix the compiled shapes)."""

    lambda_scas: float = 0.5
    target_layer: str = DEFAULT_TAP
    # padded tokens per batch *per batch shard* (per device of the mesh's data x fsdp
    # axes): a batch holds ``batch_tokens * row_multiple`` tokens, so every device gets
    # real rows however many there are. 4096 measured on CPU: less tail padding than
    # 8192, same matmul speed
    batch_tokens: int = 4096
    max_length: int = 4096
    max_segments: int = 16
    dtype: str = "auto"  # auto: bfloat16 on GPU/TPU, float32 on CPU (resolved on construction)
    attn_impl: str = "auto"
    vocab_chunk: int = LOGIT_POSITIONS  # positions of a device's rows per log-softmax chunk

    def __post_init__(self) -> None:
        from scas_jax.models.precision import resolve_dtype

        object.__setattr__(self, "dtype", resolve_dtype(self.dtype))


@dataclasses.dataclass
class Prepared:
    """Rows tokenized and planned: ``encoded[i]`` is an Encoded or an error message."""

    encoded: list[Encoded | str]
    plans: list[BatchPlan]  # item indices refer to ``encoded``
    stats: dict

    @property
    def error_items(self) -> list[int]:
        return [i for i, e in enumerate(self.encoded) if isinstance(e, str)]

    def __len__(self) -> int:
        return len(self.encoded)

    def error(self, i: int) -> str | None:
        """Item ``i``'s error message, None when it is scored."""
        e = self.encoded[i]
        return e if isinstance(e, str) else None

    def length(self, i: int) -> int:
        """Item ``i``'s tokens (0 for an error item)."""
        e = self.encoded[i]
        return 0 if isinstance(e, str) else e.length

    def digest(self) -> str:
        """sha256 of every item's tokens and boundary, every error message and the plan
        (the journal's ``tokens_and_plan``)."""
        h = hashlib.sha256()
        for e in self.encoded:
            _digest_item(h, e if isinstance(e, str) else None, e)
        _digest_plans(h, self.plans)
        return h.hexdigest()

    def seqs_for(self, items: Sequence[int]) -> dict[int, dict]:
        """The arrays of ``items`` (scored items), as :func:`materialise` takes them."""
        return {i: _as_seq(self.encoded[i]) for i in items}

    def close(self) -> None:
        pass


def _digest_item(h, error: str | None, e: Encoded | None) -> None:
    if error is not None:
        h.update(b"E" + error.encode("utf-8"))
    else:
        h.update(b"T%d:" % e.n_prompt + e.ids.tobytes())


def _digest_plans(h, plans: Sequence[BatchPlan]) -> None:
    for p in plans:
        h.update(repr((p.length, p.rows)).encode())


class _Seq(dict):
    """One item's arrays, rebuilt from the spill (weak-referenceable, to count them)."""


class StreamPrepared:
    """Rows tokenized once and planned, holding no token arrays in memory.

    The first pass (:func:`prepare_stream`) keeps per item its length, prompt boundary
    and error message, and appends the token ids of every scored item to a spill file
    (an unlinked temporary file: int32 ids, item after item; ``offsets[i]`` is where
    item ``i`` starts). :meth:`seqs_for` reads back the ids of one batch's items and
    rebuilds their masks (:func:`scas_jax.data.chat.build_masks`, as the encoder does),
    so a batch is materialised from a bounded window of rows: the ids, boundaries, masks,
    plan and digest are those of :func:`prepare` on the same rows.

    ``alive``/``peak_alive`` count the item arrays built by :meth:`seqs_for` that are
    still referenced (the bounded-window check of tests/test_input_stream.py).
    """

    def __init__(self, lengths: np.ndarray, n_prompt: np.ndarray, errors: dict[int, str],
                 plans: list[BatchPlan], stats: dict, digest: str, spill, special_ids):
        import threading

        self.lengths = lengths
        self.n_prompt = n_prompt
        self.errors = errors
        self.plans = plans
        self.stats = stats
        self._digest = digest
        self._spill = spill
        self.offsets = np.zeros(len(lengths) + 1, np.int64)
        np.cumsum(lengths, out=self.offsets[1:])
        self.special_ids = special_ids
        self.alive = 0
        self.peak_alive = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def error_items(self) -> list[int]:
        return sorted(self.errors)

    def error(self, i: int) -> str | None:
        return self.errors.get(i)

    def length(self, i: int) -> int:
        return int(self.lengths[i])

    def digest(self) -> str:
        return self._digest

    def _release(self) -> None:
        with self._lock:
            self.alive -= 1

    def seqs_for(self, items: Sequence[int]) -> dict[int, dict]:
        import os
        import weakref

        from scas_jax.data.chat import build_masks

        out = {}
        fd = self._spill.fileno()
        for i in items:
            n = int(self.lengths[i])
            raw = os.pread(fd, 4 * n, 4 * int(self.offsets[i]))
            if len(raw) != 4 * n:
                raise RuntimeError(f"internal error: spill file short read for item {i}")
            ids = np.frombuffer(raw, dtype=np.int32)
            q, a, nq, na = build_masks(ids, int(self.n_prompt[i]), self.special_ids)
            seq = _Seq(tokens=ids, question_mask=q, answer_mask=a, nll_question_mask=nq,
                       nll_answer_mask=na)
            with self._lock:
                self.alive += 1
                self.peak_alive = max(self.peak_alive, self.alive)
            weakref.finalize(seq, self._release)
            out[i] = seq
        return out

    def close(self) -> None:
        if self._spill is not None:
            self._spill.close()
            self._spill = None


def prepare_stream(rows: Iterable[dict], tokenizer: Any, cfg: ScoreConfig, row_multiple: int = 1,
                   encoder: ChatEncoder | None = None, spill_dir=None,
                   batch_size: int = 512) -> StreamPrepared:
    """:func:`prepare` in one streaming pass over ``rows`` (any iterable, read once).

    Keeps O(1) numbers per row (length, boundary; error messages), writes the token ids
    to a spill file in ``spill_dir`` (default: the system's temporary directory) and
    renders/tokenizes the prompt of each distinct (system, instruction) once. Same
    errors, plan, stats and digest as :func:`prepare`; close the result when done.
    """
    import array
    import hashlib as _hashlib
    import tempfile

    encoder = encoder or ChatEncoder(tokenizer)
    spill = tempfile.TemporaryFile(dir=spill_dir, prefix=".scas_spill_")
    lengths = array.array("q")
    n_prompt = array.array("q")
    errors: dict[int, str] = {}
    h = _hashlib.sha256()
    prompt_cache: dict = {}
    i = 0
    try:
        for batch in encoder.iter_batches(rows, batch_size, prompt_cache=prompt_cache):
            chunk = []
            for e in batch:
                if isinstance(e, RowError):
                    msg = e.message
                elif e.length > cfg.max_length:
                    msg = f"sequence of {e.length} tokens exceeds --max-length {cfg.max_length}"
                else:
                    msg = None
                if msg is not None:
                    errors[i] = msg
                    lengths.append(0)
                    n_prompt.append(0)
                    _digest_item(h, msg, None)
                else:
                    lengths.append(e.length)
                    n_prompt.append(e.n_prompt)
                    _digest_item(h, None, e)
                    chunk.append(e.ids.tobytes())
                i += 1
            spill.write(b"".join(chunk))
        spill.flush()
    except BaseException:
        spill.close()
        raise
    del prompt_cache
    lengths_np = np.frombuffer(lengths, dtype=np.int64).astype(np.int32)
    ok = np.flatnonzero(lengths_np > 0).tolist()
    plans = plan_batches(lengths_np[ok].tolist(), max_length=cfg.max_length,
                         batch_tokens=cfg.batch_tokens * row_multiple,
                         max_segments=cfg.max_segments, row_multiple=row_multiple)
    plans = [BatchPlan(p.length, tuple(tuple(ok[j] for j in row) for row in p.rows)) for p in plans]
    _digest_plans(h, plans)
    stats = padding_stats(plans, lengths_np.astype(np.int64))
    return StreamPrepared(lengths_np, np.frombuffer(n_prompt, dtype=np.int64).astype(np.int32),
                          errors, plans, stats, h.hexdigest(), spill, encoder.special_ids)


def _as_seq(e: Encoded) -> dict:
    return {"tokens": e.ids, "question_mask": e.question_mask, "answer_mask": e.answer_mask,
            "nll_question_mask": e.nll_question_mask, "nll_answer_mask": e.nll_answer_mask}


def prepare(rows: Sequence[dict], tokenizer: Any, cfg: ScoreConfig, row_multiple: int = 1,
            encoder: ChatEncoder | None = None) -> Prepared:
    """Tokenize ``rows`` with the reference's boundaries and plan packed batches.

    ``row_multiple``: the mesh's batch shards (data x fsdp); batches hold
    ``cfg.batch_tokens`` padded tokens per shard, i.e. a multiple of ``row_multiple`` rows.

    Rows that fail to encode, or longer than ``max_length``, become error items (never
    truncated silently).
    """
    encoder = encoder or ChatEncoder(tokenizer)
    encoded: list[Encoded | str] = []
    for e in encoder.encode_rows(list(rows)):
        if isinstance(e, RowError):
            encoded.append(e.message)
        elif e.length > cfg.max_length:
            encoded.append(f"sequence of {e.length} tokens exceeds --max-length {cfg.max_length}")
        else:
            encoded.append(e)
    ok = [i for i, e in enumerate(encoded) if not isinstance(e, str)]
    lengths = [encoded[i].length for i in ok]
    plans = plan_batches(lengths, max_length=cfg.max_length,
                         batch_tokens=cfg.batch_tokens * row_multiple,
                         max_segments=cfg.max_segments, row_multiple=row_multiple)
    plans = [BatchPlan(p.length, tuple(tuple(ok[j] for j in row) for row in p.rows)) for p in plans]
    stats = padding_stats(plans, [e.length if not isinstance(e, str) else 0 for e in encoded])
    return Prepared(encoded, plans, stats)


def _rows_of(plan: BatchPlan, rows: slice, seqs: dict[int, dict]) -> dict[str, np.ndarray]:
    """Host arrays ``[rows.stop - rows.start, plan.length]`` of rows ``rows`` of ``plan``
    (empty rows included), in the dtypes of the whole batch."""
    part = materialise(BatchPlan(plan.length, plan.rows[rows]), seqs, _SEQ_KEYS)
    ref = seqs[plan.items[0]]
    return {k: v.astype(np.asarray(ref[k]).dtype) if k in ref else v for k, v in part.items()}


def _build(prepared: Prepared, k: int, mesh=None) -> dict:
    """Batch ``k``'s arrays, built from its own items only (a bounded window for a
    :class:`StreamPrepared`): host arrays without a mesh, else global arrays sharded over
    the mesh's batch axes."""
    plan = prepared.plans[k]
    seqs = prepared.seqs_for(plan.items)
    if mesh is None:
        return materialise(plan, seqs, _SEQ_KEYS)
    from scas_jax.parallel import global_rows

    return global_rows(mesh, len(plan.rows), lambda rows: _rows_of(plan, rows, seqs))


def precompile(params, model_cfg, prepared: Prepared, cfg: ScoreConfig, mesh=None,
               skip: Callable[[int], bool] = lambda k: False) -> None:
    """Compile the scorer for the first batch :func:`iter_scored_batches` will run (the
    others' shapes compile in the background while it runs). ``params`` may be abstract
    (``jax.ShapeDtypeStruct`` leaves with the shardings the real ones will have, e.g.
    :meth:`scas_jax.loader.StudentFiles.abstract_params`), so this can run while the
    weights are read; a signature that differs from the real one only costs a second
    compilation."""
    todo = [k for k in range(len(prepared.plans)) if not skip(k)]
    if todo:
        _scorer_for(params, model_cfg, cfg, _build(prepared, todo[0], mesh))


def _scorer_for(params, model_cfg, cfg: ScoreConfig, batch):
    """The compiled scorer of ``cfg`` for these weights and this batch's signature
    (:func:`executable`), traced under the dtype's matmul precision
    (models/precision.py)."""
    fn = compiled_stats(model_cfg, cfg.max_segments, cfg.target_layer, cfg.dtype,
                        cfg.attn_impl, cfg.vocab_chunk)
    with matmul_precision(cfg.dtype):
        return executable(fn, params, batch)


def iter_scored_batches(
    params: dict,
    model_cfg,
    prepared: Prepared,
    cfg: ScoreConfig,
    mesh=None,
    skip: Callable[[int], bool] = lambda k: False,
) -> Iterator[tuple[int, list[tuple[int, dict]]]]:
    """Yield ``(batch index, [(item index, fields), ...])`` for every planned batch not
    skipped, in plan order. Error items are not included (see ``error_fields``)."""
    check_lambda(cfg.lambda_scas)
    todo = [k for k in range(len(prepared.plans)) if not skip(k)]

    def run(batch):
        return _scorer_for(params, model_cfg, cfg, batch)(params, batch)

    def build(k):
        return _build(prepared, k, mesh)

    def finish(k, out):
        from scas_jax.parallel import to_host

        out = to_host(out)  # global row order, whichever process or device held a row
        host = {name: np.asarray(v) for name, v in out.items()}
        plan = prepared.plans[k]
        slots = [(r * cfg.max_segments + s, item)
                 for r, row in enumerate(plan.rows) for s, item in enumerate(row)]
        flat_idx = np.asarray([f for f, _ in slots], dtype=np.int64)
        flat = {n: v.reshape(-1, *v.shape[2:])[flat_idx] for n, v in host.items()}
        fields = fields_from_batch(flat, cfg.lambda_scas)
        return k, [(item, f) for (_, item), f in zip(slots, fields)]

    def compile_ahead(k):  # traced as run() traces it, from a real batch of that shape
        _scorer_for(params, model_cfg, cfg, build(k))

    with cf.ThreadPoolExecutor(max_workers=1) as pool, \
            cf.ThreadPoolExecutor(max_workers=1) as compiler:
        nxt = pool.submit(build, todo[0]) if todo else None
        pending = None
        for idx, k in enumerate(todo):
            batch = nxt.result()
            if idx + 1 < len(todo):
                nxt = pool.submit(build, todo[idx + 1])
            out = run(batch)  # async dispatch
            if idx == 0:  # the other shapes compile while the first batch runs
                for later in _first_of_each_shape(prepared.plans, todo)[1:]:
                    compiler.submit(compile_ahead, later)  # a failure resurfaces in run()
            if pending is not None:
                yield finish(*pending)
            pending = (k, out)
        if pending is not None:
            yield finish(*pending)


def _first_of_each_shape(plans: Sequence[BatchPlan], todo: Sequence[int]) -> list[int]:
    """The first batch (in ``todo`` order) of each distinct ``(rows, length)``: the other
    shapes (a bucket's smaller last batch, longer buckets) compile in the background
    while the first shape's batches run."""
    first: dict[tuple[int, int], int] = {}
    for k in todo:
        first.setdefault((len(plans[k].rows), plans[k].length), k)
    return list(first.values())


def score_rows(
    params: dict,
    model_cfg,
    tokenizer: Any,
    rows: Sequence[dict],
    cfg: ScoreConfig | None = None,
    mesh=None,
) -> list[dict]:
    """SCAS fields for every row, in order (error rows get zeros and ``scas_scoring_error``)."""
    cfg = cfg or ScoreConfig()
    row_multiple = 1
    if mesh is not None:
        from scas_jax.parallel import batch_divisor

        row_multiple = batch_divisor(mesh)
    prepared = prepare(rows, tokenizer, cfg, row_multiple)
    out: list[dict | None] = [None] * len(rows)
    for i in prepared.error_items:
        out[i] = error_fields(prepared.encoded[i], cfg.lambda_scas)
    for _, items in iter_scored_batches(params, model_cfg, prepared, cfg, mesh):
        for i, f in items:
            out[i] = f
    return out  # type: ignore[return-value]


_EXECUTABLES: dict = {}  # signature -> Future of the compiled executable
_EXECUTABLES_LOCK = threading.Lock()


def _signature(tree) -> tuple:
    """Paths, shapes, dtypes and shardings; a sharding compares by its mesh's devices in
    order (two meshes that print alike but order devices differently compile apart)."""
    return tuple((jax.tree_util.keystr(path), x.shape, str(x.dtype), getattr(x, "sharding", None))
                 for path, x in jax.tree_util.tree_leaves_with_path(tree))


def executable(fn, params, batch):
    """The compiled ``fn`` for these argument shapes, dtypes and shardings.

    Compiled ahead of time, once per signature for the whole process; after each
    compilation the compiler's scratch memory goes back to the OS, so a compilation's
    peak and the runs after it never add up (-80 MB on an 8k-token SmolLM2 pass; a
    shape that :func:`iter_scored_batches` compiles in the background does run beside
    the first batch, and ``scas-jax score`` compiles the first one while it reads the
    weights: docs/benchmarks.md). Thread-safe: a caller asking for a signature another
    thread is compiling waits for that compilation (a failed one raises in every waiter
    and is tried again by the next caller).
    """
    key = (fn, _signature(params), _signature(batch))
    with _EXECUTABLES_LOCK:
        fut = _EXECUTABLES.get(key)
        mine = fut is None
        if mine:
            fut = _EXECUTABLES[key] = cf.Future()
    if mine:
        try:
            with mesh_context(batch):  # the forward attention splits rows by it
                fut.set_result(fn.lower(params, batch).compile())
        except BaseException as e:
            with _EXECUTABLES_LOCK:
                del _EXECUTABLES[key]
            fut.set_exception(e)
            raise
        release_host_memory()
    return fut.result()


def compilations(fn) -> int:
    """How many signatures of the jitted ``fn`` the scorer has compiled."""
    return sum(1 for key in _EXECUTABLES if key[0] is fn)


def device_summary() -> str:
    d = jax.devices()
    return f"{len(d)} x {d[0].platform} ({d[0].device_kind})"
