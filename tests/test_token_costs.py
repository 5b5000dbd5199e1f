"""`scas-jax score --per-token` (token-cost files beside the scores, summing to scas_score)
and the report's token view."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pool_files import gsm8k, write_pool
from scas_jax.cli import main as cli_main
from scas_jax.scoring.fields import ERROR_FIELD

TEACHERS = ("human_reference", "gpt3_175b_verification")




def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def check_token_files(out: Path, teachers, spelled: bool = False) -> dict:
    """Every score row has its token line (same order); costs sum to scas_score."""
    lines = {}
    for t in teachers:
        scores = read_jsonl(out / f"{t}_scas_scores.jsonl")
        tokens = read_jsonl(out / f"{t}_token_costs.jsonl")
        assert [r["id"] for r in tokens] == [r["id"] for r in scores]
        for s, line in zip(scores, tokens):
            assert line["teacher_name"] == s["teacher_name"]
            assert len(line["tokens"]) == len(line["nll"]) == len(line["cost"])
            if ERROR_FIELD in s:
                assert line["tokens"] == [] and line[ERROR_FIELD] == s[ERROR_FIELD]
                continue
            assert all(isinstance(x, str) for x in line["tokens"]) and len(line["tokens"]) >= 1
            assert sum(line["cost"]) == pytest.approx(s["scas_score"], rel=1e-6)
            # position 0 is <|im_start|> (special), so answer and NLL positions coincide
            assert sum(line["nll"]) / len(line["nll"]) == pytest.approx(s["answer_mean_nll"], rel=1e-5)
            if spelled:  # the tokens spell the answer (plus the template's end)
                assert s["teacher_output"].strip() in "".join(line["tokens"])
            lines[(s["id"], t)] = line
    return lines


def test_cli_per_token_on_a_tiny_student_and_the_report(tiny_llama_dir, tmp_path, capsys):
    rows = {t: gsm8k(t, 3) for t in TEACHERS}
    rows[TEACHERS[0]].append({"id": "no-instruction", "teacher_output": "4"})  # an error row
    pool = write_pool(tmp_path / "pool", {f"{t}.jsonl": r for t, r in rows.items()})
    out = tmp_path / "scores"
    code = cli_main(["score", "--student", str(tiny_llama_dir), "--candidate-dir", str(pool),
                     "--output-dir", str(out), "--batch-tokens", "1024", "--max-length", "1024",
                     "--dtype", "float32", "--per-token"])
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["token_costs"]) == set(TEACHERS)
    lines = check_token_files(out, TEACHERS)  # (the character tokenizer lower-cases)
    assert len(lines) == 5  # gpt3_175b_verification has 2 verified rows of 3

    # the report shows the token view: cheapest and costliest answers side by side
    report_dir = tmp_path / "report"
    assert cli_main(["report", "--scores", str(out), "--out", str(report_dir)]) == 0
    page = (report_dir / "token_costs.html").read_text(encoding="utf-8")
    summary = json.loads((report_dir / "report.json").read_text())["token_costs"]
    assert (report_dir / "figures" / "token_costs.png").stat().st_size > 10_000
    assert summary["examples"] and "## Token costs" in (report_dir / "report.md").read_text()
    for ex in summary["examples"]:
        scores = {t: next(r["scas_score"] for r in read_jsonl(out / f"{t}_scas_scores.jsonl") if r["id"] == ex["id"])
                  for t in TEACHERS}
        assert scores[ex["cheapest"]] < scores[ex["costliest"]]
        assert f"cheapest: {ex['cheapest']}" in page and f"costliest: {ex['costliest']}" in page
    assert page.count("title=\"cost ") == sum(
        len(lines[(ex["id"], t)]["tokens"]) for ex in summary["examples"] for t in (ex["cheapest"], ex["costliest"]))

    # a score directory without token files: no token section in the report
    plain = tmp_path / "plain"
    shutil.copytree(out, plain)
    for f in plain.glob("*_token_costs.jsonl"):
        f.unlink()
    assert cli_main(["report", "--scores", str(plain), "--out", str(tmp_path / "r2")]) == 0
    assert not (tmp_path / "r2" / "token_costs.html").exists()
    assert "token_costs" not in json.loads((tmp_path / "r2" / "report.json").read_text())


def test_per_token_on_smollm2_gsm8k_matches_its_scores(smollm2_student, tmp_path):
    import jax

    from scas_jax.parallel import make_mesh
    from scas_jax.scoring.commands import score

    pool = write_pool(tmp_path / "pool", {f"{t}.jsonl": gsm8k(t, 2) for t in TEACHERS})
    out = tmp_path / "out"
    mesh = make_mesh("data=-1", devices=jax.devices()[:1])  # one [1, 1024] row of 4 answers
    m = score(smollm2_student, pool, out, batch_tokens=1024, max_length=1024, dtype="float32",
              mesh=mesh, progress=False, per_token=True)
    assert m["rows"] == 4 and m["errors"] == 0
    lines = check_token_files(out, TEACHERS, spelled=True)
    line = next(iter(lines.values()))
    assert any(t.startswith(" ") for t in line["tokens"])  # decoded tokens, not byte-level symbols
