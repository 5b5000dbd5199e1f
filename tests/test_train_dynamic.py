"""In-training SCAS (selection: dynamic): parity with `score` + `select`, teacher shares,
rescoring cadence, exact resume, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from scas_jax.errors import ScasError
from scas_jax.training.checkpoints import TrainCheckpoints
from scas_jax.training.dynamic import QuestionOrder, chosen_teachers
from scas_jax.training.loop import train
from tiny_chat import make_student_dir, write_jsonl

N_QUESTIONS = 12
# 8 devices (conftest): batch_size 8 = one row per device
BASE = ["batch_size=8", "seq_len=128", "learning_rate=3e-2", "warmup_steps=0", "mesh=data=-1",
        "max_to_keep=0", "selection=dynamic"]


def teacher_rows(n: int) -> dict[str, list[dict]]:
    """Three teachers answering the same sums in different styles (plus one unverified row)."""
    rng = np.random.default_rng(5)
    pairs = [tuple(int(x) for x in rng.integers(0, 50, size=2)) for _ in range(n)]
    styles = {
        "alpha": lambda a, b: f"{a + b}",
        "beta": lambda a, b: f"The sum of {a} and {b} is {a + b}.",
        "gamma": lambda a, b: f"{a} plus {b} equals {a + b}, so the answer is {a + b}",
    }
    out = {}
    for name, fmt in styles.items():
        out[name] = [{"id": i, "system": "Add.", "instruction": f"{a}+{b}?", "teacher_output": fmt(a, b),
                      "teacher_correct": True} for i, (a, b) in enumerate(pairs)]
    out["gamma"].append({"id": n, "instruction": "1+1?", "teacher_output": "3", "teacher_correct": False})
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dyn")
    student = make_student_dir(root / "student", seed=2)
    pool = root / "pool"
    pool.mkdir()
    for name, rows in teacher_rows(N_QUESTIONS).items():
        write_jsonl(pool / f"{name}_teacher_responses.jsonl", rows)
    return student, pool, root


def score_and_select(student_dir: Path, pool: Path, out: Path, strategy: str, **kw) -> dict[str, str]:
    """What `scas-jax score` + `scas-jax select` give for the student's parameters:
    ``{id key: teacher}``."""
    from scas_jax.data.pool import read_pool
    from scas_jax.loader import load_student
    from scas_jax.scoring.scorer import ScoreConfig, score_rows
    from scas_jax.selection.api import select

    st = load_student(student_dir, dtype="float32")
    scores = out / "scores"
    scores.mkdir(parents=True)
    for pf in read_pool(pool).files:
        rows = [c.row for c in pf.rows]
        fields = score_rows(st.params, st.cfg, st.tokenizer, rows, ScoreConfig())
        write_jsonl(scores / f"{pf.teacher}_scas_scores.jsonl",
                    [{**r, **f, "teacher_name": pf.teacher} for r, f in zip(rows, fields)])
    manifest = select(scores, out / "sel", strategy, **kw)
    name = "min_score_selected.jsonl" if strategy == "min" else f"selected_group_{kw['selected_group']}.jsonl"
    path = Path(manifest["output_dir"]) / name
    return {json.dumps(r["id"]): r["teacher_name"] for r in map(json.loads, path.read_text().splitlines())}


def chunk_at(out: Path, step: int) -> dict:
    ck = TrainCheckpoints(out / "checkpoints")
    try:
        return ck.read_meta(step)["dynamic_chunk"]
    finally:
        ck.close()


def metric_rows(out: Path) -> list[dict]:
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


def tb_scalars(directory: Path) -> dict[str, list[int]]:
    """``{tag: [steps]}`` of the scalar summaries in TensorBoard event files (TFRecord)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, list[int]] = {}
    for path in sorted(directory.glob("events.*")):
        data = path.read_bytes()
        pos = 0
        while pos + 12 <= len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            ev = Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in ev.summary.value:
                out.setdefault(v.tag, []).append(ev.step)
    return out


def test_question_order_covers_each_epoch():
    order = QuestionOrder(10, 4, seed=3)
    assert order.steps_per_epoch == 3
    for e in range(2):
        qs = [order.questions(e * 3 + j) for j in range(3)]
        assert [len(q) for q in qs] == [4, 4, 2]
        assert sorted(np.concatenate(qs).tolist()) == list(range(10))
    assert not np.array_equal(order.questions(0), order.questions(3))
    np.testing.assert_array_equal(order.questions(4), QuestionOrder(10, 4, seed=3).questions(4))


def test_dynamic_min_matches_score_select_and_logs_shares(setup, tmp_path):
    student, pool, _ = setup
    out = tmp_path / "run"
    # 12 questions, 8 per step: steps 0-1 are epoch 0, steps 2-3 epoch 1; K=2 -> 2 events
    summary = train(student, None, out, None,
                    [*BASE, "steps=4", "rescore_every=2", "checkpoint_every=1"],
                    candidate_dir=pool, progress=False)
    assert summary["final_step"] == 4
    assert summary["data"]["questions"] == N_QUESTIONS and summary["data"]["candidates"] == 36
    assert summary["data"]["skipped_unverified"] == 1
    sel = summary["selection"]
    assert sel["rescore_events"] == 2 and sel["score_seconds"] > 0 and sel["score_fraction"] > 0
    # the first chunk (steps 0-1, every question) was chosen with the step-0 parameters
    chunk = chunk_at(out, 1)
    assert chunk["start"] == 0 and chunk["stop"] == 2
    ours = chosen_teachers(chunk)
    want = score_and_select(student, pool, tmp_path / "ref", "min")
    assert len(want) == N_QUESTIONS and ours == want
    assert len(set(want.values())) >= 2  # not a trivial one-teacher choice
    # events: one line each, at steps 1 and 3, with teacher shares summing to 1
    events = [r for r in metric_rows(out) if r.get("event") == "rescore"]
    assert [e["step"] for e in events] == [1, 3]
    assert [e["steps"] for e in events] == [[0, 2], [2, 4]]
    for e in events:
        assert e["questions"] == N_QUESTIONS and e["candidates"] == 36
        assert set(e["teacher_share"]) <= {"alpha", "beta", "gamma"}
        assert abs(sum(e["teacher_share"].values()) - 1.0) < 1e-9
    counts = {t: sum(v == t for v in want.values()) for t in set(want.values())}
    assert events[0]["teacher_share"] == pytest.approx(
        {t: counts.get(t, 0) / N_QUESTIONS for t in ("alpha", "beta", "gamma")})
    assert events[1]["score_fraction_so_far"] > 0
    scalars = tb_scalars(out / "tensorboard")
    assert scalars["selection/score_seconds"] == [1, 3]
    assert all(scalars[f"selection/share/{t}"] == [1, 3] for t in ("alpha", "beta", "gamma"))


def test_dynamic_groups_matches_select_groups(setup, tmp_path):
    student, pool, _ = setup
    out = tmp_path / "run"
    train(student, None, out, None,
          [*BASE, "steps=2", "rescore_every=2", "checkpoint_every=1", "dynamic_strategy=groups",
           "num_groups=2", "selected_group=2", "selection_seed=7"],
          candidate_dir=pool, progress=False)
    ours = chosen_teachers(chunk_at(out, 1))
    want = score_and_select(student, pool, tmp_path / "ref", "groups", num_groups=2, selected_group=2, seed=7)
    assert len(want) == N_QUESTIONS and ours == want
    # group 2 of 3 candidates holds ranks 2 and 3: never the min
    mins = score_and_select(student, pool, tmp_path / "ref_min", "min")
    assert all(ours[k] != mins[k] for k in ours)


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metric_rows(out) if "loss" in r}


def test_dynamic_resume_exact(setup, tmp_path):
    """Resume inside a chunk (restored choices) and at a chunk boundary (re-scored)."""
    student, pool, _ = setup
    common = [*BASE, "steps=6", "rescore_every=3", "checkpoint_every=1", "questions_per_step=4",
              "batch_size=8"]
    ref = tmp_path / "ref"
    train(student, None, ref, None, common, candidate_dir=pool, progress=False)
    ref_losses = _losses(ref)
    assert len(ref_losses) == 6
    assert chunk_at(ref, 4)["start"] == 3
    from scas_jax.loader import load_student

    final = jax.tree.leaves(load_student(ref / "final").params)
    for cut_at in (2, 3):  # 2: inside chunk [0, 3); 3: boundary, chunk [3, 6) re-scored
        cut = tmp_path / f"cut{cut_at}"
        shutil.copytree(ref, cut)
        shutil.rmtree(cut / "final")
        for d in (cut / "checkpoints").iterdir():
            if d.name.isdigit() and int(d.name) > cut_at:
                shutil.rmtree(d)
        summary = train(student, None, cut, None, [], candidate_dir=pool, resume=True, progress=False)
        assert summary["resumed_from"] == cut_at and summary["final_step"] == 6
        assert summary["selection"]["rescore_events"] == 1  # chunk [3, 6)
        got = _losses(cut)
        assert sorted(got) == list(range(1, 7))
        assert all(got[s] == ref_losses[s] for s in range(cut_at + 1, 7)), (got, ref_losses)
        events = [r["step"] for r in metric_rows(cut) if r.get("event") == "rescore"]
        assert events == [1, 4]  # each event logged once
        assert chunk_at(cut, 6)["choices"] == chunk_at(ref, 6)["choices"]
        for x, y in zip(final, jax.tree.leaves(load_student(cut / "final").params)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_dynamic_bad_input(setup, tmp_path):
    student, pool, root = setup
    data = write_jsonl(tmp_path / "sft.jsonl", [{"instruction": "1+1?", "output": "2"}])
    with pytest.raises(ScasError, match="selection=dynamic selects answers during training: it needs --candidate-dir"):
        train(student, data, tmp_path / "a", None, BASE, progress=False)
    with pytest.raises(ScasError, match="either --data .* or --candidate-dir .*not both"):
        train(student, data, tmp_path / "b", None, BASE, candidate_dir=pool, progress=False)
    with pytest.raises(ScasError, match=r"nothing to train on: give --data FILE .*drop selection=static"):
        train(student, None, tmp_path / "c", None, ["selection=static"], candidate_dir=pool, progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "alpha_teacher_responses.jsonl").write_text("")
    with pytest.raises(ScasError, match="empty pool"):
        train(student, None, tmp_path / "d", None, BASE, candidate_dir=empty, progress=False)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ScasError, match="no candidate JSONL files"):
        train(student, None, tmp_path / "e", None, BASE, candidate_dir=tmp_path / "nothing", progress=False)
    with pytest.raises(ScasError, match="selected_group must be in 1..num_groups"):
        train(student, None, tmp_path / "f", None, [*BASE, "num_groups=2", "selected_group=3"],
              candidate_dir=pool, progress=False)
    for d in "abcdef":  # a failed start leaves no directory
        assert not (tmp_path / d).exists(), d


def test_dynamic_from_a_tfds_pool_matches_and_resumes(setup, tmp_path):
    """``--candidate-dir`` a TFDS build of the pool (read through Grain): the same
    choices and losses as the JSONL pool; a resume inside a chunk on the dataset ends
    on the same weights."""
    from scas_jax.data.tfds_pool import build_pool_dataset
    from scas_jax.loader import load_student

    student, pool, _ = setup
    data_dir = tmp_path / "tfds"
    build_pool_dataset(pool, data_dir, "dyn_pool")
    common = [*BASE, "steps=4", "rescore_every=2", "checkpoint_every=1", "questions_per_step=4"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    a = train(student, None, ref, None, common, candidate_dir=pool, progress=False)
    b = train(student, None, run, None, common, candidate_dir=data_dir, progress=False)
    assert b["data"] == a["data"]
    assert _losses(run) == _losses(ref) and len(_losses(ref)) == 4
    for s in (1, 2, 3, 4):
        assert chunk_at(run, s) == chunk_at(ref, s)
    shutil.rmtree(run / "final")
    for d in (run / "checkpoints").iterdir():
        if d.name.isdigit() and int(d.name) > 3:  # inside chunk [2, 4)
            shutil.rmtree(d)
    again = train(student, None, run, None, [], candidate_dir=data_dir, resume=True, progress=False)
    assert again["resumed_from"] == 3 and again["selection"]["rescore_events"] == 0
    assert _losses(run) == _losses(ref)
    for x, y in zip(jax.tree.leaves(load_student(ref / "final").params),
                    jax.tree.leaves(load_student(run / "final").params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
