"""How many JAX devices a CPU host is split into: decided before JAX starts its backends.

On a CPU, XLA runs a program's large products on every core, but a loop of small
products (the scorer's attention tiles) on one thread. Split into several host
devices, a data-parallel program runs one such loop per device at once: on the
2-core build machine the scorer runs 8-17 % more tokens a second on two devices than
on one (docs/benchmarks.md, issue 13, sixth round). The split is fixed for the whole
process when JAX starts, so only a command that is nothing but scoring makes it
(``scas-jax score --cpu-devices``); library callers set ``JAX_NUM_CPU_DEVICES``
themselves.

``auto``: one device per CPU this process may run on, at most :data:`MAX_AUTO_DEVICES`,
and only as many as the pool gives :data:`MIN_ANSWERS_PER_DEVICE` answers each (a row
no answer fills still runs on its device: one 8k-token answer on two devices would
take twice the memory for nothing). Left alone where the user chose (the variable
``JAX_NUM_CPU_DEVICES`` or XLA's ``--xla_force_host_platform_device_count``), in a
multi-process run, on an explicit ``--mesh``, and where XLA_FLAGS turn the YNNPACK
fusions off (:func:`library_dots_off`: split programs compute wrong values then).
Accelerator hosts are unaffected: the split only applies to JAX's CPU backend.
"""

from __future__ import annotations

import os
from pathlib import Path

from scas_jax.errors import ScasError

AUTO = "auto"
MAX_AUTO_DEVICES = 8
MIN_ANSWERS_PER_DEVICE = 16
FLAG_HELP = (f"split a CPU host into this many JAX devices (data parallel) before JAX starts; "
             f"{AUTO}: one per CPU (at most {MAX_AUTO_DEVICES}) where the pool has "
             f"{MIN_ANSWERS_PER_DEVICE}+ answers a device, unless JAX_NUM_CPU_DEVICES or XLA_FLAGS "
             f"already say; no effect on GPU/TPU")


def parse(value: str | int) -> int | None:
    """``"auto"`` -> None; a count >= 1 -> that int; anything else a ScasError."""
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return None
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ScasError(f"--cpu-devices {value!r}: expected {AUTO} or a count >= 1") from None
    if n < 1:
        raise ScasError(f"--cpu-devices {value!r}: expected {AUTO} or a count >= 1")
    return n


def auto_count(answers: int | None, cpus: int) -> int:
    """Devices for ``answers`` answers (None: unknown, as many as the CPUs allow) on
    ``cpus`` CPUs: ``min(cpus, MAX_AUTO_DEVICES, answers // MIN_ANSWERS_PER_DEVICE)``,
    at least 1."""
    n = min(max(cpus, 1), MAX_AUTO_DEVICES)
    if answers is not None:
        n = min(n, answers // MIN_ANSWERS_PER_DEVICE)
    return max(n, 1)


def user_setting(env=None) -> str | None:
    """Where the environment already fixes the CPU device count (a short description), else None."""
    env = os.environ if env is None else env
    if env.get("JAX_NUM_CPU_DEVICES", "").strip():
        return f"JAX_NUM_CPU_DEVICES={env['JAX_NUM_CPU_DEVICES']}"
    if "xla_force_host_platform_device_count" in env.get("XLA_FLAGS", ""):
        return "XLA_FLAGS --xla_force_host_platform_device_count"
    return None


def library_dots_off(env=None) -> bool:
    """XLA_FLAGS turn XLA's YNNPACK library fusions off (``benchmarks/avx2_cap.sh`` does):
    the dots then run through Eigen, and in this jaxlib (0.10.2) a program split over
    several CPU devices that way computes wrong values for some rows (a race between the
    devices' runs: the first rows of each device's shard, differing from run to run; the
    same programs with the fusions on are bitwise equal to one device). No split then."""
    env = os.environ if env is None else env
    flags = env.get("XLA_FLAGS", "").split()
    return any(f.split("=", 1)[0] == "--xla_cpu_experimental_ynn_fusion_type"
               and f.split("=", 1)[1:] in ([], [""]) for f in flags)


def cpus_available() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def count_answers(candidate_dir: str | Path, limit: int | None = None) -> int | None:
    """Lines of the pool's JSONL candidate files (each at most ``limit``): an upper bound
    on its answers read without parsing them; None where a file is not JSONL (a TFDS
    teacher) or the directory cannot be read (the scorer reports that itself)."""
    from scas_jax.data.files import discover_candidate_files

    try:
        files = discover_candidate_files(candidate_dir)
    except (ScasError, OSError):
        return None
    total = 0
    for f in files:
        path = Path(f.path)
        if not path.is_file() or path.suffix != ".jsonl":
            return None
        with path.open("rb") as fh:
            lines = sum(block.count(b"\n") for block in iter(lambda: fh.read(1 << 20), b""))
        total += lines if limit is None else min(lines, limit)
    return total


def split(n: int, *, explicit: bool) -> bool:
    """Give JAX's CPU backend ``n`` devices. True when set; False when JAX has already
    started (the split must come first), which is a ScasError when ``explicit``."""
    import jax

    try:
        jax.config.update("jax_num_cpu_devices", int(n))
    except RuntimeError:
        if explicit:
            raise ScasError(f"--cpu-devices {n}: JAX has already started in this process; "
                            "the device split must be set before (JAX_NUM_CPU_DEVICES)") from None
        return False
    return True


def choose(value: str | int, *, answers: int | None, default_mesh: bool, multi_process: bool,
           env=None, cpus: int | None = None) -> int | None:
    """The device count to set for ``--cpu-devices value``, or None to leave JAX's own:
    an explicit count always; ``auto`` only on one process, the default mesh and no
    count in the environment (:func:`auto_count` otherwise)."""
    n = parse(value)
    if n is not None:
        if n > 1 and library_dots_off(env):
            raise ScasError(f"--cpu-devices {n}: XLA_FLAGS turn the YNNPACK fusions off "
                            "(--xla_cpu_experimental_ynn_fusion_type=), and XLA's CPU backend then "
                            "computes wrong values on split devices; use --cpu-devices 1")
        return n
    if multi_process or not default_mesh or user_setting(env) is not None or library_dots_off(env):
        return None
    return auto_count(answers, cpus_available() if cpus is None else cpus)
