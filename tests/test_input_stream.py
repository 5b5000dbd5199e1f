"""The streaming input stage of ``scas-jax score`` (issue 11 item 3).

:func:`scas_jax.scoring.scorer.prepare_stream` reads the rows once, keeps per-row
numbers and spills the token ids; batches are rebuilt from their own rows. Checked
against :func:`scas_jax.scoring.scorer.prepare`, the in-memory reference:

* the same errors, lengths, plan, stats, journal digest and batch arrays, with the
  SmolLM2 tokenizer and the tiny one, with and without the prompt cache;
* a bounded window by construction: the item arrays alive at once never exceed two
  batches' items (a counter, not RSS);
* ``score`` gives the same score files, manifest totals and journal as the reference
  path, and a streamed run interrupted and resumed gives the same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import tiny_tokenizer
from interrupt import Interrupted, stop_after
from pool_files import gsm8k
from scas_jax.data.chat import ChatEncoder
from scas_jax.data.packing import materialise
from scas_jax.scoring import commands
from scas_jax.scoring.journal import JOURNAL_DIR
from scas_jax.scoring.scorer import ScoreConfig, prepare, prepare_stream

KEYS = ("tokens", "question_mask", "answer_mask", "nll_question_mask", "nll_answer_mask")
TEACHERS = ("human_reference", "gpt3_175b_verification", "gpt3_6b_verification")



def pool_rows(n: int = 6) -> list[dict]:
    """Teacher-major rows (the same questions under every teacher, like a pool) and
    edge rows: an error row, a row over max_length, an empty system, a row whose
    prompt/answer tokens merge (the common-prefix fallback)."""
    rows = [r for t in TEACHERS for r in gsm8k(t, n)]
    rows += [
        {"id": "bad", "instruction": "", "teacher_output": "x"},
        {"id": "long", "instruction": "Say a lot.", "teacher_output": "word " * 1200},
        {"id": "nosys", "system": "", "instruction": "Add 2 and 2.", "teacher_output": "4"},
        {"id": "dup", "system": "", "instruction": "Add 2 and 2.", "teacher_output": "four"},
        # added tokens and odd whitespace around the prompt/answer junction
        {"id": "sp", "system": "", "instruction": "Add 2 and 2.", "teacher_output": "  \n\n 4"},
        {"id": "tok", "system": "", "instruction": "Add 2 and 2.",
         "teacher_output": "<|im_end|>\n<|im_start|>user\n4<|im_start|>"},
        {"id": "tokq", "system": "<|im_end|>", "instruction": "<|im_start|>assistant\n",
         "teacher_output": "<|endoftext|>4"},
        {"id": "uni", "instruction": "Héllo → 2+2? 😀", "teacher_output": "😀 ünïcode\r\n 4"},
    ]
    return rows


def assert_same_prepared(ref, got) -> None:
    assert len(got) == len(ref)
    assert got.error_items == ref.error_items
    assert [got.error(i) for i in range(len(got))] == [ref.error(i) for i in range(len(ref))]
    assert [got.length(i) for i in range(len(got))] == [ref.length(i) for i in range(len(ref))]
    assert got.plans == ref.plans
    assert got.stats == ref.stats
    assert got.digest() == ref.digest()
    for plan in ref.plans:
        want = materialise(plan, ref.seqs_for(plan.items), KEYS)
        have = materialise(plan, got.seqs_for(plan.items), KEYS)
        assert want.keys() == have.keys()
        for k in want:
            assert want[k].dtype == have[k].dtype and np.array_equal(want[k], have[k]), k


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_stream_matches_reference(which, request):
    tok = tiny_tokenizer.build() if which == "tiny" else request.getfixturevalue("smollm2_tokenizer")
    rows = pool_rows()
    cfg = ScoreConfig(batch_tokens=2048, max_length=1024 if which == "smollm2" else 2048,
                      max_segments=4)
    ref = prepare(rows, tok, cfg, row_multiple=2)
    assert ref.error_items  # the edge rows are errors (missing field, too long)
    got = prepare_stream(iter(rows), tok, cfg, row_multiple=2, batch_size=5)
    try:
        assert_same_prepared(ref, got)
    finally:
        got.close()


def test_prompt_cache_gives_identical_encodings(smollm2_tokenizer):
    rows = pool_rows(4)
    enc = ChatEncoder(smollm2_tokenizer)
    plain = enc.encode_rows(rows, batch_size=3)
    cache: dict = {}
    cached = [e for b in enc.iter_batches(rows, 3, prompt_cache=cache) for e in b]
    assert len(cache) == 4 + 4  # one prompt per distinct (system, instruction)
    assert enc.split_rows > len(rows) // 2  # most answers tokenized after the prompt head
    for a, b in zip(plain, cached):
        assert type(a) is type(b)
        if hasattr(a, "ids"):
            assert a.n_prompt == b.n_prompt
            for f in ("ids", "question_mask", "answer_mask", "nll_question_mask", "nll_answer_mask"):
                assert np.array_equal(getattr(a, f), getattr(b, f)) and getattr(a, f).dtype == getattr(b, f).dtype
        else:
            assert a == b


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_batch_ids_are_the_tokenizers_own(which, request, monkeypatch):
    """The backend's encode_batch_fast gives the ids of ``tokenizer(texts)`` on every
    text of the edge rows, and the same tokens and plan (digest) as the plain call."""
    from scas_jax.data import chat

    tok = tiny_tokenizer.build() if which == "tiny" else request.getfixturevalue("smollm2_tokenizer")
    enc = ChatEncoder(tok)
    texts = [t for r in pool_rows() if r.get("instruction") for t in enc.texts(r)]
    texts += ["", " ", "<|im_start|><|im_end|>", "a\u00a0b\u200b c\t\n", "<|endoftext|>" * 3]
    assert getattr(tok, "_tokenizer", None) is not None  # the fast path is the one tested
    assert chat.batch_ids(tok, texts) == tok(texts)["input_ids"]
    cfg = ScoreConfig(batch_tokens=2048, max_length=1024, max_segments=4)
    got = prepare_stream(iter(pool_rows()), tok, cfg, batch_size=7)
    monkeypatch.setattr(chat, "batch_ids", lambda t, xs: t(xs)["input_ids"])
    plain = prepare_stream(iter(pool_rows()), tok, cfg, batch_size=7)
    try:
        assert_same_prepared(plain, got)
    finally:
        got.close()
        plain.close()


def test_window_is_bounded_by_construction():
    """Materialising every batch (as the scorer's producer does, one batch at a time)
    never holds more item arrays than two batches' items, however many rows."""
    tok = tiny_tokenizer.build()
    rows = [dict(r, id=f"{r['id']}-{k}") for k in range(8) for r in pool_rows(8)]
    cfg = ScoreConfig(batch_tokens=2048, max_length=2048, max_segments=2)
    got = prepare_stream(iter(rows), tok, cfg, batch_size=16)
    try:
        assert not hasattr(got, "encoded")  # no per-row arrays kept
        most = max(len(p.items) for p in got.plans)
        for plan in got.plans:
            materialise(plan, got.seqs_for(plan.items), KEYS)
        assert got.alive == 0
        assert 0 < got.peak_alive <= 2 * most < len(rows) // 4
    finally:
        got.close()


# ------------------------------------------------------------------ score: stream vs reference


@pytest.fixture(scope="module")
def tiny_llama(tiny_llama_dir):
    from scas_jax.loader import load_student

    return load_student(tiny_llama_dir)


def _pool(directory: Path) -> Path:
    directory.mkdir(parents=True)
    for t in TEACHERS[:2]:
        rows = gsm8k(t, 5) + ([{"id": "bad", "instruction": "", "teacher_output": "x"}]
                              if t == TEACHERS[0] else [])
        (directory / f"{t}.jsonl").write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return directory



def _outputs(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*_scas_scores.jsonl"))}


def test_score_stream_equals_reference_and_resumes(tiny_llama, tmp_path, monkeypatch):
    import jax

    from scas_jax.parallel import make_mesh

    pool = _pool(tmp_path / "pool")
    kw = dict(mesh=make_mesh("data=-1", devices=jax.devices()[:1]), batch_tokens=256,
              max_length=1024, max_segments=2, progress=False)
    keep = ("rows", "errors", "tokens", "padded_tokens", "batches", "compiled_shapes",
            "fingerprint")

    monkeypatch.setattr(commands, "STREAM_INPUT", False)
    ref_out = tmp_path / "ref"
    with pytest.raises(Interrupted):  # the reference journal after 2 batches
        commands.score(tiny_llama, pool, ref_out, on_batch=stop_after(2), **kw)
    (ref_journal,) = (ref_out / JOURNAL_DIR).glob("*.jsonl")
    ref_journal_bytes = ref_journal.read_bytes()
    ref = commands.score(tiny_llama, pool, ref_out, **kw)
    monkeypatch.setattr(commands, "STREAM_INPUT", True)

    out = tmp_path / "stream"
    with pytest.raises(Interrupted):
        commands.score(tiny_llama, pool, out, on_batch=stop_after(2), **kw)
    (journal,) = (out / JOURNAL_DIR).glob("*.jsonl")
    assert journal.name == ref_journal.name  # same fingerprint: same digest of tokens and plan
    assert journal.read_bytes() == ref_journal_bytes  # same header and journaled batches
    assert [p.name for p in out.iterdir()] == [JOURNAL_DIR]  # the spill file left nothing
    m = commands.score(tiny_llama, pool, out, **kw)
    assert m["resumed_batches"] == 2 and m["scored_batches"] == m["batches"] - 2 > 0
    assert {k: m[k] for k in keep} == {k: ref[k] for k in keep}
    assert m["errors"] == 1
    assert _outputs(out) == _outputs(ref_out) and len(_outputs(out)) == 2
    assert not (out / JOURNAL_DIR).exists()


def test_head_split_refuses_a_token_across_the_junction():
    from scas_jax.data.chat import _head_matches, _last_added_end

    split = (["<a>", "a>b"], {1, 2}, 3)
    head_text = "x<a>"
    cut = _last_added_end(head_text, split)
    assert cut == 4
    import hashlib

    head = (cut, hashlib.blake2b(head_text.encode(), digest_size=16).digest(), None)
    assert _head_matches("x<a>c", head, split)
    assert not _head_matches("x<a>b", head, split)  # "a>b" spans the junction
    assert not _head_matches("y<a>c", head, split)  # another head
    assert not _head_matches("x<a>", head, split)  # nothing after the head


def test_split_is_off_for_tokenizers_it_cannot_prove():
    from scas_jax.data.chat import split_safe_tokens

    assert split_safe_tokens(tiny_tokenizer.build()) is None  # a normalizer (lower-case)


def test_field_columns_give_back_the_same_dicts():
    """The fields of every scored item, kept as float64 columns, come back as the
    same dicts (values bitwise, key order); other dicts are kept as they are."""
    import math

    cols = commands.FieldColumns(5)
    a = {"x": 0.1 + 0.2, "y": 1e-300, "z": -0.0}
    cols.put(0, [(0, a), (3, {"x": float("nan"), "y": 2.0, "z": 1.5})])
    cols.put(1, [(4, {"x": 1, "y": 2.0, "z": 3.0}), (2, {"y": 1.0, "x": 2.0, "z": 3.0})])
    assert cols[0] == a and list(cols[0]) == ["x", "y", "z"]
    assert math.copysign(1, cols[0]["z"]) == -1 and math.isnan(cols[3]["x"])
    assert cols[4] == {"x": 1, "y": 2.0, "z": 3.0} and type(cols[4]["x"]) is int
    assert list(cols[2]) == ["y", "x", "z"]
    assert 1 not in cols and all(i in cols for i in (0, 2, 3, 4))
    with pytest.raises(KeyError):
        cols[1]


def test_score_holds_no_pool_rows_and_names_a_file_changed_while_read(tiny_llama, tmp_path,
                                                                       monkeypatch):
    """The validated pool keeps counts only; a file that changes between validation and
    tokenizing is an error naming it (never a score file of other rows)."""
    import jax

    from scas_jax.data import pool as pool_mod
    from scas_jax.errors import ScasError
    from scas_jax.parallel import make_mesh

    pool = _pool(tmp_path / "pool")
    kw = dict(mesh=make_mesh("data=-1", devices=jax.devices()[:1]), batch_tokens=256,
              max_length=1024, max_segments=2, progress=False)
    seen = []
    real_read_pool = pool_mod.read_pool

    def read_pool(*a, **k):
        p = real_read_pool(*a, **k)
        seen.append(p)
        return p

    monkeypatch.setattr(pool_mod, "read_pool", read_pool)
    m = commands.score(tiny_llama, pool, tmp_path / "out", **kw)
    files = seen[0].files
    assert m["rows"] == sum(f.n_kept for f in files) > 0 and all(f.rows == [] for f in files)

    real_tokenizer = commands._tokenizer

    def edit_then_tokenizer(*a):  # between validation and the rows' second read
        with open(pool / f"{TEACHERS[1]}.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"id": "new", "instruction": "1+1?", "teacher_output": "2"}) + "\n")
        return real_tokenizer(*a)

    monkeypatch.setattr(commands, "_tokenizer", edit_then_tokenizer)
    with pytest.raises(ScasError, match=rf"{TEACHERS[1]}.jsonl: changed while being read"):
        commands.score(tiny_llama, pool, tmp_path / "out2", **kw)
