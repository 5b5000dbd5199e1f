"""One (arm, seed) run: fine-tune the base student on the arm's answers (nothing for
``base``), then evaluate it on the held-out questions; ``OUT/runs/<arm>/seed_<s>/result.json``.

Training keeps only what evaluation needs: the optimiser checkpoints and TensorBoard files
are deleted when training ends, the fine-tuned ``final/`` checkpoint once the run is
evaluated (unless ``keep_models``); ``metrics.jsonl`` stays.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path
from typing import Any

from scas_jax.data.jsonl import iter_jsonl
from scas_jax.data.rows import id_key
from scas_jax.experiment.arms import shares
from scas_jax.experiment.config import ExperimentConfig
from scas_jax.io_utils import write_json_atomic

RESULT = "result.json"


def train_overrides(cfg: ExperimentConfig, seed: int, steps: int, batch: int, seq_len: int,
                    dynamic: bool) -> list[str]:
    """The same training settings for every arm: ``batch`` answers per step, one per row."""
    out = [f"steps={steps}", f"batch_size={batch}", f"seq_len={seq_len}", "max_segments=1",
           f"learning_rate={cfg.learning_rate}", f"warmup_steps={cfg.warmup_steps}",
           f"schedule={cfg.schedule}", f"weight_decay={cfg.weight_decay}", f"seed={seed}",
           f"mesh={cfg.mesh}", "checkpoint_every=1000000000", "max_to_keep=1", "drop_long=true"]
    if cfg.chat_template:
        out.append(f"chat_template={cfg.chat_template}")
    if cfg.grad_accum > 1:
        out.append(f"grad_accum={cfg.grad_accum}")
    if dynamic:
        out += ["selection=dynamic", f"rescore_every={cfg.rescore_every}", f"questions_per_step={batch}",
                "dynamic_strategy=min", "score_key=scas_score", f"lambda_scas={cfg.lambda_scas}",
                f"score_batch_tokens={cfg.score_batch_tokens}", f"selection_seed={seed}",
                "score_max_segments=16"]
    return out


def _dynamic_shares(metrics: Path) -> dict[str, float]:
    """Teacher shares over the run: each rescoring event's shares weighed by its steps."""
    total: dict[str, float] = {}
    steps = 0
    for _, rec in iter_jsonl(metrics):
        if rec.get("event") != "rescore":
            continue
        n = rec["steps"][1] - rec["steps"][0]
        steps += n
        for t, v in rec.get("teacher_share", {}).items():
            total[t] = total.get(t, 0.0) + n * v
    return {t: round(v / steps, 6) for t, v in sorted(total.items()) if v} if steps else {}


def heldout_nlls(model: Path, rows: list[dict], cfg: ExperimentConfig, mesh) -> list[float]:
    """``answer_mean_nll`` of each held-out row under ``model`` (NaN for an error row), the
    rows formatted with the student's ``chat_template`` (its tokenizer's own when "")."""
    from scas_jax.data.chat import with_chat_template
    from scas_jax.loader import load_student
    from scas_jax.scoring.fields import ERROR_FIELD
    from scas_jax.scoring.scorer import ScoreConfig, score_rows

    st = load_student(model, dtype="float32", mesh=mesh)
    tok = with_chat_template(st.tokenizer, cfg.chat_template or None, "chat_template", name=str(model))
    fields = score_rows(st.params, st.cfg, tok, rows,
                        ScoreConfig(batch_tokens=cfg.score_batch_tokens, max_length=cfg.max_length,
                                    dtype="float32", lambda_scas=cfg.lambda_scas), mesh)
    return [math.nan if f.get(ERROR_FIELD) else float(f["answer_mean_nll"]) for f in fields]


def macro_nll(nlls: list[float], rows: list[dict]) -> float:
    """The macro-average over teachers of the finite NLLs (evaluate's
    :func:`~scas_jax.evaluation.metrics.per_teacher_means`); NaN when there is none."""
    from scas_jax.evaluation.metrics import per_teacher_means

    macro = per_teacher_means((r["teacher_name"], v) for v, r in zip(nlls, rows))["macro_mean_nll"]
    return math.nan if macro is None else macro


def run_one(cfg: ExperimentConfig, arm: str, seed: int | None, run_dir: Path, student: Path,
            data_file: Path | None, train_pool: Path, heldout: list[dict], questions: Path,
            steps: int, batch: int, seq_len: int, mesh, progress: bool) -> dict[str, Any]:
    """Train (unless ``base``) and evaluate; writes and returns ``result.json``'s record."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    t0 = time.time()
    rec: dict[str, Any] = {"arm": arm, "seed": seed, "steps": 0, "train_examples": None,
                           "train_tokens": None, "teacher_shares": {}, "last_loss": None}
    model = student
    if arm != "base":
        from scas_jax.training.loop import train

        dynamic = arm == "dynamic"
        tdir = run_dir / "train"
        summary = train(student, None if dynamic else data_file, tdir,
                        overrides=train_overrides(cfg, seed, steps, batch, seq_len, dynamic),
                        candidate_dir=train_pool if dynamic else None, progress=progress)
        if summary.get("interrupted"):
            raise KeyboardInterrupt
        for junk in ("checkpoints", "tensorboard"):
            shutil.rmtree(tdir / junk, ignore_errors=True)
        data = summary.get("data", {})
        if dynamic:
            rec["teacher_shares"] = _dynamic_shares(tdir / "metrics.jsonl")
            rec["train_examples"] = data.get("questions", len({r["id"] for r in iter_rows(train_pool)}))
            rec["train_tokens"] = None  # chosen during training: not one fixed set
            rec["selection"] = summary.get("selection")
        else:
            rows = [r for _, r in iter_jsonl(data_file)]
            rec["teacher_shares"] = shares(r["teacher_name"] for r in rows)
            rec["train_examples"] = data.get("examples", len(rows))
            rec["train_tokens"] = data.get("answer_tokens")
            rec["dropped_long"] = data.get("dropped_long", 0)
        rec.update(steps=summary["final_step"], last_loss=summary.get("last_loss"),
                   train_seconds=round(time.time() - t0, 1))
        model = tdir / "final"
    nlls = heldout_nlls(model, heldout, cfg, mesh)
    rec["answer_nll"] = [None if not math.isfinite(v) else round(v, 6) for v in nlls]
    rec["heldout_nll"] = macro_nll(nlls, heldout)
    rec["accuracy"], rec["verdicts"] = None, None
    if cfg.generate_accuracy:
        from scas_jax.evaluation.evaluate import evaluate

        m = evaluate(model, questions, run_dir / "eval", max_new_tokens=cfg.max_new_tokens, mesh=mesh,
                     batch_size=cfg.eval_batch_size, dtype="float32", bootstrap_samples=cfg.bootstrap_samples,
                     seed=cfg.bootstrap_seed, overwrite=True, chat_template=cfg.chat_template or None)
        rec["accuracy"] = m["accuracy"]
        rec["verdicts"] = {id_key(p["id"]): p["verdict"] is True
                           for _, p in iter_jsonl(run_dir / "eval" / "predictions.jsonl")}
    rec["seconds"] = round(time.time() - t0, 1)
    if arm != "base" and not cfg.keep_models:
        shutil.rmtree(run_dir / "train" / "final", ignore_errors=True)
    write_json_atomic(run_dir / RESULT, rec)
    return rec


def iter_rows(pool: Path):
    """Every row of a pool directory (the one pool reader, :mod:`scas_jax.data.files`)."""
    from scas_jax.data.files import discover_pool, iter_rows as file_rows

    for pf in discover_pool(pool):
        for _, r in file_rows(pf):
            yield r
