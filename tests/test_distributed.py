"""Multi-process start-up: where the process group comes from (flags, environment,
SLURM, TPU), real two-process starts (explicit and a faked SLURM job step), and a
failing process that does not hang its peers."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scas_jax.distributed import ProcessGroup, resolve
from scas_jax.errors import ScasError

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch" / "local_multiprocess.sh"


def test_flags_win_over_environment():
    env = {"SCAS_JAX_COORDINATOR": "h:1", "SCAS_JAX_NUM_PROCESSES": "4", "SCAS_JAX_PROCESS_ID": "3"}
    assert resolve(env=env) == ProcessGroup("explicit", "h:1", 4, 3)
    assert resolve("other:2", 2, 1, env=env) == ProcessGroup("explicit", "other:2", 2, 1)
    assert resolve(num_processes=1, env={}) == ProcessGroup("single")


@pytest.mark.parametrize("kw, env, pattern", [
    (dict(coordinator="h:1"), {}, r"missing: --num-processes, --process-id"),
    ({}, {"SCAS_JAX_COORDINATOR": "h:1", "SCAS_JAX_NUM_PROCESSES": "2"}, r"missing: --process-id"),
    (dict(coordinator="h:1", num_processes=2, process_id=2), {}, r"--process-id 2 is not in 0\.\.1"),
    (dict(coordinator="h", num_processes=2, process_id=0), {}, r"expected HOST:PORT"),
    ({}, {"SCAS_JAX_NUM_PROCESSES": "two"}, r"SCAS_JAX_NUM_PROCESSES='two' is not an integer"),
])
def test_incomplete_or_bad_settings_are_errors(kw, env, pattern):
    with pytest.raises(ScasError, match=pattern):
        resolve(**kw, env=env)


def test_schedulers_only_when_they_report_several_processes():
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
    assert resolve(env={**slurm, "SLURM_NTASKS": "1"}).source == "single"
    assert resolve(env=slurm).source == "single"  # a job without a task count: one process
    assert resolve(env={**slurm, "SLURM_NTASKS": "4"}).source == "slurm"
    assert resolve(env={"TPU_WORKER_HOSTNAMES": "w0"}).source == "single"
    assert resolve(env={"TPU_WORKER_HOSTNAMES": "w0,w1"}).source == "tpu"
    # jax's own variable alone starts nothing (jax would fail: no process count)
    assert resolve(env={"JAX_COORDINATOR_ADDRESS": "h:1"}).source == "single"
    assert resolve(env={"SCAS_JAX_CLUSTER": "auto"}).source == "auto"
    with pytest.raises(ScasError, match="only value is 'auto'"):
        resolve(env={"SCAS_JAX_CLUSTER": "tpu"})


_PROBE = """
import jax, jax.numpy as jnp
from jax.experimental import multihost_utils
from scas_jax import distributed
group = distributed.initialize()
total = multihost_utils.process_allgather(jnp.full((2,), jax.process_index())).sum()
# one write(2) of one line: gloo's C++ log lines share the process's output streams, and a
# print() in pieces (unbuffered output) could be split by them
import os
line = " ".join(map(str, ("RESULT", group.source, jax.process_index(), jax.process_count(), jax.device_count(), int(total))))
os.write(1, (line + chr(10)).encode())
"""


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SCAS_JAX_"))}
    env.pop("XLA_FLAGS", None)  # the test session's 8 simulated devices are not per process
    env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="2", **extra)
    return env


def _results(text: str) -> list[list[str]]:
    return sorted(line.split("RESULT ", 1)[1].split() for line in text.splitlines() if "RESULT " in line)


def _communicate(procs: list[subprocess.Popen]) -> list[str]:
    """Each process's stdout (its RESULT line); stderr is read apart, since gloo's
    C++ log lines land there unbuffered and would split a RESULT line."""
    pairs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], pairs
    return [out for out, _ in pairs]


def test_two_processes_with_the_launcher():
    proc = subprocess.run(["bash", str(LAUNCH), "2", "--", sys.executable, "-c", _PROBE],
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _results(proc.stdout) == [["explicit", "0", "2", "4", "2"], ["explicit", "1", "2", "4", "2"]]
    assert "process 0 of 2, 2 local / 4 global devices" in proc.stderr


def test_faked_slurm_job_step():
    job = str(random.randint(1000, 999999))
    procs = [subprocess.Popen([sys.executable, "-c", _PROBE], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=_env(SLURM_JOB_ID=job, SLURM_STEP_NODELIST="localhost",
                                                  SLURM_NTASKS="2", SLURM_PROCID=str(i), SLURM_LOCALID=str(i)))
             for i in range(2)]
    outs = _communicate(procs)
    assert _results("".join(outs)) == [["slurm", "0", "2", "4", "2"], ["slurm", "1", "2", "4", "2"]]


def test_a_failing_process_does_not_hang_the_others():
    """Process 1 fails at once (a bad path); process 0 is mid-collective: the launcher
    stops it and returns the failure; nothing waits for the shutdown barrier."""
    code = _PROBE.replace("total =", "import os, sys\nif jax.process_index() == 1:\n"
                          "    from scas_jax.cli import main; sys.exit(main(['export', '--ckpt', '/nonexistent', '--out', '/tmp/x']))\n"
                          "import time; time.sleep(60)\ntotal =")
    t0 = time.time()
    proc = subprocess.run(["bash", str(LAUNCH), "2", "--", sys.executable, "-c", code],
                          env=_env(SCAS_JAX_HEARTBEAT_TIMEOUT="5"), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "/nonexistent: no such file or directory" in proc.stderr
    assert time.time() - t0 < 40


def test_multinode_script_starts_each_rank():
    """launch/multinode.sh on two "nodes" (here: two local processes) forms one run."""
    port = str(random.randint(20000, 40000))
    script = REPO / "launch" / "multinode.sh"
    procs = [subprocess.Popen(["bash", str(script), "--coordinator", f"localhost:{port}", "--num-processes", "2",
                               "--process-id", str(i), "--", sys.executable, "-c", _PROBE],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
             for i in range(2)]
    outs = _communicate(procs)
    assert _results("".join(outs)) == [["explicit", "0", "2", "4", "2"], ["explicit", "1", "2", "4", "2"]]


@pytest.mark.parametrize("script", ["multinode.sh", "tpu_pod.sh", "local_multiprocess.sh"])
def test_launch_scripts_refuse_missing_arguments(script):
    path = REPO / "launch" / script
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    proc = subprocess.run(["bash", str(path)] + (["2"] if script == "local_multiprocess.sh" else []),
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and script.split(".")[0] in proc.stderr


def test_slurm_batch_script_runs_the_command_under_srun(tmp_path):
    """The sbatch script hands its arguments to srun unchanged (srun faked on PATH)."""
    fake = tmp_path / "srun"
    fake.write_text('#!/usr/bin/env bash\necho "srun $*"\n')
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}")
    proc = subprocess.run(["bash", str(REPO / "launch" / "slurm.sbatch"), "scas-jax", "train", "--resume"],
                          capture_output=True, text=True, env=env, timeout=30)
    assert proc.returncode == 0 and proc.stdout.strip() == "srun --kill-on-bad-exit=1 scas-jax train --resume"
