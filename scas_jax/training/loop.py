"""The training loop: ``train(student, data, output_dir, config, overrides) -> summary``.

Output directory::

    OUTPUT/train_config.yaml   the effective TrainConfig
    OUTPUT/checkpoints/<step>/ Orbax (state + meta), see checkpoints.py
    OUTPUT/metrics.jsonl       one line per logged step (and eval lines)
    OUTPUT/tensorboard/        TensorBoard event files
    OUTPUT/final/              converted checkpoint of the final float32 params
                               (a ``--student`` for any stage, and ``export``'s input)

Exact resume: the state (params, optimiser state, step) and the data position are
restored from the latest committed checkpoint; batches are a pure function of the step
index (see data.py), so the steps after the resume point see the same batches and
produce the same losses and parameters as an uninterrupted run. The meta records the
input position as ``data_position`` (the global step) with ``data_epoch`` and
``data_step_in_epoch`` (where that step falls in the epoch plans); a resume checks that
the data it reads puts the step at the same place. The same holds for a TFDS ``--data``
or ``--candidate-dir`` (read through Grain into the rows of its source files, in their
order): every row is read again at start, and the plan does the rest. With ``selection:
dynamic`` (dynamic.py) batches also depend on the current chunk's choices, which the
checkpoint meta holds; a resume at a chunk boundary re-scores with the restored params.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import yaml

from scas_jax.errors import ScasError
from scas_jax.io_utils import write_text_atomic
from scas_jax.models.precision import with_matmul_precision
from scas_jax.parallel import batch_divisor, is_main_process, make_mesh
from scas_jax.training import step as st
from scas_jax.training.checkpoints import TrainCheckpoints, abstract_like
from scas_jax.training.config import TrainConfig, config_from_dict, load_config
from scas_jax.training.data import BatchStream, eval_batches, load_examples, read_rows
from scas_jax.training.metrics import MetricsWriter, flops_per_token, peak_flops


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop checkpoints and stops after the current step."""

    def __init__(self):
        self.signal: str | None = None

    @contextlib.contextmanager
    def installed(self):
        names = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}
        previous = {}

        def handler(signum, frame):
            self.signal = names.get(signum, str(signum))

        try:
            for s in names:
                previous[s] = signal.signal(s, handler)
        except ValueError:  # not the main thread: no handlers
            previous = {}
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


def _join(base, name: str) -> str:
    """``base/name`` as text, keeping a URL's ``//`` (``gs://bucket/run/checkpoints``)."""
    return os.fspath(base).rstrip("/") + "/" + name


def resolve_config(config: TrainConfig | str | Path | None, overrides: Sequence[str],
                   base: TrainConfig | None = None) -> TrainConfig:
    if isinstance(config, TrainConfig):
        return load_config(None, overrides, base=config)
    return load_config(config, overrides, base=base)


def _load_student(student, mesh):
    from scas_jax.loader import Student, load_student

    if isinstance(student, Student):
        return student
    return load_student(student, dtype="float32", mesh=mesh)


def save_final(out: Path, student, params) -> Path:
    """A converted directory of ``params`` (float32) with the student's config and tokenizer.

    Every process calls it: the Orbax save of globally sharded parameters is collective;
    process 0 alone writes the config, meta and tokenizer files."""
    from scas_jax.convert import checkpoint

    with checkpoint.shared_output_dir(out, overwrite=True) as tmp:
        checkpoint.save_params(tmp / "params", params)
        if is_main_process():
            checkpoint.write_meta(tmp, student.cfg, dict(student.hf_config), "float32",
                                  str(student.source))
            if student.tokenizer is not None:
                student.tokenizer.save_pretrained(str(tmp))
    return out


def _meta(cfg: TrainConfig, student, step: int, fingerprint: str, stream) -> dict[str, Any]:
    epoch, in_epoch = stream.locate(step)
    meta = {"step": step, "data_position": step, "data_epoch": epoch, "data_step_in_epoch": in_epoch,
            "data_fingerprint": fingerprint,
            "config": cfg.to_dict(), "model_config": student.cfg.to_dict()}
    if cfg.selection == "dynamic":
        meta["dynamic_chunk"] = stream.state()
    return meta


def check_sources(cfg: TrainConfig, data, candidate_dir) -> None:
    """Training data comes from exactly one of ``--data`` and ``--candidate-dir``."""
    if data and candidate_dir:
        raise ScasError("give either --data FILE (train on a fixed selection) or --candidate-dir "
                        "POOL (select answers during training), not both")
    if cfg.selection == "dynamic" and not candidate_dir:
        raise ScasError("selection=dynamic selects answers during training: it needs "
                        "--candidate-dir POOL (the teacher answers), not --data")
    if cfg.selection == "static" and not data:
        hint = " (or drop selection=static to select during training)" if candidate_dir else ""
        raise ScasError("nothing to train on: give --data FILE (an SFT JSONL such as select's "
                        "min_score_selected.jsonl, or a dataset_info.json) or --candidate-dir "
                        f"POOL to select answers during training{hint}")


@dataclasses.dataclass
class _Inputs:
    """What ``train`` read and checked before any model work."""

    sft: tuple[Path, list] | None  # (jsonl, rows) of --data
    eval_sft: tuple[Path, list] | None  # (jsonl, rows) of eval_data


def check_inputs(cfg: TrainConfig, student, data, candidate_dir) -> _Inputs:
    """Everything that can fail without the model, checked before it loads: the data
    sources, their files and rows, the eval file, the candidate directory, the student
    path and the mesh. Errors name the file (and line) and the fix."""
    check_sources(cfg, data, candidate_dir)
    if cfg.chat_template:
        from scas_jax.data.chat import chat_template_label

        chat_template_label(cfg.chat_template, "--chat-template (chat_template)")
    sft = read_rows(data, cfg.dataset) if data else None
    eval_sft = read_rows(cfg.eval_data) if cfg.eval_data else None
    if candidate_dir and not Path(candidate_dir).is_dir():
        raise ScasError(f"--candidate-dir {candidate_dir}: no such directory")
    if isinstance(student, (str, Path)):
        from scas_jax.loader import resolve_path

        path = resolve_path(student)
        if not path.exists():
            raise ScasError(f"--student {student}: no such file or directory")
    div = batch_divisor(make_mesh(cfg.mesh))
    if cfg.micro_batch % div:
        raise ScasError(
            f"train config: the micro-batch (batch_size / grad_accum = {cfg.micro_batch}) must be "
            f"a multiple of the mesh's data*fsdp size {div} (mesh {cfg.mesh!r})"
        )
    return _Inputs(sft, eval_sft)


def _agree_latest(step: int | None) -> int | None:
    """The checkpoint to resume from: process 0's latest step, on every process (a
    restore is collective; all processes must read the same step)."""
    if jax.process_count() == 1:
        return step
    import numpy as np
    from jax.experimental import multihost_utils

    agreed = int(multihost_utils.broadcast_one_to_all(np.int64(-1 if step is None else step)))
    return None if agreed < 0 else agreed


def _agree_stop(signal_name: str | None) -> bool:
    """Whether any process was asked to stop (SIGINT/SIGTERM): every process checkpoints
    and stops after the same step (a save is collective). One process: its own flag."""
    if jax.process_count() == 1:
        return signal_name is not None
    import numpy as np
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.int32(signal_name is not None))
    return bool(np.any(flags))


class _Clock:
    """Wall seconds of training steps vs scoring, for the selection cost."""

    def __init__(self):
        self.train = 0.0
        self.score = 0.0
        self._t = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        out, self._t = now - self._t, now
        return out

    def fraction(self) -> float | None:
        return self.score / self.train if self.train > 0 else None


def train(
    student,
    data: str | Path | None,
    output_dir: str | Path,
    config: TrainConfig | str | Path | None = None,
    overrides: Sequence[str] = (),
    *,
    candidate_dir: str | Path | None = None,
    resume: bool = False,
    export_hf: str | Path | None = None,
    progress: bool = True,
    profile: str | Path | None = None,
) -> dict[str, Any]:
    """Fine-tune ``student`` (a path or a loaded Student) on SFT ``data`` (static), or on the
    answers chosen during training from ``candidate_dir`` (dynamic); see module docs.
    ``profile``: a directory for a :mod:`jax.profiler` trace of a few steps (the 3rd to
    5th of this invocation, after compilation; :mod:`scas_jax.profiling`).

    Returns a summary: steps run, final step, last loss, eval loss, data stats, paths,
    and ``interrupted`` (the signal name when SIGINT/SIGTERM stopped the run).
    """
    ckpt_dir = _join(output_dir, "checkpoints")  # may be a URL (gs://...): Orbax's own paths
    output_dir = Path(output_dir)
    overrides = list(overrides)
    if candidate_dir and not data and not any(o.split("=", 1)[0].strip().endswith("selection")
                                              for o in overrides):
        overrides.insert(0, "selection=dynamic")  # --candidate-dir alone implies dynamic selection
    ckpts = TrainCheckpoints(ckpt_dir)
    try:
        latest = _agree_latest(ckpts.latest_step())
        if resume:
            if latest is None:
                raise ScasError(f"{output_dir}: --resume given but no checkpoint exists")
            meta = ckpts.read_meta(latest)
            saved = config_from_dict(meta["config"], f"{ckpts.directory}/{latest}/meta")
            cfg = resolve_config(config, overrides, base=saved)
        else:
            if latest is not None:
                raise ScasError(
                    f"{output_dir}: holds checkpoints (latest step {latest}); pass --resume "
                    "to continue, or choose a new --output-dir"
                )
            meta = None
            cfg = resolve_config(config, overrides)
    finally:
        ckpts.close()
    inputs = check_inputs(cfg, student, data, candidate_dir)
    created = not output_dir.exists()
    ckpts = TrainCheckpoints(ckpt_dir, max_to_keep=cfg.max_to_keep)
    try:
        return _run(student, inputs, candidate_dir, output_dir, cfg, ckpts, meta, latest, export_hf, progress,
                    profile)
    except BaseException:
        # a run that fails before its first checkpoint leaves nothing behind
        if (created and output_dir.exists() and ckpts.latest_step() is None and not ckpts.step_dirs_on_disk()
                and is_main_process()):
            shutil.rmtree(output_dir, ignore_errors=True)
        raise
    finally:
        ckpts.close()


def _run(student, inputs: _Inputs, candidate_dir, output_dir: Path, cfg: TrainConfig,
         ckpts: TrainCheckpoints, meta: dict | None, latest: int | None, export_hf,
         progress: bool, profile=None) -> dict[str, Any]:
    from tqdm import tqdm

    mesh = make_mesh(cfg.mesh)
    student = _load_student(student, mesh)
    if student.tokenizer is not None:
        from scas_jax.data.chat import with_chat_template

        student = dataclasses.replace(student, tokenizer=with_chat_template(
            student.tokenizer, cfg.chat_template or None, "--chat-template (chat_template)",
            name=str(student.source)))
    dynamic = cfg.selection == "dynamic"
    if dynamic:
        from scas_jax.training.dynamic import DynamicStream, load_candidates

        pool = load_candidates(candidate_dir, student.tokenizer, cfg)
        data_stats: dict[str, Any] = pool.stats
    else:
        examples, stats = load_examples(None, student.tokenizer, cfg.seq_len, cfg.drop_long,
                                        rows=inputs.sft)
        data_stats = stats.to_dict()
    eval_sets = None
    if cfg.eval_data:
        ev, _ = load_examples(None, student.tokenizer, cfg.seq_len, cfg.drop_long, rows=inputs.eval_sft)
        eval_sets = eval_batches(ev, cfg.seq_len, cfg.micro_batch, cfg.max_segments)
    if dynamic:
        stream = DynamicStream(pool, cfg, student.cfg, mesh)
    else:
        stream = BatchStream(examples, cfg.seq_len, cfg.batch_size, cfg.max_segments, cfg.seed)
    total_steps = cfg.steps or stream.steps_for_epochs(cfg.epochs)
    schedule = st.lr_schedule(cfg, total_steps)
    optimizer = st.make_optimizer(cfg, total_steps)
    state = st.init_state(student.params, optimizer, mesh)
    shardings = st.state_shardings(state, mesh)
    start = 0
    if meta is not None:
        if meta.get("data_fingerprint") != stream.fingerprint():
            raise ScasError(
                f"{ckpts.directory}: the checkpoint was trained on different data "
                "(fingerprint mismatch); resume with the same --data/--candidate-dir and tokenizer"
            )
        state = ckpts.restore_state(latest, abstract_like(state, shardings))
        start = int(meta["data_position"])
        if "data_epoch" in meta and stream.locate(start) != (meta["data_epoch"], meta["data_step_in_epoch"]):
            raise ScasError(
                f"{ckpts.directory}/{latest}: the saved input position (epoch {meta['data_epoch']}, "
                f"step {meta['data_step_in_epoch']} of it) is not where step {start} falls in this "
                "data's plan; resume with the same data and settings")
        if dynamic:
            stream.restore(meta.get("dynamic_chunk"))
    main = is_main_process()
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(output_dir / "train_config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    step_fn = st.make_train_step(student.cfg, cfg, optimizer, mesh, shardings, schedule)
    eval_fn = st.make_eval_step(student.cfg, cfg, mesh, shardings.params) if eval_sets else None
    # traced under the compute dtype's matmul precision (float32 is float32 on GPU/TPU too)
    step_fn = with_matmul_precision(step_fn, cfg.compute_dtype)
    eval_fn = eval_fn and with_matmul_precision(eval_fn, cfg.compute_dtype)
    writer = MetricsWriter(output_dir, resume_step=start, enabled=main)
    fpt = flops_per_token(student.cfg, cfg.seq_len)
    peak = peak_flops(mesh.devices.flatten().tolist(), cfg.peak_tflops_per_device)
    fingerprint = stream.fingerprint()

    def evaluate(step: int) -> float | None:
        if eval_fn is None:
            return None
        loss_sum, count = 0.0, 0.0
        for b in eval_sets:
            s, n = eval_fn(state.params, st.put_batch(st.to_step_batch(b, 1), mesh))
            loss_sum, count = loss_sum + float(s), count + float(n)
        value = loss_sum / max(count, 1.0)
        writer.write(step, {"eval_loss": value, "eval_tokens": count})
        return value

    stop = _StopFlag()
    last_loss, eval_loss, saved_at = None, None, latest
    step = start
    bar = tqdm(total=total_steps, initial=start, desc="train", unit="step", disable=not (progress and main))
    window_tokens, window_t0 = 0, time.perf_counter()
    clock = _Clock()
    events = 0

    def rescore(step: int) -> None:
        jax.block_until_ready(state.params)  # the previous steps count as training time
        clock.train += clock.lap()
        event = stream.rescore(step, state.params, total_steps)
        clock.score += clock.lap()
        event["score_fraction_so_far"] = clock.fraction()
        from scas_jax.training.dynamic import share_scalars

        writer.write_event(step + 1, {"event": "rescore", **event}, share_scalars(event))
        bar.set_postfix_str(f"rescored {event['candidates']} candidates in {event['score_seconds']:.1f}s")

    from scas_jax.profiling import StepProfiler

    prof = StepProfiler(profile if main else None, total=total_steps - start, what="step")
    prof.after(0)
    with stop.installed(), prof:
        for step in range(start, total_steps):
            if dynamic and stream.needs_rescore(step):
                rescore(step)
                events += 1
            host = stream.batch(step)
            real_tokens = int((host["segment_ids"] > 0).sum())
            state, metrics = step_fn(state, st.put_batch(st.to_step_batch(host, cfg.grad_accum), mesh))
            window_tokens += real_tokens
            done = step + 1
            if prof.directory is not None and not prof.done:
                jax.block_until_ready(state.params)  # whole steps in the trace
                prof.after(done - start)
            if done % cfg.log_every == 0 or done == total_steps:
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                now = time.perf_counter()
                tps = window_tokens / max(now - window_t0, 1e-9)
                m["tokens_per_s"] = tps
                m["mfu"] = tps * fpt / peak if peak else None
                m["epoch"] = stream.locate(step)[0]
                writer.write(done, m)
                last_loss = m["loss"]
                bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}")
                window_tokens, window_t0 = 0, now
            bar.update(1)
            stopping = _agree_stop(stop.signal)
            if done % cfg.checkpoint_every == 0 or stopping:
                jax.block_until_ready(state.params)
                clock.train += clock.lap()
                ckpts.save(done, state, _meta(cfg, student, done, fingerprint, stream))
                clock.lap()
                saved_at = done
            if eval_fn is not None and cfg.eval_every and done % cfg.eval_every == 0:
                clock.train += clock.lap()
                eval_loss = evaluate(done)
                clock.lap()
            if stopping:
                stop.signal = stop.signal or "SIGTERM (another process)"
                break
    bar.close()
    final_step = int(jax.device_get(state.step))
    clock.train += clock.lap()
    if saved_at != final_step:
        ckpts.save(final_step, state, _meta(cfg, student, final_step, fingerprint, stream))
    summary: dict[str, Any] = {
        "steps_run": final_step - start, "final_step": final_step, "total_steps": total_steps,
        "resumed_from": start if meta is not None else None, "last_loss": last_loss,
        "data": data_stats, "output_dir": str(output_dir), "interrupted": stop.signal,
    }
    if dynamic:
        summary["selection"] = {
            "rescore_events": events, "score_seconds": clock.score, "train_seconds": clock.train,
            "score_fraction": clock.fraction(), "overflow_dropped": stream.overflow_dropped,
        }
    if stop.signal:
        writer.close()
        return summary
    if eval_fn is not None and not (cfg.eval_every and final_step % cfg.eval_every == 0):
        eval_loss = evaluate(final_step)
    summary["eval_loss"] = eval_loss
    writer.close()
    final = save_final(output_dir / "final", student, state.params)  # every process: collective
    summary["final_dir"] = str(final)
    if export_hf:
        from scas_jax.convert.commands import export

        summary["export_hf"] = str(export(final, export_hf, overwrite=True))
    return summary
