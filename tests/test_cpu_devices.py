"""`scas-jax score --cpu-devices`: the CPU host split into JAX devices before JAX starts
(scas_jax/cpu_devices.py): the rule, the settings it leaves alone, and a real split run
whose scores equal the one-device run's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pool_files import gsm8k, write_pool
from scas_jax import cpu_devices as C
from scas_jax.errors import ScasError

REPO = Path(__file__).resolve().parents[1]


def test_parse():
    assert C.parse("auto") is None and C.parse(" AUTO ") is None
    assert C.parse("3") == 3 and C.parse(2) == 2
    for bad in ("0", "-1", "two", ""):
        with pytest.raises(ScasError, match="--cpu-devices"):
            C.parse(bad)


@pytest.mark.parametrize("answers,cpus,want", [
    (None, 2, 2), (1, 2, 1), (31, 2, 1), (32, 2, 2), (10**6, 2, 2), (10**6, 64, 8),
    (10**6, 1, 1), (48, 64, 3), (0, 4, 1)])
def test_auto_count(answers, cpus, want):
    """One device per CPU, at most MAX_AUTO_DEVICES, each with MIN_ANSWERS_PER_DEVICE answers."""
    assert C.auto_count(answers, cpus) == want


def test_choose_leaves_the_users_settings_alone():
    base = dict(answers=1000, default_mesh=True, multi_process=False, cpus=4)
    assert C.choose("auto", env={}, **base) == 4
    assert C.choose("auto", env={"JAX_NUM_CPU_DEVICES": "3"}, **base) is None
    assert C.choose("auto", env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}, **base) is None
    assert C.choose("auto", env={}, **{**base, "multi_process": True}) is None
    assert C.choose("auto", env={}, **{**base, "default_mesh": False}) is None
    # an explicit count always wins (it is what the user asked for)
    assert C.choose("2", env={"JAX_NUM_CPU_DEVICES": "3"}, **{**base, "multi_process": True}) == 2
    # YNNPACK fusions off: XLA's split programs compute wrong values (cpu_devices.py)
    off = {"XLA_FLAGS": "--xla_cpu_max_isa=AVX2 --xla_cpu_experimental_ynn_fusion_type="}
    assert C.library_dots_off(off) and not C.library_dots_off({"XLA_FLAGS": "--xla_cpu_max_isa=AVX2"})
    assert not C.library_dots_off({"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot"})
    assert C.choose("auto", env=off, **base) is None
    assert C.choose("1", env=off, **base) == 1
    with pytest.raises(ScasError, match="--cpu-devices 1"):
        C.choose("2", env=off, **base)
    assert C.user_setting({"JAX_NUM_CPU_DEVICES": "3"}) == "JAX_NUM_CPU_DEVICES=3"
    assert C.user_setting({"XLA_FLAGS": "--xla_cpu_max_isa=AVX2"}) is None


def test_count_answers(tmp_path):
    pool = write_pool(tmp_path / "pool", {"a.jsonl": gsm8k("human_reference", 7),
                                          "b.jsonl": gsm8k("gpt3_6b_verification", 5)})
    assert C.count_answers(pool) == 12
    assert C.count_answers(pool, limit=6) == 11
    assert C.count_answers(tmp_path / "missing") is None


def test_split_after_jax_started():
    """This process's JAX has started (conftest's 8 devices): an explicit split is an
    error naming the variable to use instead; auto just leaves it."""
    import jax

    jax.devices()
    with pytest.raises(ScasError, match="JAX_NUM_CPU_DEVICES"):
        C.split(2, explicit=True)
    assert C.split(2, explicit=False) is False


def _run(student: Path, pool: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "scas_jax", "score", "--student", str(student), "--candidate-dir",
           str(pool), "--output-dir", str(out), "--batch-tokens", "512", "--max-length", "1024",
           "--limit", "12", *extra]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def test_split_run_scores_as_one_device(tiny_llama_dir, tmp_path):
    """The same pool on one device and on the split host (auto, as many devices as this
    machine's CPUs give, and an explicit 3): the same score files within float32
    rounding, the manifest naming the devices."""
    teachers = ("human_reference", "gpt3_175b_verification", "gpt3_6b_verification")
    pool = write_pool(tmp_path / "pool", {f"{t}.jsonl": gsm8k(t, 12) for t in teachers})
    runs = {}
    want_auto = C.auto_count(36, C.cpus_available())
    for name, extra in (("one", ("--cpu-devices", "1")), ("auto", ()), ("three", ("--cpu-devices", "3"))):
        res = _run(tiny_llama_dir, pool, tmp_path / name, *extra)
        m = json.loads((tmp_path / name / "manifest.json").read_text())
        runs[name] = {t: [json.loads(line) for line in
                          (tmp_path / name / f"{t}_scas_scores.jsonl").read_text().splitlines()]
                      for t in teachers}
        want = {"one": 1, "auto": want_auto, "three": 3}[name]
        assert m["devices"].startswith(f"{want} x cpu"), (name, m["devices"])
        assert f"{want} local / {want} global devices" in res.stderr
    for name in ("auto", "three"):
        for t in teachers:
            assert [r["id"] for r in runs[name][t]] == [r["id"] for r in runs["one"][t]]
            for got, ref in zip(runs[name][t], runs["one"][t]):
                for f in ("scas_score", "answer_mean_nll", "answer_question_similarity"):
                    assert got[f] == pytest.approx(ref[f], rel=2e-5, abs=1e-6), (name, t, f)
