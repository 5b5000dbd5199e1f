"""One reading of ``teacher_correct`` across score's pool reader, select, verify and report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scas_jax.data.pool import read_pool
from scas_jax.errors import ScasError
from scas_jax.judging.verify import verify
from scas_jax.reporting.report import report
from scas_jax.selection.api import select


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def row(id_: int, flag, score: float) -> dict:
    # every answer is right ("A: 7" for reference 7), so the judge says correct for all three
    return {"id": id_, "instruction": f"Q{id_}", "teacher_output": "A: 7", "reference_answer": "7",
            "teacher_correct": flag, "scas_score": score}


# the string "true" is correct, the string "no" incorrect, null undecided (scas_jax.data.verdicts)
FLAGS = {1: "true", 2: "no", 3: None}


@pytest.fixture
def pools(tmp_path: Path) -> tuple[Path, Path]:
    """The same three rows as a candidate pool (teacher t) and as score files (teachers t and u)."""
    pool = tmp_path / "pool"
    pool.mkdir()
    write_jsonl(pool / "t.jsonl", [row(i, f, 0.1 * i) for i, f in FLAGS.items()])
    scores = tmp_path / "scores"
    scores.mkdir()
    write_jsonl(scores / "t_scas_scores.jsonl", [row(i, f, 0.1 * i) for i, f in FLAGS.items()])
    write_jsonl(scores / "u_scas_scores.jsonl", [row(i, True, 1.0) for i in FLAGS])  # u always flagged correct
    return pool, scores


def test_score_pool_reader(pools):
    pool, _ = pools
    pf = read_pool(pool).files[0]
    assert [c.id for c in pf.rows] == [1, 3]  # "no" is skipped; "true" and null are kept
    assert pf.skipped_unverified == 1
    assert [c.verdict for c in pf.rows] == [True, None]


def test_select(pools, tmp_path):
    pool, scores = pools
    m = select(scores, tmp_path / "o", "min", verified_only=True)
    rows = [json.loads(x) for x in (tmp_path / "o" / "scas_score" / "min_score_selected.jsonl").read_text().splitlines()]
    # only t's "true" answer (0.1) is verified; on 2 ("no") and 3 (null) u's answer is the only one left
    assert [(r["id"], r["teacher_name"]) for r in rows] == [(1, "t"), (2, "u"), (3, "u")]
    assert m["skipped"] == {"not_verified_correct": 2}
    m = select(pool, tmp_path / "o", "teacher", teacher="t")
    assert m["selected_rows"] == 1 and m["skipped"] == {"not_verified_correct": 2}
    acc = select(scores, tmp_path / "o", "strongest")["teacher_accuracy"]
    assert acc == {"u": 1.0, "t": round(1 / 3, 6)}  # "true" counts as correct, "no" and null do not


def test_verify_agreement(pools, tmp_path):
    pool, _ = pools
    a = verify(pool, tmp_path / "v")["agreement_with_input_flags"]
    # "true" and "no" are decided flags and compared; null is not a flag to agree with
    assert a["compared_rows"] == 2 and a["agree"] == 1
    assert a["confusion"] == {"flag_correct/judge_correct": 1, "flag_incorrect/judge_correct": 1}
    assert [(d["id"], d["flag"]) for d in a["disagreements"]] == [(2, False)]


def test_report(pools, tmp_path):
    _, scores = pools
    select(scores, tmp_path / "o", "min")
    s = report(scores, [tmp_path / "o"], tmp_path / "rep")
    t = s["teachers"]["t"]
    assert (t["correct"], t["incorrect"], t["undecided"]) == (1, 1, 1)
    # min over every row picks t on all three items; one of the three is flagged correct
    assert s["selections"][0]["teacher_share"] == {"t": 1.0}
    assert s["selections"][0]["verified_share"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("value", ["maybe", 2, [True]])
def test_an_invalid_flag_is_a_file_line_error_everywhere(tmp_path, value):
    d = tmp_path / "d"
    d.mkdir()
    path = write_jsonl(d / "t_scas_scores.jsonl", [row(1, True, 0.1), row(2, value, 0.2)])
    message = rf"t_scas_scores.jsonl:2: teacher_correct={value!r} is not a verdict".replace("[", r"\[").replace("]", r"\]")
    with pytest.raises(ScasError, match=message):
        select(d, tmp_path / "o", "min")
    with pytest.raises(ScasError, match=message):
        verify(d, tmp_path / "v")
    with pytest.raises(ScasError, match=message):
        report(d, [], tmp_path / "r")
    cand = tmp_path / "c"
    cand.mkdir()
    path.rename(cand / "t.jsonl")
    with pytest.raises(ScasError, match=message.replace("t_scas_scores", "t")):
        read_pool(cand, include_unverified=True)
    assert not (tmp_path / "o").exists() and not (tmp_path / "v").exists() and not (tmp_path / "r").exists()
