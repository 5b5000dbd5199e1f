"""`scas-jax experiment` end to end on a tiny student (configs/experiment/smoke.yaml):
every arm trains on one answer per training question, the arms choose what they say,
results carry finite numbers and intervals, reruns skip finished runs and redo changed
ones, and bad configs fail with errors that name the fix."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import tiny_chat
import yaml

from scas_jax.cli import main

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "experiment" / "smoke.yaml"


def _lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return tiny_chat.make_student_dir(tmp_path_factory.mktemp("experiment") / "tiny")


@pytest.fixture(scope="module")
def smoke(student, tmp_path_factory):
    out = tmp_path_factory.mktemp("experiment") / "out"
    args = ["experiment", "--config", str(SMOKE), "--out", str(out), "--set", f"student={student}",
            "--no-progress"]
    assert main(args) == 0
    return out, args


def _finite_ci(ci):
    return ci is not None and len(ci) == 2 and all(math.isfinite(x) for x in ci) and ci[0] <= ci[1]


def test_results_have_every_arm_with_finite_numbers(smoke):
    out, _ = smoke
    cfg = yaml.safe_load(SMOKE.read_text())
    res = json.loads((out / "results.json").read_text())
    assert [a["arm"] for a in res["arms"]] == cfg["arms"]
    for a in res["arms"]:
        assert math.isfinite(a["heldout_nll"]) and _finite_ci(a["heldout_nll_ci"])
        assert a["heldout_nll_ci"][0] <= a["heldout_nll"] <= a["heldout_nll_ci"][1]
        assert 0.0 <= a["accuracy"] <= 1.0 and _finite_ci(a["accuracy_ci"])
        assert _finite_ci(a["heldout_nll_diff_ci"])
        trained = a["arm"] != "base"
        assert len(a["seeds"]) == (len(cfg["seeds"]) if trained else 1)
        if trained:
            assert a["train_examples"] == 12 and abs(sum(a["teacher_shares"].values()) - 1) < 1e-4
    # training lowered the held-out NLL of this random student (lr 1e-3, 2 steps)
    nll = {a["arm"]: a["heldout_nll"] for a in res["arms"]}
    assert nll["scas_min"] < nll["base"]
    assert len(res["runs"]) == 1 + (len(cfg["arms"]) - 1) * len(cfg["seeds"])
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + len(cfg["arms"])
    md = (out / "results.md").read_text()
    assert all(f"| {arm} |" in md for arm in cfg["arms"])
    for fig in ("heldout_nll.png", "accuracy.png", "teacher_shares.png"):
        assert (out / "figures" / fig).stat().st_size > 1000
    # outputs stay small: no optimiser checkpoints, no fine-tuned weights once evaluated
    assert not list(out.glob("runs/**/checkpoints")) and not list(out.glob("runs/**/final"))


def test_arm_files_one_answer_per_training_question(smoke):
    out, _ = smoke
    split = json.loads((out / "data" / "split.json").read_text())
    train, held = split["train"], split["heldout"]
    assert len(train) == 12 and len(held) == 4 and not set(train) & set(held)
    files = sorted((out / "arms").glob("*.jsonl"))
    assert {f.name for f in files} == {"scas_min.jsonl", "nll_min.jsonl", "strongest.jsonl"}
    for f in files:
        rows = _lines(f)
        assert sorted(r["id"] for r in rows) == train, f.name
        assert all(r["output"] for r in rows)
    # held-out answers are verified answers of held-out questions only
    held_rows = [r for p in (out / "data" / "heldout_pool").glob("*.jsonl") for r in _lines(p)]
    assert held_rows and all(r["id"] in held and r["teacher_correct"] is True for r in held_rows)


def test_strongest_is_the_most_accurate_teacher_on_the_train_split(smoke):
    out, _ = smoke
    train = set(json.loads((out / "data" / "split.json").read_text())["train"])
    acc = {}
    verified = {}
    for p in (out / "data" / "verified").glob("*.jsonl"):
        rows = [r for r in _lines(p) if r["id"] in train]
        acc[p.stem] = sum(r["teacher_correct"] is True for r in rows) / len(rows)
        verified[p.stem] = {r["id"] for r in rows if r["teacher_correct"] is True}
    order = sorted(acc, key=lambda t: (-acc[t], t))
    assert acc[order[0]] > acc[order[1]]  # the smoke split has a clear winner
    for r in _lines(out / "arms" / "strongest.jsonl"):
        expected = next(t for t in order if r["id"] in verified[t])
        assert r["teacher_name"] == expected


def test_nll_min_picks_the_lowest_answer_mean_nll(smoke):
    out, _ = smoke
    best = {}
    for p in (out / "scored").glob("*_scas_scores.jsonl"):
        for r in _lines(p):
            key = (r["answer_mean_nll"], r["teacher_name"])
            best[r["id"]] = min(best.get(r["id"], key), key)
    picks = {r["id"]: (r["score_value"], r["teacher_name"]) for r in _lines(out / "arms" / "nll_min.jsonl")}
    assert picks == best
    scas = {r["id"]: r["teacher_name"] for r in _lines(out / "arms" / "scas_min.jsonl")}
    assert set(scas) == set(picks)


def test_other_arms_choose_as_documented(smoke, tmp_path):
    from scas_jax.experiment.arms import write_arm_file

    out, _ = smoke
    train = json.loads((out / "data" / "split.json").read_text())["train"]
    kw = dict(scored=out / "scored", train_pool=out / "data" / "train_pool",
              accuracy_file=out / "data" / "teacher_accuracy_train.json", num_groups=5)
    scored = {}
    for p in (out / "scored").glob("*_scas_scores.jsonl"):
        for r in _lines(p):
            scored.setdefault(r["id"], []).append(r)
    for arm in ("scas_groups", "scas_no_diag_min", "random", "teacher:gpt3_6b_finetuning"):
        dest = tmp_path / f"{arm.replace(':', '_')}.jsonl"
        info = write_arm_file(arm, 3, dest, **kw)
        rows = _lines(dest)
        assert sorted(r["id"] for r in rows) == train and info["rows"] == len(train)
    for r in _lines(tmp_path / "scas_no_diag_min.jsonl"):
        assert r["score_value"] == min(c["scas_score_no_diag"] for c in scored[r["id"]])
    for r in _lines(tmp_path / "scas_groups.jsonl"):  # the lowest occupied group
        n = len(scored[r["id"]])
        assert r["group"] == min(min(5, max(1, math.ceil((k + 1) * 5 / n))) for k in range(n))
    own = {r["id"] for r in _lines(out / "data" / "train_pool" / "gpt3_6b_finetuning.jsonl")}
    for r in _lines(tmp_path / "teacher_gpt3_6b_finetuning.jsonl"):
        assert (r["teacher_name"] == "gpt3_6b_finetuning") == (r["id"] in own)


def test_rerun_skips_and_changed_setting_redoes(smoke, capsys):
    out, args = smoke
    before = json.loads((out / "results.json").read_text())["arms"]
    capsys.readouterr()
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "training and evaluating" not in text
    assert text.count("done earlier with the same settings") == 2 + len(before[1:]) * 2 + 1
    assert json.loads((out / "results.json").read_text())["arms"] == before

    changed = [*args, "--set", "learning_rate=0.002", "--set", "arms=[base, scas_min]", "--set", "seeds=[0]"]
    assert main(changed) == 0
    text = capsys.readouterr().out
    assert "learning_rate: 0.001 -> 0.002" in text
    assert "run:scas_min:seed0: training and evaluating" in text
    assert "run:base: done earlier with the same settings" in text
    res = json.loads((out / "results.json").read_text())
    assert [a["arm"] for a in res["arms"]] == ["base", "scas_min"]
    assert res["arms"][1]["heldout_nll"] != before[1]["heldout_nll"]


@pytest.mark.parametrize("extra, message", [
    ({"learning_rat": 1e-4}, "unknown key 'learning_rat'; did you mean 'learning_rate'?"),
    ({"arms": ["base", "scas_mni"]}, "unknown arm 'scas_mni' (did you mean 'scas_min'?); valid arms: base"),
    ({"teachers": ["human_reference", "gpt5"]}, "unknown teacher 'gpt5' in teachers; the pool's teachers: "),
    ({"arms": ["base", "teacher:gpt5"], "compare_to": "base"}, "unknown teacher 'gpt5' in arm 'teacher:gpt5'"),
    ({"seeds": []}, "seeds must be a non-empty list"),
    ({"compare_to": "random"}, "compare_to 'random' is not one of the arms"),
    ({"arms": ["base", "scas_min", "scas_min_other"]},
     ("arm 'scas_min_other' needs other_student (a second student whose scores choose its answers); "
      "without it the valid arms are: base, scas_min")),
    ({"chat_template": "chatmll"}, "chat_template 'chatmll': not one of chatml, gemma, plain"),
    ({"other_chat_template": "plain"}, "other_chat_template is set but other_student is not"),
    ({"both_roles": True}, "both_roles needs other_student"),
    ({"other_learning_rate": 1e-5}, "other_learning_rate is set but both_roles is not"),
])
def test_bad_configs_are_errors_naming_the_fix(tmp_path, capsys, extra, message):
    cfg = {**yaml.safe_load(SMOKE.read_text()), **extra}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["experiment", "--config", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err
    assert not (tmp_path / "out").exists()


def test_aggregate_bootstraps_questions_and_seeds_paired():
    from scas_jax.data.rows import id_key
    from scas_jax.experiment.results import aggregate

    ids = [f"q{i}" for i in range(30)]
    rows = [{"id": q, "teacher_name": t} for q in ids for t in ("a", "b")]
    base = [1.0 + 0.1 * (i % 7) for i in range(len(rows))]

    def run(seed, shift, correct):
        return {"seed": seed, "answer_nll": [v + shift for v in base], "heldout_nll": None,
                "verdicts": {id_key(q): i < correct for i, q in enumerate(ids)}, "accuracy": correct / 30,
                "train_examples": 10, "train_tokens": 100, "teacher_shares": {"a": 1.0}}

    runs = {"ref": [run(0, 0.0, 15), run(1, 0.0, 15)], "better": [run(0, -0.01, 21), run(1, -0.01, 21)]}
    for rs in runs.values():
        for r in rs:
            r["heldout_nll"] = sum(r["answer_nll"]) / len(r["answer_nll"])
    out = {a["arm"]: a for a in aggregate(["ref", "better"], runs, [id_key(q) for q in ids], rows,
                                          ["a", "b"], "ref", 500, 0)}
    assert out["better"]["heldout_nll_diff"] == pytest.approx(-0.01)
    # a constant shift is resolved exactly by the paired bootstrap, not by the unpaired one
    assert out["better"]["heldout_nll_diff_ci"] == pytest.approx([-0.01, -0.01])
    lo, hi = out["better"]["heldout_nll_ci"]
    assert hi - lo > 0.02
    assert out["better"]["accuracy"] == pytest.approx(0.7) and out["ref"]["accuracy"] == pytest.approx(0.5)
    assert out["better"]["accuracy_ci"][0] < 0.7 < out["better"]["accuracy_ci"][1]


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "experiment").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_configs_are_valid(path):
    from scas_jax.experiment.config import check_teachers, load_config
    from scas_jax.experiment.split import pool_teachers

    cfg = load_config(path)
    teachers = check_teachers(cfg, pool_teachers(cfg.pool_dir()), str(path))
    assert teachers and "base" in cfg.arms and cfg.compare_to in cfg.arms


# ------------------------------------------------------------------ two students

@pytest.fixture(scope="module")
def two_students(student, tmp_path_factory):
    """The smoke experiment with a second tiny student (other weights, the ``plain``
    template) and the student on the named ``chatml`` template, both roles (cross-training):
    OUT/tiny/ (student tiny, other tiny_other), then OUT/tiny_other/ (roles swapped)."""
    base = tmp_path_factory.mktemp("experiment2")
    other = tiny_chat.make_student_dir(base / "tiny_other", seed=1)
    out = base / "out"
    args = ["experiment", "--config", str(SMOKE), "--out", str(out), "--set", f"student={student}",
            "--set", "chat_template=chatml", "--set", f"other_student={other}",
            "--set", "other_chat_template=plain", "--set", "arms=[base, scas_min, scas_min_other, strongest]",
            "--set", "seeds=[0]", "--set", "both_roles=true", "--set", "other_learning_rate=0.002",
            "--no-progress"]
    assert main(args) == 0
    return out, args


def _scores(scored):
    """{id: {teacher: scas_score}} of the verified scored answers."""
    out = {}
    for p in Path(scored).glob("*_scas_scores.jsonl"):
        for r in _lines(p):
            if r.get("teacher_correct") is True and not r.get("scas_scoring_error"):
                out.setdefault(r["id"], {})[r["teacher_name"]] = r["scas_score"]
    return out


def test_two_students_comparison_is_computed_and_written(two_students):
    from scipy.stats import spearmanr

    out, _ = two_students
    out = out / "tiny"  # role 1
    cmp = json.loads((out / "comparison.json").read_text())
    a, b = _scores(out / "scored"), _scores(out / "scored_other")
    assert set(a) == set(b) and len(a) == 12 == cmp["questions"]
    same = 0
    for q in a:
        assert set(a[q]) == set(b[q])
        pa = min(a[q], key=lambda t: (a[q][t], t))
        pb = min(b[q], key=lambda t: (b[q][t], t))
        same += pa == pb
        assert {"id": q, "student": pa, "other_student": pb} in cmp["picks"]
    assert cmp["agreeing_questions"] == same and cmp["agreement"] == pytest.approx(same / 12)
    multi = [q for q in a if len(a[q]) >= 2]
    picked = {p["id"]: p["student"] == p["other_student"] for p in cmp["picks"]}
    same_multi = sum(picked[q] for q in multi)
    assert cmp["questions_with_one_answer"] == 12 - len(multi)
    assert cmp["agreement_multi"] == pytest.approx(same_multi / len(multi))
    lo, hi = cmp["agreement_ci"]
    assert 0.0 <= lo <= cmp["agreement"] <= hi <= 1.0
    xs = [a[q][t] for q in sorted(a) for t in sorted(a[q])]
    ys = [b[q][t] for q in sorted(a) for t in sorted(a[q])]
    assert cmp["candidates"] == len(xs)
    assert cmp["spearman_global"] == pytest.approx(spearmanr(xs, ys).statistic)
    within = [spearmanr([a[q][t] for t in a[q]], [b[q][t] for t in a[q]]).statistic for q in a if len(a[q]) >= 3]
    within = [w for w in within if math.isfinite(w)]
    assert within and cmp["spearman_within_questions"] == len(within)
    assert cmp["spearman_within_mean"] == pytest.approx(sum(within) / len(within))
    for who in ("student", "other_student"):
        assert abs(sum(cmp["teacher_shares"][who].values()) - 1) < 1e-4
    assert cmp["chat_template"] == "chatml" and cmp["other_chat_template"] == "plain"
    # the other student scored with its own template
    assert json.loads((out / "scored_other" / "manifest.json").read_text())["chat_template"] == "plain"

    res = json.loads((out / "results.json").read_text())
    assert [a["arm"] for a in res["arms"]] == ["base", "scas_min", "scas_min_other", "strongest"]
    for arm in res["arms"]:
        assert math.isfinite(arm["heldout_nll"]) and _finite_ci(arm["heldout_nll_ci"])
        assert _finite_ci(arm["heldout_nll_diff_ci"]) and arm["compare_to"] == "scas_min"
    assert res["info"]["chat_template"] == "chatml" and res["info"]["other_chat_template"] == "plain"
    assert res["comparison"]["agreement"] == cmp["agreement"] and "picks" not in res["comparison"]
    md = (out / "results.md").read_text()
    assert "## Student comparison" in md and f"{same}/12 questions" in md and "| scas_min_other |" in md


def test_scas_min_other_picks_the_other_students_lowest(two_students):
    out, _ = two_students
    b = _scores(out / "tiny" / "scored_other")
    picks = {r["id"]: (r["teacher_name"], r["score_value"])
             for r in _lines(out / "tiny" / "arms" / "scas_min_other.jsonl")}
    assert set(picks) == set(b)
    for q, (t, v) in picks.items():
        assert (v, t) == min((s, u) for u, s in b[q].items())


def test_both_roles_swap_the_students_and_share_the_rest(two_students):
    out, _ = two_students
    one, two = out / "tiny", out / "tiny_other"
    # role 2 reuses role 1's conversions, split and scores: it has none of its own
    assert not (two / "data").exists() and not (two / "scored").exists() and not (two / "scored_other").exists()

    def picks(path):
        return [(r["id"], r["teacher_name"]) for r in _lines(path)]

    # each student's own selection is the other role's "other" selection
    assert picks(two / "arms" / "scas_min.jsonl") == picks(one / "arms" / "scas_min_other.jsonl")
    assert picks(two / "arms" / "scas_min_other.jsonl") == picks(one / "arms" / "scas_min.jsonl")
    assert picks(two / "arms" / "strongest.jsonl") == picks(one / "arms" / "strongest.jsonl")
    c1, c2 = (json.loads((d / "comparison.json").read_text()) for d in (one, two))
    assert c2["agreement"] == c1["agreement"] and c2["other_chat_template"] == "chatml"
    assert c2["spearman_global"] == pytest.approx(c1["spearman_global"])
    r2 = json.loads((two / "results.json").read_text())
    assert r2["info"]["chat_template"] == "plain" and r2["info"]["student"].endswith("tiny_other")
    # each student trains at its own learning rate (role 2: other_learning_rate)
    r1 = json.loads((one / "results.json").read_text())
    assert r2["info"]["learning_rate"] == 0.002 and r1["info"]["learning_rate"] != 0.002
    assert "learning rate 0.002" in (out / "cross_training.md").read_text()
    # greedy accuracy with each student's template
    for d, template in ((one, "chatml"), (two, "plain")):
        m = json.loads((d / "runs" / "scas_min_other" / "seed_0" / "eval" / "metrics.json").read_text())
        assert m["chat_template"] == template
    table = json.loads((out / "cross_training.json").read_text())
    assert [(Path(a["student"]).name, a["arm"]) for a in table["arms"]] == [
        (s, a) for s in ("tiny", "tiny_other") for a in ("base", "scas_min", "scas_min_other", "strongest")]
    assert all(math.isfinite(a["heldout_nll"]) and _finite_ci(a["heldout_nll_diff_ci"]) for a in table["arms"])
    md = (out / "cross_training.md").read_text()
    assert md.count("| scas_min_other |") == 2 and "the other student's SCAS selection" in md


def test_two_students_rerun_skips_finished_stages(two_students, capsys):
    out, args = two_students
    before = (out / "tiny" / "comparison.json").read_text()
    capsys.readouterr()
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "training and evaluating" not in text and "] running" not in text
    for name in ("[data]", "[score]", "[score_other]"):
        assert text.count(f"{name} done earlier with the same settings") == 1, name
    for name in ("run:base:", "run:scas_min:seed0:", "run:scas_min_other:seed0:", "run:strongest:seed0:"):
        assert text.count(f"{name} done earlier with the same settings") == 2, name  # both roles
    assert (out / "tiny" / "comparison.json").read_text() == before


def test_compare_students_counts_disagreement_and_ties(tmp_path):
    """Synthetic scores: the agreement and Spearman numbers by hand (the tiny students of
    the fixture happen to rank alike)."""
    from scipy.stats import spearmanr

    from scas_jax.experiment.compare import compare_students, spearman

    a = {"q1": {"t1": 1.0, "t2": 2.0, "t3": 3.0}, "q2": {"t1": 1.0, "t2": 2.0, "t3": 3.0},
         "q3": {"t1": 5.0, "t2": 5.0, "t3": 1.0}, "q4": {"t1": 1.0, "t2": 2.0}}
    b = {"q1": {"t1": 1.0, "t2": 2.0, "t3": 3.0}, "q2": {"t1": 3.0, "t2": 2.0, "t3": 1.0},
         "q3": {"t1": 0.5, "t2": 0.5, "t3": 0.5}, "q4": {"t1": 9.0, "t2": 2.0, "t3": 1.0}}
    for name, scores in (("a", a), ("b", b)):
        d = tmp_path / name
        d.mkdir()
        for t in ("t1", "t2", "t3"):
            rows = [{"id": q, "teacher_name": t, "teacher_correct": True, "scas_score": s[t]}
                    for q, s in scores.items() if t in s]
            rows.append({"id": "q5", "teacher_name": t, "teacher_correct": False, "scas_score": 0.0})
            tiny_chat.write_jsonl(d / f"{t}_scas_scores.jsonl", rows)
    cmp = compare_students(tmp_path / "a", tmp_path / "b", 200, 0)
    # q5 unverified: left out; q4: only t1, t2 in both; picks: q1 t1/t1, q2 t1/t3, q3 t3/t1 (tie by name), q4 t1/t2
    assert cmp["questions"] == 4 and cmp["candidates"] == 11
    assert cmp["agreeing_questions"] == 1 and cmp["agreement"] == pytest.approx(0.25)
    assert cmp["agreement_multi"] == pytest.approx(0.25) and cmp["questions_with_one_answer"] == 0
    assert [(p["id"], p["student"], p["other_student"]) for p in cmp["picks"]] == [
        ("q1", "t1", "t1"), ("q2", "t1", "t3"), ("q3", "t3", "t1"), ("q4", "t1", "t2")]
    assert cmp["teacher_shares"]["student"] == {"t1": 0.75, "t3": 0.25}
    assert cmp["by_teacher"]["t1"] == {"student": 3, "other_student": 2, "both": 1, "candidates": 4}
    xs = [a[q][t] for q in sorted(a) for t in sorted(a[q]) if t in b[q]]
    ys = [b[q][t] for q in sorted(a) for t in sorted(a[q]) if t in b[q]]
    assert cmp["spearman_global"] == pytest.approx(spearmanr(xs, ys).statistic)
    # within: q1 +1, q2 -1, q3 all tied under b (no rho, left out), q4 has 2 answers
    assert cmp["spearman_within_questions"] == 2 and cmp["spearman_within_skipped_ties"] == 1
    assert cmp["spearman_within_mean"] == pytest.approx(0.0)
    assert spearman([1, 2, 2, 3], [4, 1, 1, 0]) == pytest.approx(spearmanr([1, 2, 2, 3], [4, 1, 1, 0]).statistic)


def test_a_changed_other_student_redoes_only_its_own_stages(two_students, capsys):
    """Role 1 alone, the other student on another template: its scoring is redone, and
    only the runs whose training answers changed; the split, the student's scores and
    the other runs are kept. (Last: it changes the fixture's outputs.)"""
    out, args = two_students
    one = out / "tiny"
    single = list(args)
    for value in ("other_chat_template=plain", "both_roles=true", "other_learning_rate=0.002"):
        i = single.index(value)
        del single[i - 1:i + 1]  # "--set", value
    single[single.index("--out") + 1] = str(one)
    single += ["--set", "other_chat_template=chatml", "--set", "both_roles=false"]
    old = _lines(one / "arms" / "scas_min_other.jsonl")
    capsys.readouterr()
    assert main(single) == 0
    text = capsys.readouterr().out
    assert "[score_other] running" in text
    for name in ("[data]", "[score]", "run:base:", "run:scas_min:seed0:", "run:strongest:seed0:"):
        assert f"{name} done earlier with the same settings" in text, name
    changed = _lines(one / "arms" / "scas_min_other.jsonl") != old
    assert ("run:scas_min_other:seed0: training and evaluating" in text) == changed
    assert json.loads((one / "comparison.json").read_text())["other_chat_template"] == "chatml"
    assert json.loads((one / "scored_other" / "manifest.json").read_text())["chat_template"] == "chatml"
