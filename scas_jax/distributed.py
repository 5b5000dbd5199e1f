"""Multi-process start-up: one function every JAX command calls before touching devices.

Where the process group comes from, first match wins:

1. explicit: ``--coordinator HOST:PORT --num-processes N --process-id I`` (flags), else
   ``SCAS_JAX_COORDINATOR``, ``SCAS_JAX_NUM_PROCESSES``, ``SCAS_JAX_PROCESS_ID``
   (environment); a flag wins over its variable. All three are needed; ``N = 1`` is a
   plain single-process run.
2. a SLURM job step with more than one task (``SLURM_NTASKS`` or ``SLURM_NPROCS`` > 1):
   jax's SLURM detection (coordinator = the step's first node).
3. a Cloud TPU pod slice with more than one worker (``TPU_WORKER_HOSTNAMES`` lists more
   than one host, as on GKE): jax's TPU detection.
4. ``SCAS_JAX_CLUSTER=auto``: jax's own cluster detection, whatever it finds (TPU VM
   metadata, SLURM, Open MPI, Kubernetes); ``launch/tpu_pod.sh`` sets it, because on a
   TPU VM the worker count is in the VM's metadata, not in the environment.
5. otherwise: one process, nothing to start.

A one-task SLURM job or a single-host TPU VM stays a single process. Every process
logs one line: ``process i of N, L local / G global devices``. A process that fails
exits at once (:func:`abandon`) instead of waiting for its peers at shutdown.
``SCAS_JAX_HEARTBEAT_TIMEOUT`` (seconds, default 100) bounds how long the survivors wait
for a process that died before they stop with an error.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from scas_jax.errors import ScasError

ENV_COORDINATOR = "SCAS_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "SCAS_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "SCAS_JAX_PROCESS_ID"
ENV_HEARTBEAT = "SCAS_JAX_HEARTBEAT_TIMEOUT"
ENV_CLUSTER = "SCAS_JAX_CLUSTER"
DEFAULT_HEARTBEAT_SECONDS = 100

_started: "ProcessGroup | None" = None


@dataclasses.dataclass(frozen=True)
class ProcessGroup:
    """How this run's processes find each other.

    source: ``"explicit"``, ``"slurm"``, ``"tpu"``, ``"auto"`` or ``"single"``;
    coordinator, count and id are None where jax detects them itself.
    """

    source: str
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    @property
    def multi_process(self) -> bool:
        return self.source != "single"


def add_args(parser: argparse.ArgumentParser) -> None:
    """The start-up flags, for every subcommand that touches JAX."""
    g = parser.add_argument_group("multi-process runs (pods, clusters; see README)")
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help=f"address of process 0's coordination service (env {ENV_COORDINATOR})")
    g.add_argument("--num-processes", type=int, default=None, metavar="N",
                   help=f"number of processes in the run (env {ENV_NUM_PROCESSES})")
    g.add_argument("--process-id", type=int, default=None, metavar="I",
                   help=f"this process's index, 0..N-1 (env {ENV_PROCESS_ID})")


def _int_env(name: str, env) -> int | None:
    value = env.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ScasError(f"{name}={value!r} is not an integer") from None


def _count(names: tuple[str, ...], env) -> int:
    for name in names:
        n = _int_env(name, env)
        if n is not None:
            return n
    return 1


def resolve(coordinator: str | None = None, num_processes: int | None = None,
            process_id: int | None = None, env=None) -> ProcessGroup:
    """The process group from flags (given here), the environment and the scheduler."""
    env = os.environ if env is None else env
    coordinator = coordinator or env.get(ENV_COORDINATOR) or None
    num_processes = num_processes if num_processes is not None else _int_env(ENV_NUM_PROCESSES, env)
    process_id = process_id if process_id is not None else _int_env(ENV_PROCESS_ID, env)
    explicit = {"--coordinator": coordinator, "--num-processes": num_processes, "--process-id": process_id}
    if any(v is not None for v in explicit.values()):
        missing = [k for k, v in explicit.items() if v is None]
        if missing and num_processes != 1:
            raise ScasError(
                f"multi-process start-up needs --coordinator, --num-processes and --process-id "
                f"(or {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}); missing: "
                + ", ".join(missing))
        if num_processes is not None and num_processes < 1:
            raise ScasError(f"--num-processes must be >= 1, got {num_processes}")
        if num_processes == 1:
            return ProcessGroup("single")
        if not 0 <= process_id < num_processes:
            raise ScasError(f"--process-id {process_id} is not in 0..{num_processes - 1}")
        if ":" not in coordinator:
            raise ScasError(f"--coordinator {coordinator!r}: expected HOST:PORT")
        return ProcessGroup("explicit", coordinator, num_processes, process_id)
    if env.get("SLURM_JOB_ID") and _count(("SLURM_NTASKS", "SLURM_NPROCS"), env) > 1:
        return ProcessGroup("slurm")
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1:
        return ProcessGroup("tpu")
    cluster = env.get(ENV_CLUSTER, "").strip()
    if cluster == "auto":
        return ProcessGroup("auto")
    if cluster:
        raise ScasError(f"{ENV_CLUSTER}={cluster!r}: the only value is 'auto' (jax's cluster detection)")
    return ProcessGroup("single")


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, log=None) -> ProcessGroup:
    """Start the process group (once per process) and log where this process stands."""
    global _started
    if _started is not None:
        return _started
    import jax

    group = resolve(coordinator, num_processes, process_id)
    if group.multi_process:
        heartbeat = _int_env(ENV_HEARTBEAT, os.environ) or DEFAULT_HEARTBEAT_SECONDS
        kwargs = {"heartbeat_timeout_seconds": heartbeat}
        if group.source == "explicit":
            kwargs.update(coordinator_address=group.coordinator, num_processes=group.num_processes,
                          process_id=group.process_id)
        try:
            jax.distributed.initialize(**kwargs)
        except Exception as e:  # jax raises RuntimeError/ValueError with the service's message
            raise ScasError(f"multi-process start-up ({group.source}) failed: {e}") from None
    _started = group
    line = (f"process {jax.process_index()} of {jax.process_count()}, "
            f"{jax.local_device_count()} local / {jax.device_count()} global devices "
            f"({jax.default_backend()}, {group.source})")
    (log or (lambda s: print(s, file=sys.stderr, flush=True)))(line)
    return group


def initialize_from_args(args: argparse.Namespace) -> ProcessGroup:
    return initialize(getattr(args, "coordinator", None), getattr(args, "num_processes", None),
                      getattr(args, "process_id", None))


def abandon(code: int) -> None:
    """End a failing process of a multi-process run now, with ``code``.

    A process that fails alone must not wait in jax's shutdown barrier for peers that
    are still working (up to minutes): it exits at once, and the others stop with an
    error when its heartbeat stops (``SCAS_JAX_HEARTBEAT_TIMEOUT``). Single-process runs
    return normally.
    """
    if _started is None or not _started.multi_process:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
