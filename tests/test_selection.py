"""`scas-jax select`: reference min/groups semantics, hand-computed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from scas_jax.cli import main as cli
from scas_jax.errors import ScasError
from scas_jax.selection.api import select
from scas_jax.selection.strategies import group_for_rank

ROW_FIELDS = [
    "id", "dataset", "split", "system", "instruction", "output", "teacher_output", "reference_answer",
    "reference_output", "category", "teacher_name", "score_key", "score_value", "score_rank", "group",
]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def srow(id_, score, **extra) -> dict:
    """A scored row; answer_mean_nll_score is -score so that it ranks the other way round."""
    row = {"id": id_, "instruction": f"question {id_}", "teacher_output": f"answer {id_}",
           "reference_answer": "1", "scas_score": score,
           "answer_mean_nll_score": None if score is None else -score}
    row.update(extra)
    return row


@pytest.fixture
def scored(tmp_path: Path) -> Path:
    """q1: 5 candidates (a tie between t3 and t4), q2: 2 (a tie broken by teacher name, not
    file order), q3: 1; plus five rows that must be skipped."""
    d = tmp_path / "scored"
    d.mkdir()
    write_jsonl(d / "t1_scas_scores.jsonl", [
        srow("q1", 0.5), srow("q2", 0.2),
        {"instruction": "no id", "scas_score": 0.0},                      # missing_id
        srow("q9", 0.0, scas_scoring_error="too long"),                   # scoring_error
        srow("q9", float("nan")), srow("q9", float("inf")),               # non_finite_score x2
        srow("q8", None),                                                 # missing_score
    ])
    write_jsonl(d / "t2_scas_scores.jsonl", [srow("q1", 0.1)])
    write_jsonl(d / "t3_scas_scores.jsonl", [srow("q1", 0.3), srow("q3", 5)])
    write_jsonl(d / "t4_scas_scores.jsonl", [srow("q1", 0.3)])
    write_jsonl(d / "t5_scas_scores.jsonl", [srow("q1", 0.9)])
    # the file sorts last but its teacher_name sorts first
    write_jsonl(d / "x_scas_scores.jsonl", [srow("q2", 0.2, teacher_name="alpha")])
    return d


def picks(rows: list[dict]) -> list[tuple]:
    return [(r["id"], r["teacher_name"], r["score_rank"], r["group"]) for r in rows]


def test_group_formula_by_hand():
    # n=5, G=3: ceil(0.6), ceil(1.2), ceil(1.8), ceil(2.4), ceil(3.0)
    assert [group_for_rank(r, 5, 3) for r in range(5)] == [1, 2, 2, 3, 3]
    # fewer candidates than groups: n=2, G=3 -> ceil(1.5)=2, ceil(3)=3 (group 1 empty)
    assert [group_for_rank(r, 2, 3) for r in range(2)] == [2, 3]
    assert [group_for_rank(0, 1, 5)] == [5]
    assert [group_for_rank(r, 10, 5) for r in range(10)] == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]


def test_groups_seed_42_by_hand(scored: Path, tmp_path: Path):
    # random.Random(42) draws, in order: q1 g1 over 1, g2 over 2, g3 over 2; q2 g2 over 1,
    # g3 over 1; q3 g3 over 1 -> indices 0, 0, 1, 0, 0, 0. (Drawing only for the selected
    # group would give index 0 for q1 g3: the singleton draws matter.)
    out = tmp_path / "out"
    m = select(scored, out, "groups", num_groups=3, selected_group=3, seed=42)
    root = out / "scas_score" / "3_groups"
    assert sorted(p.name for p in root.iterdir()) == [
        "dataset_info.json", "group_1.jsonl", "group_2.jsonl", "group_3.jsonl", "manifest.json",
        "selected_group_3.jsonl",
    ]
    assert picks(read_jsonl(root / "group_1.jsonl")) == [("q1", "t2", 1, 1)]
    assert picks(read_jsonl(root / "group_2.jsonl")) == [("q1", "t3", 2, 2), ("q2", "alpha", 1, 2)]
    g3 = [("q1", "t5", 5, 3), ("q2", "t1", 2, 3), ("q3", "t3", 1, 3)]
    assert picks(read_jsonl(root / "group_3.jsonl")) == g3
    assert picks(read_jsonl(root / "selected_group_3.jsonl")) == g3
    assert [r["score_value"] for r in read_jsonl(root / "group_3.jsonl")] == [0.9, 0.2, 5.0]

    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest == json.loads(json.dumps(m))
    assert manifest["missing_groups"] == {"1": 2, "2": 1, "3": 0}
    assert manifest["group_counts"] == {"group_1.jsonl": 1, "group_2.jsonl": 2, "group_3.jsonl": 3}
    assert manifest["selected_count"] == 3 and manifest["selected_rows"] == 3
    assert manifest["items"] == 3 and manifest["rows_read"] == 13 and manifest["candidates"] == 8
    assert manifest["skipped"] == {"missing_id": 1, "missing_score": 1, "non_finite_score": 2, "scoring_error": 1}
    assert manifest["strategy"] == "groups"
    assert manifest["parameters"] == {"score_key": "scas_score", "verified_only": False, "num_groups": 3,
                                      "selected_group": 3, "seed": 42}
    assert manifest["teacher_share"] == {"t1": {"rows": 1, "share": round(1 / 3, 6)},
                                         "t3": {"rows": 1, "share": round(1 / 3, 6)},
                                         "t5": {"rows": 1, "share": round(1 / 3, 6)}}
    assert set(manifest["input_checksums"]) == {f"t{i}_scas_scores.jsonl" for i in range(1, 6)} | {"x_scas_scores.jsonl"}
    assert all(v.startswith("sha256:") and len(v) == 71 for v in manifest["input_checksums"].values())
    info = json.loads((root / "dataset_info.json").read_text())
    columns = {"system": "system", "prompt": "instruction", "response": "output"}
    assert info == {
        **{f"group_{g}": {"file_name": f"group_{g}.jsonl", "columns": columns} for g in (1, 2, 3)},
        "selected_group_3": {"file_name": "selected_group_3.jsonl", "columns": columns},
    }


def test_groups_other_seed_changes_draws(scored: Path, tmp_path: Path):
    # random.Random(0) draws 0, 1, 0, 0, 0, 0: q1 g2 takes t4 (rank 3), q1 g3 takes t1 (rank 4).
    select(scored, tmp_path / "o", "groups", num_groups=3, selected_group=2, seed=0)
    root = tmp_path / "o" / "scas_score" / "3_groups"
    assert picks(read_jsonl(root / "group_2.jsonl")) == [("q1", "t4", 3, 2), ("q2", "alpha", 1, 2)]
    assert picks(read_jsonl(root / "group_3.jsonl")) == [("q1", "t1", 4, 3), ("q2", "t1", 2, 3), ("q3", "t3", 1, 3)]
    assert picks(read_jsonl(root / "selected_group_2.jsonl")) == [("q1", "t4", 3, 2), ("q2", "alpha", 1, 2)]
    # the same seed twice gives byte-identical files
    select(scored, tmp_path / "p", "groups", num_groups=3, selected_group=2, seed=0)
    for name in ("group_1.jsonl", "group_2.jsonl", "group_3.jsonl", "selected_group_2.jsonl"):
        assert (root / name).read_bytes() == (tmp_path / "p" / "scas_score" / "3_groups" / name).read_bytes()


def test_min_and_row_format(scored: Path, tmp_path: Path):
    out = tmp_path / "out"
    m = select(scored, out, "min")
    root = out / "scas_score"
    assert sorted(p.name for p in root.iterdir()) == ["dataset_info.json", "manifest.json", "min_score_selected.jsonl"]
    rows = read_jsonl(root / "min_score_selected.jsonl")
    assert picks(rows) == [("q1", "t2", 1, 0), ("q2", "alpha", 1, 0), ("q3", "t3", 1, 0)]
    assert list(rows[0]) == ROW_FIELDS
    assert rows[0] == {
        "id": "q1", "dataset": None, "split": None, "system": "You are a helpful assistant.",
        "instruction": "question q1", "output": "answer q1", "teacher_output": "answer q1",
        "reference_answer": "1", "reference_output": None, "category": "", "teacher_name": "t2",
        "score_key": "scas_score", "score_value": 0.1, "score_rank": 1, "group": 0,
    }
    assert m["items"] == 3 and m["selected_rows"] == 3 and m["score_key"] == "scas_score"
    assert json.loads((root / "dataset_info.json").read_text()) == {
        "min_score_selected": {"file_name": "min_score_selected.jsonl",
                               "columns": {"system": "system", "prompt": "instruction", "response": "output"}}}


def test_min_with_another_score_key(scored: Path, tmp_path: Path):
    # answer_mean_nll_score = -scas_score: q1 -> t5 (-0.9); q2 tie at -0.2 -> alpha (name order)
    select(scored, tmp_path / "o", "min", score_key="answer_mean_nll_score")
    rows = read_jsonl(tmp_path / "o" / "answer_mean_nll_score" / "min_score_selected.jsonl")
    assert [(r["id"], r["teacher_name"], r["score_value"]) for r in rows] == [
        ("q1", "t5", -0.9), ("q2", "alpha", -0.2), ("q3", "t3", -5.0)]
    assert {r["score_key"] for r in rows} == {"answer_mean_nll_score"}


def test_item_order_is_the_json_key_order_and_row_fallbacks(tmp_path: Path):
    # keys json.dumps(id): '"b"' < '10' < '9' (string order); numeric strings are scores too
    d = tmp_path / "s"
    d.mkdir()
    write_jsonl(d / "t_scas_scores.jsonl", [
        {"id": 9, "instruction": "nine", "output": "o9", "answer": "A9", "scas_score": "0.5",
         "source_dataset": "gsm8k", "split": "test", "category": "math", "system": "",
         "reference_output": "R9"},
        {"id": 10, "instruction": "ten", "teacher_output": "o10", "scas_score": 1, "dataset": "own",
         "source_dataset": "ignored", "system": "Be brief.", "teacher": "from_teacher_field"},
        {"id": "b", "teacher_output": "ob", "scas_score": 2.5},
    ])
    select(d, tmp_path / "o", "min")
    rows = read_jsonl(tmp_path / "o" / "scas_score" / "min_score_selected.jsonl")
    assert [r["id"] for r in rows] == ["b", 10, 9]
    b, ten, nine = rows
    assert (b["instruction"], b["reference_answer"], b["teacher_name"], b["dataset"]) == ("", None, "t", None)
    assert (ten["dataset"], ten["system"], ten["teacher_name"], ten["score_value"]) == ("own", "Be brief.", "from_teacher_field", 1.0)
    assert nine == {
        "id": 9, "dataset": "gsm8k", "split": "test", "system": "You are a helpful assistant.",
        "instruction": "nine", "output": "o9", "teacher_output": "o9", "reference_answer": "A9",
        "reference_output": "R9", "category": "math", "teacher_name": "t", "score_key": "scas_score",
        "score_value": 0.5, "score_rank": 1, "group": 0,
    }


def test_groups_and_min_share_an_output_dir(scored: Path, tmp_path: Path):
    out = tmp_path / "out"
    select(scored, out, "groups")
    select(scored, out, "min")
    root = out / "scas_score"
    assert sorted(p.name for p in root.iterdir()) == ["5_groups", "dataset_info.json", "manifest.json", "min_score_selected.jsonl"]
    # G=5 and q1 has 5 candidates: one per group; q2 (n=2) fills groups 3 and 5; q3 group 5
    m = json.loads((root / "5_groups" / "manifest.json").read_text())
    assert m["missing_groups"] == {"1": 2, "2": 2, "3": 1, "4": 2, "5": 0}
    assert picks(read_jsonl(root / "5_groups" / "selected_group_1.jsonl")) == [("q1", "t2", 1, 1)]
    with pytest.raises(ScasError, match="exists and is not empty"):
        select(scored, out, "groups")
    with pytest.raises(ScasError, match="already has"):
        select(scored, out, "min")
    select(scored, out, "min", overwrite=True)


def test_verified_only_for_groups(tmp_path: Path):
    d = tmp_path / "s"
    d.mkdir()
    write_jsonl(d / "a_scas_scores.jsonl", [srow("q", 0.1, teacher_correct=False)])
    write_jsonl(d / "b_scas_scores.jsonl", [srow("q", 0.2, teacher_correct=True)])
    write_jsonl(d / "c_scas_scores.jsonl", [srow("q", 0.3)])  # no flag: kept
    m = select(d, tmp_path / "all", "min")
    assert m["teacher_share"] == {"a": {"rows": 1, "share": 1.0}}
    m = select(d, tmp_path / "ver", "min", verified_only=True)
    assert m["teacher_share"] == {"b": {"rows": 1, "share": 1.0}}
    assert m["skipped"] == {"not_verified_correct": 1}


# --- bad input: clear errors, nothing left behind -------------------------------------



@pytest.mark.parametrize("extra, message", [
    (["--selected-group", "6"], "--selected-group must be between 1 and --num-groups \\(5\\), got 6"),
    (["--selected-group", "0"], "--selected-group must be between 1"),
    (["--num-groups", "0"], "--num-groups must be >= 1"),
    (["--score-key", "nope"], "score key 'nope' is in no row"),
])
def test_bad_arguments_exit_2_and_write_nothing(scored, tmp_path, capsys, extra, message):
    out = tmp_path / "new" / "out"
    assert cli(["select", "--input-dir", str(scored), "--output-dir", str(out), *extra]) == 2
    assert pytest.importorskip("re").search(message, capsys.readouterr().err)
    assert not (tmp_path / "new").exists()


def test_missing_score_key_names_the_available_fields(scored, tmp_path):
    with pytest.raises(ScasError, match="answer_mean_nll_score, scas_score"):
        select(scored, tmp_path / "o", "min", score_key="scas_scor")


def test_no_score_files(tmp_path):
    (tmp_path / "pool").mkdir()
    write_jsonl(tmp_path / "pool" / "t.jsonl", [{"id": 1}])
    with pytest.raises(ScasError, match=r"no \*_scas_scores.jsonl score files .*found t.jsonl"):
        select(tmp_path / "pool", tmp_path / "o", "groups")
    with pytest.raises(ScasError, match="does not exist"):
        select(tmp_path / "missing", tmp_path / "o", "min")
    assert not (tmp_path / "o").exists()


def test_empty_pool_and_all_rows_skipped(tmp_path):
    d = tmp_path / "s"
    d.mkdir()
    (d / "t_scas_scores.jsonl").write_text("\n")
    with pytest.raises(ScasError, match="empty pool"):
        select(d, tmp_path / "o", "min")
    write_jsonl(d / "t_scas_scores.jsonl", [srow("q", float("nan")), srow("r", float("-inf"))])
    with pytest.raises(ScasError, match="no candidates left .*non_finite_score=2"):
        select(d, tmp_path / "o", "groups")
    assert not (tmp_path / "o").exists()


def test_bad_json_names_file_and_line(tmp_path):
    d = tmp_path / "s"
    d.mkdir()
    (d / "t_scas_scores.jsonl").write_text('{"id": 1, "scas_score": 1}\n\n{"id": 2,\n')
    with pytest.raises(ScasError, match=r"t_scas_scores.jsonl:3: malformed JSON"):
        select(d, tmp_path / "o", "min")
    (d / "t_scas_scores.jsonl").write_text('[1, 2]\n')
    with pytest.raises(ScasError, match=r"t_scas_scores.jsonl:1: expected a JSON object, got list"):
        select(d, tmp_path / "o", "min")


def test_non_finite_scores_are_never_selected(tmp_path):
    d = tmp_path / "s"
    d.mkdir()
    write_jsonl(d / "a_scas_scores.jsonl", [srow("q", float("-inf"))])  # would win if kept
    write_jsonl(d / "b_scas_scores.jsonl", [srow("q", 3.0)])
    m = select(d, tmp_path / "o", "groups", num_groups=2, selected_group=2)
    assert m["skipped"] == {"non_finite_score": 1}
    assert m["missing_groups"] == {"1": 1, "2": 0}
    rows = read_jsonl(tmp_path / "o" / "scas_score" / "2_groups" / "selected_group_2.jsonl")
    assert [(r["teacher_name"], r["score_value"]) for r in rows] == [("b", 3.0)]
    assert all(math.isfinite(r["score_value"]) for r in rows)


def test_cli_success_prints_summary(scored, tmp_path, capsys):
    out = tmp_path / "o"
    assert cli(["select", "--input-dir", str(scored), "--output-dir", str(out), "--strategy", "groups",
                "--num-groups", "3", "--selected-group", "3"]) == 0
    text = capsys.readouterr().out
    assert "items=3 selected=3 skipped_rows=5" in text
    assert (out / "scas_score" / "3_groups" / "selected_group_3.jsonl").exists()


def test_groups_match_a_literal_reading_of_the_method_page(tmp_path):
    """200 random items (1-7 candidates, many score ties) against the method page, line by line."""
    import random

    gen = random.Random(123)
    teachers = ["t0", "t1", "t2", "t3", "t4", "t5", "t6"]
    files: dict[str, list[dict]] = {t: [] for t in teachers}
    for i in range(200):
        for t in gen.sample(teachers, gen.randint(1, 7)):
            files[t].append({"id": {"n": i} if i % 3 else i, "instruction": "q", "teacher_output": t,
                             "scas_score": gen.choice([0.1, 0.2, 0.3, gen.random()])})
    d = tmp_path / "s"
    d.mkdir()
    for t, rows in files.items():
        write_jsonl(d / f"{t}_scas_scores.jsonl", rows)

    # the method page: key json.dumps(id, ensure_ascii=False, sort_keys=True); items ascending;
    # sort by (score, str(teacher)); group min(G, max(1, ceil((r+1)G/n))); one Random(seed);
    # for each item, groups 1..G, one choice per non-empty group over (rank, candidate)
    G, seed = 4, 9
    by_key: dict[str, list[tuple[float, str]]] = {}
    for t in teachers:  # files in name order, rows in line order
        for r in files[t]:
            by_key.setdefault(json.dumps(r["id"], ensure_ascii=False, sort_keys=True), []).append((r["scas_score"], t))
    rng = random.Random(seed)
    expected: dict[int, list[tuple[str, int]]] = {g: [] for g in range(1, G + 1)}
    for key in sorted(by_key):
        ranked_ = sorted(by_key[key], key=lambda c: (c[0], str(c[1])))
        groups = {g: [] for g in range(1, G + 1)}
        for r, c in enumerate(ranked_):
            groups[min(G, max(1, math.ceil((r + 1) * G / len(ranked_))))].append((r + 1, c))
        for g in range(1, G + 1):
            if groups[g]:
                rank, c = rng.choice(groups[g])
                expected[g].append((c[1], rank))

    select(d, tmp_path / "o", "groups", num_groups=G, selected_group=2, seed=seed)
    root = tmp_path / "o" / "scas_score" / f"{G}_groups"
    for g in range(1, G + 1):
        got = [(r["teacher_name"], r["score_rank"]) for r in read_jsonl(root / f"group_{g}.jsonl")]
        assert got == expected[g]
    assert len(expected[1]) < 200  # items with fewer than G candidates have no group 1
