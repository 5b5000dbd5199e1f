"""`scas-jax report`: from a small hand-made fixture and from real SmolLM2 scores of GSM8K."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from scas_jax.cli import main as cli
from scas_jax.judging.verify import verify
from scas_jax.reporting.report import report
from scas_jax.selection.api import select

REAL_SCORES = Path(__file__).parent / "fixtures" / "selection" / "gsm8k_smollm2"
PNG = b"\x89PNG\r\n\x1a\n"


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def row(id_, teacher, score, ok, words):
    return {"id": id_, "teacher_name": teacher, "instruction": f"Q{id_}", "teacher_output": " ".join(["w"] * words),
            "reference_answer": "1", "teacher_correct": ok, "scas_score": score, "answer_mean_nll_score": 2 * score}


@pytest.fixture
def small(tmp_path: Path) -> tuple[Path, Path]:
    """Teachers a, b on items 1-4; b's item 4 has an infinite score (left out, never selected)."""
    scores = tmp_path / "scores"
    scores.mkdir()
    write_jsonl(scores / "a_scas_scores.jsonl", [
        row(1, "a", 0.1, True, 2), row(2, "a", 0.5, True, 4), row(3, "a", 0.2, False, 6), row(4, "a", 0.9, True, 8)])
    write_jsonl(scores / "b_scas_scores.jsonl", [
        row(1, "b", 0.3, True, 10), row(2, "b", 0.4, True, 10), row(3, "b", 0.1, True, 10),
        row(4, "b", float("inf"), False, 10)])
    sel = tmp_path / "sel"
    select(scores, sel, "min")              # 1 -> a, 2 -> b, 3 -> b, 4 -> a
    select(scores, sel, "teacher", teacher="a")  # verified: 1, 2, 4 -> a
    return scores, sel


def test_report_from_small_fixture(small, tmp_path):
    scores, sel = small
    s = report(scores, [sel], tmp_path / "rep")
    out = tmp_path / "rep"
    assert sorted(p.name for p in out.iterdir()) == ["figures", "picks.csv", "report.json", "report.md"]
    figures = sorted(p.name for p in (out / "figures").iterdir())
    assert figures == ["agreement.png", "score_1_scas_score.png", "score_2_answer_mean_nll_score.png",
                       "teacher_share.png", "teachers.png"]
    assert all((out / "figures" / f).read_bytes()[:8] == PNG for f in figures)

    assert s == {**json.loads((out / "report.json").read_text()), "report": str(out / "report.md")}
    # flags among the scored rows are counted, but without --verified accuracy is unknown
    assert s["teachers"]["a"] == {"rows": 4, "correct": 3, "incorrect": 1, "undecided": 0, "accuracy": None,
                                  "median_words": 5.0, "scoring_errors": 0}
    assert s["teachers"]["b"]["accuracy"] is None and s["teachers"]["b"]["median_words"] == 10
    assert s["accuracy"] == {"source": None, "teachers": {}, "verify_manifest_check": None}
    f = s["fields"]["scas_score"]
    assert f["skipped_rows"] == 1
    assert f["median"] == {"a": pytest.approx(0.35), "b": pytest.approx(0.3)}
    assert s["fields"]["answer_mean_nll_score"]["median"]["b"] == pytest.approx(0.6)

    by_label = {x["label"]: x for x in s["selections"]}
    assert list(by_label) == ["min scas_score", "teacher a"]
    m = by_label["min scas_score"]
    assert m["teacher_share"] == {"a": 0.5, "b": 0.5}
    assert m["rows"] == 4 and m["verified_share"] == 1.0       # a1, b2, b3, a4 are all flagged correct
    assert m["mean_words"] == 7.5                              # (2 + 10 + 10 + 8) / 4
    assert m["mean_score"] == pytest.approx((0.1 + 0.4 + 0.1 + 0.9) / 4)
    assert by_label["teacher a"]["teacher_share"] == {"a": 1.0} and by_label["teacher a"]["rows"] == 3
    # min vs teacher a: items 1, 2, 4 in common; same teacher on 1 and 4
    assert s["agreement"]["same_common"] == [[[4, 4], [2, 3]], [[2, 3], [3, 3]]]
    assert s["agreement"]["all_agree"] == [2, 3]

    md = (out / "report.md").read_text()
    assert "| a | 4 | 3 | 1 | 0 | 5 | 0 | 0.35 |" in md
    assert "**Teacher accuracy is unknown here.**" in md and "Teacher accuracy is **unknown**" in md
    assert "Most accurate" not in md
    assert "| rows left out | 1 | 1 |" in md
    assert "| min scas_score | 50.0% | 50.0% |" in md
    assert "| (1) min scas_score | 100% of 4 | 67% of 3 |" in md
    assert "All 2 selections chose the same teacher on 2 of the 3 items they all cover (66.7%)." in md
    assert "Lowest median `scas_score` (cheapest for this student to learn): **b** (0.3)" in md
    for fig in figures:
        assert f"](figures/{fig})" in md


def test_report_from_a_raw_pool_without_selections(tmp_path):
    pool = tmp_path / "pool"
    pool.mkdir()
    write_jsonl(pool / "t.jsonl", [{"id": 1, "teacher_output": "a b c", "teacher_correct": None}])
    s = report(pool, [], tmp_path / "rep")
    assert s["input_kind"] == "candidates" and s["fields"] == {} and s["selections"] == []
    assert s["teachers"]["t"]["undecided"] == 1 and s["teachers"]["t"]["accuracy"] is None
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "No score fields" in md and "No selections given" in md
    assert sorted(p.name for p in (tmp_path / "rep" / "figures").iterdir()) == ["teachers.png"]



def test_report_bad_input(small, tmp_path, capsys):
    scores, sel = small
    out = tmp_path / "new" / "rep"
    cases = [
        (["--scores", str(tmp_path / "nope")], "does not exist"),
        (["--scores", str(scores), "--fields", "nope"], "score field(s) nope hold no finite number"),
        (["--scores", str(scores), "--selections", str(scores)], "no selection manifest.json"),
        (["--scores", str(scores), "--selections", str(tmp_path / "missing")], "does not exist"),
    ]
    for extra, message in cases:
        assert cli(["report", *extra, "--out", str(out)]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "new").exists()
    assert cli(["report", "--scores", str(scores), "--out", str(out)]) == 0
    assert cli(["report", "--scores", str(scores), "--out", str(out)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert cli(["report", "--scores", str(scores), "--out", str(out), "--overwrite", "--fields", "answer_mean_nll_score"]) == 0


def test_report_from_real_scores(tmp_path):
    """SmolLM2-135M-Instruct scores of the first 20 GSM8K items (tests/fixtures/selection/make_gsm8k_scores.py)."""
    files = sorted(p.name for p in REAL_SCORES.glob("*_scas_scores.jsonl"))
    assert len(files) == 6
    sel = tmp_path / "sel"
    select(REAL_SCORES, sel, "groups")                    # every item has n = 6 >= G = 5 candidates
    select(REAL_SCORES, sel, "min")
    select(REAL_SCORES, sel / "verified", "min", verified_only=True)
    verify(REAL_SCORES, tmp_path / "judged")  # the judge's verdicts and teacher_accuracy.json
    select(REAL_SCORES, sel, "strongest", teacher_accuracy=tmp_path / "judged" / "teacher_accuracy.json")
    select(REAL_SCORES, sel, "random", seed=3)
    s = report(REAL_SCORES, [sel], tmp_path / "rep", verified=tmp_path / "judged")
    assert len(s["teachers"]) == 6 and all(t["rows"] == 20 for t in s["teachers"].values())
    assert s["teachers"]["human_reference"]["accuracy"] == 1.0
    assert s["teachers"]["gpt3_6b_finetuning"]["accuracy"] < 0.5
    assert s["accuracy"]["verify_manifest_check"] == []
    assert list(s["fields"])[:3] == ["scas_score", "scas_score_no_diag", "answer_mean_nll_score"]
    assert s["fields"]["scas_score"]["skipped_rows"] == 0
    assert all(0 < v < 50 for v in s["fields"]["scas_score"]["median"].values())
    labels = [x["label"] for x in s["selections"]]
    assert labels == ["min scas_score", "min scas_score #2", "groups scas_score G=5 g=1", "strongest", "random seed=3"]
    for x in s["selections"]:
        assert x["rows"] == 20
        assert sum(x["teacher_share"].values()) == pytest.approx(1.0)
    by_path = {Path(x["manifest"]).parent.relative_to(sel).as_posix(): x for x in s["selections"]}
    assert by_path["verified/scas_score"]["verified_share"] == 1.0
    assert by_path["strongest"]["teacher_share"] == {"human_reference": 1.0}
    assert by_path["random/seed_3"]["verified_share"] == 1.0
    # n = 6, G = 5: group 1 holds exactly rank 1, so groups g=1 and min (both over all rows) agree on all 20
    i, j = labels.index("groups scas_score G=5 g=1"), [k for k, x in enumerate(s["selections"])
                                                       if Path(x["manifest"]).parent == sel / "scas_score"][0]
    assert s["agreement"]["same_common"][i][j] == [20, 20]
    assert [row[k] for k, row in enumerate(s["agreement"]["same_common"])] == [[20, 20]] * 5
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "## Score distributions" in md and "what each group holds" in md
    assert (tmp_path / "rep" / "figures" / f"groups_{i + 1}.png").read_bytes()[:8] == PNG


def test_report_flags_groups_that_miss_items(tmp_path):
    """With verified answers only, most GSM8K items have fewer than 5 candidates, so no group 1."""
    verified = {}
    for path in REAL_SCORES.glob("*_scas_scores.jsonl"):
        for line in path.read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            verified[r["id"]] = verified.get(r["id"], 0) + (r["teacher_correct"] is True)
    covered = sum(1 for n in verified.values() if n >= 5)  # group 1 of G=5 is non-empty iff n >= 5
    select(REAL_SCORES, tmp_path / "sel", "groups", verified_only=True)
    report(REAL_SCORES, [tmp_path / "sel"], tmp_path / "rep")
    md = (tmp_path / "rep" / "report.md").read_text()
    assert 0 < covered < 20
    assert (f"**Note:** `groups scas_score G=5 g=1` covers only {covered} of 20 items: {20 - covered} items "
            "have no answer in group 1") in md


def test_picks_show_the_choice_beside_every_alternative(small, tmp_path):
    scores, sel = small
    report(scores, [sel], tmp_path / "rep")
    with open(tmp_path / "rep" / "picks.csv", encoding="utf-8", newline="") as f:
        lines = list(csv.DictReader(f))
    mins = [r for r in lines if r["selection"] == "min scas_score"]
    assert [(r["id"], r["teacher"], r["score"], r["rank"], r["chosen"], r["skipped"]) for r in mins] == [
        ("1", "a", "0.1", "1", "1", ""), ("1", "b", "0.3", "2", "0", ""),
        ("2", "b", "0.4", "1", "1", ""), ("2", "a", "0.5", "2", "0", ""),
        ("3", "b", "0.1", "1", "1", ""), ("3", "a", "0.2", "2", "0", ""),
        ("4", "a", "0.9", "1", "1", ""), ("4", "b", "", "", "0", "non finite score"),
    ]
    assert {r["verdict"] for r in mins if (r["id"], r["teacher"]) == ("3", "a")} == {"incorrect"}
    # `teacher a` (a baseline, verified answers only) also ranks by score: a's answer to 2 is 2nd of 2
    mine = [r for r in lines if r["selection"] == "teacher a"]
    assert [(r["id"], r["teacher"], r["rank"], r["chosen"]) for r in mine if r["chosen"] == "1"] == [
        ("1", "a", "1", "1"), ("2", "a", "2", "1"), ("4", "a", "1", "1")]
    assert ("3", "a", "not verified") not in {(r["id"], r["teacher"], r["skipped"]) for r in mine}  # item 3 not picked
    # the rank of every pick is the score_rank select wrote
    for path in sel.rglob("*_selected.jsonl"):
        label = "min scas_score" if "min" in path.name else "teacher a"
        written = {str(r["id"]): str(r["score_rank"]) for r in map(json.loads, path.read_text().splitlines())}
        assert {r["id"]: r["rank"] for r in lines if r["selection"] == label and r["chosen"] == "1"} == written
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "## What was picked" in md and "### (1) min scas_score" in md
    assert "| `3` | **b** 0.1 (rank 1 of 2) | **b 0.1** · a 0.2 ✗ |" in md
    assert "| `4` | **a** 0.9 (rank 1 of 1) | **a 0.9** · ~~b – ✗~~ (non finite score) |" in md


def test_report_accuracy_comes_from_verify_over_all_answers(tmp_path):
    """Scores hold only the answers flagged correct (what `score` keeps); accuracy must not read 100 %."""
    pool = tmp_path / "pool"
    pool.mkdir()
    answers = {"a": ["A: 1", "A: 2", "A: 3", "no marker"], "b": ["#### 1", "#### 2", "#### 9", "#### 4"]}
    for t, outs in answers.items():
        write_jsonl(pool / f"{t}.jsonl", [{"id": i + 1, "instruction": f"Q{i + 1}", "teacher_output": o,
                                           "reference_answer": str(i + 1)} for i, o in enumerate(outs)])
    judged = tmp_path / "judged"
    vm = verify(pool, judged)
    scores = tmp_path / "scores"
    scores.mkdir()
    for t in answers:
        rows = [json.loads(x) for x in (judged / f"{t}.jsonl").read_text().splitlines()]
        write_jsonl(scores / f"{t}_scas_scores.jsonl",
                    [{**r, "scas_score": 0.1 * r["id"]} for r in rows if r["teacher_correct"] is True])
    s = report(scores, [], tmp_path / "rep", verified=judged)
    for t, counts in vm["teachers"].items():  # equal to the verify manifest's numbers
        mine = s["accuracy"]["teachers"][t]
        assert (mine["total"], mine["correct"], mine["incorrect"], mine["undecided"]) == (
            counts["rows"], counts["correct"], counts["incorrect"], counts["undecided"])
        assert round(mine["accuracy"], 6) == counts["accuracy"] == round(s["teachers"][t]["accuracy"], 6)
    assert s["teachers"]["a"]["accuracy"] == 0.75 and s["teachers"]["b"]["accuracy"] == 0.75
    assert s["accuracy"]["teachers"]["a"]["undecided"] == 1 and s["accuracy"]["verify_manifest_check"] == []
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| a | 4 | 3 | 0 | 1 | 75.0% | 3 | 3 | 0 | 0 |" in md
    assert "The counts equal those of its `verify_manifest.json`." in md
    assert "Most accurate teacher" in md and "unknown" not in md
    # without --verified the same scores would look 100 % accurate: the report says unknown instead
    s2 = report(scores, [], tmp_path / "rep2")
    assert all(t["accuracy"] is None and t["correct"] == t["rows"] for t in s2["teachers"].values())
    # a manifest that disagrees with the rows is reported, not hidden
    m = json.loads((judged / "verify_manifest.json").read_text())
    m["teachers"]["a"]["correct"] = 4
    (judged / "verify_manifest.json").write_text(json.dumps(m))
    s3 = report(scores, [], tmp_path / "rep3", verified=judged)
    assert s3["accuracy"]["verify_manifest_check"] == ["a: correct 3 in the rows, 4 in the manifest"]
    assert "**Warning:** the rows disagree" in (tmp_path / "rep3" / "report.md").read_text()
    assert cli(["report", "--scores", str(scores), "--verified", str(judged), "--out", str(tmp_path / "r4")]) == 0
    assert json.loads((tmp_path / "r4" / "report.json").read_text())["accuracy"]["source"] == str(judged)
