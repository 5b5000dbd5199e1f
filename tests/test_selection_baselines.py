"""Baselines: strongest, teacher, random; pool discovery; bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scas_jax.assets import GSM8K_POOL
from scas_jax.errors import ScasError
from scas_jax.judging.verify import verify
from scas_jax.selection.api import select
from scas_jax.data.files import discover_candidate_files, discover_pool
from scas_jax.data.layout import teacher_from_filename

# teacher -> flags for q1..q4. Accuracy: A 2/4, B 2/4, C 3/4 -> strength order C, A, B
FLAGS = {
    "A": [True, False, True, False],
    "B": [True, True, False, False],
    "C": [True, False, True, True],
}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture
def pool(tmp_path: Path) -> Path:
    """Candidate files with the three naming suffixes; verification flags from FLAGS."""
    d = tmp_path / "pool"
    d.mkdir()
    names = {"A": "A_teacher_responses_evaluated.jsonl", "B": "B_student_train.jsonl", "C": "C.jsonl"}
    for teacher, flags in FLAGS.items():
        write_jsonl(d / names[teacher], [
            {"id": f"q{i + 1}", "instruction": f"Q{i + 1}", "teacher_output": f"{teacher} says {i + 1}",
             "reference_answer": str(i + 1), "teacher_correct": ok}
            for i, ok in enumerate(flags)
        ])
    return d


def chosen(rows: list[dict]) -> list[tuple[str, str]]:
    return [(r["id"], r["teacher_name"]) for r in rows]


def test_file_naming_rules(pool: Path):
    assert teacher_from_filename("x_teacher_responses_evaluated.jsonl") == "x"
    assert teacher_from_filename("x_teacher_responses.jsonl") == "x"
    assert teacher_from_filename("x_student_train.jsonl") == "x"
    assert teacher_from_filename("x_scas_scores.jsonl") == "x"
    assert teacher_from_filename("x.y.jsonl") == "x.y"
    assert [f.teacher for f in discover_candidate_files(pool)] == ["A", "B", "C"]
    write_jsonl(pool / "A_scas_scores.jsonl", [{"id": "q1", "scas_score": 1.0}])
    # a score file is never a candidate; with one present the pool is read from score files
    assert [f.teacher for f in discover_candidate_files(pool)] == ["A", "B", "C"]
    assert [(f.teacher, f.kind) for f in discover_pool(pool)] == [("A", "scores")]


def test_strongest_falls_back_to_the_next_strongest(pool: Path, tmp_path: Path):
    m = select(pool, tmp_path / "o", "strongest")
    rows = read_jsonl(tmp_path / "o" / "strongest" / "strongest_selected.jsonl")
    # q2: C and A are wrong, B is right -> B; everything else -> C
    assert chosen(rows) == [("q1", "C"), ("q2", "B"), ("q3", "C"), ("q4", "C")]
    assert m["teacher_order"] == ["C", "A", "B"] and m["order_source"] == "flags"
    assert m["teacher_accuracy"] == {"C": 0.75, "A": 0.5, "B": 0.5}
    assert m["teacher_share"] == {"C": {"rows": 3, "share": 0.75}, "B": {"rows": 1, "share": 0.25}}
    assert m["skipped"] == {"not_verified_correct": 5}
    assert m["candidates"] == 7 and m["rows_read"] == 12 and m["items"] == 4
    assert rows[1]["score_key"] is None and rows[1]["score_value"] is None and rows[1]["group"] == 0
    assert rows[1]["output"] == "B says 2"
    assert sorted(p.name for p in (tmp_path / "o" / "strongest").iterdir()) == [
        "dataset_info.json", "manifest.json", "strongest_selected.jsonl"]


def test_strongest_with_accuracy_file_and_unverified(pool: Path, tmp_path: Path):
    acc = tmp_path / "acc.json"
    acc.write_text(json.dumps({"A": 0.9, "B": 0.1, "C": 0.2, "other": 1.0}))
    m = select(pool, tmp_path / "o", "strongest", teacher_accuracy=acc)
    # order A, C, B: q2 -> B (A, C wrong), q4 -> C (A wrong)
    assert chosen(read_jsonl(tmp_path / "o" / "strongest" / "strongest_selected.jsonl")) == [
        ("q1", "A"), ("q2", "B"), ("q3", "A"), ("q4", "C")]
    assert m["teacher_order"] == ["other", "A", "C", "B"]
    select(pool, tmp_path / "u", "strongest", verified_only=False)
    assert chosen(read_jsonl(tmp_path / "u" / "strongest" / "strongest_selected.jsonl")) == [
        ("q1", "C"), ("q2", "C"), ("q3", "C"), ("q4", "C")]


@pytest.mark.parametrize("content, message", [
    ('{"A": 1.5}', "accuracy of teacher 'A' must be a number in \\[0, 1\\]"),
    ("[]", "expected a JSON object"),
    ("{", "acc.json:1: invalid JSON"),
    ('{"A": 0.5}', "no accuracy given for teacher\\(s\\): B, C"),
])
def test_strongest_bad_accuracy_file(pool, tmp_path, content, message):
    acc = tmp_path / "acc.json"
    acc.write_text(content)
    with pytest.raises(ScasError, match=message):
        select(pool, tmp_path / "o", "strongest", teacher_accuracy=acc)
    assert not (tmp_path / "o").exists()


def test_strongest_needs_flags_or_a_file(tmp_path: Path):
    d = tmp_path / "p"
    d.mkdir()
    write_jsonl(d / "x.jsonl", [{"id": 1, "teacher_output": "a"}])
    with pytest.raises(ScasError, match="x have no teacher_correct/is_correct flags"):
        select(d, tmp_path / "o", "strongest")


def test_fixed_teacher(pool: Path, tmp_path: Path):
    m = select(pool, tmp_path / "o", "teacher", teacher="B")
    rows = read_jsonl(tmp_path / "o" / "teacher" / "B" / "teacher_B_selected.jsonl")
    assert chosen(rows) == [("q1", "B"), ("q2", "B")]
    assert m["items_without_teacher"] == 2 and m["selected_rows"] == 2
    assert m["parameters"] == {"score_key": None, "verified_only": True, "teacher": "B"}


def test_unknown_teacher_is_an_error(pool: Path, tmp_path: Path):
    with pytest.raises(ScasError, match="unknown teacher 'Z'; teachers in .*: A, B, C"):
        select(pool, tmp_path / "o", "teacher", teacher="Z")
    with pytest.raises(ScasError, match="needs --teacher"):
        select(pool, tmp_path / "o", "teacher")
    with pytest.raises(ScasError, match="--teacher only applies"):
        select(pool, tmp_path / "o", "random", teacher="A")
    assert not (tmp_path / "o").exists()


def test_random_is_seeded_and_uniform_over_candidates(pool: Path, tmp_path: Path):
    # verified candidates per item (ordered by teacher): q1 [A, B, C], q2 [B], q3 [A, C], q4 [C].
    # random.Random(42).choice over sizes 3, 1, 2, 1 -> indices 2, 0, 0, 0;
    # random.Random(1) -> indices 0, 0, 1, 0.
    select(pool, tmp_path / "o", "random", seed=42)
    assert chosen(read_jsonl(tmp_path / "o" / "random" / "seed_42" / "random_seed_42_selected.jsonl")) == [
        ("q1", "C"), ("q2", "B"), ("q3", "A"), ("q4", "C")]
    m = select(pool, tmp_path / "o", "random", seed=1)
    assert chosen(read_jsonl(tmp_path / "o" / "random" / "seed_1" / "random_seed_1_selected.jsonl")) == [
        ("q1", "A"), ("q2", "B"), ("q3", "C"), ("q4", "C")]
    assert m["parameters"]["seed"] == 1


def test_strongest_refuses_flags_that_cannot_rank_the_teachers(tmp_path: Path):
    """A pool of verified answers only: every teacher at 1.0, so only names would be left to rank by."""
    d = tmp_path / "verified_only"
    d.mkdir()
    for t in ("A", "B"):
        write_jsonl(d / f"{t}.jsonl", [{"id": f"q{i}", "instruction": "Q", "teacher_output": f"{t}{i}",
                                        "teacher_correct": True} for i in range(3)])
    with pytest.raises(ScasError, match=r"every teacher has accuracy 1\.000 .*--teacher-accuracy FILE"):
        select(d, tmp_path / "o", "strongest")
    assert not (tmp_path / "o").exists()
    acc = tmp_path / "acc.json"  # verify's format
    acc.write_text(json.dumps({"A": {"correct": 1, "incorrect": 2, "undecided": 0, "total": 3, "accuracy": 1 / 3},
                               "B": {"correct": 2, "incorrect": 1, "undecided": 0, "total": 3, "accuracy": 2 / 3}}))
    m = select(d, tmp_path / "o", "strongest", teacher_accuracy=acc)
    assert m["order_source"] == str(acc) and m["teacher_order"] == ["B", "A"] and "ties_broken_by_name" not in m
    assert m["teacher_share"] == {"B": {"rows": 3, "share": 1.0}}
    manifest = json.loads((tmp_path / "o" / "strongest" / "manifest.json").read_text())
    assert manifest["order_source"] == str(acc)
    acc.write_text(json.dumps({"A": {"correct": 1}, "B": 0.5}))
    with pytest.raises(ScasError, match="teacher 'A' has no \"accuracy\" field"):
        select(d, tmp_path / "o2", "strongest", teacher_accuracy=acc)


def test_baselines_on_score_files_carry_scores_and_ranks(tmp_path: Path):
    d = tmp_path / "s"
    d.mkdir()
    write_jsonl(d / "a_scas_scores.jsonl", [{"id": 1, "scas_score": 0.7, "teacher_correct": True}])
    write_jsonl(d / "b_scas_scores.jsonl", [{"id": 1, "scas_score": 0.2, "teacher_correct": True}])
    write_jsonl(d / "c_scas_scores.jsonl", [{"id": 1, "scas_score": 0.1, "teacher_correct": False}])
    acc = tmp_path / "acc.json"
    acc.write_text('{"a": 0.9, "b": 0.5, "c": 0.99}')
    m = select(d, tmp_path / "o", "strongest", teacher_accuracy=acc)
    row = read_jsonl(tmp_path / "o" / "strongest" / "strongest_selected.jsonl")[0]
    # c is unverified for this item; a beats b; a ranks 2nd of the two verified by score
    assert (row["teacher_name"], row["score_key"], row["score_value"], row["score_rank"]) == ("a", "scas_score", 0.7, 2)
    assert m["input_kind"] == "scores"


def test_baselines_on_the_gsm8k_pool(tmp_path: Path):
    m = select(GSM8K_POOL, tmp_path / "o", "teacher", teacher="gpt3_175b_verification")
    # the pool's README: accuracy 0.563 of 1319 -> 742 verified answers
    assert m["selected_rows"] == 742 and m["items_without_teacher"] == 577 and m["items"] == 1319
    # both human solution sets are flagged 100 % correct: the flags cannot rank them
    with pytest.raises(ScasError, match="human_reference, human_socratic share the top accuracy 1.000.*--teacher-accuracy"):
        select(GSM8K_POOL, tmp_path / "o", "strongest")
    verify(GSM8K_POOL, tmp_path / "v")
    acc = tmp_path / "v" / "teacher_accuracy.json"
    m = select(GSM8K_POOL, tmp_path / "o", "strongest", teacher_accuracy=acc)
    assert m["order_source"] == str(acc) and m["parameters"]["teacher_accuracy_file"] == str(acc)
    assert m["teacher_order"] == ["human_reference", "human_socratic", "gpt3_175b_verification",
                                  "gpt3_6b_verification", "gpt3_175b_finetuning", "gpt3_6b_finetuning"]
    assert m["ties_broken_by_name"] == [["human_reference", "human_socratic"]]  # the file's own tie, recorded
    assert m["teacher_share"] == {"human_reference": {"rows": 1319, "share": 1.0}}


def test_overwrite_replaces_a_baseline_run(pool: Path, tmp_path: Path):
    select(pool, tmp_path / "o", "random", seed=5)
    with pytest.raises(ScasError, match="exists and is not empty"):
        select(pool, tmp_path / "o", "random", seed=5)
    select(pool, tmp_path / "o", "random", seed=5, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "o" / "random" / "seed_5").iterdir()) == [
        "dataset_info.json", "manifest.json", "random_seed_5_selected.jsonl"]
