"""`scas-jax score` and the library scorer: oracle parity, invariance, compile bounds,
resume after a real kill, and every bad input.

Kept fast on 2 cores: the SmolLM2 student is shared through the session fixture, the
tiny models use the offline character tokenizer of ``tests/tiny_tokenizer.py``, pools
are a few GSM8K rows, and budgets are small (few, small compiled shapes).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny_tokenizer
from test_chat import BARE_ANSWER_TEMPLATE, MISMATCH_TEMPLATE, with_template
from interrupt import Interrupted, stop_after
from pool_files import gsm8k, write_pool
from scas_jax.cli import main as cli_main
from scas_jax.data.chat import ChatEncoder
from scas_jax.data.packing import bucket_lengths
from scas_jax.errors import ScasError
from scas_jax.parallel import make_mesh
from scas_jax.scoring.commands import score
from scas_jax.scoring.core import compiled_stats
from scas_jax.scoring.fields import ERROR_FIELD, METRIC_FIELDS
from scas_jax.scoring.journal import JOURNAL_DIR, Journal
from scas_jax.scoring.scorer import ScoreConfig, compilations, prepare, score_rows

TEACHERS = ("human_reference", "gpt3_175b_verification", "gpt3_6b_verification")
REPO = Path(__file__).resolve().parents[1]




def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def assert_metrics_close(got: dict, want: dict, label="", rel=1e-4, abs_=1e-6) -> None:
    assert set(METRIC_FIELDS) <= set(got), label
    for key in METRIC_FIELDS:
        assert got[key] == pytest.approx(want[key], rel=rel, abs=abs_), (label, key, got[key], want[key])
    assert (ERROR_FIELD in got) == (ERROR_FIELD in want), label


def one_device_mesh():
    return make_mesh("data=-1", devices=jax.devices()[:1])


# ------------------------------------------------------------------ tiny models + tokenizer


@pytest.fixture(scope="module")
def tiny_tok():
    return tiny_tokenizer.build()


@pytest.fixture(scope="module")
def tiny_students(tiny_hf_dirs, tiny_tok):
    """{family: (scas_jax Student with the tiny tokenizer, torch model)} for Qwen2/Qwen3."""
    import torch
    from transformers import AutoModelForCausalLM

    from scas_jax.loader import load_student

    out = {}
    for name in ("qwen2_bias", "qwen3_qknorm_tied"):
        st = dataclasses.replace(load_student(tiny_hf_dirs[name]), tokenizer=tiny_tok)
        tm = AutoModelForCausalLM.from_pretrained(tiny_hf_dirs[name], dtype=torch.float32).eval()
        out[name] = (st, tm)
    return out


@pytest.fixture(scope="module")
def tiny_llama(tiny_llama_dir):
    from scas_jax.loader import load_student

    return load_student(tiny_llama_dir)


def edge_rows() -> list[dict]:
    return [
        {"id": "one", "instruction": "What is 3 + 4?", "teacher_output": "7"},  # 1-char answer
        {"id": "nosys", "system": "", "instruction": "Add 2 and 2.", "teacher_output": "2 + 2 = 4."},
        {"id": "bad", "instruction": "", "teacher_output": "x"},  # error row
    ]


@pytest.mark.parametrize("family", ["qwen2_bias", "qwen3_qknorm_tied"])
def test_tiny_qwen_parity_with_torch_oracle(tiny_students, family):
    from scas_reference import reference_metrics

    st, torch_model = tiny_students[family]
    rows = gsm8k("human_reference", 3) + edge_rows()
    cfg = ScoreConfig(batch_tokens=2048, max_length=1024)
    got = score_rows(st.params, st.cfg, st.tokenizer, rows, cfg)
    for row, g in zip(rows, got):
        want = reference_metrics(torch_model, st.tokenizer, row, lambda_scas=0.5)
        assert_metrics_close(g, want, f"{family} {row['id']}")
        if ERROR_FIELD not in want:
            assert g["answer_mean_nll"] > 1.0 and np.isfinite(g["scas_score"])  # real values
    assert got[5][ERROR_FIELD].startswith("Missing instruction")

    # an answer of exactly one token: a template that ends right after the answer
    bare = tiny_tokenizer.build(BARE_ANSWER_TEMPLATE)
    row = edge_rows()[0]
    assert ChatEncoder(bare).encode(row).n_answer == 1
    (one,) = score_rows(st.params, st.cfg, bare, [row], cfg)
    assert_metrics_close(one, reference_metrics(torch_model, bare, row, 0.5), f"{family} one token")
    assert one["answer_answer_similarity"] == pytest.approx(1.0)
    assert one["answer_answer_similarity_no_diag"] == 0.0 and one["answer_mean_nll"] > 1.0


# ------------------------------------------------------------------ invariance


@pytest.fixture(scope="module")
def varied_rows():
    """GSM8K rows of three teachers plus short rows: many different lengths."""
    rows = [r for t in TEACHERS for r in gsm8k(t, 3)]
    rows += [{"id": f"s{n}", "instruction": "Say it." * (1 + n % 3), "teacher_output": "ok " * n}
             for n in (1, 5, 20, 60)]
    return rows


def _metric_matrix(fields: list[dict]) -> np.ndarray:
    return np.array([[f[k] for k in METRIC_FIELDS] for f in fields])


def test_same_scores_on_1_and_8_devices_budgets_and_packing(tiny_students, varied_rows):
    st, _ = tiny_students["qwen2_bias"]
    tok = st.tokenizer
    base_cfg = ScoreConfig(batch_tokens=2048, max_length=512)  # 3 rows > 512: error rows
    one = make_mesh("data=-1", devices=jax.devices()[:1])
    eight = make_mesh("data=-1")
    assert len(jax.devices()) == 8

    fields = score_rows(st.params, st.cfg, tok, varied_rows, base_cfg, mesh=one)
    assert sum(ERROR_FIELD in f for f in fields) == 3
    base = _metric_matrix(fields)
    nll = base[[ERROR_FIELD not in f for f in fields], METRIC_FIELDS.index("answer_mean_nll")]
    assert np.all(np.isfinite(base)) and len(nll) == 10 and nll.min() > 1.0

    # 8 simulated devices: the same plan shapes up to the row multiple; bitwise equal
    p8 = prepare(varied_rows, tok, base_cfg, row_multiple=8)
    assert all(len(p.rows) % 8 == 0 for p in p8.plans)
    on8 = _metric_matrix(score_rows(st.params, st.cfg, tok, varied_rows, base_cfg, mesh=eight))
    np.testing.assert_array_equal(on8, base)

    # other batch-token budget: other batches, same per-sequence results (bitwise here)
    small = dataclasses.replace(base_cfg, batch_tokens=512)
    assert len(prepare(varied_rows, tok, small).plans) > len(prepare(varied_rows, tok, base_cfg).plans)
    np.testing.assert_array_equal(
        _metric_matrix(score_rows(st.params, st.cfg, tok, varied_rows, small, mesh=one)), base)

    # bucketed (one sequence per row) vs packed (up to 16 per row): equal within 1e-5
    bucketed = dataclasses.replace(base_cfg, max_segments=1)
    pb, pp = prepare(varied_rows, tok, bucketed), prepare(varied_rows, tok, base_cfg)
    assert max(len(r) for p in pb.plans for r in p.rows) == 1
    assert max(len(r) for p in pp.plans for r in p.rows) >= 2  # short rows share a row
    got = _metric_matrix(score_rows(st.params, st.cfg, tok, varied_rows, bucketed, mesh=one))
    np.testing.assert_allclose(got, base, rtol=1e-5, atol=1e-7)  # not bitwise: another program


def test_sharded_scorer_keeps_every_row_on_its_device(tiny_students, monkeypatch):
    """On the 8-device mesh the compiled scorer moves nothing between devices: the MLP's
    token pieces and the log-softmax's position chunks (both made small here, so both
    loops run with several rows a device) are position ranges of each device's own rows.
    A piece of the flattened batch would gather the whole batch on every device, and
    every device would compute every row (the MLP and head of a 2-device run did)."""
    import functools

    from scas_jax.models import layers
    from scas_jax.parallel import mesh_context, shard_params
    from scas_jax.scoring import scorer as sc
    from scas_jax.scoring.core import sequence_stats

    st, _ = tiny_students["qwen2_bias"]
    monkeypatch.setattr(layers, "MLP_TOKEN_CHUNK", 64)
    cfg = ScoreConfig(batch_tokens=512, max_length=256)
    rows = [{"id": f"r{n}", "instruction": "Add them." * (1 + n % 4),
             "teacher_output": "one two " * (6 + 3 * n % 17)} for n in range(40)]
    fn = jax.jit(functools.partial(sequence_stats, cfg=st.cfg, max_segments=cfg.max_segments,
                                   vocab_chunk=64))
    eight = make_mesh("data=-1")
    prep = prepare(rows, st.tokenizer, cfg, row_multiple=8)
    k = max(range(len(prep.plans)), key=lambda i: len(prep.plans[i].rows))
    assert len(prep.plans[k].rows) >= 16  # several rows a device: the loops slice positions
    batch = sc._build(prep, k, eight)
    params = shard_params(st.params, eight)
    with mesh_context(batch):
        compiled = fn.lower(params, batch).compile()
    hlo = compiled.as_text()
    assert "mlp/while" in hlo  # the MLP ran in pieces
    for op in ("all-gather", "all-to-all", "collective-permute", "all-reduce"):
        assert op not in hlo, op
    got = jax.tree.map(np.asarray, compiled(params, batch))
    one = jax.tree.map(np.asarray, fn(st.params, sc._build(prep, k)))  # one device, one program
    for name in one:
        np.testing.assert_allclose(got[name], one[name], rtol=2e-5, atol=1e-5, err_msg=name)


def test_factored_tap_gives_the_unit_row_sums():
    """``unit_tap_stats`` of a FactoredUp (the tapped activation ``x @ w`` never made)
    equals ``tap_stats`` of the unit rows of ``x @ w``, a zero row included, and is the
    same bit for bit whether a row is scored alone or beside others (one product a row:
    a GEMM's rows depend on how many rows it has)."""
    from scas_jax.models.layers import FactoredUp
    from scas_jax.scoring.core import l2_normalise, tap_stats, unit_tap_stats

    r = np.random.default_rng(7)
    b, t, d, f, segs = 3, 12, 8, 20, 4
    x = r.normal(size=(b, t, d)).astype(np.float32)
    x[1, 5] = 0.0  # a zero row: its unit row is 0, as l2_normalise makes it
    w = r.normal(size=(d, f)).astype(np.float32)
    seg = np.repeat(np.arange(1, segs + 1), t // segs)[None].repeat(b, 0).astype(np.int32)
    seg[2, -3:] = 0  # padding
    q = (np.arange(t) % 3 == 0)[None].repeat(b, 0)
    batch = {"segment_ids": jnp.asarray(seg), "question_mask": jnp.asarray(q),
             "answer_mask": jnp.asarray(~q & (seg > 0))}
    up = jnp.asarray(x) @ jnp.asarray(w)
    want = tap_stats(l2_normalise(up), batch, max_segments=segs)
    fac = FactoredUp(jnp.asarray(x), jnp.asarray(w), jnp.sum(up * up, -1))
    fn = jax.jit(lambda a, bt: unit_tap_stats(a, bt, max_segments=segs))
    got = fn(fac, batch)
    for k in want:
        np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), rtol=2e-6, atol=1e-6)
    one = fn(FactoredUp(fac.x[1:2], fac.w, fac.sqnorm[1:2]),
             {k: v[1:2] for k, v in batch.items()})
    for k in want:
        np.testing.assert_array_equal(np.asarray(one[k]), np.asarray(got[k])[1:2])


def test_compilations_bounded_by_buckets(tiny_students):
    st, _ = tiny_students["qwen3_qknorm_tied"]
    rows = [{"id": n, "instruction": "Count.", "teacher_output": "a" * n} for n in range(1, 3000, 75)]
    cfg = ScoreConfig(batch_tokens=4096, max_length=4096, max_segments=7)  # own jit cache entry
    prepared = prepare(rows, st.tokenizer, cfg)
    assert len({e.length for e in prepared.encoded}) == len(rows) == 40
    buckets = {p.length for p in prepared.plans}
    assert len(buckets) >= 2 and buckets <= set(bucket_lengths(4096))
    assert len(prepared.plans) > len(buckets)
    fn = compiled_stats(st.cfg, cfg.max_segments, cfg.target_layer, cfg.dtype, cfg.attn_impl,
                        cfg.vocab_chunk)
    shapes = {(len(p.rows), p.length) for p in prepared.plans}
    assert len(shapes) < len(prepared.plans)
    assert compilations(fn) == 0
    out = score_rows(st.params, st.cfg, st.tokenizer, rows, cfg)
    assert all(ERROR_FIELD not in f and f["answer_mean_nll"] > 0 for f in out)
    # one compilation per batch shape (a bucket's full batches and its smaller last
    # one, compiled ahead in the background), not per length or batch
    assert compilations(fn) == len(shapes)
    score_rows(st.params, st.cfg, st.tokenizer, rows, cfg)
    assert compilations(fn) == len(shapes)  # and none again on the next call


def test_command_compiles_for_the_weights_it_reads_while_reading_them(tiny_llama_dir, tmp_path):
    """``score`` with a student path compiles the first batch's program for the weights'
    abstract shapes while a thread reads them: the real weights then hit that program
    (one compilation per batch shape in all, for a Hugging Face directory and for its
    converted checkpoint), and the scores equal those of an already loaded student."""
    from scas_jax.convert.commands import convert
    from scas_jax.loader import load_student, open_student

    rows = gsm8k("human_reference", 11)
    pool = write_pool(tmp_path / "pool", {"a.jsonl": rows})
    converted = convert(tiny_llama_dir, tmp_path / "converted")
    kw = dict(mesh=one_device_mesh(), batch_tokens=2048, max_length=1024, max_segments=5,
              progress=False)  # max_segments=5: this test's own jit cache entry
    want = None
    for i, student in enumerate((tiny_llama_dir, converted)):
        files = open_student(student)
        d = ScoreConfig()
        fn = compiled_stats(files.cfg, 5, d.target_layer, "float32", "auto", d.vocab_chunk)
        m = score(student, pool, tmp_path / f"out{i}", **kw)
        shapes = {tuple(s) for s in m["compiled_shapes"]}
        assert len(shapes) == 2  # full batches and the smaller last one
        assert compilations(fn) == len(shapes), student  # none for a mismatched signature
        got = read_jsonl(tmp_path / f"out{i}" / "a_scas_scores.jsonl")
        if want is None:
            m2 = score(load_student(tiny_llama_dir), pool, tmp_path / "loaded", **kw)
            assert m2["compiled_shapes"] == m["compiled_shapes"]
            want = read_jsonl(tmp_path / "loaded" / "a_scas_scores.jsonl")
        assert got == want


# ------------------------------------------------------------------ SmolLM2 through the command


@pytest.mark.slow
def test_command_matches_torch_oracle_on_smollm2(smollm2_student, smollm2_torch_model, tmp_path):
    from scas_reference import reference_metrics

    pool = write_pool(tmp_path / "pool", {f"{t}.jsonl": gsm8k(t, 2) for t in TEACHERS[:2]})
    out = tmp_path / "out"
    mesh = one_device_mesh()
    m = score(smollm2_student, pool, out, lambda_scas=0.3, mesh=mesh, batch_tokens=1024,
              max_length=512, progress=False)
    assert m["rows"] == 4 and m["errors"] == 0 and m["resumed_batches"] == 0
    assert not (out / JOURNAL_DIR).exists()
    tok = smollm2_student.tokenizer
    for t in TEACHERS[:2]:
        rows = read_jsonl(out / f"{t}_scas_scores.jsonl")
        src = gsm8k(t, 2)
        assert [r["id"] for r in rows] == [r["id"] for r in src]
        for r, s in zip(rows, src):
            assert {k: r[k] for k in s} == {**s, "teacher_name": s["teacher_name"]}  # all kept
            want = reference_metrics(smollm2_torch_model, tok, s, lambda_scas=0.3)
            assert_metrics_close(r, want, f"{t} {s['id']}")
            assert r["lambda_scas"] == 0.3 and r["answer_mean_nll"] > 0.1 and r["scas_score"] > 0
        assert m["teachers"][t]["rows"] == 2 and m["teachers"][t]["tokens"] > 200

    # boundary cases through the library call
    cfg = ScoreConfig(lambda_scas=0.3, batch_tokens=256, max_length=512)  # one [1, 256] shape
    short = {"instruction": "What is 3 + 4?", "teacher_output": "7"}
    for label, tk, row in (("one-token answer", with_template(tok, BARE_ANSWER_TEMPLATE), short),
                           ("prompt not a prefix", with_template(tok, MISMATCH_TEMPLATE), short),
                           ("empty system", tok, {**short, "system": ""})):
        (got,) = score_rows(smollm2_student.params, smollm2_student.cfg, tk, [row], cfg, mesh=mesh)
        assert_metrics_close(got, reference_metrics(smollm2_torch_model, tk, row, 0.3), label)


# ------------------------------------------------------------------ bad inputs


@pytest.fixture
def good_pool(tmp_path):
    return write_pool(tmp_path / "pool", {"a.jsonl": gsm8k("human_reference", 2)})


def test_refusals_before_loading_the_model(tiny_llama_dir, tiny_hf_dirs, good_pool, tmp_path,
                                           monkeypatch):
    import scas_jax.loader as loader

    def no_load(*a, **k):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(loader, "load_student", no_load)
    out = tmp_path / "out"
    for kwargs, message in (
        (dict(lambda_scas=1.5), "lambda_scas must be in [0, 1], got 1.5"),
        (dict(lambda_scas=-0.1), "lambda_scas must be in [0, 1]"),
        (dict(target_layer="layers.-1.attn"), "unknown tap 'layers.-1.attn'"),
        (dict(target_layer="layers.7.mlp.up_proj"), "layer out of range for a 2-layer model"),
        (dict(max_length=1), "--max-length must be >= 2"),
        (dict(dtype="float16"), "--dtype must be one of"),
    ):
        with pytest.raises(ScasError, match=message.replace("[", r"\[").replace("]", r"\]")):
            score(tiny_llama_dir, good_pool, out, **kwargs)
    with pytest.raises(ScasError, match="no such file or directory"):
        score(tmp_path / "missing_student", good_pool, out)
    with pytest.raises(ScasError, match="no tokenizer files"):
        score(tiny_hf_dirs["llama_tied_bias"], good_pool, out)  # weights without a tokenizer
    with pytest.raises(ScasError, match="candidate directory not found"):
        score(tiny_llama_dir, tmp_path / "nope", out)
    assert not out.exists()


def test_bad_pool_files_fail_with_file_and_line(tiny_llama_dir, tmp_path, capsys):
    rows = gsm8k("human_reference", 3)
    bad_json = write_pool(tmp_path / "p1", {"a.jsonl": [rows[0], '{"id": 2, "instruction": ', rows[2]]})
    with pytest.raises(ScasError, match=r"a\.jsonl:2: malformed JSON"):
        score(tiny_llama_dir, bad_json, tmp_path / "o1")
    dup = write_pool(tmp_path / "p2", {"a.jsonl": [rows[0], rows[1], {**rows[2], "id": rows[0]["id"]}]})
    with pytest.raises(ScasError, match=r"a\.jsonl:3: duplicate id .*first at line 1"):
        score(tiny_llama_dir, dup, tmp_path / "o2")
    # the same through the CLI: exit status 2 and the message, no traceback
    code = cli_main(["score", "--student", str(tiny_llama_dir), "--candidate-dir", str(dup),
                     "--output-dir", str(tmp_path / "o3")])
    err = capsys.readouterr().err
    assert code == 2 and "scas-jax score: error:" in err and "a.jsonl:3: duplicate id" in err
    code = cli_main(["score", "--student", str(tmp_path / "none.gguf"), "--candidate-dir", str(dup),
                     "--output-dir", str(tmp_path / "o3"), "--lambda-scas", "0.5"])
    assert code == 2 and "none.gguf: no such file or directory" in capsys.readouterr().err


def test_error_rows_unverified_too_long_and_partial_ids(tiny_llama, tmp_path):
    a = gsm8k("human_reference", 2)
    b = gsm8k("gpt3_6b_verification", 4)  # rows 0 and 2 have teacher_correct false
    assert [r["teacher_correct"] for r in b] == [False, True, False, True]
    a.append({"id": "no-instruction", "teacher_output": "4", "keep_me": [1, 2]})
    a.append({"id": "long", "instruction": "Repeat.", "teacher_output": "word " * 300})
    pool = write_pool(tmp_path / "pool", {"a_teacher_responses.jsonl": a, "b.jsonl": b})
    out = tmp_path / "out"
    kw = dict(mesh=one_device_mesh(), batch_tokens=1024, max_length=1024, progress=False)
    m = score(tiny_llama, pool, out, **kw)

    ta, tb = m["teachers"]["a"], m["teachers"]["b"]
    assert (ta["rows"], ta["errors"], ta["skipped_unverified"]) == (4, 2, 0)
    assert (tb["rows"], tb["errors"], tb["skipped_unverified"]) == (2, 0, 2)
    assert m["errors"] == 2 and m["skipped_unverified"] == 2 and m["rows"] == 6
    rows_a = read_jsonl(out / "a_scas_scores.jsonl")
    assert [r["id"] for r in rows_a] == [r["id"] for r in a]
    miss, long = rows_a[2], rows_a[3]
    assert miss[ERROR_FIELD] == "Missing instruction or teacher_output/output."
    assert miss["keep_me"] == [1, 2] and miss["scas_score"] == 0.0 and miss["teacher_name"] == "a"
    assert "exceeds --max-length 1024" in long[ERROR_FIELD]
    n_long = int(long[ERROR_FIELD].split()[2])
    assert n_long > 1024 and long[ERROR_FIELD].startswith(f"sequence of {n_long} tokens")
    assert all(ERROR_FIELD not in r and r["scas_score"] > 0 for r in rows_a[:2])
    rows_b = read_jsonl(out / "b_scas_scores.jsonl")
    assert [r["id"] for r in rows_b] == [b[1]["id"], b[3]["id"]]  # unverified not written
    assert rows_b[0]["teacher_name"] == "gpt3_6b_verification"  # row-level name kept
    partial = m["pool"]["partial_ids"]  # ids in only some teachers, from every row read
    assert set(partial) == {json.dumps(i) for i in (b[2]["id"], b[3]["id"], "no-instruction", "long")}
    assert partial[json.dumps("long")] == ["a"]
    assert json.loads((out / "manifest.json").read_text())["pool"]["partial_ids"] == partial

    m2 = score(tiny_llama, pool, tmp_path / "out2", include_unverified=True, **kw)
    assert m2["teachers"]["b"]["rows"] == 4 and m2["teachers"]["b"]["skipped_unverified"] == 0
    rows_b2 = read_jsonl(tmp_path / "out2" / "b_scas_scores.jsonl")
    assert [r["id"] for r in rows_b2] == [r["id"] for r in b]
    assert rows_b2[0]["teacher_correct"] is False and rows_b2[0]["scas_score"] > 0
    assert_metrics_close(rows_b2[1], rows_b[0], "same row, other batches", rel=1e-5)


def test_skip_existing_keeps_only_files_made_the_same_way(tiny_llama, tmp_path, capsys):
    pool = write_pool(tmp_path / "pool", {f"{t}.jsonl": gsm8k(t, 2) for t in TEACHERS[:2]})
    out = tmp_path / "out"
    kw = dict(mesh=one_device_mesh(), batch_tokens=1024, max_length=1024, progress=False)
    score(tiny_llama, pool, out, **kw)
    keep, redo = (out / f"{t}_scas_scores.jsonl" for t in TEACHERS[:2])
    keep_bytes, keep_mtime, redo_bytes = keep.read_bytes(), keep.stat().st_mtime_ns, redo.read_bytes()
    umask = os.umask(0)
    os.umask(umask)
    assert keep.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    redo.unlink()
    m = score(tiny_llama, pool, out, skip_existing=True, **kw)
    assert m["teachers"][TEACHERS[0]]["status"] == "existing"
    assert m["teachers"][TEACHERS[1]]["status"] == "scored" and m["rows"] == 2  # one teacher
    assert keep.stat().st_mtime_ns == keep_mtime and keep.read_bytes() == keep_bytes
    assert redo.read_bytes() == redo_bytes
    m = score(tiny_llama, pool, out, skip_existing=True, **kw)  # nothing left to do
    assert m["rows"] == 0 and {t["status"] for t in m["teachers"].values()} == {"existing"}
    capsys.readouterr()

    def statuses(m):
        return {t: (e["status"], e.get("rescored_because")) for t, e in m["teachers"].items()}

    # another lambda: every file was made otherwise, so every file is rescored, and said so
    m = score(tiny_llama, pool, out, skip_existing=True, lambda_scas=0.3, **kw)
    why = "made with other inputs or settings: lambda_scas 0.5 -> 0.3"
    assert statuses(m) == {t: ("scored", why) for t in TEACHERS[:2]}
    err = capsys.readouterr().err
    assert f"{TEACHERS[0]}: rescoring {keep}: {why}" in err
    assert all(r["lambda_scas"] == 0.3 for r in read_jsonl(keep))
    # another student (the same tiny model with other weights) and another target layer
    other = dataclasses.replace(tiny_llama, params=jax.tree.map(lambda x: x * 1.01, tiny_llama.params))
    m = score(other, pool, out, skip_existing=True, lambda_scas=0.3, target_layer="layers.0.residual", **kw)
    why = 'made with other inputs or settings: student changed; target_layer "layers.-1.mlp.up_proj" -> "layers.0.residual"'
    assert {e["rescored_because"] for e in m["teachers"].values()} == {why}
    m = score(tiny_llama, pool, out, skip_existing=True, lambda_scas=0.3, **kw)  # back: rescored
    assert {e["status"] for e in m["teachers"].values()} == {"scored"}
    # a limit, or one changed candidate row, rescores exactly the files concerned
    m = score(tiny_llama, pool, out, skip_existing=True, lambda_scas=0.3, limit=1, **kw)
    assert {e["rescored_because"] for e in m["teachers"].values()} == {
        "made with other inputs or settings: limit null -> 1"}
    score(tiny_llama, pool, out, skip_existing=True, lambda_scas=0.3, **kw)
    rows = gsm8k(TEACHERS[0], 2)
    rows[1]["teacher_output"] += " Done."
    write_pool(pool, {f"{TEACHERS[0]}.jsonl": rows})
    m = score(tiny_llama, pool, out, skip_existing=True, lambda_scas=0.3, **kw)
    assert statuses(m) == {TEACHERS[0]: ("scored", "made with other inputs or settings: input_sha256 changed"),
                           TEACHERS[1]: ("existing", None)}
    assert read_jsonl(keep)[1]["teacher_output"].endswith(" Done.")
    # a score file edited since it was written, or no record of how it was made
    with open(redo, "a", encoding="utf-8") as f:
        f.write("{}\n")
    m = score(tiny_llama, pool, out, skip_existing=True, lambda_scas=0.3, **kw)
    assert statuses(m)[TEACHERS[1]] == (
        "scored", "its content changed since it was written (sha256 differs from manifest.json)")
    assert statuses(m)[TEACHERS[0]] == ("existing", None)
    (out / "manifest.json").unlink()
    m = score(tiny_llama, pool, out, skip_existing=True, lambda_scas=0.3, **kw)
    assert {e["rescored_because"] for e in m["teachers"].values()} == {
        "manifest.json has no record of the settings it was made with"}
    assert read_jsonl(redo) == [r for r in read_jsonl(redo) if r]  # the stray line is gone


def test_score_help_is_plain_and_complete():
    from scas_jax.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction)]
    p = sub.choices["score"]
    assert "\n" not in p.description.strip()
    for markup in ("``", ":class:", ":func:", ":mod:"):
        assert markup not in p.description and markup not in p.format_help()
    options = [a for a in p._actions if a.option_strings and a.dest != "help"]
    assert len(options) >= 12 and all(a.help for a in options), [a.dest for a in options if not a.help]
    assert "(default 4096" not in p.format_help()  # the cli adds defaults, once


# ------------------------------------------------------------------ resume


def test_journal_drops_a_torn_last_line(tmp_path):
    j = Journal(tmp_path, "fp", n_batches=3)
    j.record(0, [(0, {"x": 0.1 + 0.2})])
    j.record(2, [(1, {"x": float("nan")}), (2, {"x": 1e-300})])
    j.close()
    with open(j.path, "a", encoding="utf-8") as f:
        f.write('{"batch": 1, "items": [[3, {"x": 1.')  # killed mid-write
    j2 = Journal(tmp_path, "fp", n_batches=3)
    assert j2.resumed == 2 and set(j2.done) == {0, 2}
    assert j2.done[0][0][1]["x"] == 0.1 + 0.2 and j2.done[2][1][1]["x"] == 1e-300
    j2.record(1, [(3, {"x": 2.0})])
    j2.close()
    j3 = Journal(tmp_path, "fp", n_batches=3)
    assert set(j3.done) == {0, 1, 2} and j3.done[1] == [(3, {"x": 2.0})]
    assert Journal(tmp_path / "other", "fp", n_batches=4).resumed == 0  # another run: fresh
    j3.remove()
    assert not j3.path.exists() and not j3.path.parent.exists()


def _score_cmd(student: Path, pool: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "scas_jax", "score", "--student", str(student),
            "--candidate-dir", str(pool), "--output-dir", str(out), "--limit", "8",
            "--batch-tokens", "512", "--max-length", "1024", "--lambda-scas", "0.4"]


# The same run as _score_cmd through the Python API, with a batch callback that, once two
# batches are journaled, tells the test (a marker file) and waits to be killed.
_VICTIM = """
import sys, time
from pathlib import Path
from scas_jax.scoring.commands import score

def on_batch(done, total):
    if done >= 2:
        Path(sys.argv[4]).write_text(f"{done} {total}")
        time.sleep(600)

score(sys.argv[1], sys.argv[2], sys.argv[3], limit=8, batch_tokens=512, max_length=1024,
      lambda_scas=0.4, progress=False, on_batch=on_batch)
"""


def _env() -> dict:
    return {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
            "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}


def test_resume_after_sigkill_gives_identical_files(tiny_llama_dir, tmp_path):
    pool = write_pool(tmp_path / "pool", {f"{t}.jsonl": gsm8k(t, 8) for t in TEACHERS})
    ref_out, out, marker = tmp_path / "uninterrupted", tmp_path / "killed", tmp_path / "two_done"
    # the uninterrupted run, concurrently with the run we kill (which waits to be killed)
    ref = subprocess.Popen(_score_cmd(tiny_llama_dir, pool, ref_out), env=_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim = subprocess.Popen([sys.executable, "-c", _VICTIM, str(tiny_llama_dir), str(pool),
                               str(out), str(marker)], env=_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and victim.poll() is None and not marker.exists():
        time.sleep(0.05)
    assert victim.poll() is None, victim.stderr.read()
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    victim.stderr.close()
    assert victim.returncode == -signal.SIGKILL
    assert not list(out.glob("*_scas_scores.jsonl")) and not (out / "manifest.json").exists()
    journal_dir = out / JOURNAL_DIR
    (journal,) = journal_dir.glob("*.jsonl")
    assert journal.read_bytes().count(b"\n") - 1 == 2  # header + exactly the 2 batches reported

    stdout, stderr = ref.communicate(timeout=300)
    assert ref.returncode == 0, stderr
    resumed = subprocess.run(_score_cmd(tiny_llama_dir, pool, out), env=_env(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr

    m_ref = json.loads((ref_out / "manifest.json").read_text())
    m = json.loads((out / "manifest.json").read_text())
    assert m_ref["resumed_batches"] == 0 and m_ref["scored_batches"] == m_ref["batches"] >= 4
    assert m["resumed_batches"] == 2 < m["batches"]  # journaled batches not redone
    assert m["scored_batches"] == m["batches"] - 2 == m_ref["batches"] - 2
    assert m["fingerprint"] == m_ref["fingerprint"]
    names = sorted(p.name for p in ref_out.glob("*_scas_scores.jsonl"))
    assert names == sorted(f"{t}_scas_scores.jsonl" for t in TEACHERS)
    for name in names:
        assert (out / name).read_bytes() == (ref_out / name).read_bytes(), name
    assert not journal_dir.exists()  # deleted once the outputs are written
    assert "scoring" in stderr and "tok/s" in stderr  # the progress bar
    rows = read_jsonl(out / names[0])
    assert rows and all(r["lambda_scas"] == 0.4 for r in rows)



def test_resume_follows_content_not_paths_or_mtimes(tiny_llama, tmp_path, capsys):
    rows = {t: gsm8k(t, 4) for t in TEACHERS[:2]}
    pool = write_pool(tmp_path / "pool", {f"{t}.jsonl": r for t, r in rows.items()})
    out = tmp_path / "out"
    kw = dict(mesh=one_device_mesh(), batch_tokens=256, max_length=1024, max_segments=1,
              progress=False)

    def interrupt(candidates):
        with pytest.raises(Interrupted):
            score(tiny_llama, candidates, out, on_batch=stop_after(2), **kw)
        (journal,) = (out / JOURNAL_DIR).glob("*.jsonl")
        assert journal.read_bytes().count(b"\n") == 3  # header + 2 batches

    interrupt(pool)
    copy = tmp_path / "copy"  # another directory, new mtimes, same bytes: resumes
    copy.mkdir()
    for f in pool.iterdir():
        shutil.copyfile(f, copy / f.name)
    m = score(tiny_llama, copy, out, **kw)
    assert m["resumed_batches"] == 2 and m["scored_batches"] == m["batches"] - 2 > 0
    assert m["stale_journals"] == {}
    first = {t: (out / f"{t}_scas_scores.jsonl").read_bytes() for t in TEACHERS[:2]}

    interrupt(copy)  # touched: resumes, same bytes as before
    for f in copy.iterdir():
        st = f.stat()
        os.utime(f, ns=(st.st_atime_ns + 10**9, st.st_mtime_ns + 10**9))
    m = score(tiny_llama, copy, out, **kw)
    assert m["resumed_batches"] == 2
    assert {t: (out / f"{t}_scas_scores.jsonl").read_bytes() for t in TEACHERS[:2]} == first
    assert "starting over" not in capsys.readouterr().err

    interrupt(copy)  # one row changed: starts over, and says why in one line
    changed = [dict(r) for r in rows[TEACHERS[1]]]
    changed[3] = {**changed[3], "teacher_output": "The answer is 42.", "teacher_correct": True}
    write_pool(copy, {f"{TEACHERS[1]}.jsonl": changed})
    m = score(tiny_llama, copy, out, **kw)
    assert m["resumed_batches"] == 0 and m["scored_batches"] == m["batches"]
    (why,) = m["stale_journals"].values()
    assert why.startswith(f"inputs.{TEACHERS[1]} changed; ")  # and the tokens changed with it
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if "starting over" in line] == [
        f"scas-jax score: not resuming {next(iter(m['stale_journals']))}, starting over: {why}"]
    assert read_jsonl(out / f"{TEACHERS[1]}_scas_scores.jsonl")[-1]["teacher_output"] == "The answer is 42."


def test_stale_journal_reasons(tmp_path):
    from scas_jax.scoring.journal import stale_reasons

    old = {"lambda_scas": 0.3, "inputs": {"a": "1" * 64, "b": "2" * 64}, "limit": None}
    new = {"lambda_scas": 0.5, "inputs": {"a": "1" * 64, "b": "3" * 64}, "limit": 8}
    Journal(tmp_path, "old", 2, parts=old).close()
    Journal(tmp_path, "new", 2, parts=new).close()
    (tmp_path / JOURNAL_DIR / "junk.jsonl").write_text("not json\n")
    assert stale_reasons(tmp_path, "new", new) == {
        tmp_path / JOURNAL_DIR / "junk.jsonl": "written by another version of scas_jax",
        tmp_path / JOURNAL_DIR / "old.jsonl": "inputs.b changed; lambda_scas 0.3 -> 0.5; limit null -> 8",
    }


# ------------------------------------------------------------------ --profile


def test_profile_writes_a_trace_and_the_same_scores(tiny_llama_dir, tmp_path, capsys):
    rows = {t: gsm8k(t, 4) for t in TEACHERS[:2]}
    pool = write_pool(tmp_path / "pool", {f"{t}.jsonl": r for t, r in rows.items()})
    common = ["score", "--student", str(tiny_llama_dir), "--candidate-dir", str(pool),
              "--batch-tokens", "256", "--max-length", "1024", "--dtype", "float32"]
    assert cli_main(common + ["--output-dir", str(tmp_path / "plain")]) == 0
    prof = tmp_path / "prof"
    assert cli_main(common + ["--output-dir", str(tmp_path / "traced"), "--profile", str(prof)]) == 0
    err = capsys.readouterr().err
    assert "profile: trace of" in err and str(prof) in err and "perfetto" in err
    assert list(prof.glob("plugins/profile/*/*.xplane.pb"))
    for t in TEACHERS[:2]:
        got = read_jsonl(tmp_path / "traced" / f"{t}_scas_scores.jsonl")
        want = read_jsonl(tmp_path / "plain" / f"{t}_scas_scores.jsonl")
        assert got == want
