"""``evaluate()``: how well a student answers, and how it reads the pool's verified answers.

1. Greedy answers to every question (the KV-cache sampler, :mod:`scas_jax.generation`),
   judged by the rule judge against ``reference_answer`` (a truncated answer is
   undecided) -> ``predictions.jsonl``, one row per question::

       {"id", "generation", "extracted_answer", "verdict" (true/false/null), "reason",
        "truncated", "generated_tokens", "reference_answer"}

2. ``metrics.json``: counts, accuracy (undecided counts as not correct) with a 95 %
   percentile bootstrap interval over questions (seeded), and, with ``pool``, the mean
   answer NLL (``answer_mean_nll`` of :func:`scas_jax.scoring.scorer.score_rows`: the
   student's mean per-token NLL of an answer after its prompt) of the *verified*
   answers of these questions, per teacher (mean over answers) and the macro-average
   over teachers. A pool row is verified when its flag (``teacher_correct``, else
   ``is_correct``) says correct; a pool without flags is judged on the fly. Rows match a
   question by ``question_id`` (``generate --samples K``) else ``id``.

``chat_template`` (``--chat-template chatml|gemma|plain|FILE.jinja``) replaces the
student's template before the prompts are built and the pool's answers are scored (a base
model has none; without the flag such a student is an error naming it); stop tokens as
in ``generate`` (:func:`scas_jax.generation.prompts.generation_stop_ids`). ``metrics.json``
records it as ``chat_template`` (``"tokenizer"``: the student's own).

Inputs are checked (questions file, pool files, student path, template) before the model loads;
outputs appear together, atomically (a non-empty ``output_dir`` needs ``overwrite``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from scas_jax.errors import ScasError

PREDICTIONS = "predictions.jsonl"
METRICS = "metrics.json"


def _pool_rows(pool: Path, keys: set[str]) -> tuple[list[dict], dict]:
    """Verified rows of ``pool`` answering one of ``keys``, and counts of what was kept."""
    from scas_jax.data.files import discover_pool, iter_rows
    from scas_jax.data.rows import id_key, row_answer, row_teacher
    from scas_jax.data.verdicts import correctness_at, has_flag
    from scas_jax.judging.verify import judge_row

    rows, counts = [], {"read": 0, "other_questions": 0, "unverified": 0, "verified_by_flag": 0,
                        "verified_by_judge": 0}
    for pf in discover_pool(pool):
        for line, row in iter_rows(pf):  # a JSONL pool or its TFDS build alike
            counts["read"] += 1
            qid = row.get("question_id", row.get("id"))
            if qid is None or id_key(qid) not in keys:
                counts["other_questions"] += 1
                continue
            if has_flag(row):
                ok, how = correctness_at(row, f"{pf.path}:{line}") is True, "verified_by_flag"
            else:
                ok, how = judge_row(row).correct is True, "verified_by_judge"
            if not ok or not row.get("instruction") or row_answer(row) is None:
                counts["unverified"] += 1
                continue
            counts[how] += 1
            rows.append({**row, "teacher_name": str(row_teacher(row, pf.teacher))})
    return rows, counts


def evaluate(
    student: str | Path,
    questions: str | Path,
    output_dir: str | Path,
    *,
    pool: str | Path | None = None,
    max_new_tokens: int = 512,
    limit: int | None = None,
    mesh: Any = "data=-1",
    batch_size: int = 16,
    dtype: str = "float32",
    tokenizer: str | Path | None = None,
    chat_template: str | None = None,
    bootstrap_samples: int = 1000,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluate ``student`` on ``questions``; write ``predictions.jsonl`` and ``metrics.json``
    to ``output_dir``; return the metrics."""
    import dataclasses

    from scas_jax.data.chat import chat_template_label, with_chat_template
    from scas_jax.data.files import check_dir
    from scas_jax.generation.prompts import (
        generation_stop_ids,
        prompt_ids,
        read_questions,
    )
    from scas_jax.generation.sampler import Sampler
    from scas_jax.generation.student import resolve_model
    from scas_jax.io_utils import publish_dir, refuse_non_empty
    from scas_jax.judging.verify import judge_row
    from scas_jax.parallel import is_main_process, make_mesh

    if max_new_tokens < 1:
        raise ScasError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if bootstrap_samples < 1:
        raise ScasError(f"--bootstrap-samples must be >= 1, got {bootstrap_samples}")
    output_dir = Path(output_dir)
    if not overwrite:
        refuse_non_empty(output_dir)
    qs = read_questions(questions, limit)
    template_label = chat_template_label(chat_template)
    pool_rows, pool_counts = ([], None)
    if pool is not None:
        pool_rows, pool_counts = _pool_rows(check_dir(pool, "--pool"), {q.key for q in qs})
    resolved = resolve_model(student, tokenizer)

    t0 = time.time()
    mesh = mesh if not isinstance(mesh, (str, type(None))) else make_mesh(mesh or "data=-1")
    st = resolved.load(dtype, mesh)
    if st.tokenizer is None:
        raise ScasError(f"{resolved.describe()}: the student has no tokenizer")
    tok = with_chat_template(st.tokenizer, chat_template or None, name=str(resolved.describe()))
    st = dataclasses.replace(st, tokenizer=tok)  # the pool's answers are scored after these prompts too
    stop_ids = generation_stop_ids(tok, chat_template or None)
    sampler = Sampler(st.params, st.cfg, mesh=mesh, dtype=dtype, batch_size=batch_size)
    done = [0]

    def on_batch(indices, gens):
        done[0] += len(indices)
        if progress:
            import sys

            print(f"evaluate: {done[0]}/{len(qs)} questions answered", file=sys.stderr)

    gens = sampler.generate(prompt_ids(tok, qs), max_new_tokens=max_new_tokens,
                            stop_ids=stop_ids, on_batch=on_batch)
    gen_seconds = time.time() - t0
    predictions = []
    for q, g in zip(qs, gens):
        text = tok.decode(list(g.tokens), skip_special_tokens=True)
        v = judge_row({"teacher_output": text, "reference_answer": q.reference_answer,
                       "truncated": g.truncated})
        predictions.append({
            "id": q.id, "generation": text, "extracted_answer": v.answer, "verdict": v.correct,
            "reason": v.reason, "truncated": g.truncated, "generated_tokens": len(g.tokens),
            "reference_answer": q.reference_answer,
        })
    metrics = _metrics(predictions, bootstrap_samples, seed)
    metrics["answer_nll"] = _answer_nll(st, pool_rows, pool_counts, pool, mesh) if pool is not None else None
    tokens = sum(p["generated_tokens"] for p in predictions)
    metrics.update({
        "student": resolved.describe(), "questions_file": str(questions), "limit": limit,
        "max_new_tokens": max_new_tokens, "dtype": dtype, "chat_template": template_label,
        "generated_tokens": tokens,
        "generation_seconds": round(gen_seconds, 3), "sampler_compilations": sampler.compilations,
        "seconds": round(time.time() - t0, 3),
    })
    if is_main_process():
        publish_dir(output_dir, {PREDICTIONS: predictions, METRICS: metrics}, overwrite=True)
    return metrics


def _metrics(predictions: list[dict], samples: int, seed: int) -> dict:
    from scas_jax.evaluation.metrics import accuracy_metrics

    return accuracy_metrics([p["verdict"] for p in predictions], [p["truncated"] for p in predictions],
                            samples=samples, seed=seed)


def _answer_nll(st, rows: list[dict], counts: dict, pool, mesh) -> dict:
    from scas_jax.evaluation.metrics import per_teacher_means
    from scas_jax.scoring.fields import ERROR_FIELD
    from scas_jax.scoring.scorer import ScoreConfig, score_rows

    out: dict[str, Any] = {"pool": str(pool), "pool_rows": counts}
    if not rows:
        return {**out, "per_teacher": {}, "macro_mean_nll": None, "answers": 0, "errors": 0}
    fields = score_rows(st.params, st.cfg, st.tokenizer, rows, ScoreConfig(dtype=st.param_dtype), mesh)
    ok = [(r["teacher_name"], f["answer_mean_nll"]) for r, f in zip(rows, fields) if not f.get(ERROR_FIELD)]
    return {**out, **per_teacher_means(ok), "errors": len(rows) - len(ok)}
