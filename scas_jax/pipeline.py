"""``scas-jax pipeline``: the main job end to end, on the embedded default.

Stages, each writing under ``OUT``:

1. ``convert``: the student (default: the bundled SmolLM2-135M-Instruct GGUF) -> ``student/``
2. ``pool``: the first ``questions`` GSM8K questions of the bundled pool -> ``pool/``, and
   the next ``heldout_questions`` -> ``heldout/`` (never trained on)
3. ``verify``: judge every answer with the rule-based judge -> ``verified/`` (with
   ``teacher_accuracy.json``, the teachers' accuracy over *all* their answers)
4. ``score``: SCAS-score every verified answer with the student -> ``scored/``
5. ``select``: SCAS ``min`` and the ``strongest``-teacher baseline -> ``selections/``
6. ``report``: -> ``report/report.md`` (accuracy, scores, what was picked and why)
7. ``train``: fine-tune on the SCAS selection -> ``train/final`` (float32 checkpoint) and
   ``train/hf`` (bfloat16 safetensors for transformers); the optimiser checkpoints are
   dropped once training has finished (they only serve ``--resume``)
8. ``effect``: mean answer NLL of the trained-on answers and of the held-out answers under
   the base and the fine-tuned student -> ``effect.json``, ``summary.md``

Reruns never reuse stale results: ``OUT/pipeline_state.json`` records the settings each
stage ran with and whether it finished. A rerun skips a finished stage only when its
settings and those of every stage before it are unchanged; otherwise it says which
setting changed and redoes that stage and all after it. An interrupted stage is run
again (scoring resumes from its journal, training from its last checkpoint).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from scas_jax.io_utils import write_json_atomic, write_jsonl_atomic, write_text_atomic
from scas_jax.stage_log import STATE_FILE, StageLog  # noqa: F401  (shared with scas_jax.experiment)


@dataclasses.dataclass(frozen=True)
class PipelineSettings:
    """Every knob of the demo; the defaults are the README's main job (about 0.4 nats of
    NLL drop on the trained-on answers for SmolLM2-135M-Instruct)."""

    student: str = "smollm2"
    questions: int = 30  # training questions (one selected answer each)
    heldout_questions: int = 10  # the next questions: the held-out slice for the NLL check
    train_steps: int = 6
    learning_rate: float = 1e-4
    rows_per_step: int = 2  # packed rows of seq_len tokens per step (rounded up to the devices)
    seq_len: int = 512
    warmup_steps: int = 1


def _remove(*paths: Path) -> None:
    for p in paths:
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def _barrier(tag: str) -> None:
    """All processes of a multi-process run reach ``tag`` before any goes on."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"scas_jax.pipeline.{tag}")


def slice_pool(src: Path, out: Path, start: int, stop: int) -> Path:
    """Rows ``start:stop`` of every teacher file (the bundled files are aligned by id)."""
    from scas_jax.data.jsonl import iter_jsonl

    tmp = out.with_name(out.name + ".partial")
    _remove(tmp)
    for f in sorted(src.glob("*.jsonl")):
        rows = [row for i, (_, row) in enumerate(iter_jsonl(f)) if start <= i < stop]
        write_jsonl_atomic(tmp / f.name, rows)
    tmp.rename(out)
    return out


def verified_rows(pool_dir: Path) -> list[dict]:
    """Every answer of a pool that its flags call correct."""
    from scas_jax.data.jsonl import iter_jsonl
    from scas_jax.data.verdicts import correctness

    return [row for f in sorted(pool_dir.glob("*.jsonl")) for _, row in iter_jsonl(f)
            if correctness(row) is True]


def mean_answer_nlls(student_path: Path, sets: dict[str, list[dict]], mesh) -> dict[str, tuple[float, int]]:
    """``{set: (mean over answers of answer_mean_nll, answers scored)}`` under one student."""
    from scas_jax.loader import load_student
    from scas_jax.scoring.scorer import ScoreConfig, score_rows

    student = load_student(student_path, dtype="float32", mesh=mesh)
    out = {}
    for name, rows in sets.items():
        fields = score_rows(student.params, student.cfg, student.tokenizer, rows,
                            ScoreConfig(batch_tokens=2048), mesh)
        nlls = [f["answer_mean_nll"] for f in fields if not f.get("scas_scoring_error")]
        out[name] = (sum(nlls) / max(len(nlls), 1), len(nlls))
    return out


def measure_effect(base: Path, tuned: Path, sets: dict[str, list[dict]]) -> dict:
    """Mean answer NLL of each row set under the base and the fine-tuned student."""
    from scas_jax.parallel import make_mesh

    mesh = make_mesh("data=-1")
    out: dict[str, dict] = {name: {} for name in sets}
    for label, path in (("base", base), ("fine_tuned", tuned)):
        for name, (nll, n) in mean_answer_nlls(path, sets, mesh).items():
            out[name][label] = nll
            out[name]["answers"] = n
    for v in out.values():
        v["change"] = v["fine_tuned"] - v["base"]
    return out


def effect_table(effect: dict, settings: PipelineSettings) -> str:
    names = {
        "trained_on": f"the {settings.questions} selected answers trained on",
        "heldout": f"held-out: verified answers of the next {settings.heldout_questions} questions",
    }
    lines = ["| answers | n | base NLL | fine-tuned NLL | change |", "|---|---:|---:|---:|---:|"]
    for key, v in effect.items():
        lines.append(f"| {names.get(key, key)} | {v['answers']} | {v['base']:.3f} | "
                     f"{v['fine_tuned']:.3f} | {v['change']:+.3f} |")
    return "\n".join(lines)


def run_pipeline(out_dir: str | Path = "runs/demo", settings: PipelineSettings = PipelineSettings(),
                 progress: bool = True) -> dict:
    """Run (or resume) the main job in ``out_dir``; returns the stages' results."""
    from scas_jax.assets import GSM8K_POOL

    s = settings
    if s.questions < 1 or s.heldout_questions < 0 or s.train_steps < 1:
        from scas_jax.errors import ScasError

        raise ScasError("pipeline: --questions and --train-steps must be >= 1, "
                        "--heldout-questions >= 0")
    from scas_jax.parallel import is_main_process

    main = is_main_process()
    say = print if main else (lambda *a, **k: None)
    out = Path(out_dir)
    if main:
        out.mkdir(parents=True, exist_ok=True)
    _barrier("start")
    log = StageLog(out, write=main)
    _barrier("state-read")  # every process decides from the same record
    t0 = time.time()
    total = 8
    conv, pool, heldout = out / "student", out / "pool", out / "heldout"
    verified, scored, sel = out / "verified", out / "scored", out / "selections"
    train_dir, report_dir = out / "train", out / "report"
    results: dict[str, Any] = {}

    def stage(n: int, name: str, text: str, settings: dict, outputs: list[Path],
              fn: Callable[[bool], Any], collective: bool = False) -> Any:
        """Run, resume or skip one stage. ``collective`` stages (they use the devices) run
        on every process; the others (files only) on process 0 while the rest wait."""
        say(f"\n[{n}/{total}] {text}", flush=True)
        action = log.decide(name, settings, report=say)
        if action == "skip" and not all(p.exists() for p in outputs):
            say(f"    {name}'s outputs are gone: redoing it and every stage after it")
            action = "run"
        if action == "skip":
            say("    done earlier with the same settings")
            return log.stages[name].get("result")
        if action == "run" and main:
            _remove(*outputs)
        log.start(name, settings, redo=True)
        _barrier(f"{name}-begin")
        result = fn(action == "resume") if (collective or main) else None
        _barrier(f"{name}-end")
        log.finish(name, result)
        return result

    def do_convert(_):
        from scas_jax.convert.commands import convert

        convert(s.student, conv)

    stage(1, "convert", f"convert {s.student} -> {conv}", {"student": s.student}, [conv], do_convert,
          collective=True)

    def do_pool(_):
        slice_pool(GSM8K_POOL, pool, 0, s.questions)
        slice_pool(GSM8K_POOL, heldout, s.questions, s.questions + s.heldout_questions)

    stage(2, "pool", f"GSM8K questions 0-{s.questions - 1} of each teacher -> {pool}; "
          f"{s.questions}-{s.questions + s.heldout_questions - 1} held out -> {heldout}",
          {"questions": s.questions, "heldout_questions": s.heldout_questions}, [pool, heldout], do_pool)

    def do_verify(_):
        from scas_jax.judging.verify import verify

        manifest = verify(pool, verified)
        a = manifest["agreement_with_input_flags"]
        say(f"    judge agrees with the pool's flags on {a['agree']}/{a['compared_rows']} answers "
              f"({a['undecided']} undecided)")

    stage(3, "verify", "verify answers (rule-based math judge)", {}, [verified], do_verify)

    def do_score(resume):
        from scas_jax.scoring.commands import score

        m = score(conv, verified, scored, progress=progress)
        return {"rows": m.get("rows"), "wall_seconds": m.get("wall_seconds")}

    stage(4, "score", "score every verified answer with the student (SCAS)", {}, [scored], do_score,
          collective=True)

    def do_select(_):
        from scas_jax.selection.api import select

        shares = {}
        for strategy in ("min", "strongest"):
            # verified_only: answers the judge left undecided are never trained on
            kw = {"teacher_accuracy": verified / "teacher_accuracy.json"} if strategy == "strongest" else {}
            m = select(scored if strategy == "min" else verified, sel, strategy=strategy,
                       verified_only=True, overwrite=True, **kw)
            shares[strategy] = {t: round(v["share"], 3) for t, v in (m.get("teacher_share") or {}).items()}
            say(f"    {strategy}: {m.get('selected_rows')} answers, teacher share {shares[strategy]}")
        return shares

    results["teacher_share"] = stage(5, "select", "select: SCAS min and the strongest-teacher baseline",
                                     {}, [sel], do_select)

    def do_report(_):
        from scas_jax.reporting.report import report

        report(scored, [sel], report_dir, overwrite=True, verified=verified)

    stage(6, "report", f"report -> {report_dir / 'report.md'}", {}, [report_dir], do_report)

    train_settings = {"train_steps": s.train_steps, "learning_rate": s.learning_rate,
                      "rows_per_step": s.rows_per_step, "seq_len": s.seq_len,
                      "warmup_steps": s.warmup_steps}

    def do_train(resume):
        import jax

        from scas_jax.convert.commands import export
        from scas_jax.training.loop import train

        resume = resume and (train_dir / "checkpoints").is_dir()
        if not resume and main:
            _remove(train_dir)
        _barrier("train-clean")
        n = jax.device_count()  # rows per step: a multiple of the devices
        rows = -(-s.rows_per_step // n) * n
        summary = train(conv, sel / "scas_score" / "min_score_selected.jsonl", train_dir,
                        overrides=[f"steps={s.train_steps}", f"batch_size={rows}", f"seq_len={s.seq_len}",
                                   f"warmup_steps={s.warmup_steps}", f"learning_rate={s.learning_rate}",
                                   "checkpoint_every=2", "max_to_keep=1"],
                        resume=resume, progress=progress)
        if summary.get("interrupted"):
            raise KeyboardInterrupt
        export(train_dir / "final", train_dir / "hf", dtype="bfloat16", overwrite=True)
        _barrier("train-exported")
        if not main:
            return None
        _remove(train_dir / "checkpoints")  # training finished: resume state no longer needed
        losses = [json.loads(line)["loss"] for line in
                  (train_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
        say("    training loss (answer tokens, per step's batch): "
              + " ".join(f"{x:.3f}" for x in losses))
        return {"losses": losses}

    stage(7, "train", f"fine-tune {s.train_steps} steps on the SCAS selection, export to HF",
          train_settings, [train_dir], do_train, collective=True)

    def do_effect(_):
        from scas_jax.data.jsonl import iter_jsonl

        trained_on = [row for _, row in iter_jsonl(sel / "scas_score" / "min_score_selected.jsonl")]
        sets = {"trained_on": trained_on}
        if s.heldout_questions:
            sets["heldout"] = verified_rows(heldout)
        effect = measure_effect(conv, train_dir / "final", sets)
        if main:
            write_json_atomic(out / "effect.json", effect)
        return effect

    effect = stage(8, "effect", "the effect of fine-tuning: mean answer NLL, base vs fine-tuned",
                   {}, [out / "effect.json"], do_effect, collective=True)
    table = effect_table(effect, s)
    say(table)
    if main:
        write_text_atomic(out / "summary.md", summary_markdown(out, s, table, time.time() - t0))
    say(f"\ndone in {time.time() - t0:.0f}s: report {report_dir / 'report.md'}, "
          f"summary {out / 'summary.md'}, fine-tuned model {train_dir / 'hf'}")
    results.update({"out": str(out), "effect": effect, "ok": True})
    return results


def summary_markdown(out: Path, s: PipelineSettings, table: str, seconds: float) -> str:
    return f"""# scas-jax pipeline: {out}

Student `{s.student}`; GSM8K questions 0-{s.questions - 1} (training) and
{s.questions}-{s.questions + s.heldout_questions - 1} (held out); {s.train_steps} steps at
learning rate {s.learning_rate:g} on the SCAS `min` selection (one answer per question).

## The effect of fine-tuning

Mean per-answer NLL of the answer tokens (nats), under the base student and the fine-tuned
one (`effect.json`):

{table}

## Where things are

- report: `report/report.md` (teacher accuracy, score distributions, what was picked and why)
- scores: `scored/`; selections: `selections/`; judge's verdicts: `verified/`
- fine-tuned model: `train/final` (scas_jax checkpoint, float32, usable as `--student`) and
  `train/hf` (bfloat16 safetensors for transformers); training log: `train/metrics.jsonl`

This run (or its resumption) took {seconds:.0f} s.
"""


def _cmd(args: argparse.Namespace) -> int:
    settings = PipelineSettings(student=args.student, questions=args.questions,
                                heldout_questions=args.heldout_questions,
                                train_steps=args.train_steps, learning_rate=args.learning_rate)
    run_pipeline(args.out, settings, not args.no_progress)
    return 0


def register(sub) -> None:
    d = PipelineSettings()
    p = sub.add_parser(
        "pipeline", help="the main job end to end on the embedded default student",
        description="Convert the student, verify, score, select, report, fine-tune and measure the "
                    "effect, on the bundled GSM8K pool. A rerun skips the stages already done with "
                    "the same settings and redoes the rest.")
    p.add_argument("--out", default="runs/demo", help="working directory")
    p.add_argument("--student", default=d.student, help="HF dir, GGUF, converted dir or 'smollm2'")
    p.add_argument("--questions", type=int, default=d.questions,
                   help="GSM8K questions to score, select and train on")
    p.add_argument("--heldout-questions", type=int, default=d.heldout_questions,
                   help="the next questions, held out for the NLL check (0: none)")
    p.add_argument("--train-steps", type=int, default=d.train_steps, help="fine-tuning steps")
    p.add_argument("--learning-rate", type=float, default=d.learning_rate, help="peak learning rate")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd)
