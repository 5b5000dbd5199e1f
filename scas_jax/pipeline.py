"""``scas-jax pipeline``: the main job end to end, on the embedded default.

Stages (each skipped when its output is already there, so a rerun resumes):

1. convert the student (default: the bundled SmolLM2-135M-Instruct GGUF) -> ``OUT/student``
2. take the first ``questions`` GSM8K questions of the bundled pool -> ``OUT/pool``
3. verify every answer with the rule-based judge -> ``OUT/verified``
4. score every verified answer with the student (SCAS) -> ``OUT/scored``
5. select: SCAS ``min`` and the ``strongest``-teacher baseline -> ``OUT/selections``
6. report -> ``OUT/report/report.md``
7. fine-tune on the SCAS selection for ``train_steps`` steps and export to Hugging
   Face -> ``OUT/train``, ``OUT/train/hf``
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from scas_jax.io_utils import write_jsonl_atomic


def _stage(n: int, total: int, text: str) -> None:
    print(f"\n[{n}/{total}] {text}", flush=True)


def subset_pool(src: Path, out: Path, questions: int) -> Path:
    """The first ``questions`` rows of every teacher file (rows are aligned by id)."""
    if out.exists():
        return out
    tmp = out.with_name(out.name + ".partial")
    for f in sorted(src.glob("*.jsonl")):
        with open(f, encoding="utf-8") as fh:
            rows = [json.loads(line) for _, line in zip(range(questions), fh)]
        write_jsonl_atomic(tmp / f.name, rows)
    tmp.rename(out)
    return out


def run_pipeline(
    out_dir: str | Path = "runs/demo",
    student: str = "smollm2",
    questions: int = 40,
    train_steps: int = 10,
    progress: bool = True,
) -> dict:
    from scas_jax.assets import GSM8K_POOL
    from scas_jax.convert.checkpoint import is_converted
    from scas_jax.convert.commands import convert
    from scas_jax.judging.verify import verify
    from scas_jax.reporting.report import report
    from scas_jax.scoring.commands import score
    from scas_jax.selection.api import select
    from scas_jax.training.loop import train

    out = Path(out_dir)
    t0 = time.time()
    total = 7
    conv = out / "student"
    _stage(1, total, f"convert {student} -> {conv}")
    if not is_converted(conv):
        convert(student, conv)

    _stage(2, total, f"first {questions} GSM8K questions of each teacher -> {out / 'pool'}")
    pool = subset_pool(GSM8K_POOL, out / "pool", questions)

    _stage(3, total, "verify answers (rule-based math judge)")
    verified = out / "verified"
    if not verified.exists():
        a = verify(pool, verified)["agreement_with_input_flags"]
        print(f"    judge agrees with the pool's flags on {a['agree']}/{a['compared_rows']} answers "
              f"({a['undecided']} undecided)")

    _stage(4, total, "score every verified answer with the student (SCAS)")
    scored = out / "scored"
    manifest = score(conv, verified, scored, skip_existing=True, progress=progress)

    _stage(5, total, "select: SCAS min and the strongest-teacher baseline")
    sel = out / "selections"
    picks = {}
    for strategy in ("min", "strongest"):
        source = scored if strategy == "min" else verified
        # verified_only: answers the judge left undecided are never trained on
        m = select(source, sel, strategy=strategy, verified_only=True, overwrite=True)
        picks[strategy] = m
        share = {t: round(v["share"], 3) for t, v in (m.get("teacher_share") or {}).items()}
        print(f"    {strategy}: {m.get('selected_rows')} answers, teacher share {share}")

    _stage(6, total, f"report -> {out / 'report' / 'report.md'}")
    report(scored, [sel], out / "report", overwrite=True)

    _stage(7, total, f"fine-tune {train_steps} steps on the SCAS selection, export to HF")
    data = sel / "scas_score" / "min_score_selected.jsonl"
    summary = None
    if not (out / "train" / "hf").exists():
        import jax

        n = jax.device_count()  # rows per step: at least 2, a multiple of the devices
        summary = train(conv, data, out / "train",
                        overrides=[f"steps={train_steps}", f"batch_size={-(-2 // n) * n}", "seq_len=512",
                                   "warmup_steps=2", "learning_rate=2e-5",
                                   f"checkpoint_every={max(train_steps, 1)}"],
                        export_hf=out / "train" / "hf", progress=progress)
    metrics = out / "train" / "metrics.jsonl"
    if metrics.exists():
        losses = [json.loads(line)["loss"] for line in metrics.read_text().splitlines() if line.strip()]
        if losses:
            print(f"    training loss (answer tokens): step 1 {losses[0]:.3f} -> step {len(losses)} "
                  f"{losses[-1]:.3f}")
    print(f"\ndone in {time.time() - t0:.0f}s: scores {scored}, selections {sel}, "
          f"report {out / 'report' / 'report.md'}, trained model {out / 'train' / 'hf'}")
    return {"out": str(out), "score_manifest": manifest, "selections": picks, "train": summary,
            "ok": True}


def _cmd(args: argparse.Namespace) -> int:
    run_pipeline(args.out, args.student, args.questions, args.train_steps, not args.no_progress)
    return 0


def register(sub) -> None:
    p = sub.add_parser("pipeline", help="the main job end to end on the embedded default student")
    p.add_argument("--out", default="runs/demo", help="working directory (default runs/demo)")
    p.add_argument("--student", default="smollm2", help="HF dir, GGUF or converted dir")
    p.add_argument("--questions", type=int, default=40, help="GSM8K questions to use (default 40)")
    p.add_argument("--train-steps", type=int, default=10, help="fine-tuning steps (default 10)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd)
