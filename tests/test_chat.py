"""Chat-template tokenization boundaries and masks vs the oracle (scas_jax.data.chat)."""

from __future__ import annotations

import copy
import json
import threading

import numpy as np
import pytest

from scas_jax.assets import GSM8K_POOL
from scas_jax.data.chat import (
    DEFAULT_SYSTEM,
    ChatEncoder,
    Encoded,
    RowError,
    build_messages,
    special_token_ids,
)
from scas_jax.data.rows import MISSING_FIELDS_ERROR
from scas_jax.errors import ScasError

IM_START, IM_END, NEWLINE = 1, 2, 198

# Renders the last assistant turn as "<|im_start|>model\n..." while the generation prompt
# is "<|im_start|>assistant\n": the prompt is NOT a prefix of the full text.
MISMATCH_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}{{ '<|im_start|>model\n' + m['content'] + '<|im_end|>\n' }}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# The assistant turn is the bare content after the generation prompt: full = prompt + answer.
BARE_ANSWER_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' + m['content'] }}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Starts with ordinary text (position 0 is a non-special question token) and drops the answer.
PLAIN_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['role'] + ': ' + m['content'] + '\n' }}"
    "{% elif not drop %}{{ 'assistant: ' + m['content'] + '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)


def with_template(tokenizer, template):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    return tok


def gsm8k_rows(n_per_teacher: int = 8) -> list[dict]:
    rows = []
    for name in ("human_reference", "gpt3_175b_verification"):
        with open(GSM8K_POOL / f"{name}.jsonl") as f:
            rows += [json.loads(next(f)) for _ in range(n_per_teacher)]
    return rows


def assert_matches_oracle(enc: Encoded, tokenizer, row: dict) -> None:
    from scas_reference import reference_tokenize

    ref = reference_tokenize(tokenizer, row)
    assert enc.ids.dtype == np.int32
    np.testing.assert_array_equal(enc.ids, ref["ids"].numpy())
    assert enc.n_prompt == ref["n_prompt"]
    np.testing.assert_array_equal(enc.question_mask, ref["question"].numpy())
    np.testing.assert_array_equal(enc.answer_mask, ref["answer"].numpy())
    first = np.arange(enc.length) == 0
    np.testing.assert_array_equal(enc.nll_question_mask, ref["question"].numpy() & ~first)
    np.testing.assert_array_equal(enc.nll_answer_mask, ref["answer"].numpy() & ~first)


def test_build_messages_defaults():
    row = {"system": "", "instruction": 12, "output": "x"}
    assert build_messages(row) == [
        {"role": "system", "content": DEFAULT_SYSTEM},
        {"role": "user", "content": "12"},
        {"role": "assistant", "content": "x"},
    ]
    assert build_messages({"system": "S", "instruction": "q", "teacher_output": "t", "output": "o"})[2]["content"] == "t"


def test_special_ids_smollm2(smollm2_tokenizer):
    assert special_token_ids(smollm2_tokenizer).tolist() == [0, 1, 2]


def test_gsm8k_rows_match_oracle(smollm2_tokenizer):
    rows = gsm8k_rows()
    encoded = ChatEncoder(smollm2_tokenizer).encode_rows(rows, batch_size=5)
    assert len(encoded) == len(rows)
    for enc, row in zip(encoded, rows):
        assert isinstance(enc, Encoded)
        assert_matches_oracle(enc, smollm2_tokenizer, row)
        ids = enc.ids.tolist()
        # ChatML: the prompt ends with "<|im_start|>assistant\n", the full text with "<|im_end|>\n".
        assert ids[0] == IM_START and ids[enc.n_prompt - 4] == IM_START
        assert ids[enc.n_prompt - 1] == NEWLINE and ids[-2:] == [IM_END, NEWLINE]
        assert not enc.question_mask[0] and not enc.answer_mask[-2] and enc.answer_mask[-1]
        answer_text = smollm2_tokenizer.decode(ids[enc.n_prompt : -2])
        assert answer_text == row["teacher_output"]
        assert int(enc.answer_mask.sum()) == enc.n_answer - 1  # all but <|im_end|>


def test_first_gsm8k_row_exact_values(smollm2_tokenizer):
    enc = ChatEncoder(smollm2_tokenizer).encode(gsm8k_rows(1)[0])
    prompt_ids = smollm2_tokenizer(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        + gsm8k_rows(1)[0]["instruction"]
        + "<|im_end|>\n<|im_start|>assistant\n"
    )["input_ids"]
    assert enc.n_prompt == len(prompt_ids)
    assert enc.ids[: enc.n_prompt].tolist() == prompt_ids
    n_special_prompt = sum(i in (0, 1, 2) for i in prompt_ids)
    assert int(enc.question_mask.sum()) == enc.n_prompt - n_special_prompt == int(enc.nll_question_mask.sum())


def test_batched_equals_single(smollm2_tokenizer):
    encoder = ChatEncoder(smollm2_tokenizer)
    rows = gsm8k_rows(3)
    batched = encoder.encode_rows(rows, batch_size=4)
    for enc, row in zip(batched, rows):
        single = encoder.encode(row)
        np.testing.assert_array_equal(enc.ids, single.ids)
        assert enc.n_prompt == single.n_prompt
    lazily = list(encoder.iter_batches((r for r in rows), batch_size=4))
    assert [len(b) for b in lazily] == [4, 2]
    assert [e.ids.tolist() for b in lazily for e in b] == [e.ids.tolist() for e in batched]


def test_background_thread(smollm2_tokenizer):
    encoder = ChatEncoder(smollm2_tokenizer)
    rows = gsm8k_rows(2)
    out: list = []
    worker = threading.Thread(target=lambda: out.extend(encoder.encode_rows(rows)))
    worker.start()
    worker.join(timeout=60)
    assert [e.ids.tolist() for e in out] == [encoder.encode(r).ids.tolist() for r in rows]


def test_prompt_not_prefix_of_full(smollm2_tokenizer):
    tok = with_template(smollm2_tokenizer, MISMATCH_TEMPLATE)
    row = gsm8k_rows(1)[0]
    enc = ChatEncoder(tok).encode(row)
    assert_matches_oracle(enc, tok, row)
    prompt_len = len(tok(ChatEncoder(tok).texts(row)[0])["input_ids"])
    ids = enc.ids.tolist()
    last_start = len(ids) - 1 - ids[::-1].index(IM_START)
    # common prefix ends right after the last turn's <|im_start|>; "assistant\n" != "model\n"
    assert enc.n_prompt == last_start + 1 < prompt_len
    assert tok.decode(ids[enc.n_prompt :]).startswith("model\n")
    assert enc.answer_mask[enc.n_prompt] and not enc.question_mask[enc.n_prompt:].any()


def test_one_token_answer(smollm2_tokenizer):
    tok = with_template(smollm2_tokenizer, BARE_ANSWER_TEMPLATE)
    row = {"id": 1, "instruction": "What is 3 + 4?", "teacher_output": "7"}
    enc = ChatEncoder(tok).encode(row)
    assert_matches_oracle(enc, tok, row)
    assert enc.n_answer == 1 and enc.ids[-1] == tok.convert_tokens_to_ids("7")
    assert enc.answer_mask.tolist() == [False] * (enc.length - 1) + [True]
    assert enc.nll_answer_mask.sum() == 1


def test_empty_system_prompt_uses_default(smollm2_tokenizer):
    encoder = ChatEncoder(smollm2_tokenizer)
    base = {"id": 1, "instruction": "Hi?", "teacher_output": "Hello."}
    empty = encoder.encode({**base, "system": ""})
    missing = encoder.encode(base)
    explicit = encoder.encode({**base, "system": DEFAULT_SYSTEM})
    assert empty.ids.tolist() == missing.ids.tolist() == explicit.ids.tolist()
    assert DEFAULT_SYSTEM in smollm2_tokenizer.decode(empty.ids[: empty.n_prompt].tolist())
    assert_matches_oracle(empty, smollm2_tokenizer, {**base, "system": ""})
    other = encoder.encode({**base, "system": "Be terse."})
    assert other.n_prompt < empty.n_prompt


def test_position_zero_not_special(smollm2_tokenizer):
    tok = with_template(smollm2_tokenizer, PLAIN_TEMPLATE.replace("not drop", "true"))
    row = {"instruction": "Add 2 and 2.", "teacher_output": "4"}
    enc = ChatEncoder(tok).encode(row)
    assert_matches_oracle(enc, tok, row)
    assert enc.question_mask[0] and not enc.nll_question_mask[0]
    assert enc.question_mask.sum() == enc.nll_question_mask.sum() + 1
    assert enc.question_mask.sum() == enc.n_prompt  # no special token anywhere


def test_error_rows(smollm2_tokenizer):
    encoder = ChatEncoder(smollm2_tokenizer)
    out = encoder.encode_rows(
        [
            {"id": 1, "instruction": "q"},
            {"id": 2, "instruction": "q", "teacher_output": "a"},
            {"id": 3, "teacher_output": "a"},
        ]
    )
    assert out[0] == RowError(MISSING_FIELDS_ERROR) and out[2] == RowError(MISSING_FIELDS_ERROR)
    assert isinstance(out[1], Encoded)
    # a template that renders no answer at all: n_answer == 0 -> error row
    dropping = with_template(smollm2_tokenizer, PLAIN_TEMPLATE.replace("not drop", "false").replace(
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}", ""))
    err = ChatEncoder(dropping).encode({"instruction": "q", "teacher_output": "a"})
    assert isinstance(err, RowError) and "n_answer=0" in err.message


def test_no_chat_template_names_tokenizer(smollm2_tokenizer):
    tok = with_template(smollm2_tokenizer, None)
    with pytest.raises(ScasError, match="has no chat template") as err:
        ChatEncoder(tok, name="my-student")
    assert "my-student" in str(err.value)
