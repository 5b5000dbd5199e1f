"""``scas-jax generate``: a model answers a questions file; the answers form a teacher file.

:func:`generate` writes ``DIR/<NAME>.jsonl`` in the pool format, so ``verify``,
``score`` and ``select`` read it like any teacher's file::

    {"id", "system", "instruction", "teacher_output", "reference_answer", "teacher_name",
     "truncated", "generated_tokens"}                      # one row per question (K = 1)
    ... + "question_id", "sample_index"                    # K > 1: one row per sample

Ids stay unique in the file: with ``--samples K > 1`` the row of sample ``k`` has
``id = "<question id>#<k>"`` (the question id as written, JSON for a non-string id),
``question_id`` = the original id and ``sample_index`` = k. (To offer several samples
of one model to ``select`` as alternatives for the same question, run K = 1 several
times with other ``--seed`` and ``--teacher-name``: each run is then a teacher.)

``truncated`` is true when the answer hit ``--max-new-tokens`` without a stop token;
the row is kept, and ``verify`` leaves it undecided. ``DIR/<NAME>.generate.json``
records the settings and counts (a ``.json`` file: pool readers ignore it).

``--chat-template chatml|gemma|plain|FILE.jinja`` builds the prompts with that template
instead of the tokenizer's own (a base model has none; see
:mod:`scas_jax.generation.prompts` for prompts and stop tokens). The manifest records it
as ``chat_template`` (``"tokenizer"`` by default); a named template is also one of the
settings, so a rerun with another template never continues the old generations.

Resumable: finished questions are journaled (:mod:`scas_jax.generation.journal`); a
rerun with the same settings continues, a rerun with other settings is an error
naming them, and a rerun after completion does nothing. Sampled answers do not depend
on the batch a row lands in (row keys from the question id, sample index and seed), so
a resumed run writes what an uninterrupted one writes.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path
from typing import Any

from scas_jax.errors import ScasError

MANIFEST_SUFFIX = ".generate.json"
DTYPES = ("float32", "bfloat16")


def _row_id(key: str, sample: int) -> int:
    """A stable 32-bit integer per (question, sample): seeds that row's draws."""
    return int.from_bytes(hashlib.sha256(f"{key}\0{sample}".encode("utf-8")).digest()[:4], "little")


def sample_id(question_id: Any, k: int) -> str:
    """The row id of sample ``k`` when K > 1: ``"<id>#<k>"``."""
    import json

    base = question_id if isinstance(question_id, str) else json.dumps(question_id, ensure_ascii=False)
    return f"{base}#{k}"


def _check(teacher_name: str, samples: int, max_new_tokens: int, limit: int | None, dtype: str) -> None:
    if not teacher_name or "/" in teacher_name or teacher_name.startswith("."):
        raise ScasError(f"--teacher-name {teacher_name!r}: a non-empty file name without '/' or a leading '.'")
    if teacher_name.endswith("_scas_scores"):
        raise ScasError(f"--teacher-name {teacher_name!r}: names ending in _scas_scores are score files")
    for name, value in (("--samples", samples), ("--max-new-tokens", max_new_tokens)):
        if int(value) < 1:
            raise ScasError(f"{name} must be >= 1, got {value}")
    if limit is not None and int(limit) < 0:
        raise ScasError(f"--limit must be >= 0, got {limit}")
    if dtype not in DTYPES:
        raise ScasError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")


def _rows_for(question, gens, tokenizer, teacher: str, samples: int) -> list[dict]:
    rows = []
    for k, g in enumerate(gens):
        row = {
            "id": question.id if samples == 1 else sample_id(question.id, k),
            "system": question.system,
            "instruction": question.instruction,
            "teacher_output": tokenizer.decode(list(g.tokens), skip_special_tokens=True),
            "reference_answer": question.reference_answer,
            "teacher_name": teacher,
            "truncated": bool(g.truncated),
            "generated_tokens": len(g.tokens),
        }
        if samples > 1:
            row["question_id"] = question.id
            row["sample_index"] = k
        rows.append(row)
    return rows


def generate(
    model: str | Path,
    questions: str | Path,
    output_dir: str | Path,
    teacher_name: str,
    *,
    samples: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    max_new_tokens: int = 512,
    seed: int = 0,
    mesh: Any = "data=-1",
    limit: int | None = None,
    batch_size: int = 16,
    dtype: str = "float32",
    tokenizer: str | Path | None = None,
    chat_template: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Generate answers (see the module docstring); returns the manifest.

    ``chat_template``: ``chatml``, ``gemma``, ``plain`` or a Jinja file (``--chat-template``)
    for the prompts; None: the tokenizer's own (an error naming the flag when it has none).
    """
    from scas_jax.data.chat import chat_template_label
    from scas_jax.generation.prompts import questions_sha256, read_questions
    from scas_jax.generation.sampling import SamplingConfig
    from scas_jax.generation.student import model_path_identity, resolve_model

    _check(teacher_name, samples, max_new_tokens, limit, dtype)
    sampling = SamplingConfig(float(temperature), int(top_k), float(top_p))
    qs = read_questions(questions, limit)  # file:line errors before any model loads
    template_label = chat_template_label(chat_template)  # a missing FILE.jinja: before the model
    resolved = resolve_model(model, tokenizer)
    output_dir = Path(output_dir)
    settings = {
        "model": str(resolved.describe()), "model_identity": model_path_identity(resolved),
        "questions": str(Path(questions)), "questions_sha256": questions_sha256(questions),
        "limit": limit, "teacher_name": teacher_name, "samples": int(samples),
        "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k,
        "max_new_tokens": int(max_new_tokens), "seed": int(seed), "dtype": dtype,
    }
    if template_label != "tokenizer":  # settings of default runs stay as before (their journals resume)
        settings["chat_template"] = template_label
    out_file = output_dir / f"{teacher_name}.jsonl"
    manifest_file = output_dir / f"{teacher_name}{MANIFEST_SUFFIX}"
    if out_file.exists():
        return _already_done(out_file, manifest_file, settings)
    return _run(resolved, qs, output_dir, out_file, manifest_file, settings, sampling, mesh,
                batch_size, progress, chat_template or None)


def _already_done(out_file: Path, manifest_file: Path, settings: dict) -> dict:
    from scas_jax.data.jsonl import read_json
    from scas_jax.generation.journal import settings_error

    if not manifest_file.exists():
        raise ScasError(f"{out_file} exists but was not written by generate (no {manifest_file.name}): "
                        "choose another --output-dir or --teacher-name")
    manifest = read_json(manifest_file, "generate manifest")
    error = settings_error(out_file, manifest.get("settings") or {}, settings)
    if error is not None:
        raise error
    return {**manifest, "already_complete": True}


def _run(resolved, qs, output_dir: Path, out_file: Path, manifest_file: Path, settings: dict,
         sampling, mesh, batch_size: int, progress: bool, chat_template: str | None) -> dict:
    from scas_jax.data.chat import with_chat_template
    from scas_jax.generation.journal import Journal
    from scas_jax.generation.prompts import generation_stop_ids, prompt_ids
    from scas_jax.generation.sampler import Sampler
    from scas_jax.io_utils import publish_files
    from scas_jax.parallel import is_main_process, make_mesh

    samples = settings["samples"]
    main = is_main_process()
    journal = Journal(output_dir, settings["teacher_name"], settings, write=main)
    try:
        todo = [q for q in qs if q.key not in journal.done]
        t0 = time.time()
        stats = {"compilations": 0, "generated_tokens": 0}
        if todo:
            mesh = mesh if not isinstance(mesh, (str, type(None))) else make_mesh(mesh or "data=-1")
            student = resolved.load(settings["dtype"], mesh)
            if student.tokenizer is None:
                raise ScasError(f"{resolved.describe()}: the model has no tokenizer")
            tok = with_chat_template(student.tokenizer, chat_template, name=str(resolved.describe()))
            stop_ids = generation_stop_ids(tok, chat_template)
            prompts = prompt_ids(tok, todo)
            sampler = Sampler(student.params, student.cfg, mesh=mesh, dtype=settings["dtype"],
                              batch_size=batch_size)
            flat = [(qi, k) for qi in range(len(todo)) for k in range(samples)]
            pending: dict[int, dict[int, Any]] = {}

            def on_batch(indices, gens):
                for i, g in zip(indices, gens):
                    qi, k = flat[i]
                    pending.setdefault(qi, {})[k] = g
                    stats["generated_tokens"] += len(g.tokens)
                    if len(pending[qi]) == samples:
                        got = pending.pop(qi)
                        q = todo[qi]
                        journal.record(q.key, _rows_for(q, [got[j] for j in range(samples)], tok,
                                                        settings["teacher_name"], samples))
                if progress:
                    print(f"generate: {len(journal.done)}/{len(qs)} questions", file=sys.stderr)

            sampler.generate([prompts[qi] for qi, _ in flat], max_new_tokens=settings["max_new_tokens"],
                             sampling=sampling, seed=settings["seed"],
                             row_ids=[_row_id(todo[qi].key, k) for qi, k in flat],
                             stop_ids=stop_ids, on_batch=on_batch)
            stats["compilations"] = sampler.compilations
        rows = [r for q in qs for r in journal.done[q.key]]
        elapsed = time.time() - t0
        manifest = {
            "command": "generate", "settings": settings, "output": out_file.name,
            "chat_template": settings.get("chat_template", "tokenizer"),
            "questions": len(qs), "rows": len(rows), "resumed_questions": len(qs) - len(todo),
            "truncated": sum(1 for r in rows if r["truncated"]),
            "generated_tokens_this_run": stats["generated_tokens"],
            "seconds_this_run": round(elapsed, 3),
            "tokens_per_second": round(stats["generated_tokens"] / elapsed, 2) if elapsed > 0 else None,
            "compilations": stats["compilations"],
        }
        if main:
            publish_files(output_dir, {out_file.name: rows, manifest_file.name: manifest}, overwrite=True)
            journal.remove()
        return manifest
    finally:
        journal.close()


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``generate`` subcommand."""
    from scas_jax.data.chat import CHAT_TEMPLATE_FLAG, CHAT_TEMPLATE_HELP

    p = subparsers.add_parser(
        "generate",
        help="answer a questions file with a model (KV-cache sampler); writes a teacher file",
        description=(
            "Answer every question of --questions (JSONL: id, instruction, optional system and "
            "reference_answer; a pool file works) with the model, greedy or sampled, and write "
            "DIR/NAME.jsonl in the pool format (verify, score and select read it). Resumable: "
            "rerun the same command after an interruption."),
    )
    p.add_argument("--model", required=True,
                   help="converted checkpoint, Hugging Face directory, GGUF file, 'smollm2', or a "
                        "training output directory / checkpoint")
    p.add_argument("--questions", required=True, type=Path, help="JSONL of questions, or its TFDS build (scas-jax dataset build --data FILE)")
    p.add_argument("--output-dir", required=True, type=Path, help="directory of the teacher file")
    p.add_argument("--teacher-name", required=True, help="NAME of DIR/NAME.jsonl and of every row's teacher_name")
    p.add_argument("--samples", type=int, default=1, help="answers per question (K > 1: ids become '<id>#<k>')")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0: off)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    p.add_argument("--max-new-tokens", type=int, default=512,
                   help="longest answer; a longer one is kept with truncated: true")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--mesh", default="data=-1", help="device mesh, e.g. data=-1 or data=2,fsdp=4")
    p.add_argument("--limit", type=int, default=None, help="only the first N questions")
    p.add_argument("--batch-size", type=int, default=16, help="rows per compiled call")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="compute and parameter dtype")
    p.add_argument("--tokenizer", default=None,
                   help="where to read the tokenizer when --model is a training checkpoint without one")
    p.add_argument(CHAT_TEMPLATE_FLAG, dest="chat_template", default=None,
                   metavar="chatml|gemma|plain|FILE.jinja", help=CHAT_TEMPLATE_HELP)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    m = generate(args.model, args.questions, args.output_dir, args.teacher_name, samples=args.samples,
                 temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                 max_new_tokens=args.max_new_tokens, seed=args.seed, mesh=args.mesh, limit=args.limit,
                 batch_size=args.batch_size, dtype=args.dtype, tokenizer=args.tokenizer,
                 chat_template=args.chat_template, progress=True)
    where = Path(args.output_dir) / m["output"]
    if m.get("already_complete"):
        print(f"generate: {where} is already complete ({m['rows']} rows, same settings)")
    else:
        print(f"generate: {m['rows']} rows ({m['truncated']} truncated, {m['resumed_questions']} questions "
              f"from the journal) -> {where}; {m['tokens_per_second']} tokens/s")
    return 0
