"""The main job end to end (`scas-jax pipeline`) on a tiny student: every stage runs, its
outputs are consistent with one another, and reruns never reuse stale results."""

from __future__ import annotations

import json

import pytest
import tiny_tokenizer

from scas_jax.cli import main


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def student(tiny_hf_dirs, tmp_path_factory):
    return tiny_tokenizer.student_dir(tiny_hf_dirs["llama_rope_scaling_untied"],
                                      tmp_path_factory.mktemp("pipeline") / "tiny")


def test_pipeline_end_to_end_and_reruns(student, tmp_path, capsys, monkeypatch):
    out = tmp_path / "demo"
    args = ["pipeline", "--out", str(out), "--student", str(student), "--questions", "3",
            "--heldout-questions", "2", "--train-steps", "2", "--no-progress"]
    assert main(args) == 0

    scored = json.loads((out / "scored" / "manifest.json").read_text())
    # every answer the judge did not reject is scored (undecided ones too, as the reference)
    not_rejected = sum(r["teacher_correct"] is not False
                       for f in (out / "verified").glob("*.jsonl") for r in _lines(f))
    assert scored["rows"] == not_rejected and scored["errors"] == 0
    min_file = out / "selections" / "scas_score" / "min_score_selected.jsonl"
    sel = _lines(min_file)
    assert [r["id"] for r in sel] == ["gsm8k-test-0000", "gsm8k-test-0001", "gsm8k-test-0002"]
    # min picks, per question, the verified answer with the lowest scas_score
    best = {}
    for f in (out / "scored").glob("*_scas_scores.jsonl"):
        for r in _lines(f):
            if r.get("teacher_correct") is True:
                key = (r["scas_score"], r["teacher_name"])
                best[r["id"]] = min(best.get(r["id"], key), key)
    assert {r["id"]: r["teacher_name"] for r in sel} == {k: v[1] for k, v in best.items()}
    assert (out / "report" / "report.md").exists()
    # the report's teacher accuracy is the judge's over all answers, as verify counted it
    acc = json.loads((out / "report" / "report.json").read_text())["accuracy"]["teachers"]
    judged = json.loads((out / "verified" / "verify_manifest.json").read_text())["teachers"]
    assert set(acc) == set(judged) and len(acc) == 6
    for t, v in judged.items():
        assert (acc[t]["correct"], acc[t]["incorrect"], acc[t]["undecided"], acc[t]["total"]) == (
            v["correct"], v["incorrect"], v["undecided"], v["rows"])
    # strongest is ordered by the judge's accuracy file, never by name
    strongest = json.loads((out / "selections" / "strongest" / "manifest.json").read_text())
    assert strongest["order_source"].endswith("teacher_accuracy.json")
    assert len(_lines(out / "train" / "metrics.jsonl")) == 2
    # disk: one float32 checkpoint, one bfloat16 export, no optimiser checkpoints left
    assert not (out / "train" / "checkpoints").exists()
    hf_config = json.loads((out / "train" / "hf" / "config.json").read_text())
    assert hf_config["dtype"] == "bfloat16" and (out / "train" / "hf" / "model.safetensors").exists()
    # the effect of fine-tuning, on the trained-on answers and the held-out ones
    effect = json.loads((out / "effect.json").read_text())
    assert effect["trained_on"]["answers"] == 3
    held_ids = {r["id"] for f in (out / "heldout").glob("*.jsonl") for r in _lines(f)}
    assert held_ids == {"gsm8k-test-0003", "gsm8k-test-0004"}
    for v in effect.values():
        assert v["change"] == pytest.approx(v["fine_tuned"] - v["base"])
        assert v["base"] > 0 and v["fine_tuned"] > 0
    assert "fine-tuned NLL" in (out / "summary.md").read_text()
    state = json.loads((out / "pipeline_state.json").read_text())["stages"]
    assert all(rec["done"] for rec in state.values()) and state["pool"]["settings"]["questions"] == 3

    # a rerun with the same settings skips every stage and changes nothing
    before = min_file.read_bytes()
    capsys.readouterr()
    assert main(args) == 0
    assert capsys.readouterr().out.count("done earlier with the same settings") == 8
    assert min_file.read_bytes() == before
    assert len(_lines(out / "train" / "metrics.jsonl")) == 2

    # more training steps: selection is kept, training and the effect are redone
    assert main([*args[:-2], "3", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "train_steps: 2 -> 3" in text and min_file.read_bytes() == before
    assert len(_lines(out / "train" / "metrics.jsonl")) == 3

    # fewer questions: everything from the pool on is redone, nothing stale survives
    small = ["pipeline", "--out", str(out), "--student", str(student), "--questions", "2",
             "--heldout-questions", "2", "--train-steps", "2", "--no-progress"]
    assert main(small) == 0
    assert "questions: 3 -> 2" in capsys.readouterr().out
    assert [r["id"] for r in _lines(min_file)] == ["gsm8k-test-0000", "gsm8k-test-0001"]
    assert json.loads((out / "effect.json").read_text())["trained_on"]["answers"] == 2
    assert len(_lines(out / "train" / "metrics.jsonl")) == 2

    # an interrupted train stage resumes from its checkpoint instead of starting over
    import scas_jax.convert.commands as commands

    real_export = commands.export

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(commands, "export", interrupted)
    retrain = [*small[:-2], "4", "--no-progress"]
    assert main(retrain) == 130
    assert (out / "train" / "checkpoints").is_dir()
    monkeypatch.setattr(commands, "export", real_export)
    assert main(retrain) == 0
    steps = [r["step"] for r in _lines(out / "train" / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3, 4]  # each step once: the resumed run trained no step again
    assert (out / "train" / "hf" / "model.safetensors").exists()
