"""``run_experiment(config, out)``: the stages of ``scas-jax experiment``.

1. ``student``: the student converted once into ``OUT/student`` (a converted directory is
   used in place);
2. ``data``: the configured teachers and questions, judged and split (``split.py``);
3. ``score``: the training candidates scored once with the base student (``OUT/scored``;
   only when an arm ranks by a score or ``other_student`` is set); with ``other_student``:
   ``other_student`` (converted into ``OUT/other_student``) and ``score_other`` (the same
   candidates scored by it, ``OUT/scored_other``), then ``OUT/comparison.json``
   (``compare.py``; rewritten each time);
4. arm files: one answer per training question for each arm (and seed, for seeded arms),
   ``OUT/arms/*.jsonl``; rewritten each time (cheap, deterministic);
5. runs: for each seed, each arm: train and evaluate (``runs.py``);
6. ``results.json``, ``results.csv``, ``results.md``, ``figures/``.

``OUT/experiment_state.json`` (:class:`scas_jax.stage_log.StageLog`) records the settings
of each stage and of each (arm, seed) run. A rerun skips what finished with the same
settings; a changed stage setting redoes that stage and everything after it; a run is
redone when its own settings change (training settings, the content of its training
file, the held-out data, the evaluation settings). Only the runs of the current
config make up the results.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from scas_jax.experiment.config import (
    OTHER_ARMS,
    SCORED_ARMS,
    SEEDED_ARMS,
    ExperimentConfig,
    check_teachers,
    load_config,
)
from scas_jax.experiment.split import dir_digest, heldout_rows, pool_teachers, prepare_data
from scas_jax.io_utils import write_json_atomic, write_text_atomic
from scas_jax.stage_log import StageLog

STATE_FILE = "experiment_state.json"


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _reset_cache() -> None:
    try:  # JAX decides once per process whether to use the cache: ask it again
        from jax._src import compilation_cache as cc

        cc.reset_cache()
    except (ImportError, AttributeError):  # another JAX: no persistent cache, just slower
        pass


@contextlib.contextmanager
def compilation_cache(path: Path):
    """Every arm and seed compiles the same training step, scorer and sampler (same shapes):
    a persistent compilation cache in ``OUT/.jax_cache`` compiles each once. A cache the
    user configured (``JAX_COMPILATION_CACHE_DIR``) is left alone; the previous settings
    come back afterwards."""
    import jax

    if jax.config.jax_compilation_cache_dir:
        yield
        return
    old_time = jax.config.jax_persistent_cache_min_compile_time_secs
    _reset_cache()
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    try:
        yield
    finally:
        jax.config.update("jax_compilation_cache_dir", None)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", old_time)
        _reset_cache()


def longest_row(student: Path, pool: Path, chat_template: str = "") -> int:
    """Tokens of the longest candidate (chat-formatted prompt + answer) of ``pool``."""
    from scas_jax.data.chat import ChatEncoder, with_chat_template
    from scas_jax.experiment.runs import iter_rows
    from scas_jax.loader import load_tokenizer

    enc = ChatEncoder(with_chat_template(load_tokenizer(student), chat_template or None, "chat_template",
                                         name=str(student)))
    lengths = [getattr(e, "length", 0) for e in enc.encode_rows(list(iter_rows(pool)))]
    return max(lengths or [1])


def run_experiment(config: str | Path | None, out: str | Path, overrides: list[str] = (), progress: bool = True,
                   say: Callable[..., None] = print) -> dict[str, Any]:
    """Run or resume the experiment of ``config`` (with ``key=value`` ``overrides``) in ``out``;
    returns ``results.json``'s content."""
    import jax

    cfg = load_config(config, list(overrides))
    where = str(config) if config else "experiment config"
    if jax.process_count() > 1:
        from scas_jax.errors import ScasError

        raise ScasError("scas-jax experiment runs as one process (one host, all its devices); "
                        "run its stages (score, train) multi-host on their own")
    check_teachers(cfg, pool_teachers(cfg.pool_dir()), where)  # before any model work
    if cfg.both_roles:
        from scas_jax.experiment.roles import role_dirs

        role_dirs(cfg, where)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with compilation_cache(out / ".jax_cache"):
        if cfg.both_roles:
            from scas_jax.experiment.roles import run_both_roles

            return run_both_roles(cfg, where, out, lambda c, w, o, shared=None: _stages(
                c, w, o, progress, say, shared), say)
        return _stages(cfg, where, out, progress, say)[0]


def _template_settings(template: str) -> dict:
    """``{"chat_template": label}`` when one is named; {} otherwise (so the recorded settings
    of configs without templates stay as they were, and their runs are not redone)."""
    from scas_jax.data.chat import chat_template_label

    return {"chat_template": chat_template_label(template, "chat_template")} if template else {}


def _convert_stage(stage, spec: str, dest: Path, name: str, cascade: bool = True) -> Path:
    """``spec`` itself when it is a converted checkpoint, else converted once into ``dest``."""
    from scas_jax.convert import checkpoint
    from scas_jax.loader import resolve_path

    src = resolve_path(spec)
    if checkpoint.is_converted(src):
        return src
    from scas_jax.convert.commands import convert

    stage(name, {"student": spec}, dest, lambda: str(convert(spec, dest)), cascade)
    return dest


def _stages(cfg: ExperimentConfig, where: str, out: Path, progress: bool, say: Callable[..., None],
            shared: dict | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every stage in ``out``; with ``shared`` (the second role of ``both_roles``: the
    paths of the first role's converted students, data and scores, roles swapped) only
    the comparison, arm files, runs and results. Returns (results, the paths of stages 1-3)."""
    log = StageLog(out, filename=STATE_FILE)
    t0 = time.time()

    def stage(name: str, settings: dict, output: Path, fn: Callable[[], Any], cascade: bool = True) -> Any:
        """Run or skip a stage; a stage that runs redoes every stage after it, unless not
        ``cascade`` (the other student's: what depends on it is checked by content)."""
        action = log.decide(name, settings, report=say)
        if action == "skip" and output.exists():
            say(f"[{name}] done earlier with the same settings")
            return log.stages[name].get("result")
        say(f"[{name}] running")
        if action != "resume":
            _remove(output)
        log.start(name, settings, redo=cascade)
        result = fn()
        log.finish(name, result)
        return result

    prep = shared or _prepare(cfg, where, out, stage, progress, say)
    student, other, data, counts = prep["student"], prep["other"], prep["data"], prep["counts"]
    scored, scored_other = prep["scored"], prep["scored_other"]
    comparison = None
    if other is not None:
        from scas_jax.experiment.compare import compare_students

        comparison = compare_students(scored, scored_other, cfg.bootstrap_samples, cfg.bootstrap_seed)
        comparison = {"student": cfg.student, "other_student": cfg.other_student,
                      "chat_template": _template_label(cfg.chat_template),
                      "other_chat_template": _template_label(cfg.other_chat_template), **comparison}
        write_json_atomic(out / "comparison.json", comparison)
        rho = comparison["spearman_global"]
        say(f"    students pick the same answer for {comparison['agreeing_questions']}/{comparison['questions']} "
            f"questions; Spearman rho of scas_score {'n/a' if rho is None else f'{rho:.3f}'}")
    results = _arms_and_runs(cfg, where, out, log, progress, say, student, data, counts, scored, scored_other)
    return write_results(cfg, where, out, *results, time.time() - t0, comparison, data=data), prep


def _prepare(cfg: ExperimentConfig, where: str, out: Path, stage, progress: bool,
             say: Callable[..., None]) -> dict[str, Any]:
    """Stages 1-3: the students converted, the data split, the training pool scored."""
    # 1. student (and the other student)
    student = _convert_stage(stage, cfg.student, out / "student", "student")
    # the other student's stages redo nothing after them: its picks reach the runs through the
    # arm files (whose sha256 each run records) and the comparison is rewritten every time
    other = _convert_stage(stage, cfg.other_student, out / "other_student", "other_student", cascade=False) \
        if cfg.other_student else None

    # 2. data
    data = out / "data"
    data_settings = {k: getattr(cfg, k) for k in ("questions", "min_verified", "heldout_questions",
                                                   "train_questions", "split_seed")}
    data_settings.update(pool=cfg.pool, pool_sha256=dir_digest(cfg.pool_dir()),
                         teachers=list(cfg.teachers))
    counts = stage("data", data_settings, data, lambda: prepare_data(cfg, data, where))
    say(f"    {counts['train_questions']} training questions, {counts['heldout_questions']} held out "
        f"({counts['heldout_answers']} verified answers), teachers {', '.join(counts['teachers'])}")
    train_pool = data / "train_pool"

    # 3. score (the base student, once; the other student too when there is one)
    scored, scored_other = out / "scored", out / "scored_other"

    def score_stage(name: str, model: Path, spec: str, template: str, dest: Path, cascade: bool = True) -> None:
        from scas_jax.scoring.commands import score

        def do_score():
            m = score(model, train_pool, dest, lambda_scas=cfg.lambda_scas, mesh=cfg.mesh,
                      batch_tokens=cfg.score_batch_tokens, max_length=cfg.max_length, dtype="float32",
                      progress=progress, chat_template=template or None)
            return {"rows": m.get("rows"), "tokens": m.get("tokens"), "wall_time_s": m.get("wall_time_s"),
                    "tokens_per_s": m.get("tokens_per_s")}

        stage(name, {"student": spec, "lambda_scas": cfg.lambda_scas, "max_length": cfg.max_length,
                     "train_pool_sha256": dir_digest(train_pool), **_template_settings(template)}, dest, do_score,
              cascade)

    if cfg.other_student or any(a in SCORED_ARMS for a in cfg.arms):
        score_stage("score", student, cfg.student, cfg.chat_template, scored)
    if other is not None:
        score_stage("score_other", other, cfg.other_student, cfg.other_chat_template, scored_other, cascade=False)
    return {"student": student, "other": other, "data": data, "counts": counts, "scored": scored,
            "scored_other": scored_other}


def _arms_and_runs(cfg: ExperimentConfig, where: str, out: Path, log: StageLog, progress: bool,
                   say: Callable[..., None], student: Path, data: Path, counts: dict, scored: Path,
                   scored_other: Path) -> tuple:
    """Stages 4-6: arm files, geometry, runs; returns write_results' arguments after ``out``."""
    from scas_jax.parallel import batch_divisor, make_mesh

    teachers = counts["teachers"]
    train_pool = data / "train_pool"

    # 4. arm files
    from scas_jax.experiment.arms import NO_FILE_ARMS, arm_file_name, write_arm_file

    arms_dir = out / "arms"
    arm_files: dict[tuple[str, int], Path] = {}
    for arm in cfg.arms:
        if arm in NO_FILE_ARMS:
            continue
        for seed in (cfg.seeds if arm in SEEDED_ARMS else cfg.seeds[:1]):
            dest = arms_dir / arm_file_name(arm, seed)
            info = write_arm_file(arm, seed, dest, scored=scored, train_pool=train_pool,
                                  accuracy_file=data / "teacher_accuracy_train.json", num_groups=cfg.num_groups,
                                  scored_other=scored_other if arm in OTHER_ARMS else None)
            if info["rows"] != counts["train_questions"]:
                say(f"    warning: arm {arm} has {info['rows']} answers for {counts['train_questions']} "
                    "training questions (answers that could not be scored are never chosen)")
            for s in cfg.seeds:
                if arm in SEEDED_ARMS and s != seed:
                    continue
                arm_files[(arm, s)] = dest

    # 5. geometry: the same for every arm
    mesh = make_mesh(cfg.mesh)
    div = batch_divisor(mesh)
    unit = div * cfg.grad_accum  # every micro-batch splits over the devices
    batch = -(-cfg.batch_size // unit) * unit
    steps = cfg.steps or cfg.epochs * -(-counts["train_questions"] // batch)
    seq_len = cfg.seq_len or -(-longest_row(student, train_pool, cfg.chat_template) // 64) * 64
    say(f"    every arm: {steps} steps of {batch} answers (one per row of {seq_len} tokens), "
        f"learning rate {cfg.learning_rate:g}")

    # 6. runs
    from scas_jax.experiment.runs import RESULT, run_one

    rows = heldout_rows(data, teachers)
    heldout_sha = dir_digest(data / "heldout_pool") + dir_digest(data, "heldout_questions.jsonl")[:16]
    eval_settings = {"generate_accuracy": cfg.generate_accuracy, "max_length": cfg.max_length,
                     "max_new_tokens": cfg.max_new_tokens if cfg.generate_accuracy else None}
    train_settings = {"steps": steps, "batch": batch, "seq_len": seq_len, "learning_rate": cfg.learning_rate,
                      "warmup_steps": cfg.warmup_steps, "schedule": cfg.schedule, "weight_decay": cfg.weight_decay}
    if cfg.grad_accum > 1:  # recorded only when set: older runs keep their settings
        train_settings["grad_accum"] = cfg.grad_accum
    runs: dict[str, list[dict]] = {arm: [] for arm in cfg.arms}
    plan = [("base", None)] if "base" in cfg.arms else []
    plan += [(arm, s) for s in cfg.seeds for arm in cfg.arms if arm != "base"]
    for i, (arm, seed) in enumerate(plan):
        name = f"run:{arm}:seed{seed}" if seed is not None else f"run:{arm}"
        run_dir = out / "runs" / arm.replace(":", "_") / ("base" if seed is None else f"seed_{seed}")
        settings: dict[str, Any] = {"arm": arm, "seed": seed, "student": cfg.student,
                                    "heldout_sha256": heldout_sha, **eval_settings,
                                    **_template_settings(cfg.chat_template)}
        if arm != "base":
            settings.update(train_settings)
            if arm == "dynamic":
                settings.update(rescore_every=cfg.rescore_every, lambda_scas=cfg.lambda_scas,
                                data_sha256=dir_digest(train_pool))
            else:
                f = arm_files[(arm, seed)]
                settings["data_sha256"] = dir_digest(f.parent, f.name)
        action = log.decide(name, settings, report=lambda m: say(
            "    " + m.strip().replace(" and every stage after it", "")))
        result_file = run_dir / RESULT
        if action == "skip" and result_file.exists():
            from scas_jax.data.jsonl import read_json

            say(f"[{i + 1}/{len(plan)}] {name}: done earlier with the same settings")
            runs[arm].append(read_json(result_file, "run result"))
            continue
        say(f"[{i + 1}/{len(plan)}] {name}: training and evaluating")
        log.start(name, settings, redo=False)
        rec = run_one(cfg, arm, seed, run_dir, student, arm_files.get((arm, seed)), train_pool, rows,
                      data / "heldout_questions.jsonl", steps, batch, seq_len, mesh, progress)
        log.finish(name, {"heldout_nll": rec["heldout_nll"], "accuracy": rec["accuracy"]})
        acc = "" if rec["accuracy"] is None else f", accuracy {rec['accuracy']:.3f}"
        say(f"    held-out NLL {rec['heldout_nll']:.4f}{acc} ({rec['seconds']:.0f}s)")
        runs[arm].append(rec)

    return runs, rows, teachers, counts, steps, batch


def _template_label(template: str) -> str:
    from scas_jax.data.chat import chat_template_label

    return chat_template_label(template or None, "chat_template")


def write_results(cfg: ExperimentConfig, where: str, out: Path, runs: dict[str, list[dict]], rows: list[dict],
                  teachers: list[str], counts: dict, steps: int, batch: int, seconds: float,
                  comparison: dict | None = None, data: Path | None = None) -> dict[str, Any]:
    """7. ``results.json``, ``results.csv``, ``results.md`` (with the comparison) and figures."""
    from scas_jax.data.jsonl import read_json
    from scas_jax.experiment.plots import write_figures
    from scas_jax.experiment.results import aggregate, to_csv, to_markdown

    split = read_json((data or out / "data") / "split.json", "split")
    from scas_jax.data.rows import id_key

    arms = aggregate(list(cfg.arms), runs, [id_key(i) for i in split["heldout"]], rows, teachers, cfg.compare_to,
                     cfg.bootstrap_samples, cfg.bootstrap_seed)
    per_run = [{k: v for k, v in r.items() if k not in ("answer_nll", "verdicts")}
               for arm in cfg.arms for r in runs[arm]]
    for r in per_run:
        if isinstance(r.get("heldout_nll"), float) and not math.isfinite(r["heldout_nll"]):
            r["heldout_nll"] = None
    info = {"config_file": where, "student": cfg.student, "chat_template": _template_label(cfg.chat_template),
            "teachers": teachers, "steps": steps, "batch": batch,
            "learning_rate": cfg.learning_rate, "seeds": list(cfg.seeds), **counts}
    if cfg.other_student:
        info.update(other_student=cfg.other_student, other_chat_template=_template_label(cfg.other_chat_template))
    results = {"config": cfg.to_dict(), "config_file": where, "info": info, "arms": arms, "runs": per_run,
               "seconds_this_invocation": round(seconds, 1)}
    if comparison is not None:
        results["comparison"] = {k: v for k, v in comparison.items() if k != "picks"}
    write_json_atomic(out / "results.json", results)
    write_text_atomic(out / "results.csv", to_csv(arms))
    md = to_markdown(arms, info)
    if comparison is not None:
        from scas_jax.experiment.compare import comparison_markdown

        md = md.rstrip("\n") + "\n\n" + comparison_markdown(comparison, cfg.student, cfg.other_student)
    write_text_atomic(out / "results.md", md)
    write_figures(arms, teachers, out / "figures")
    return results
