"""``scas-jax evaluate``: predictions, accuracy with a bootstrap interval, the answer NLL of
a pool's verified answers, and every kind of student path (training outputs included)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from scas_jax.errors import ScasError
from scas_jax.evaluation.metrics import accuracy_metrics, bootstrap_interval, per_teacher_means


def test_bootstrap_interval_is_seeded_and_brackets_the_accuracy():
    correct = [True] * 30 + [False] * 10
    lo, hi = bootstrap_interval(correct, samples=2000, seed=3)
    assert (lo, hi) == bootstrap_interval(correct, samples=2000, seed=3)
    assert lo < 0.75 < hi and 0.55 < lo and hi < 0.9  # binomial sd ~0.07
    assert bootstrap_interval([True] * 5) == (1.0, 1.0)
    m = accuracy_metrics([True, False, None, None], [False, False, True, False], samples=100)
    assert (m["correct"], m["incorrect"], m["undecided"], m["truncated"], m["accuracy"]) == (1, 1, 2, 1, 0.25)
    per = per_teacher_means([("a", 1.0), ("a", 3.0), ("b", 4.0), ("b", float("nan"))])
    assert per == {"per_teacher": {"a": {"answers": 2, "mean_nll": 2.0}, "b": {"answers": 1, "mean_nll": 4.0}},
                   "macro_mean_nll": 3.0, "answers": 3}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import tiny_chat

    root = tmp_path_factory.mktemp("eval")
    student = tiny_chat.make_student_dir(root / "student")
    questions = root / "q.jsonl"
    questions.write_text("".join(
        json.dumps({"id": i, "instruction": f"What is {i} + 1?", "reference_answer": str(i + 1)}) + "\n"
        for i in range(3)))
    pool = root / "pool"
    pool.mkdir()
    a = [{"id": i, "instruction": f"What is {i} + 1?", "teacher_output": f"#### {i + 1}",
          "teacher_correct": i != 1} for i in range(3)] + [
        {"id": 9, "instruction": "not asked", "teacher_output": "#### 1", "teacher_correct": True}]
    b = [{"id": i, "instruction": f"What is {i} + 1?", "teacher_output": f"so #### {i + 1 if i else 7}",
          "reference_answer": str(i + 1)} for i in range(3)]  # no flags: judged (id 0 wrong)
    for name, rows in (("a", a), ("b", b)):
        (pool / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"root": root, "student": student, "questions": questions, "pool": pool}


def test_evaluate_writes_predictions_metrics_and_pool_nll(tiny):
    from scas_jax.evaluation.evaluate import evaluate
    from scas_jax.loader import load_student
    from scas_jax.scoring.scorer import score_rows

    out = tiny["root"] / "out"
    m = evaluate(tiny["student"], tiny["questions"], out, pool=tiny["pool"], max_new_tokens=8, batch_size=2)
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [p["id"] for p in preds] == [0, 1, 2]
    for p in preds:
        assert set(p) >= {"generation", "extracted_answer", "verdict", "truncated", "reason"}
        if p["truncated"]:
            assert p["verdict"] is None and p["generated_tokens"] == 8
    assert json.loads((out / "metrics.json").read_text()) == m
    assert m["questions"] == 3 and m["undecided"] >= m["truncated"]
    assert m["correct"] + m["incorrect"] + m["undecided"] == 3
    assert len(m["accuracy_ci95"]) == 2 and m["bootstrap"]["seed"] == 0
    assert m["chat_template"] == "tokenizer"  # the student's own

    nll = m["answer_nll"]
    assert nll["pool_rows"] == {"read": 7, "other_questions": 1, "unverified": 2, "verified_by_flag": 2,
                                "verified_by_judge": 2}
    assert {t: v["answers"] for t, v in nll["per_teacher"].items()} == {"a": 2, "b": 2}
    st = load_student(tiny["student"])
    kept_a = [json.loads(line) for line in (tiny["pool"] / "a.jsonl").read_text().splitlines()][0:3:2]
    want = np.mean([f["answer_mean_nll"] for f in score_rows(st.params, st.cfg, st.tokenizer, kept_a)])
    assert nll["per_teacher"]["a"]["mean_nll"] == pytest.approx(want, rel=1e-6)
    assert nll["macro_mean_nll"] == pytest.approx(
        (nll["per_teacher"]["a"]["mean_nll"] + nll["per_teacher"]["b"]["mean_nll"]) / 2)

    with pytest.raises(ScasError, match="not empty"):
        evaluate(tiny["student"], tiny["questions"], out, max_new_tokens=8)


def test_training_outputs_and_checkpoints_are_students(tiny):
    """``OUT`` (-> ``OUT/final``), ``OUT/checkpoints`` and ``OUT/checkpoints/<step>`` load the
    same parameters; a checkpoint takes its tokenizer from ``OUT/final`` or ``--tokenizer``."""
    import jax
    import optax

    from scas_jax.evaluation.evaluate import evaluate
    from scas_jax.generation.student import resolve_model
    from scas_jax.loader import load_student
    from scas_jax.training.checkpoints import TrainCheckpoints
    from scas_jax.training.step import TrainState

    run = tiny["root"] / "run"
    st = load_student(tiny["student"])
    ck = TrainCheckpoints(run / "checkpoints")
    ck.save(2, TrainState(jax.numpy.int32(2), st.params, optax.adam(1e-3).init(st.params)),
            {"step": 2, "model_config": st.cfg.to_dict()})
    ck.close()
    shutil.copytree(tiny["student"], run / "final")

    assert resolve_model(run).path == run / "final"
    step = resolve_model(run / "checkpoints" / "2")
    assert (step.kind, step.tokenizer) == ("train_checkpoint", run / "final")
    assert resolve_model(run / "checkpoints").path == run / "checkpoints" / "2"
    loaded = step.load()
    for x, y in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(st.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    shutil.rmtree(run / "final")
    with pytest.raises(ScasError, match="--tokenizer"):
        resolve_model(run)
    a = evaluate(run, tiny["questions"], tiny["root"] / "e1", tokenizer=tiny["student"], max_new_tokens=6)
    b = evaluate(tiny["student"], tiny["questions"], tiny["root"] / "e2", max_new_tokens=6)
    assert ((tiny["root"] / "e1" / "predictions.jsonl").read_text()
            == (tiny["root"] / "e2" / "predictions.jsonl").read_text())
    assert a["student"].endswith("checkpoints/2") and a["accuracy"] == b["accuracy"]


def test_evaluate_cli(tiny, capsys):
    from scas_jax.cli import main

    out = tiny["root"] / "cli"
    assert main(["evaluate", "--student", str(tiny["student"]), "--questions", str(tiny["questions"]),
                 "--output-dir", str(out), "--max-new-tokens", "4", "--limit", "2"]) == 0
    assert "accuracy" in capsys.readouterr().out
    assert json.loads((out / "metrics.json").read_text())["questions"] == 2
    assert main(["evaluate", "--student", str(tiny["root"] / "nothing"), "--questions",
                 str(tiny["questions"]), "--output-dir", str(tiny["root"] / "cli2")]) == 2
    assert "no such file or directory" in capsys.readouterr().err


def test_evaluate_chat_template_builds_prompts_scores_the_pool_and_is_recorded(tiny, tmp_path, monkeypatch):
    """A student without a template: the default is an error naming --chat-template;
    ``plain`` builds the plain prompts (and scores the pool's answers after them),
    ``chatml`` (CLI) the ChatML ones; metrics.json records the template."""
    from transformers import AutoTokenizer

    from scas_jax.cli import main
    from scas_jax.data.chat import with_chat_template
    from scas_jax.evaluation.evaluate import evaluate
    from scas_jax.generation import sampler as sampler_mod
    from scas_jax.loader import load_student
    from scas_jax.scoring.scorer import score_rows

    from tiny_chat import drop_chat_template

    student = tmp_path / "bare"
    shutil.copytree(tiny["student"], student)
    drop_chat_template(student)
    tok = AutoTokenizer.from_pretrained(str(student))
    assert not tok.chat_template
    with pytest.raises(ScasError, match="has no chat template; name one with --chat-template"):
        evaluate(student, tiny["questions"], tmp_path / "none", max_new_tokens=2)

    prompts: list[list[list[int]]] = []
    original = sampler_mod.Sampler.generate

    def spy(self, ids, **kw):
        prompts.append([list(map(int, p)) for p in ids])
        return original(self, ids, **kw)

    monkeypatch.setattr(sampler_mod.Sampler, "generate", spy)
    m = evaluate(student, tiny["questions"], tmp_path / "plain", pool=tiny["pool"], max_new_tokens=3,
                 batch_size=4, chat_template="plain")
    texts = [f"You are a helpful assistant.\n\nQuestion: What is {i} + 1?\nAnswer:\n" for i in range(3)]
    assert prompts[0] == [list(ids) for ids in tok(texts)["input_ids"]]
    assert json.loads((tmp_path / "plain" / "metrics.json").read_text())["chat_template"] == "plain"
    st = load_student(student)
    kept_a = [json.loads(line) for line in (tiny["pool"] / "a.jsonl").read_text().splitlines()][0:3:2]
    want = np.mean([f["answer_mean_nll"] for f in score_rows(
        st.params, st.cfg, with_chat_template(st.tokenizer, "plain"), kept_a)])
    assert m["answer_nll"]["per_teacher"]["a"]["mean_nll"] == pytest.approx(want, rel=1e-6)

    assert main(["evaluate", "--student", str(student), "--questions", str(tiny["questions"]),
                 "--output-dir", str(tmp_path / "chatml"), "--max-new-tokens", "3", "--limit", "1",
                 "--chat-template", "chatml"]) == 0
    text = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is 0 + 1?"
            "<|im_end|>\n<|im_start|>assistant\n")
    assert prompts[1] == [tok(text)["input_ids"]]
    assert json.loads((tmp_path / "chatml" / "metrics.json").read_text())["chat_template"] == "chatml"
