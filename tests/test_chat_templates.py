"""--chat-template: named templates (chatml, gemma, plain, FILE.jinja) for students whose
tokenizer has none, the method's boundary rules on each, and the manifests recording them."""

from __future__ import annotations

import json

import pytest
import yaml

from scas_jax.data.chat import (
    CHAT_TEMPLATES, ChatEncoder, chat_template_label, with_chat_template,
)
from scas_jax.errors import ScasError
from tiny_chat import arithmetic_rows, make_student_dir, write_jsonl

ROW = {"id": 1, "system": "", "instruction": "What is 2+3?", "output": "2+3 = 5. The answer is 5."}
EXPECTED = {  # (prompt, full) texts of the method's step 2
    "chatml": ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
               "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n",
               "2+3 = 5. The answer is 5.<|im_end|>\n"),
    "gemma": ("<start_of_turn>user\nYou are a helpful assistant.\n\nWhat is 2+3?<end_of_turn>\n"
              "<start_of_turn>model\n", "2+3 = 5. The answer is 5.<end_of_turn>\n"),
    "plain": ("You are a helpful assistant.\n\nQuestion: What is 2+3?\nAnswer:\n",
              "2+3 = 5. The answer is 5.<|im_end|>"),  # SmolLM2's eos token ends the answer
}


def _no_template(tok):
    bare = with_chat_template(tok, "plain")
    bare.chat_template = None
    return bare


@pytest.mark.parametrize("name", sorted(CHAT_TEMPLATES))
def test_builtin_templates_texts_and_boundary(smollm2_tokenizer, name):
    tok = with_chat_template(_no_template(smollm2_tokenizer), name)
    enc = ChatEncoder(tok)
    prompt, full = enc.texts(ROW)
    assert prompt == EXPECTED[name][0] and full == prompt + EXPECTED[name][1]
    e = enc.encode(ROW)
    prompt_ids = smollm2_tokenizer(prompt)["input_ids"]
    assert e.n_prompt == len(prompt_ids) and list(e.ids[:e.n_prompt]) == prompt_ids
    assert smollm2_tokenizer.decode(e.ids[e.n_prompt:]) == EXPECTED[name][1]
    assert e.answer_mask.sum() > 0 and not e.question_mask[e.n_prompt:].any()


def test_no_template_is_an_error_naming_the_flag(smollm2_tokenizer):
    bare = _no_template(smollm2_tokenizer)
    with pytest.raises(ScasError, match="no chat template; name one with --chat-template"):
        with_chat_template(bare, None)
    with pytest.raises(ScasError, match="--chat-template chatml|gemma|plain|FILE.jinja"):
        ChatEncoder(bare)
    assert with_chat_template(smollm2_tokenizer, None) is smollm2_tokenizer  # its own template


def test_template_file_and_labels(smollm2_tokenizer, tmp_path):
    f = tmp_path / "qa.jinja"
    f.write_text("{% for m in messages %}{% if m['role'] == 'user' %}{{ 'Q: ' + m['content'] + '\\nA: ' }}"
                 "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{% endif %}{% endfor %}")
    tok = with_chat_template(smollm2_tokenizer, str(f))
    assert tok is not smollm2_tokenizer and smollm2_tokenizer.chat_template != tok.chat_template
    assert ChatEncoder(tok).texts(ROW) == ("Q: What is 2+3?\nA: ", "Q: What is 2+3?\nA: 2+3 = 5. The answer is 5.")
    label = chat_template_label(str(f))
    assert label.startswith(f"file:{f} sha256:") and len(label.split("sha256:")[1]) == 64
    assert (chat_template_label(None), chat_template_label("plain")) == ("tokenizer", "plain")
    with pytest.raises(ScasError, match="--chat-template 'nope.jinja': not one of chatml, gemma, plain"):
        chat_template_label("nope.jinja")


@pytest.fixture
def bare_student(tmp_path):
    """The tiny char-level student with its chat template removed (a base model)."""
    from tiny_chat import drop_chat_template

    return drop_chat_template(make_student_dir(tmp_path / "student"))


def test_train_with_named_template_records_it(bare_student, tmp_path):
    from scas_jax.loader import load_tokenizer
    from scas_jax.training.loop import train

    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(8))
    with pytest.raises(ScasError, match="--chat-template"):
        train(bare_student, data, tmp_path / "run0", None, ["steps=1", "batch_size=8", "seq_len=64"],
              progress=False)
    train(bare_student, data, tmp_path / "run", None,
          ["steps=1", "batch_size=8", "seq_len=64", "chat_template=plain"], progress=False)
    saved = yaml.safe_load((tmp_path / "run" / "train_config.yaml").read_text())
    assert saved["chat_template"] == "plain"
    final = load_tokenizer(tmp_path / "run" / "final")
    assert final.chat_template == CHAT_TEMPLATES["plain"]  # the trained model keeps its template


def test_score_with_named_template_records_it(bare_student, tmp_path):
    from scas_jax.scoring.commands import score

    pool = tmp_path / "pool"
    pool.mkdir()
    write_jsonl(pool / "t.jsonl", [dict(r, teacher_correct=True) for r in arithmetic_rows(3)])
    with pytest.raises(ScasError, match="--chat-template"):
        score(bare_student, pool, tmp_path / "out0", progress=False)
    m = score(bare_student, pool, tmp_path / "out", progress=False,
              chat_template="chatml")
    assert m["chat_template"] == "chatml"
    assert m["teachers"]["t"]["record"]["chat_template"] == "chatml"
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["chat_template"] == "chatml" and manifest["teachers"]["t"]["rows"] == 3
