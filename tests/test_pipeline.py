"""The main job end to end (`scas-jax pipeline`) on a tiny student: every stage runs and
its outputs are consistent with one another."""

from __future__ import annotations

import json
import shutil

import tiny_tokenizer

from scas_jax.cli import main


def test_pipeline_end_to_end_and_rerun(tiny_hf_dirs, tmp_path, capsys):
    student = tmp_path / "tiny"
    shutil.copytree(tiny_hf_dirs["llama_rope_scaling_untied"], student)
    tiny_tokenizer.save(student)
    out = tmp_path / "demo"
    args = ["pipeline", "--out", str(out), "--student", str(student), "--questions", "3",
            "--train-steps", "2", "--no-progress"]
    assert main(args) == 0

    scored = json.loads((out / "scored" / "manifest.json").read_text())
    # every answer the judge did not reject is scored (undecided ones too, as the reference)
    not_rejected = sum(
        json.loads(line)["teacher_correct"] is not False
        for f in (out / "verified").glob("*.jsonl") for line in f.read_text().splitlines())
    assert scored["rows"] == not_rejected and scored["errors"] == 0
    sel = [json.loads(line) for line in
           (out / "selections" / "scas_score" / "min_score_selected.jsonl").read_text().splitlines()]
    assert [r["id"] for r in sel] == ["gsm8k-test-0000", "gsm8k-test-0001", "gsm8k-test-0002"]
    # min picks, per question, the verified answer with the lowest scas_score
    best = {}
    for f in (out / "scored").glob("*_scas_scores.jsonl"):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            if r.get("teacher_correct") is True:
                key = (r["scas_score"], r["teacher_name"])
                best[r["id"]] = min(best.get(r["id"], key), key)
    assert {r["id"]: r["teacher_name"] for r in sel} == {k: v[1] for k, v in best.items()}
    assert (out / "report" / "report.md").exists()
    steps = (out / "train" / "metrics.jsonl").read_text().splitlines()
    assert len(steps) == 2
    assert (out / "train" / "hf" / "model.safetensors").exists()

    # a rerun skips every finished stage and changes nothing
    before = (out / "selections" / "scas_score" / "min_score_selected.jsonl").read_bytes()
    capsys.readouterr()
    assert main(args) == 0
    assert (out / "selections" / "scas_score" / "min_score_selected.jsonl").read_bytes() == before
    assert len((out / "train" / "metrics.jsonl").read_text().splitlines()) == 2
