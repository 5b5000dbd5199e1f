"""Real multi-process runs (2 processes x 2 CPU devices, gloo collectives) against one
process with the same 4 devices: scoring, training, in-training selection, a mesh whose
device order crosses processes, and a process killed mid-training.

Every run goes through ``launch/local_multiprocess.sh`` (or, for the kill, two plain
processes with the same variables, so that nothing but the heartbeat stops the
survivor). Each command runs under :data:`_WRAPPER`, which logs every atomic file
write with the writing process, so the tests can check that only process 0 writes.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from tiny_chat import arithmetic_rows, make_student_dir, write_jsonl

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch" / "local_multiprocess.sh"

# the CLI, with every atomic write (score files, manifests, configs) logged as
# "WROTE <process> <path>"
_WRAPPER = """
import contextlib, os, sys
import scas_jax.io_utils as io
_orig = io.atomic_path
@contextlib.contextmanager
def _logged(path):
    print("WROTE", os.environ.get("SCAS_JAX_PROCESS_ID", "0"), os.path.abspath(path), flush=True)
    with _orig(path) as tmp:
        yield tmp
io.atomic_path = _logged
from scas_jax.cli import main
sys.exit(main(sys.argv[1:]))
"""

# grad_accum=2: the micro-batch loop runs in a shard_map over data, across the processes
TRAIN = ["steps=4", "batch_size=8", "seq_len=128", "learning_rate=1e-2", "warmup_steps=1",
         "checkpoint_every=1", "max_to_keep=0", "mesh=data=2,fsdp=2", "grad_accum=2"]


# one persistent compilation cache for this module's runs: the kill test's runs and the
# dynamic runs compile the same train step as the static runs (about 5 s per process)
_CACHE = Path(tempfile.gettempdir()) / f"scas_jax_mp_cache_{os.getpid()}"


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache():
    yield
    shutil.rmtree(_CACHE, ignore_errors=True)


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SCAS_JAX_"))}
    env.pop("XLA_FLAGS", None)  # the test session's 8 simulated devices are not per process
    env.update(JAX_PLATFORMS="cpu", SCAS_JAX_HEARTBEAT_TIMEOUT="10",
               JAX_COMPILATION_CACHE_DIR=str(_CACHE), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", **extra)
    return env


def two_processes(args: list[str], timeout: float = 240) -> str:
    """``scas-jax ARGS`` as 2 processes x 2 devices; their output (lines prefixed ``[i] ``)."""
    p = subprocess.run(["bash", str(LAUNCH), "2", "--", sys.executable, "-c", _WRAPPER, *args],
                       env=_env(), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


def one_process(args: list[str], timeout: float = 240) -> str:
    """``scas-jax ARGS`` as one process with 4 devices."""
    p = subprocess.run([sys.executable, "-c", _WRAPPER, *args], env=_env(JAX_NUM_CPU_DEVICES="4"),
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


def writes(output: str) -> list[tuple[str, str]]:
    """``[(process, path)]`` of the logged atomic writes."""
    out = []
    for line in output.splitlines():
        if "WROTE " in line:
            proc, path = line.split("WROTE ", 1)[1].split(" ", 1)
            out.append((proc, path))
    return out


def final_params(run: Path) -> list[np.ndarray]:
    from scas_jax.loader import load_student

    return [np.asarray(x) for x in jax.tree.leaves(load_student(run / "final").params)]


def metric_rows(run: Path) -> list[dict]:
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny student, SFT rows, and a pool of two teachers answering the same sums."""
    root = tmp_path_factory.mktemp("mp")
    student = make_student_dir(root / "student", seed=3)
    data = write_jsonl(root / "train.jsonl", arithmetic_rows(40))
    pool = root / "pool"
    pool.mkdir()
    rows = arithmetic_rows(12, seed=4)
    write_jsonl(pool / "short_teacher_responses.jsonl",
                [{"id": r["id"], "instruction": r["instruction"], "teacher_output": r["output"],
                  "teacher_correct": True} for r in rows])
    write_jsonl(pool / "long_teacher_responses.jsonl",
                [{"id": r["id"], "instruction": r["instruction"],
                  "teacher_output": f"{r['instruction'][:-1]} is {r['output']}, so the answer is {r['output']}",
                  "teacher_correct": True} for r in rows])
    return {"root": root, "student": student, "data": data, "pool": pool}


@pytest.fixture(scope="module")
def train_runs(inputs):
    """The 4-step static run: one process with 4 devices, and 2 processes x 2 devices."""
    root = inputs["root"]
    common = ["train", "--student", str(inputs["student"]), "--data", str(inputs["data"]),
              "--no-progress", *TRAIN]
    one_process([*common, "--output-dir", str(root / "train1")])
    out = two_processes([*common, "--output-dir", str(root / "train2")])
    return root / "train1", root / "train2", out


def test_score_two_processes_equal_one(inputs):
    root = inputs["root"]
    common = ["score", "--student", str(inputs["student"]), "--candidate-dir", str(inputs["pool"]),
              "--batch-tokens", "512", "--max-length", "512"]
    one_process([*common, "--output-dir", str(root / "score1")])
    out = two_processes([*common, "--output-dir", str(root / "score2")])
    names = sorted(p.name for p in (root / "score1").iterdir())
    assert names == ["long_scas_scores.jsonl", "manifest.json", "short_scas_scores.jsonl"]
    assert sorted(p.name for p in (root / "score2").iterdir()) == names  # no journal left
    # every output written once, by process 0
    logged = writes(out)
    assert sorted(path for _, path in logged) == sorted(str((root / "score2" / n).absolute()) for n in names)
    assert {proc for proc, _ in logged} == {"0"}
    for name in [n for n in names if n.endswith(".jsonl")]:
        a = [json.loads(l) for l in (root / "score1" / name).read_text().splitlines()]
        b = [json.loads(l) for l in (root / "score2" / name).read_text().splitlines()]
        assert len(a) == len(b) == 12
        for ra, rb in zip(a, b):
            assert ra.keys() == rb.keys() and ra["id"] == rb["id"]
            for k, v in ra.items():
                if isinstance(v, float):
                    assert rb[k] == pytest.approx(v, rel=1e-6, abs=1e-12), (name, ra["id"], k)
                else:
                    assert rb[k] == v, (name, ra["id"], k)
    m1, m2 = (json.loads((root / d / "manifest.json").read_text()) for d in ("score1", "score2"))
    assert m1["batches"] == m2["batches"] and m1["compiled_shapes"] == m2["compiled_shapes"]
    assert m1["tokens"] == m2["tokens"] and m2["mesh"]["data"] == 4


def test_train_two_processes_equal_one(train_runs):
    one, two, out = train_runs
    for a, b in zip(final_params(one), final_params(two)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    m1, m2 = metric_rows(one), metric_rows(two)
    assert [r["step"] for r in m2] == [1, 2, 3, 4]
    assert [r["tokens"] for r in m2] == [r["tokens"] for r in m1]
    for r1, r2 in zip(m1, m2):
        assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-5)
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["1", "2", "3", "4"]
    assert {proc for proc, _ in writes(out)} == {"0"}  # train_config.yaml: process 0 only


def test_dynamic_selection_two_processes_equal_one(inputs):
    from scas_jax.training.checkpoints import TrainCheckpoints

    root = inputs["root"]
    common = ["train", "--student", str(inputs["student"]), "--candidate-dir", str(inputs["pool"]),
              "--no-progress", *TRAIN, "rescore_every=2", "score_batch_tokens=128"]
    one_process([*common, "--output-dir", str(root / "dyn1")])
    two_processes([*common, "--output-dir", str(root / "dyn2")])

    def chunk(run, step):
        ck = TrainCheckpoints(run / "checkpoints")
        try:
            return ck.read_meta(step)["dynamic_chunk"]
        finally:
            ck.close()

    for step in (2, 4):
        assert chunk(root / "dyn2", step) == chunk(root / "dyn1", step)
    shares = [[r["teacher_share"] for r in metric_rows(root / d) if r.get("event") == "rescore"]
              for d in ("dyn1", "dyn2")]
    assert shares[0] == shares[1] and len(shares[0]) == 2
    for a, b in zip(final_params(root / "dyn1"), final_params(root / "dyn2")):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


def permuted_run(student_dir: str, data: str, devices) -> dict[str, np.ndarray]:
    """Score 20 rows and train 2 steps on mesh ``data=2,fsdp=2`` over ``devices`` (in that
    order); ``{"scores", "tokens", "p<i>"}`` as host arrays (collective: every process)."""
    from scas_jax import parallel
    from scas_jax.loader import load_student
    from scas_jax.scoring.scorer import ScoreConfig, score_rows
    from scas_jax.training import step as st
    from scas_jax.training.config import TrainConfig
    from scas_jax.training.data import BatchStream, load_examples

    mesh = parallel.make_mesh("data=2,fsdp=2", devices=devices)
    student = load_student(student_dir, mesh=mesh)
    rows = [{"instruction": f"{i}+{i}?", "teacher_output": f"{2 * i}"} for i in range(20)]
    fields = score_rows(student.params, student.cfg, student.tokenizer, rows,
                        ScoreConfig(batch_tokens=256, max_length=256), mesh=mesh)
    examples, _ = load_examples(data, student.tokenizer, 128)
    tc = TrainConfig(batch_size=8, seq_len=128, learning_rate=1e-2, warmup_steps=1, steps=2)
    opt = st.make_optimizer(tc, 2)
    state = st.init_state(student.params, opt, mesh)
    fn = st.make_train_step(student.cfg, tc, opt, mesh, st.state_shardings(state, mesh),
                            st.lr_schedule(tc, 2))
    stream, tokens = BatchStream(examples, 128, 8, 16, 0), []
    for k in range(2):
        state, m = fn(state, st.put_batch(st.to_step_batch(stream.batch(k), 1), mesh))
        tokens.append(float(m["tokens"]))
    keys = sorted(k for k in fields[0] if isinstance(fields[0][k], float))
    out = {"scores": np.array([[f[k] for k in keys] for f in fields]), "tokens": np.array(tokens)}
    out.update({f"p{i}": x for i, x in enumerate(parallel.to_host(jax.tree.leaves(state.params)))})
    return out


_PERMUTED = """
import sys
import jax, numpy as np
from scas_jax import distributed
distributed.initialize()
sys.path.insert(0, sys.argv[1])
from test_multiprocess import permuted_run
d = sorted(jax.devices(), key=lambda d: d.id)
out = permuted_run(sys.argv[2], sys.argv[3], [d[3], d[0], d[2], d[1]])  # both axes cross processes
if jax.process_index() == 0:
    np.savez(sys.argv[4], **out)
"""


def test_permuted_mesh_across_processes(inputs):
    """data=2,fsdp=2 over devices ordered across the processes (3, 0, 2, 1) equals one
    process (this one) with the same mesh over 4 devices in order."""
    root = inputs["root"]
    p = subprocess.run(["bash", str(LAUNCH), "2", "--", sys.executable, "-c", _PERMUTED,
                        str(Path(__file__).parent), str(inputs["student"]), str(inputs["data"]),
                        str(root / "two.npz")], env=_env(), capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout + p.stderr
    two = np.load(root / "two.npz")
    one = permuted_run(str(inputs["student"]), str(inputs["data"]), jax.devices()[:4])
    assert two["scores"].shape == (20, one["scores"].shape[1]) and one["scores"].shape[1] > 5
    np.testing.assert_allclose(two["scores"], one["scores"], rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(two["tokens"], one["tokens"])
    for k in one:
        if k.startswith("p"):
            np.testing.assert_allclose(two[k], one[k], rtol=1e-5, atol=1e-6)


def _start_pair(args: list[str], log_dir: Path) -> list[subprocess.Popen]:
    """The two processes of one run started directly (no launcher: nothing stops the
    survivor of a killed peer but the heartbeat)."""
    port = str(20000 + random.randint(0, 19999))
    procs = []
    for i in range(2):
        env = _env(SCAS_JAX_COORDINATOR=f"localhost:{port}", SCAS_JAX_NUM_PROCESSES="2",
                   SCAS_JAX_PROCESS_ID=str(i), JAX_NUM_CPU_DEVICES="2")
        log = open(log_dir / f"proc{i}.log", "w")
        procs.append(subprocess.Popen([sys.executable, "-c", _WRAPPER, *args], env=env,
                                      stdout=log, stderr=subprocess.STDOUT, text=True))
    return procs


def test_killed_process_stops_the_other_and_resume_matches(inputs, train_runs, tmp_path):
    """SIGKILL process 1 after a checkpoint exists: process 0 exits with an error within
    the heartbeat bound; --resume on both processes ends at the uninterrupted weights."""
    _, reference, _ = train_runs
    run = tmp_path / "run"
    common = ["train", "--student", str(inputs["student"]), "--data", str(inputs["data"]),
              "--no-progress", *TRAIN, "--output-dir", str(run)]
    procs = _start_pair(common, tmp_path)
    deadline = time.time() + 180
    killed_at = None
    while time.time() < deadline and procs[1].poll() is None:
        done = [int(d.name) for d in (run / "checkpoints").glob("*") if d.name.isdigit()] \
            if (run / "checkpoints").is_dir() else []
        if done:
            os.kill(procs[1].pid, signal.SIGKILL)
            killed_at = time.time()
            break
        time.sleep(0.01)
    assert killed_at is not None, (tmp_path / "proc0.log").read_text()
    assert procs[1].wait(timeout=30) == -signal.SIGKILL
    try:
        rc = procs[0].wait(timeout=90)
    except subprocess.TimeoutExpired:
        procs[0].kill()
        pytest.fail("the surviving process hung after its peer was killed")
    log0 = (tmp_path / "proc0.log").read_text()
    assert rc != 0, log0
    assert time.time() - killed_at < 90
    assert not (run / "final").exists()
    two_processes([*common, "--resume"])
    for a, b in zip(final_params(reference), final_params(run)):
        np.testing.assert_array_equal(b, a)
    assert [r["step"] for r in metric_rows(run) if "loss" in r][-1] == 4
