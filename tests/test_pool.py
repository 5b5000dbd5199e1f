"""Candidate pool discovery, teacher naming and validation (scas_jax.data.pool)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scas_jax.assets import GSM8K_POOL
from scas_jax.data.files import discover_candidate_files
from scas_jax.data.pool import read_pool, read_pool_file
from scas_jax.data.rows import MISSING_FIELDS_ERROR
from scas_jax.data.layout import teacher_from_filename as teacher_name_from_path
from scas_jax.errors import ScasError


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in rows))
    return path


def good(i: int, **extra) -> dict:
    return {"id": f"q{i}", "instruction": f"question {i}", "teacher_output": f"answer {i}", **extra}


def test_teacher_name_suffixes():
    assert teacher_name_from_path("a_teacher_responses_evaluated.jsonl") == "a"
    assert teacher_name_from_path("b_teacher_responses.jsonl") == "b"
    assert teacher_name_from_path("c_student_train.jsonl") == "c"
    assert teacher_name_from_path("/x/d.jsonl") == "d"
    assert teacher_name_from_path("e_teacher_responses_evaluated_v2.jsonl") == "e_teacher_responses_evaluated_v2"


def test_discovery_order_outputs_and_shadowing(tmp_path):
    for name in [
        "zeta.jsonl",
        "alpha_teacher_responses.jsonl",
        "alpha.jsonl",  # same teacher name as above: shadowed by the earlier suffix
        "beta_teacher_responses_evaluated.jsonl",
        "gamma_student_train.jsonl",
        "zeta_scas_scores.jsonl",  # an output, never a candidate
        "notes.txt",
    ]:
        write_jsonl(tmp_path / name, [good(0)])
    files = discover_candidate_files(tmp_path)
    assert [f.path.name for f in files] == [
        "alpha_teacher_responses.jsonl",
        "beta_teacher_responses_evaluated.jsonl",
        "gamma_student_train.jsonl",
        "zeta.jsonl",
    ]
    pool = read_pool(tmp_path)
    assert [f.teacher for f in pool.files] == ["alpha", "beta", "gamma", "zeta"]
    assert [p.name for p in pool.summary.shadowed] == ["alpha.jsonl"]


def test_row_and_file_teacher_names(tmp_path):
    write_jsonl(
        tmp_path / "filet_teacher_responses.jsonl",
        [
            good(0, teacher_name="rowname", teacher="other"),
            good(1, teacher="legacy"),
            good(2),
            good(3, teacher_name="", teacher=""),
        ],
    )
    pf = read_pool(tmp_path).files[0]
    assert pf.teacher == "filet"
    assert [c.teacher for c in pf.rows] == ["rowname", "legacy", "filet", "filet"]
    assert [c.line for c in pf.rows] == [1, 2, 3, 4]
    assert pf.rows[0].row["teacher"] == "other"  # every field kept


def test_output_field_fallback_and_extra_fields_kept(tmp_path):
    row = {"id": 7, "instruction": "q", "output": "o", "reference_answer": "5", "meta": {"k": [1]}}
    pf = read_pool_file(write_jsonl(tmp_path / "t.jsonl", [row]))
    assert pf.rows[0].error is None
    assert pf.rows[0].row == row
    assert pf.rows[0].id == 7


def test_malformed_json_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [good(0), "\n", '{"id": "q1", "instruction": \n'])
    with pytest.raises(ScasError) as err:
        read_pool(tmp_path)
    msg = str(err.value)
    assert f"{path}:3:" in msg
    assert "Expecting value" in msg  # the parser's own message


def test_non_object_line_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [good(0), "[1, 2]\n"])
    with pytest.raises(ScasError, match=f"{path}:2: expected a JSON object"):
        read_pool_file(path)


def test_duplicate_id_names_both_lines(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [good(0), good(1), "\n", good(0)])
    with pytest.raises(ScasError) as err:
        read_pool(tmp_path)
    msg = str(err.value)
    assert f"{path}:4:" in msg and "first at line 1" in msg and '"q0"' in msg


def test_same_id_in_two_teachers_is_fine(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [good(0)])
    write_jsonl(tmp_path / "b.jsonl", [good(0)])
    pool = read_pool(tmp_path)
    assert pool.summary.rows == 2 and pool.summary.partial_ids == {}


def test_missing_instruction_or_answer_is_counted_error_row(tmp_path):
    rows = [
        good(0),
        {"id": "q1", "teacher_output": "a"},
        {"id": "q2", "instruction": "q", "teacher_output": ""},
        {"id": "q3", "instruction": "", "output": "a"},
        {"id": "q4", "instruction": "q"},
    ]
    write_jsonl(tmp_path / "t.jsonl", rows)
    pf = read_pool(tmp_path).files[0]
    assert [c.error for c in pf.rows] == [None] + [MISSING_FIELDS_ERROR] * 4
    assert pf.errors == 4 and len(pf.rows) == 5


def test_unverified_rows_skipped_and_counted(tmp_path):
    rows = [
        good(0, teacher_correct=True),
        good(1, teacher_correct=False),
        good(2, is_correct=False),
        good(3, is_correct="false"),
        good(4, teacher_correct=None, is_correct=False),  # teacher_correct wins, unknown -> kept
        good(5),
    ]
    write_jsonl(tmp_path / "t.jsonl", rows)
    pool = read_pool(tmp_path)
    pf = pool.files[0]
    assert [c.id for c in pf.rows] == ["q0", "q4", "q5"]
    assert pf.skipped_unverified == 3 and pool.summary.skipped_unverified == 3
    kept_all = read_pool(tmp_path, include_unverified=True).files[0]
    assert len(kept_all.rows) == 6 and kept_all.skipped_unverified == 0


def test_partial_ids_reported_not_error(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [good(0), good(1), good(2)])
    write_jsonl(tmp_path / "b.jsonl", [good(0), good(2)])
    write_jsonl(tmp_path / "c.jsonl", [good(0), good(3)])
    summary = read_pool(tmp_path).summary
    assert summary.ids == 4
    assert summary.partial_ids == {'"q1"': ("a",), '"q2"': ("a", "b"), '"q3"': ("c",)}
    assert any("3 ids are present in only some teachers" in line for line in summary.lines())


def test_limit_first_rows_before_filter(tmp_path):
    rows = [good(0, teacher_correct=False), good(1), good(2), "not json\n"]
    write_jsonl(tmp_path / "t.jsonl", rows)
    pf = read_pool(tmp_path, limit=2).files[0]  # the bad 4th line is never read
    assert pf.n_read == 2 and [c.id for c in pf.rows] == ["q1"] and pf.skipped_unverified == 1


def test_empty_or_missing_directory(tmp_path):
    with pytest.raises(ScasError, match="no candidate JSONL"):
        read_pool(tmp_path)
    with pytest.raises(ScasError, match="not found"):
        read_pool(tmp_path / "nope")


def test_gsm8k_pool():
    pool = read_pool(GSM8K_POOL)
    assert [f.teacher for f in pool.files] == [
        "gpt3_175b_finetuning",
        "gpt3_175b_verification",
        "gpt3_6b_finetuning",
        "gpt3_6b_verification",
        "human_reference",
        "human_socratic",
    ]
    s = pool.summary
    assert s.rows_read == 6 * 1319 and s.ids == 1319 and s.partial_ids == {} and s.errors == 0
    assert s.rows + s.skipped_unverified == s.rows_read
    by_teacher = {f.teacher: f for f in pool.files}
    assert len(by_teacher["human_reference"].rows) == 1319
    correct = sum(
        1
        for line in (GSM8K_POOL / "gpt3_6b_finetuning.jsonl").read_text().splitlines()
        if json.loads(line)["teacher_correct"]
    )
    assert len(by_teacher["gpt3_6b_finetuning"].rows) == correct
    assert pool.files[0].rows[0].row["id"].startswith("gsm8k-test-")
