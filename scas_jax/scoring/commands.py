"""``scas-jax score``: SCAS fields for every candidate of a pool, resumable.

``score(student, candidate_dir, output_dir, ...)`` validates everything (pool, lambda,
target layer, settings, student path) before loading the model, tokenizes and plans the
whole pool once (:func:`scas_jax.scoring.scorer.prepare`), scores the planned batches
with the jitted core, journals every finished batch (:mod:`scas_jax.scoring.journal`),
and finally writes ``<teacher>_scas_scores.jsonl`` per teacher file and
``manifest.json`` atomically, then deletes the journal. A run killed at any moment
and restarted with the same command skips the journaled batches and ends with the same
bytes in every score file.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from scas_jax.errors import ScasError
from scas_jax.scoring.core import DEFAULT_TAP

DTYPES = ("float32", "bfloat16")
OUTPUT_SUFFIX = "_scas_scores.jsonl"
MANIFEST = "manifest.json"
# Seconds to sleep after each journaled batch: a testing aid that makes a real kill
# land between batches deterministically (tests/test_score.py). Never set in production.
_DELAY_ENV = "SCAS_JAX_BATCH_DELAY"


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


def _resolve_mesh(mesh: Any):
    from jax.sharding import Mesh

    from scas_jax.parallel import make_mesh

    return mesh if isinstance(mesh, Mesh) else make_mesh(mesh or "data=-1")


def _student_identity(source: str) -> dict:
    from scas_jax.scoring.journal import file_identity

    path = Path(source)
    return {"path": str(path.resolve()) if path.exists() else source,
            "files": file_identity(path) if path.exists() else []}


def _prepared_digest(prepared) -> str:
    """Hash of every item's tokens and boundary, every error message and the plan."""
    import hashlib

    h = hashlib.sha256()
    for e in prepared.encoded:
        if isinstance(e, str):
            h.update(b"E" + e.encode("utf-8"))
        else:
            h.update(b"T%d:" % e.n_prompt + e.ids.tobytes())
    for p in prepared.plans:
        h.update(repr((p.length, p.rows)).encode())
    return h.hexdigest()


def _agree_on_done(journal, n_batches: int) -> set[int]:
    """The batches to skip: process 0's journal, broadcast so every host skips the same
    batches (each global batch is one collective computation)."""
    import jax
    import numpy as np

    if jax.process_count() == 1 or n_batches == 0:
        return set(journal.done)
    from jax.experimental import multihost_utils

    mask = np.zeros(n_batches, np.int32)
    mask[sorted(journal.done)] = 1
    mask = np.asarray(multihost_utils.broadcast_one_to_all(mask))
    return {int(k) for k in np.flatnonzero(mask)}


def _output_row(row: dict, teacher: str, fields: dict) -> dict:
    """The input row, every field kept, with the metric fields and ``teacher_name``."""
    from scas_jax.scoring.fields import ERROR_FIELD

    out = dict(row)
    out.pop(ERROR_FIELD, None)  # a stale error from an earlier scoring never survives
    out.update(fields)
    out["teacher_name"] = teacher
    return out


def _pool_summary_dict(summary) -> dict:
    return {
        "files": summary.files, "rows_read": summary.rows_read, "rows": summary.rows,
        "errors": summary.errors, "skipped_unverified": summary.skipped_unverified,
        "rows_without_id": summary.rows_without_id, "ids": summary.ids,
        "partial_ids": {k: list(v) for k, v in summary.partial_ids.items()},
        "shadowed": [str(p) for p in summary.shadowed],
    }  # fmt: skip


def score(
    student: Any,
    candidate_dir: str | Path,
    output_dir: str | Path,
    *,
    lambda_scas: float = 0.5,
    target_layer: str = DEFAULT_TAP,
    mesh: Any = "data=-1",
    batch_tokens: int = 4096,
    max_length: int = 4096,
    limit: int | None = None,
    skip_existing: bool = False,
    include_unverified: bool = False,
    dtype: str = "float32",
    max_segments: int = 16,
    progress: bool = True,
) -> dict:
    """Score every candidate of ``candidate_dir`` into ``output_dir``; return the manifest.

    Args:
      student: a converted checkpoint, an HF directory, a GGUF file, ``"smollm2"``, or an
        already loaded :class:`scas_jax.loader.Student` (its parameters are placed on
        ``mesh``).
      mesh: a mesh spec (``"data=-1"``) or a ``jax.sharding.Mesh``.
      max_segments: at most this many sequences packed per row (1 = no packing).
    Raises:
      ScasError: bad input (pool file:line, lambda, target layer, settings, student path),
        always before the model is loaded.
    """
    t_start = time.time()
    from scas_jax.data.pool import read_pool
    from scas_jax.loader import Student, resolve_path
    from scas_jax.models.decoder import parse_tap

    lam = _check_settings(lambda_scas, target_layer, batch_tokens, max_length, limit, dtype,
                          max_segments)
    if isinstance(student, Student):
        num_layers, student_path = student.cfg.num_layers, None
    else:
        student_path = resolve_path(student)
        if not student_path.exists():
            raise ScasError(f"student {student_path}: no such file or directory")
        num_layers = _student_preflight(student_path, target_layer)
    if num_layers is not None:
        parse_tap(target_layer, num_layers)
    pool = read_pool(candidate_dir, include_unverified=include_unverified, limit=limit)
    output_dir = Path(output_dir)

    outputs = {f.teacher: output_dir / f"{f.teacher}{OUTPUT_SUFFIX}" for f in pool.files}
    existing = {t for t, p in outputs.items() if skip_existing and p.exists()}
    todo_files = [f for f in pool.files if f.teacher not in existing]

    import jax

    from scas_jax.parallel import batch_divisor, is_main_process, shard_params
    from scas_jax.scoring.scorer import ScoreConfig, device_summary

    main = is_main_process()
    mesh_obj = _resolve_mesh(mesh)
    cfg = ScoreConfig(lambda_scas=lam, target_layer=target_layer, batch_tokens=int(batch_tokens),
                      max_length=int(max_length), max_segments=int(max_segments), dtype=dtype)
    manifest: dict[str, Any] = {
        "student": str(student_path) if student_path else student.source,
        "candidate_dir": str(Path(candidate_dir)),
        "output_dir": str(output_dir),
        "target_layer": target_layer,
        "lambda_scas": lam,
        "dtype": dtype,
        "batch_tokens": cfg.batch_tokens,
        "max_length": cfg.max_length,
        "max_segments": cfg.max_segments,
        "limit": limit,
        "include_unverified": bool(include_unverified),
        "skip_existing": bool(skip_existing),
        "mesh": dict(mesh_obj.shape),
        "devices": device_summary(),
        "pool": _pool_summary_dict(pool.summary),
    }
    teachers: dict[str, dict] = {}
    for f in pool.files:
        teachers[f.teacher] = {"input": str(f.path), "output": str(outputs[f.teacher]),
                               "status": "existing" if f.teacher in existing else "scored",
                               "rows_read": f.n_read, "skipped_unverified": f.skipped_unverified}

    if not todo_files:
        manifest.update(teachers=teachers, rows=0, errors=0, tokens=0, batches=0,
                        resumed_batches=0, scored_batches=0, compiled_shapes=[],
                        padding_fraction=0.0, wall_time_s=round(time.time() - t_start, 3),
                        tokens_per_s=0.0, rows_per_s=0.0)
        if main:
            from scas_jax.io_utils import write_json_atomic

            write_json_atomic(output_dir / MANIFEST, manifest)
        return manifest

    # ---- the model: loaded only now, after every check passed
    from scas_jax.loader import load_student

    if isinstance(student, Student):
        st = student
        params = shard_params(st.params, mesh_obj)
        if dtype != st.param_dtype:
            params = jax.tree.map(lambda x: x.astype(jax.numpy.dtype(dtype)), params)
    else:
        st = load_student(student_path, dtype=dtype, mesh=mesh_obj)
        params = st.params
    if st.tokenizer is None:
        raise ScasError(f"student {st.source}: no tokenizer found beside the checkpoint")
    parse_tap(target_layer, st.cfg.num_layers)

    from scas_jax.scoring.scorer import iter_scored_batches, prepare

    items = [(f.teacher, c) for f in todo_files for c in f.rows]
    divisor = batch_divisor(mesh_obj)
    t_prep = time.time()
    prepared = prepare([c.row for _, c in items], st.tokenizer, cfg, row_multiple=divisor)
    t_prep = time.time() - t_prep

    from scas_jax.scoring.journal import Journal, file_identity, fingerprint

    fp = fingerprint({
        "student": _student_identity(st.source), "target_layer": target_layer, "lambda": lam,
        "dtype": dtype, "batch_tokens": cfg.batch_tokens, "max_length": cfg.max_length,
        "max_segments": cfg.max_segments, "limit": limit,
        "include_unverified": bool(include_unverified),
        "inputs": {f.teacher: file_identity(f.path) for f in todo_files},
        "mesh": dict(mesh_obj.shape), "batch_divisor": divisor,
        "platform": jax.devices()[0].platform, "jax": jax.__version__,
        "prepared": _prepared_digest(prepared),
    })  # fmt: skip
    n_batches = len(prepared.plans)
    journal = Journal(output_dir, fp, n_batches, write=main)
    done = _agree_on_done(journal, n_batches)
    lengths = [0 if isinstance(e, str) else e.length for e in prepared.encoded]

    from tqdm import tqdm

    total_rows = sum(len(p.items) for p in prepared.plans)
    done_rows = sum(len(v) for v in journal.done.values())
    bar = tqdm(total=total_rows, initial=done_rows, unit="row", desc="scoring",
               disable=not (progress and main), dynamic_ncols=True, file=sys.stderr)
    delay = float(os.environ.get(_DELAY_ENV, "0") or 0)
    t_loop = time.time()
    new_tokens = new_rows = 0
    try:
        for k, batch_items in iter_scored_batches(params, st.cfg, prepared, cfg, mesh_obj,
                                                  skip=done.__contains__):
            journal.record(k, batch_items)
            new_rows += len(batch_items)
            new_tokens += sum(lengths[i] for i, _ in batch_items)
            elapsed = max(time.time() - t_loop, 1e-9)
            bar.update(len(batch_items))
            bar.set_postfix_str(f"{new_tokens / elapsed:,.0f} tok/s")
            if delay:
                time.sleep(delay)
    finally:
        bar.close()
        journal.close()
    t_loop = time.time() - t_loop

    # ---- assemble, in input order, and write atomically
    from scas_jax.scoring.fields import error_fields

    fields: dict[int, dict] = {i: f for batch in journal.done.values() for i, f in batch}
    missing = [i for i, e in enumerate(prepared.encoded) if not isinstance(e, str) and i not in fields]
    if missing and main:  # cannot happen unless the plan lost items: never write partial files
        raise RuntimeError(f"internal error: {len(missing)} planned rows were not scored")
    per_teacher: dict[str, list[dict]] = {f.teacher: [] for f in todo_files}
    for i, (teacher, cand) in enumerate(items):
        e = prepared.encoded[i]
        if main:  # other hosts hold no fields of the batches process 0 had journaled
            f = error_fields(e, lam) if isinstance(e, str) else fields[i]
            per_teacher[teacher].append(_output_row(cand.row, cand.teacher, f))
        entry = teachers[teacher]
        entry["rows"] = entry.get("rows", 0) + 1
        entry["errors"] = entry.get("errors", 0) + isinstance(e, str)
        entry["tokens"] = entry.get("tokens", 0) + lengths[i]
    for f in todo_files:
        teachers[f.teacher].setdefault("rows", 0)
        teachers[f.teacher].setdefault("errors", 0)
        teachers[f.teacher].setdefault("tokens", 0)

    stats = prepared.stats
    wall = time.time() - t_start
    manifest.update(
        teachers=teachers,
        rows=len(items),
        errors=len(prepared.error_items),
        skipped_unverified=pool.summary.skipped_unverified,
        tokens=stats["real_tokens"],
        padded_tokens=stats["padded_tokens"],
        padding_fraction=round(stats["padding_fraction"], 6),
        batches=n_batches,
        resumed_batches=journal.resumed,
        scored_batches=n_batches - journal.resumed,
        compiled_shapes=[list(s) for s in stats["shapes"]],
        fingerprint=fp,
        tokenize_time_s=round(t_prep, 3),
        scoring_time_s=round(t_loop, 3),
        wall_time_s=round(wall, 3),
        tokens_per_s=round(new_tokens / t_loop, 1) if t_loop > 0 else 0.0,
        rows_per_s=round(new_rows / t_loop, 2) if t_loop > 0 else 0.0,
    )
    if main:
        from scas_jax.io_utils import write_json_atomic, write_jsonl_atomic

        for teacher, rows in per_teacher.items():
            write_jsonl_atomic(outputs[teacher], rows)
        write_json_atomic(output_dir / MANIFEST, manifest)
    journal.remove()
    return manifest


def _cmd(args: argparse.Namespace) -> int:
    from scas_jax.parallel import initialize_distributed, is_main_process

    initialize_distributed()
    m = score(
        args.student, args.candidate_dir, args.output_dir, lambda_scas=args.lambda_scas,
        target_layer=args.target_layer, mesh=args.mesh, batch_tokens=args.batch_tokens,
        max_length=args.max_length, limit=args.limit, skip_existing=args.skip_existing,
        include_unverified=args.include_unverified, dtype=args.dtype,
    )  # fmt: skip
    if is_main_process():
        for teacher, t in m["teachers"].items():
            if t["status"] == "existing":
                print(f"{teacher}: kept existing {t['output']}")
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
        print(f"manifest: {Path(args.output_dir) / MANIFEST}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("score", help="SCAS scores for every candidate answer of a pool",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", required=True,
                   help="converted checkpoint, HF directory, GGUF file, or 'smollm2' (bundled)")
    p.add_argument("--candidate-dir", required=True, help="directory of teacher JSONL files")
    p.add_argument("--output-dir", required=True, help="where score files and manifest.json go")
    p.add_argument("--lambda-scas", type=float, default=0.5, help="weight of the answer-question block, in [0, 1]")
    p.add_argument("--target-layer", default=DEFAULT_TAP,
                   help=f"activation tap: layers.<i>.mlp.up_proj or layers.<i>.residual (default {DEFAULT_TAP})")
    p.add_argument("--mesh", default="data=-1", help="mesh spec, e.g. data=-1 or data=2,tp=4")
    p.add_argument("--batch-tokens", type=int, default=4096,
                   help="padded tokens per batch (default 4096; raise it on accelerators)")
    p.add_argument("--max-length", type=int, default=4096,
                   help="longest sequence scored; longer rows become error rows")
    p.add_argument("--limit", type=int, default=None, help="first N rows of each teacher file")
    p.add_argument("--skip-existing", action="store_true",
                   help="leave teacher files whose score file exists untouched")
    p.add_argument("--include-unverified", action="store_true",
                   help="also score rows whose teacher_correct/is_correct is false")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="parameter/activation dtype")
    p.set_defaults(func=_cmd)
