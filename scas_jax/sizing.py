"""Dry runs: per-device memory of ``scas-jax score`` and ``scas-jax train`` on a target
mesh, from the student's config alone (no weights are read).

A dry run builds everything abstractly and compiles the real program:

1. the student's :class:`ModelConfig` from a preset (``configs/models/<name>.yaml``) or
   from the config of a checkpoint / HF directory / GGUF (its tensors are not read);
2. the target mesh from ``--mesh`` (it may name more devices than this machine has);
3. parameters (and, for training, the AdamW state) as ``jax.ShapeDtypeStruct`` leaves
   from ``jax.eval_shape`` of the model's init, sharded by :mod:`scas_jax.parallel`'s
   rule table; the batch of the planned shape, sharded over ``(data, fsdp)``;
4. the real jitted scoring step (:func:`scas_jax.scoring.core.compiled_stats`) or train
   step (:func:`scas_jax.training.step.make_train_step`), lowered and compiled for the
   mesh; ``compiled.memory_analysis()`` gives the per-device argument, output, aliased
   and temporary bytes.

Where the program is compiled: on this process's devices when it has as many as the
mesh; otherwise in a subprocess that simulates the mesh's devices on the CPU
(``--xla_force_host_platform_device_count``); if that fails, on one device with the
per-device batch and unsharded parameters (an upper bound for the temporaries). The
report says which. Parameter, optimiser and batch bytes per device are always also
computed from the shardings (exact: each leaf's shard shape times its item size).

Compiled numbers are XLA's plan for the platform it compiled for: a CPU compile of a
GPU/TPU target gives the right parameter and optimiser bytes but only an estimate of
the temporaries (another backend fuses and schedules differently).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from scas_jax.errors import ScasError
from scas_jax.models.config import ModelConfig

GIB = float(1 << 30)
DEFAULT_STEPS = 1000  # the schedule's length does not change any shape


# ------------------------------------------------------------------ the student


@dataclasses.dataclass
class StudentInfo:
    """The student as a dry run knows it: its config, where it came from, and the
    preset's settings ({} unless a preset)."""

    cfg: ModelConfig
    name: str
    source: str
    settings: dict

    @property
    def published(self) -> float | None:
        return self.settings.get("published_params")


def describe_student(student: str | Path) -> StudentInfo:
    """A preset name or YAML, or a student path whose config alone is read: a converted
    checkpoint (``scas_jax.json``), a HF directory (``config.json``) or a GGUF (header)."""
    from scas_jax.models.presets import is_preset, load_model_preset

    if is_preset(student):
        cfg, settings = load_model_preset(student)
        return StudentInfo(cfg, settings["name"], f"preset {settings['path']}", settings)
    from scas_jax.convert import checkpoint
    from scas_jax.loader import resolve_path
    from scas_jax.models.config import config_from_hf, read_hf_config
    from scas_jax.models.presets import PRESET_DIR, available

    path = resolve_path(student)
    if not path.exists():
        raise ScasError(f"--student {student}: no such file or directory, and not a model "
                        f"preset (presets in {PRESET_DIR}: {', '.join(available())})")
    if checkpoint.is_converted(path):
        cfg = ModelConfig.from_dict(checkpoint.read_meta(path)["model_config"])
        return StudentInfo(cfg, path.name, f"converted checkpoint {path} (config only)", {})
    if path.is_dir() and (path / "config.json").is_file():
        hf = read_hf_config(path / "config.json")
        return StudentInfo(config_from_hf(hf, where=str(path / "config.json")), path.name,
                           f"{path / 'config.json'} (config only)", {})
    from scas_jax.convert.sources import open_source

    source = open_source(path)  # a GGUF: its header, not its tensors
    return StudentInfo(config_from_hf(source.hf_config, where=source.config_where), path.name,
                       f"{source.config_where} (metadata only)", {})


# ------------------------------------------------------------------ mesh, dtype, batch


def target_mesh(spec: str, local_devices: int) -> dict[str, int]:
    """Axis sizes of ``spec``; it may use more devices than ``local_devices`` (an
    axis of ``-1`` takes the local devices left over)."""
    from scas_jax.parallel import AXES, parse_mesh_spec

    sizes = {}
    for part in filter(None, (p.strip() for p in (spec or "data=-1").split(","))):
        name, _, value = part.partition("=")
        try:
            sizes[name.strip()] = int(value)
        except ValueError:
            sizes[name.strip()] = 0  # parse_mesh_spec names the problem
    if -1 in sizes.values():
        return parse_mesh_spec(spec, local_devices)
    n = math.prod(v for v in sizes.values()) if sizes else local_devices
    out = parse_mesh_spec(spec, max(n, 1))
    if any(out[a] < 1 for a in AXES):
        raise ScasError(f"mesh spec {spec!r}: axis sizes must be >= 1")
    return out


def mesh_spec(sizes: dict[str, int]) -> str:
    return ",".join(f"{a}={n}" for a, n in sizes.items())


def target_dtype(requested: str, info: StudentInfo) -> tuple[str, str]:
    """``(dtype, why)``: a concrete request as is; ``auto`` takes the preset's dtype
    (its target hardware), else resolves on this machine's backend."""
    import jax

    from scas_jax.models.precision import resolve_dtype

    if requested != "auto":
        return resolve_dtype(requested), "given"
    preset = info.settings.get("dtype")
    if preset and preset != "auto":
        return preset, f"auto: the preset's, for {info.settings.get('hardware') or 'its target'}"
    backend = jax.default_backend()
    return resolve_dtype("auto", backend), f"auto on this machine's {backend} backend"


class _LengthEncoder:
    """Stands in for the chat encoder: each "row" is just its token count."""

    def encode_rows(self, rows):
        import types

        return [types.SimpleNamespace(length=int(n)) for n in rows]


def score_batch(batch_tokens: int, max_length: int, max_segments: int,
                divisor: int) -> tuple[int, int]:
    """``(rows, length)`` of the largest batch ``scas-jax score`` plans with these
    settings: the scorer's own planner (:func:`scas_jax.scoring.scorer.prepare`) run on
    one sequence of each length bucket; of its batches, the most padded tokens, then the
    longest rows."""
    from scas_jax.data.packing import bucket_lengths
    from scas_jax.scoring.scorer import ScoreConfig, prepare

    cfg = ScoreConfig(batch_tokens=batch_tokens, max_length=max_length,
                      max_segments=max_segments, dtype="float32")
    plans = prepare(bucket_lengths(max_length), None, cfg, row_multiple=divisor,
                    encoder=_LengthEncoder()).plans
    tokens, length = max((len(p.rows) * p.length, p.length) for p in plans)
    return tokens // length, length


# ------------------------------------------------------------------ abstract trees


def _shard_bytes(tree, shardings) -> int:
    """Bytes one device holds of ``tree`` under ``shardings`` (NamedSharding leaves)."""
    import jax
    import numpy as np

    total = 0
    for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
        shape = list(x.shape)
        for i, axes in enumerate(s.spec):
            for a in (axes,) if isinstance(axes, str) else (axes or ()):
                shape[i] //= s.mesh.shape[a]
        total += math.prod(shape) * np.dtype(x.dtype).itemsize
    return total


def _with_shardings(tree, shardings):
    import jax

    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def _abstract_params(cfg: ModelConfig, dtype: str):
    import jax.numpy as jnp

    from scas_jax.convert.keymap import abstract_params

    return abstract_params(cfg, jnp.dtype(dtype))


def _num_params(cfg: ModelConfig) -> int:
    import jax

    return sum(math.prod(x.shape) for x in jax.tree.leaves(_abstract_params(cfg, "float32")))


def _score_program(plan: dict, mesh):
    """``(jitted fn, abstract args, {part: per-device bytes})`` of the scoring step."""
    import jax
    import jax.numpy as jnp

    from scas_jax.parallel import batch_sharding, param_shardings
    from scas_jax.scoring.core import BATCH_KEYS, compiled_stats
    from scas_jax.scoring.scorer import ScoreConfig

    cfg = ModelConfig.from_dict(plan["model"])
    defaults = {f.name: f.default for f in dataclasses.fields(ScoreConfig)}
    params = _abstract_params(cfg, plan["dtype"])
    p_sh = param_shardings(params, mesh)
    b_sh = batch_sharding(mesh, 2)
    shape = (plan["rows"], plan["length"])
    batch = {k: jax.ShapeDtypeStruct(shape, jnp.bool_ if "mask" in k else jnp.int32)
             for k in BATCH_KEYS}
    b_shs = {k: b_sh for k in batch}
    fn = compiled_stats(cfg, plan["max_segments"], plan["target_layer"], plan["dtype"],
                        defaults["attn_impl"], defaults["vocab_chunk"])
    parts = {"params": _shard_bytes(params, p_sh), "batch": _shard_bytes(batch, b_shs)}
    return fn, (_with_shardings(params, p_sh), _with_shardings(batch, b_shs)), parts


def _train_program(plan: dict, mesh):
    """``(jitted step, abstract args, {part: per-device bytes})`` of the train step."""
    import jax
    import jax.numpy as jnp

    from scas_jax.training import step as st
    from scas_jax.training.config import config_from_dict

    cfg = ModelConfig.from_dict(plan["model"])
    tc = config_from_dict(plan["train"], "dry run plan")
    optimizer = st.make_optimizer(tc, DEFAULT_STEPS)
    schedule = st.lr_schedule(tc, DEFAULT_STEPS)
    params = _abstract_params(cfg, "float32")  # master weights are float32
    state = jax.eval_shape(
        lambda p: st.TrainState(jnp.zeros((), jnp.int32), p, optimizer.init(p)), params)
    shardings = st.state_shardings(state, mesh)
    shape = (tc.grad_accum, tc.micro_batch, tc.seq_len)
    batch = {k: jax.ShapeDtypeStruct(shape, jnp.float32 if k == "weights" else jnp.int32)
             for k in st.BATCH_FIELDS}
    b_shs = st.batch_shardings(mesh)
    fn = st.make_train_step(cfg, tc, optimizer, mesh, shardings, schedule)
    parts = {"params": _shard_bytes(state.params, shardings.params),
             "opt_state": _shard_bytes(state.opt_state, shardings.opt_state),
             "batch": _shard_bytes(batch, b_shs)}
    return fn, (_with_shardings(state, shardings), _with_shardings(batch, b_shs)), parts


PROGRAMS = {"score": _score_program, "train": _train_program}


# ------------------------------------------------------------------ compiling


def compile_plan(plan: dict, devices=None) -> dict:
    """Lower and compile ``plan``'s program for its mesh on ``devices`` (default: the
    first ``n`` local devices); the per-device memory of the compiled program."""
    import jax

    from scas_jax.models.precision import matmul_precision
    from scas_jax.parallel import make_mesh, mesh_context

    sizes = plan["mesh"]
    n = math.prod(sizes.values())
    devices = list(devices if devices is not None else jax.devices()[:n])
    mesh = make_mesh(mesh_spec(sizes), devices=devices)
    t0 = time.perf_counter()
    fn, args, parts = PROGRAMS[plan["kind"]](plan, mesh)
    with matmul_precision(plan["dtype"]), mesh_context(args):  # as the scorer compiles it
        compiled = fn.lower(*args).compile()
    m = compiled.memory_analysis()
    return {
        "argument": int(m.argument_size_in_bytes), "output": int(m.output_size_in_bytes),
        "alias": int(m.alias_size_in_bytes), "temp": int(m.temp_size_in_bytes),
        "code": int(m.generated_code_size_in_bytes), "computed": parts,
        "platform": devices[0].platform, "devices": len(devices),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def _compile_in_subprocess(plan: dict, timeout: float = 900) -> dict:
    """:func:`compile_plan` in a fresh process simulating the mesh's devices on the CPU."""
    n = math.prod(plan["mesh"].values())
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=" ".join(flags + [f"--xla_force_host_platform_device_count={n}"]))
    proc = subprocess.run([sys.executable, "-m", "scas_jax.sizing"], input=json.dumps(plan),
                          capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"simulated-device compile failed: {tail[0]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _compile_per_device(plan: dict) -> dict:
    """Fallback: the per-device batch on one device, parameters unsharded (so the
    temporaries are an upper bound: an FSDP/TP program gathers at most this much)."""
    import jax

    from scas_jax.parallel import AXES

    single = dict(plan, mesh={a: 1 for a in AXES})
    div = plan["mesh"]["data"] * plan["mesh"]["fsdp"]
    if plan["kind"] == "score":
        single["rows"] = plan["rows"] // div
    else:
        tc = dict(plan["train"])
        tc["batch_size"] = tc["batch_size"] // div
        tc["mesh"] = "data=1"
        single["train"] = tc
    return compile_plan(single, jax.devices()[:1])


def compile_for_target(plan: dict) -> tuple[dict | None, str]:
    """Compile ``plan`` the best way this machine allows: ``(stats or None, how)``."""
    import jax

    n = math.prod(plan["mesh"].values())
    local = jax.devices()
    if n <= len(local):
        return compile_plan(plan), f"compiled for {n} {local[0].platform} devices in this process"
    try:
        return (_compile_in_subprocess(plan),
                f"compiled for {n} simulated CPU devices in a subprocess "
                f"(this machine has {len(local)} {local[0].platform} device(s))")
    except (RuntimeError, subprocess.TimeoutExpired, OSError, ValueError) as e:
        why = str(e)
    try:
        stats = _compile_per_device(plan)
    except Exception as e:  # noqa: BLE001 - reported, the computed numbers still stand
        return None, f"not compiled ({why}; one-device compile failed too: {e})"
    return stats, (f"{why}; temporaries compiled on 1 device with the per-device batch and "
                   "unsharded parameters (an upper bound)")


# ------------------------------------------------------------------ the dry runs


def _report(kind: str, info: StudentInfo, plan: dict, dtype_why: str, batch: dict,
            command_hint: str) -> dict:
    stats, how = compile_for_target(plan)
    if stats and stats["devices"] == math.prod(plan["mesh"].values()):
        parts = stats["computed"]
    else:  # the compile (if any) was not for the target mesh: shard on an abstract one
        parts = PROGRAMS[kind](plan, _abstract_mesh(plan))[2]
    n_params = _num_params(info.cfg)
    return {
        "kind": kind, "student": info.name, "source": info.source,
        "hf_id": info.settings.get("hf_id", ""), "params": n_params,
        "published_params": info.published, "layers": info.cfg.num_layers,
        "hidden_size": info.cfg.hidden_size, "vocab_size": info.cfg.vocab_size,
        "mesh": plan["mesh"], "devices": math.prod(plan["mesh"].values()),
        "dtype": plan["dtype"], "dtype_why": dtype_why, "batch": batch,
        "per_device": parts, "compiled": stats, "how": how,
        "suggested": {k: info.settings[k] for k in ("hardware", "dtype", "score", "train")
                      if k in info.settings},
        "suggested_command": command_hint if info.settings else "",
        "weights_read": False,
    }


def _abstract_mesh(plan: dict):
    from jax.sharding import AbstractMesh

    from scas_jax.parallel import AXES

    return AbstractMesh(tuple(plan["mesh"][a] for a in AXES), AXES)


def dry_run_score(student, *, mesh: str = "data=-1", dtype: str = "auto",
                  batch_tokens: int = 4096, max_length: int = 4096, max_segments: int = 16,
                  target_layer: str | None = None) -> dict:
    """Per-device memory of ``scas-jax score`` with these settings on ``mesh``; no
    weights and no pool are read. Returns the report (:func:`format_report` prints it)."""
    import jax

    from scas_jax.models.decoder import parse_tap
    from scas_jax.scoring.core import DEFAULT_TAP

    info = describe_student(student)
    target_layer = target_layer or DEFAULT_TAP
    parse_tap(target_layer, info.cfg.num_layers)
    for name, value in (("--batch-tokens", batch_tokens), ("--max-length", max_length)):
        if int(value) < 1:
            raise ScasError(f"{name} must be >= 1, got {value}")
    sizes = target_mesh(mesh, len(jax.devices()))
    div = sizes["data"] * sizes["fsdp"]
    rows, length = score_batch(int(batch_tokens), int(max_length), int(max_segments), div)
    dt, why = target_dtype(dtype, info)
    plan = {"kind": "score", "model": info.cfg.to_dict(), "mesh": sizes, "dtype": dt,
            "rows": rows, "length": length, "max_segments": int(max_segments),
            "target_layer": target_layer}
    batch = {"rows": rows, "tokens_per_row": length, "tokens": rows * length,
             "rows_per_device": rows // div,
             "why": f"the largest batch the scorer plans for --batch-tokens {batch_tokens}, "
                    f"--max-length {max_length} on data*fsdp = {div} batch shards"}
    hint = ""
    if info.settings:
        s = info.settings.get("score", {})
        hint = (f"scas-jax score --dry-run --student {info.name} --candidate-dir POOL "
                f"--output-dir OUT --mesh {s.get('mesh', mesh)} --dtype "
                f"{info.settings.get('dtype', 'auto')} --batch-tokens "
                f"{s.get('batch_tokens', batch_tokens)} --max-length {s.get('max_length', max_length)}")
    return _report("score", info, plan, why, batch, hint)


def dry_run_train(student, config=None, overrides=()) -> dict:
    """Per-device memory of ``scas-jax train`` with this config on its mesh (the
    config's ``mesh``, which may be larger than this machine); no weights or data read."""
    import jax

    from scas_jax.training.config import load_config, parse_overrides, read_yaml

    info = describe_student(student)
    tc = load_config(config, overrides)
    asked = dict(read_yaml(config)) if config else {}
    asked.update(parse_overrides(overrides))
    dt, why = target_dtype(str(asked.get("compute_dtype", "auto")), info)
    sizes = target_mesh(tc.mesh, len(jax.devices()))
    div = sizes["data"] * sizes["fsdp"]
    if tc.micro_batch % div:
        raise ScasError(f"train config: the micro-batch (batch_size / grad_accum = "
                        f"{tc.micro_batch}) must be a multiple of the mesh's data*fsdp size "
                        f"{div} (mesh {tc.mesh!r})")
    tc = dataclasses.replace(tc, compute_dtype=dt, mesh=mesh_spec(sizes))
    plan = {"kind": "train", "model": info.cfg.to_dict(), "mesh": sizes, "dtype": dt,
            "train": tc.to_dict()}
    batch = {"rows": tc.batch_size, "tokens_per_row": tc.seq_len,
             "tokens": tc.batch_size * tc.seq_len, "rows_per_device": tc.micro_batch // div,
             "grad_accum": tc.grad_accum, "remat": tc.remat,
             "why": f"batch_size {tc.batch_size} = {tc.grad_accum} micro-batch(es) of "
                    f"{tc.micro_batch} rows, rows over data*fsdp = {div}"}
    hint = ""
    if info.settings:
        t = info.settings.get("train", {})
        kv = " ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in t.items())
        hint = (f"scas-jax train --dry-run --student {info.name} --output-dir OUT {kv} "
                f"compute_dtype={info.settings.get('dtype', 'auto')}")
    return _report("train", info, plan, why, batch, hint)


# ------------------------------------------------------------------ printing


def _gib(n: int) -> str:
    return f"{n / GIB:8.2f}"


def format_report(r: dict) -> str:
    """The report as the table the commands print."""
    lines = [f"scas-jax {r['kind']} --dry-run: {r['student']} ({r['source']}); "
             "no weights read"]
    pub = r.get("published_params")
    pub_s = (f", published {pub / 1e9:.2f} B ({100 * (r['params'] / pub - 1):+.1f} %)"
             if pub else "")
    lines.append(f"  model     {r['params'] / 1e9:.3f} B parameters{pub_s}; {r['layers']} layers, "
                 f"d_model {r['hidden_size']}, vocab {r['vocab_size']}")
    mesh = " ".join(f"{a}={n}" for a, n in r["mesh"].items())
    lines.append(f"  mesh      {mesh} ({r['devices']} devices): {r['how']}")
    lines.append(f"  dtype     {r['dtype']} ({r['dtype_why']})")
    b = r["batch"]
    lines.append(f"  batch     {b['rows']} rows x {b['tokens_per_row']} tokens = {b['tokens']} "
                 f"tokens; {b['rows_per_device']} row(s) per device per "
                 f"{'micro-batch' if r['kind'] == 'train' else 'batch'} ({b['why']})")
    if r["kind"] == "train":
        lines.append(f"            grad_accum {b['grad_accum']}, remat {str(b['remat']).lower()}")
    lines.append("")
    lines.append(f"  {'per device':<52}{'GiB':>8}   source")
    p, c = r["per_device"], r["compiled"]
    if r["kind"] == "train":
        lines.append(f"  {'parameters (float32 master weights)':<52}{_gib(p['params'])}   "
                     "computed from the sharding rules")
        lines.append(f"  {'optimiser state (AdamW mu and nu, float32)':<52}{_gib(p['opt_state'])}   "
                     "computed from the sharding rules")
    else:
        label = f"parameters ({r['dtype']})"
        lines.append(f"  {label:<52}{_gib(p['params'])}   computed from the sharding rules")
    lines.append(f"  {'batch inputs':<52}{_gib(p['batch'])}   computed")
    if c:
        lines.append(f"  {'activations and temporaries':<52}{_gib(c['temp'])}   compiled (XLA temp)")
        lines.append(f"  {'compiled arguments':<52}{_gib(c['argument'])}   compiled")
        lines.append(f"  {'compiled outputs (aliased with arguments: ' + _gib(c['alias']).strip() + ')':<52}"
                     f"{_gib(c['output'])}   compiled")
        peak = c["argument"] + c["output"] - c["alias"] + c["temp"]
        lines.append(f"  {'peak estimate (arguments + outputs - aliased + temp)':<52}{_gib(peak)}   "
                     "compiled")
        lines.append(f"  (compiled for {c['devices']} {c['platform']} device(s) in {c['seconds']} s)")
    else:
        lines.append("  activations and temporaries: not available (no compile succeeded)")
    if c and c["platform"] == "cpu":
        lines.append("  note: XLA's CPU memory plan; on GPU/TPU the parameter and optimiser bytes "
                     "are the same, the temporaries differ (other fusion and scheduling)")
    if r.get("suggested"):
        s = r["suggested"]
        lines.append(f"  preset's suggestion for {s.get('hardware') or 'its target'}: "
                     f"{r['suggested_command']}")
    return "\n".join(lines)


def main() -> int:
    """Subprocess entry: a plan (JSON) on stdin -> compile stats (JSON) on stdout."""
    plan = json.loads(sys.stdin.read())
    print(json.dumps(compile_plan(plan)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
