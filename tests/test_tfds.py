"""Pools as TFDS datasets (scas_jax.data.tfds_pool, ``scas-jax dataset build``): built
atomically with file:line errors, read back row for row through Grain, and every stage
that reads a pool gives the same outputs from the JSONL pool and from its dataset."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace as dataclass_replace
from pathlib import Path

import pytest

import tiny_tokenizer
from interrupt import Interrupted, stop_after
from pool_files import gsm8k, write_pool
from scas_jax.assets import GSM8K_POOL
from scas_jax.cli import main as cli_main
from scas_jax.data.files import discover_pool, find_dataset_dir, input_sha256, iter_rows
from scas_jax.data.jsonl import iter_jsonl
from scas_jax.errors import ScasError
from scas_jax.scoring.identity import file_sha256

TEACHERS = ("human_reference", "gpt3_175b_verification", "gpt3_6b_verification")




def small_pool(directory: Path, n: int = 4) -> Path:
    """Three GSM8K teachers, ``n`` rows each; the last file adds awkward rows (blank
    line, nested and unicode fields, an int id, no id, an unverified and an error row)."""
    files = {f"{t}.jsonl": gsm8k(t, n) for t in TEACHERS}
    files[f"{TEACHERS[2]}.jsonl"] += [
        "",
        {"id": 7, "instruction": "Çà 2+2?", "teacher_output": "4 ✓", "meta": {"a": [1, 2.5, None]},
         "teacher_correct": True, "reference_answer": "4"},
        {"instruction": "no id", "teacher_output": "#### 3", "reference_answer": "3", "x": 1e-300},
        {"id": "wrong", "instruction": "1+1?", "teacher_output": "#### 3", "teacher_correct": False,
         "reference_answer": "2"},
        {"id": "empty", "instruction": "", "teacher_output": "x", "reference_answer": "1"},
    ]
    return write_pool(directory, files)


def build(pool: Path, data_dir: Path, name: str = "mini") -> Path:
    assert cli_main(["dataset", "build", "--candidate-dir", str(pool), "--out", str(data_dir),
                     "--name", name]) == 0
    return data_dir / name / "1.0.0"


def rows_by_teacher(directory) -> list[tuple[str, str, list]]:
    return [(pf.teacher, pf.path.name, list(iter_rows(pf))) for pf in discover_pool(directory)]


def test_build_reads_back_every_row_in_order(tmp_path, capsys):
    pool = small_pool(tmp_path / "pool")
    version = build(pool, tmp_path / "data")
    assert "mini/1.0.0 (16 rows)" in capsys.readouterr().out
    want = [(pf.teacher, pf.path.name, list(iter_jsonl(pf.path))) for pf in discover_pool(pool)]
    for where in (tmp_path / "data", tmp_path / "data" / "mini", version):  # any level finds it
        assert find_dataset_dir(where) == version
        assert rows_by_teacher(where) == want  # same rows, line numbers, teachers, order
    files = discover_pool(tmp_path / "data")
    assert {pf.path.name: input_sha256(pf) for pf in files} == {
        p.name: file_sha256(p) for p in pool.glob("*.jsonl")}  # the sources' checksums
    assert not any(p.name.startswith(".") for p in (tmp_path / "data").iterdir())  # no temp left
    assert find_dataset_dir(pool) is None
    build(pool, pool / "tfds")  # a dataset inside a JSONL pool never hides its files
    assert [pf.dataset for pf in discover_pool(pool)] == [None] * 3

    from scas_jax.data.tfds_pool import build_pool_dataset

    with pytest.raises(ScasError, match="already exists"):
        build_pool_dataset(pool, tmp_path / "data", "mini")
    assert cli_main(["dataset", "build", "--candidate-dir", str(pool), "--out", str(tmp_path / "data"),
                     "--name", "mini", "--overwrite"]) == 0

    sft = write_pool(tmp_path, {"sft.jsonl": gsm8k(TEACHERS[0], 3)}) / "sft.jsonl"
    assert cli_main(["dataset", "build", "--data", str(sft), "--out", str(tmp_path / "sft_data")]) == 0
    from scas_jax.data.tfds_pool import map_dataset, read_metadata

    sft_dir = tmp_path / "sft_data" / "sft" / "1.0.0"
    assert read_metadata(sft_dir)["teachers"][0]["sha256"] == file_sha256(sft)
    assert list(map_dataset(sft_dir)) == list(iter_jsonl(sft))


def _cmp_outputs(a: Path, b: Path, same_paths: dict[str, str]) -> None:
    """Two output trees hold the same files; JSONL rows identical; JSON identical once
    the input paths (``same_paths``: path -> placeholder) are replaced."""
    same_paths = {**same_paths, str(a): "OUT", str(b): "OUT"}
    names = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file())
    for name in names:
        ta, tb = (a / name).read_text(encoding="utf-8"), (b / name).read_text(encoding="utf-8")
        if name.endswith(".jsonl"):
            assert [json.loads(x) for x in ta.splitlines()] == [json.loads(x) for x in tb.splitlines()], name
            continue
        for path, label in sorted(same_paths.items(), key=lambda kv: -len(kv[0])):
            ta, tb = ta.replace(path, label), tb.replace(path, label)
        ja, jb = json.loads(ta), json.loads(tb)
        for volatile in ("wall_time_s", "scoring_time_s", "tokenize_time_s", "tokens_per_s",
                         "rows_per_s", "created", "created_at", "time", "devices"):
            for j in (ja, jb):
                j.pop(volatile, None) if isinstance(j, dict) else None
        assert ja == jb, name


@pytest.fixture(scope="module")
def tiny_student(tmp_path_factory):
    """A tiny random Llama with the offline test tokenizer, loaded once."""
    import hf_tiny
    from scas_jax.loader import load_student

    d = hf_tiny.build("llama_tied_bias", tmp_path_factory.mktemp("tiny") / "student")
    tiny_tokenizer.save(d)
    return load_student(d)


def _mesh():
    import jax

    from scas_jax.parallel import make_mesh

    return make_mesh("data=-1", devices=jax.devices()[:1])


def test_score_select_verify_same_from_jsonl_and_tfds(tiny_student, tmp_path):
    from scas_jax.judging.verify import verify
    from scas_jax.scoring.commands import score
    from scas_jax.selection.api import select

    pool = small_pool(tmp_path / "pool", n=3)
    data = tmp_path / "data"
    version = build(pool, data)
    paths = {str(pool): "POOL", str(version): "POOL", str(data): "POOL"}
    kw = dict(mesh=_mesh(), batch_tokens=512, max_length=1024, progress=False)
    ma = score(tiny_student, pool, tmp_path / "sa", **kw)
    mb = score(tiny_student, data, tmp_path / "sb", **kw)
    for t in TEACHERS:
        ra = [json.loads(x) for x in (tmp_path / "sa" / f"{t}_scas_scores.jsonl").read_text().splitlines()]
        rb = [json.loads(x) for x in (tmp_path / "sb" / f"{t}_scas_scores.jsonl").read_text().splitlines()]
        assert ra == rb and ra
        assert ma["teachers"][t]["record"] == mb["teachers"][t]["record"]  # source sha256 recorded
        assert mb["teachers"][t]["record"]["input_sha256"] == file_sha256(pool / f"{t}.jsonl")
        assert mb["teachers"][t]["input_dataset"] == str(version)
    assert ma["pool"] == mb["pool"] and ma["rows"] == mb["rows"] and ma["errors"] == mb["errors"]

    # select: SCAS on the score files (JSONL vs their TFDS build), a baseline on the pool
    scored_data = tmp_path / "scored_data"
    build(tmp_path / "sa", scored_data, "scored")
    paths.update({str(tmp_path / "sa"): "SCORED", str(scored_data / "scored" / "1.0.0"): "SCORED",
                  str(scored_data): "SCORED"})
    select(tmp_path / "sa", tmp_path / "min_a", "min")
    select(scored_data, tmp_path / "min_b", "min")
    _cmp_outputs(tmp_path / "min_a", tmp_path / "min_b", paths)
    select(pool, tmp_path / "rnd_a", "random", seed=3)
    select(data, tmp_path / "rnd_b", "random", seed=3)
    _cmp_outputs(tmp_path / "rnd_a", tmp_path / "rnd_b", paths)

    verify(pool, tmp_path / "va")
    verify(data, tmp_path / "vb")
    _cmp_outputs(tmp_path / "va", tmp_path / "vb", paths)



def test_resume_follows_the_datasets_source_checksums(tiny_student, tmp_path, capsys):
    from scas_jax.scoring.commands import score
    from scas_jax.scoring.journal import JOURNAL_DIR

    rows = {t: gsm8k(t, 4) for t in TEACHERS[:2]}
    pool = write_pool(tmp_path / "pool", {f"{t}.jsonl": r for t, r in rows.items()})
    data = tmp_path / "data"
    build(pool, data)
    out = tmp_path / "out"
    kw = dict(mesh=_mesh(), batch_tokens=256, max_length=1024, max_segments=1, progress=False)

    def interrupt(candidates):
        with pytest.raises(Interrupted):
            score(tiny_student, candidates, out, on_batch=stop_after(2), **kw)
        assert len(list((out / JOURNAL_DIR).glob("*.jsonl"))) == 1

    interrupt(pool)  # a run on the JSONL pool resumes on its dataset: same inputs
    m = score(tiny_student, data, out, **kw)
    assert m["resumed_batches"] == 2 and m["stale_journals"] == {}

    interrupt(data)  # a dataset built from another version of the pool: refused
    (journal,) = (out / JOURNAL_DIR).glob("*.jsonl")
    changed = [dict(r) for r in rows[TEACHERS[1]]]
    changed[3] = {**changed[3], "teacher_output": "The answer is 42.", "teacher_correct": True}
    write_pool(pool, {f"{TEACHERS[1]}.jsonl": changed})
    data2 = tmp_path / "data2"
    build(pool, data2)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(ScasError) as err:
        score(tiny_student, data2, out, **kw)
    msg = str(err.value)
    assert str(data2 / "mini" / "1.0.0") in msg and str(journal) in msg
    assert f"{TEACHERS[1]}: source sha256" in msg and TEACHERS[0] + ":" not in msg
    assert "another version of the pool" in msg and "--output-dir" in msg
    assert journal.exists() and {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    m = score(tiny_student, data, out, **kw)  # the journal's own dataset still resumes it
    assert m["resumed_batches"] == 2 and m["stale_journals"] == {}
    # the JSONL pool edited since a journal: starts over, naming the change
    interrupt(data)
    capsys.readouterr()
    m = score(tiny_student, pool, out, **kw)
    assert m["resumed_batches"] == 0 and m["scored_batches"] == m["batches"]
    (why,) = m["stale_journals"].values()
    assert why.startswith(f"inputs.{TEACHERS[1]} changed")
    assert "starting over: inputs." in capsys.readouterr().err
    # --skip-existing says which teacher file changed
    m = score(tiny_student, data, out, skip_existing=True, **kw)
    assert m["teachers"][TEACHERS[0]]["status"] == "existing"
    assert "input_sha256" in m["teachers"][TEACHERS[1]]["rescored_because"]


def test_invalid_row_names_file_and_line_and_leaves_nothing(tmp_path, capsys):
    from scas_jax.data.tfds_pool import build_pool_dataset

    bad_json = write_pool(tmp_path / "p1", {"a.jsonl": gsm8k(TEACHERS[0], 2) + ["{not json"],
                                            "b.jsonl": gsm8k(TEACHERS[1], 2)})
    out = tmp_path / "new" / "data"
    with pytest.raises(ScasError, match=rf"{bad_json / 'a.jsonl'}:3: malformed JSON"):
        build_pool_dataset(bad_json, out)
    assert not (tmp_path / "new").exists()

    bad_flag = write_pool(tmp_path / "p2", {"a.jsonl": gsm8k(TEACHERS[0], 2),
                                            "b.jsonl": [{**gsm8k(TEACHERS[1], 1)[0], "teacher_correct": "maybe"}]})
    existing = tmp_path / "existing"
    build(write_pool(tmp_path / "p3", {"a.jsonl": gsm8k(TEACHERS[0], 1)}), existing, "other")
    before = sorted(p.relative_to(existing) for p in existing.rglob("*"))
    assert cli_main(["dataset", "build", "--candidate-dir", str(bad_flag), "--out", str(existing)]) == 2
    assert f"{bad_flag / 'b.jsonl'}:1" in capsys.readouterr().err
    assert sorted(p.relative_to(existing) for p in existing.rglob("*")) == before  # untouched

    dup = write_pool(tmp_path / "p4", {"a.jsonl": gsm8k(TEACHERS[0], 2) + gsm8k(TEACHERS[0], 1)})
    with pytest.raises(ScasError, match=r"a.jsonl:3: duplicate id"):
        build_pool_dataset(dup, tmp_path / "d4")
    assert not (tmp_path / "d4").exists()


def test_build_leaves_no_temporary_directory(tmp_path, monkeypatch):
    """TFDS's builder makes a ``mkdtemp("tfds")`` dir in the system temp dir and never
    removes it (DatasetInfo.initialize_from_bucket); ours skips it, on success and failure."""
    import tempfile

    from scas_jax.data.tfds_pool import build_pool_dataset, gsm8k_data_source

    system_tmp = tmp_path / "system_tmp"
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    pool = write_pool(tmp_path / "pool", {"a.jsonl": gsm8k(TEACHERS[0], 2)})
    build_pool_dataset(pool, tmp_path / "ok")
    with pytest.raises(ScasError):
        build_pool_dataset(write_pool(tmp_path / "bad", {"a.jsonl": ["{not json"]}), tmp_path / "no")
    gsm8k_data_source(tmp_path / "gsm8k")
    assert list(system_tmp.iterdir()) == []


def test_corrupt_array_record_file_is_named(tmp_path):
    from scas_jax.data import tfds_pool
    from scas_jax.data.pool import read_pool

    version = build(write_pool(tmp_path / "pool", {f"{t}.jsonl": gsm8k(t, 3) for t in TEACHERS}),
                    tmp_path / "data")
    (shard,) = [p for p in version.iterdir() if ".array_record" in p.name]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    tfds_pool._SOURCES.clear()
    with pytest.raises(ScasError, match=rf"{shard}: corrupt or truncated array_record file"):
        read_pool(tmp_path / "data")


def test_registered_gsm8k_dataset_is_the_bundled_pool(tmp_path):
    import scas_jax.data.tfds_pool  # noqa: F401  registers scas_gsm8k_pool
    import tensorflow_datasets as tfds

    ds = tfds.data_source("scas_gsm8k_pool", data_dir=str(tmp_path), split="train")
    want = [(pf.teacher, line, row) for pf in discover_pool(GSM8K_POOL) for line, row in iter_jsonl(pf.path)]
    got = [(r["teacher"].decode(), int(r["line"]), json.loads(r["row"])) for r in ds]
    assert got == want
    # and as a pool directory
    assert rows_by_teacher(tmp_path)[0][2][:5] == list(iter_jsonl(GSM8K_POOL / "gpt3_175b_finetuning.jsonl"))[:5]


def test_grain_shards_cover_every_row_once(tmp_path):
    import grain

    from scas_jax.data.tfds_pool import map_dataset, process_shard_options, shard

    version = build(write_pool(tmp_path / "pool", {f"{t}.jsonl": gsm8k(t, 5) for t in TEACHERS}),
                    tmp_path / "data")
    ds = map_dataset(version)
    everything = [json.dumps(row, sort_keys=True) for _, row in ds]
    assert len(everything) == 15
    parts = [[json.dumps(row, sort_keys=True) for _, row in shard(ds, process_shard_options(i, 2))]
             for i in range(2)]
    assert sorted(parts[0] + parts[1]) == sorted(everything) and len(parts[0]) == 8
    assert list(shard(ds)) == list(ds)  # one process: all of it

    # Grain's own loader with the same ShardOptions (an even count: grain 0.2.18's
    # IndexSampler drops a record of an uneven split with drop_remainder=False)
    from scas_jax.data.tfds_pool import data_source

    class First14:
        def __len__(self):
            return 14

        def __getitem__(self, i):
            return data_source(version)[i]

    seen = []
    for i in range(2):
        sampler = grain.samplers.IndexSampler(14, shard_options=process_shard_options(i, 2),
                                              shuffle=False, num_epochs=1, seed=0)
        loader = grain.DataLoader(data_source=First14(), sampler=sampler, worker_count=0)
        seen.append([json.dumps(json.loads(r["row"]), sort_keys=True) for r in loader])
    assert len(seen[0]) == len(seen[1]) == 7 and sorted(seen[0] + seen[1]) == sorted(everything[:14])


def test_cli_import_does_not_load_tfds():
    code = ("import sys, scas_jax.cli as c; c.build_parser(); "
            "bad = [m for m in ('tensorflow_datasets', 'grain', 'torch', 'tensorflow') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- generate, evaluate, experiment


@pytest.fixture(scope="module")
def chat_student(tmp_path_factory):
    """A converted tiny llama with a character-level ChatML tokenizer (a path)."""
    import tiny_chat

    return tiny_chat.make_student_dir(tmp_path_factory.mktemp("chat") / "student")


def _questions(path: Path, n: int = 4) -> Path:
    return write_pool(path.parent, {path.name: [
        {"id": i, "instruction": f"What is {i} + 1?", "reference_answer": str(i + 1)} for i in range(n)]}) / path.name


def test_generate_reads_questions_from_a_dataset(chat_student, tmp_path):
    """``generate --questions`` a TFDS build of the questions file: the same answers and
    the same recorded questions checksum; a dataset of several files is refused."""
    from scas_jax.data.tfds_pool import build_sft_dataset
    from scas_jax.generation.commands import generate
    from scas_jax.generation.prompts import read_questions

    q = _questions(tmp_path / "q" / "questions.jsonl")
    built = build_sft_dataset(q, tmp_path / "data", "questions")
    assert read_questions(tmp_path / "data") == [
        dataclass_replace(x, source=x.source.replace(str(q), str(built / q.name))) for x in read_questions(q)]
    assert [x.id for x in read_questions(built, limit=2)] == [0, 1]
    kw = dict(max_new_tokens=4, mesh="data=-1", batch_size=8)
    a = generate(chat_student, q, tmp_path / "a", "tiny", **kw)
    b = generate(chat_student, tmp_path / "data", tmp_path / "b", "tiny", **kw)
    assert (tmp_path / "a/tiny.jsonl").read_bytes() == (tmp_path / "b/tiny.jsonl").read_bytes()
    assert a["settings"]["questions_sha256"] == b["settings"]["questions_sha256"] == file_sha256(q)
    build(small_pool(tmp_path / "pool"), tmp_path / "several")
    with pytest.raises(ScasError, match=r"--questions .*a dataset of 3 files .*dataset build --data FILE"):
        read_questions(tmp_path / "several")


def test_evaluate_reads_questions_and_pool_from_datasets(chat_student, tmp_path):
    """``evaluate --questions/--pool`` TFDS builds: the same predictions and metrics."""
    from scas_jax.data.tfds_pool import build_sft_dataset
    from scas_jax.evaluation.evaluate import evaluate

    q = _questions(tmp_path / "q" / "questions.jsonl", 3)
    pool = write_pool(tmp_path / "pool", {
        "a.jsonl": [{"id": i, "instruction": f"What is {i} + 1?", "teacher_output": f"#### {i + 1}",
                     "teacher_correct": i != 1} for i in range(3)],
        "b.jsonl": [{"id": i, "instruction": f"What is {i} + 1?", "teacher_output": f"so #### {i + 1 if i else 7}",
                     "reference_answer": str(i + 1)} for i in range(3)]})
    build_sft_dataset(q, tmp_path / "qdata", "questions")
    build(pool, tmp_path / "pdata", "evalpool")
    kw = dict(max_new_tokens=4, batch_size=8, mesh="data=-1")
    a = evaluate(chat_student, q, tmp_path / "a", pool=pool, **kw)
    b = evaluate(chat_student, tmp_path / "qdata", tmp_path / "b", pool=tmp_path / "pdata", **kw)
    assert (tmp_path / "a/predictions.jsonl").read_bytes() == (tmp_path / "b/predictions.jsonl").read_bytes()
    def fixed(m):  # less the input paths and the timings
        if isinstance(m, dict):
            return {k: fixed(v) for k, v in m.items()
                    if k not in ("questions_file", "pool") and not k.endswith("seconds")}
        return m

    assert fixed(a) == fixed(b) and a["answer_nll"]["answers"] == 4


def test_experiment_data_from_a_dataset_pool(tmp_path):
    """The experiment's ``pool:`` a TFDS build: the same split and data files."""
    from scas_jax.experiment.config import ExperimentConfig
    from scas_jax.experiment.split import dir_digest, prepare_data

    pool = write_pool(tmp_path / "pool", {f"{t}.jsonl": gsm8k(t, 10) for t in TEACHERS})
    build(pool, tmp_path / "data")
    kw = dict(teachers=TEACHERS[:2], questions=8, heldout_questions=3, split_seed=1)
    ca = prepare_data(ExperimentConfig(pool=str(pool), **kw), tmp_path / "a", "cfg")
    cb = prepare_data(ExperimentConfig(pool=str(tmp_path / "data"), **kw), tmp_path / "b", "cfg")
    assert ca == cb and ca["heldout_questions"] == 3
    _cmp_outputs(tmp_path / "a", tmp_path / "b", {})
    digest = dir_digest(tmp_path / "data")
    assert digest == dir_digest(tmp_path / "data" / "mini") and digest != dir_digest(tmp_path / "a" / "pool")


def test_train_data_dataset_rows_and_errors(tmp_path):
    """``train --data`` a dataset: the SFT file's rows, read before any model loads; a
    pool of several files and a LLaMA-Factory ``dataset=`` are refused naming the fix."""
    from scas_jax.data.tfds_pool import build_sft_dataset
    from scas_jax.training.data import read_rows

    rows = [{"id": 1, "instruction": "1+1?", "output": "2"}, {"instruction": "2+2?", "output": "4 ✓"}]
    sft = write_pool(tmp_path / "sft", {"sft.jsonl": rows}) / "sft.jsonl"
    version = build_sft_dataset(sft, tmp_path / "data")
    path, got = read_rows(tmp_path / "data")
    assert path == version / "sft.jsonl" and got == read_rows(sft)[1] == [(1, rows[0]), (2, rows[1])]
    with pytest.raises(ScasError, match="dataset='x' names an entry .*drop dataset="):
        read_rows(version, "x")
    build(small_pool(tmp_path / "pool"), tmp_path / "several")
    with pytest.raises(ScasError, match="--data .*a dataset of 3 files"):
        read_rows(tmp_path / "several")
