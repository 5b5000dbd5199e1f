"""The scoring input stage at pool scale (issue 11 item 3): everything before the model.

A synthetic GSM8K-like pool (the bundled GSM8K questions and answers, numbered so that
every question is distinct; 6 teachers answer every question) goes through:

* ``write``: the JSONL pool files;
* ``build``: ``scas-jax dataset build`` of that pool (TFDS ArrayRecord; ``--tfds``);
* ``read``: every row parsed (files.iter_rows), nothing else;
* ``stream``: the streaming input stage of ``scas-jax score``
  (scorer.prepare_stream: read + encode + plan in one pass, ids spilled), then every
  planned batch materialised from the spill (the model call skipped);
* ``reference``: the in-memory path (pool.read_pool, scorer.prepare, every batch
  materialised), for comparison at a size that fits (``--reference``);
* ``plan``: plan_batches alone on the pool's lengths;
* ``journal``: a journal of one record per planned batch with the real score fields of
  every row, written then reloaded (what a resume reads);
* ``tokenizer``: the tokenizer alone on the full texts of the pool's first rows (the
  ceiling of the first pass): its own batched call, the backend's ``encode_batch_fast``
  (what the first pass uses, :func:`scas_jax.data.chat.batch_ids`), one text at a time;
* ``stream_plain``: ``stream`` with the tokenizer's own call instead (before/after);
* ``score_first`` (``--score``): the real ``scas-jax score`` (``commands.score``) with
  the bundled SmolLM2 student, stopped by its ``on_batch`` hook after ``--score-batches``
  batches: validation, identities, model load, the input stage and the first batches;
* ``score_whole`` (``--score``): the real ``scas-jax score`` from start to end with only
  the model call replaced by synthetic fields (``scorer.iter_scored_batches``): every
  batch journaled, every score file and the manifest written; then interrupted halfway
  and resumed from its journal (the same bytes).

Each phase runs in its own process (ru_maxrss is that process's peak RSS). Prints a
Markdown table and writes ``--json``.

    python benchmarks/bench_input.py --answers 1000000 [--tfds] [--reference 50000] [--score]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import machine  # benchmarks/machine.py

ROOT = Path(__file__).resolve().parents[1]
N_TEACHERS = 6
TEACHER_FILES = ("human_reference", "gpt3_175b_verification", "gpt3_6b_verification",
                 "gpt3_175b_finetuning", "gpt3_6b_finetuning", "human_socratic")


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def tokenizer():
    from transformers import AutoTokenizer

    from scas_jax.convert.student_io import bundled_smollm2

    gguf = bundled_smollm2()
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def write_pool(directory: Path, answers: int) -> dict:
    """``answers`` rows over 6 teacher files: question q of teacher t is GSM8K question
    ``q % 1319`` with its number appended, answered as that teacher answered it."""
    from scas_jax.assets import GSM8K_POOL

    src = {t: [json.loads(x) for x in (GSM8K_POOL / f"{t}.jsonl").read_text(encoding="utf-8").splitlines()]
           for t in TEACHER_FILES}
    directory.mkdir(parents=True, exist_ok=True)
    questions = -(-answers // N_TEACHERS)
    t0 = time.time()
    n = 0
    for t in TEACHER_FILES:
        base = src[t]
        with open(directory / f"{t}.jsonl", "w", encoding="utf-8") as f:
            for q in range(questions):
                if n >= answers:
                    break
                r = base[q % len(base)]
                row = {"id": f"q{q}", "teacher_name": t, "system": r.get("system"),
                       "instruction": f"{r['instruction']} (problem {q})",
                       "teacher_output": r["teacher_output"], "teacher_correct": True}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                n += 1
    return {"rows": n, "seconds": time.time() - t0,
            "bytes": sum(p.stat().st_size for p in directory.glob("*.jsonl"))}


def pool_files(directory: Path):
    from scas_jax.data.files import find_candidate_files

    return find_candidate_files(directory)[0]


def rows_of(directory: Path):
    from scas_jax.data.files import iter_rows

    for pf in pool_files(directory):
        for _, row in iter_rows(pf):
            yield row


def phase_read(directory: Path, args=None) -> dict:
    t0 = time.time()
    n = sum(1 for _ in rows_of(directory))
    return {"rows": n, "seconds": time.time() - t0}


def phase_read_tfds(directory: Path, args=None) -> dict:
    """Every row of the TFDS build (``build``), through files.iter_rows (Grain)."""
    return phase_read(directory / "tfds", args)


def _cfg(args):
    from scas_jax.scoring.scorer import ScoreConfig

    return ScoreConfig(batch_tokens=args.batch_tokens, max_length=args.max_length,
                       max_segments=args.max_segments, dtype="float32")


def _materialise_all(prepared) -> tuple[float, int]:
    from scas_jax.data.packing import materialise
    from scas_jax.scoring.scorer import _SEQ_KEYS

    t0 = time.time()
    cells = 0
    for plan in prepared.plans:
        batch = materialise(plan, prepared.seqs_for(plan.items), _SEQ_KEYS)
        cells += batch["tokens"].size
    return time.time() - t0, cells


def phase_stream(directory: Path, args) -> dict:
    from scas_jax.scoring.scorer import prepare_stream

    tok = tokenizer()
    t0 = time.time()
    prepared = prepare_stream(rows_of(directory), tok, _cfg(args), spill_dir=directory)
    t_pass1 = time.time() - t0
    rss_pass1 = rss_mb()
    t_mat, cells = _materialise_all(prepared)
    out = {"rows": len(prepared), "errors": len(prepared.errors), "batches": len(prepared.plans),
           "real_tokens": prepared.stats["real_tokens"], "padded_tokens": cells,
           "pass1_seconds": t_pass1, "materialise_seconds": t_mat,
           "rss_after_pass1_mb": rss_pass1, "peak_alive_rows": prepared.peak_alive,
           "digest": prepared.digest()}
    prepared.close()
    np_lengths = prepared.lengths
    np_lengths.tofile(directory / ".lengths.int32")
    return out


def phase_stream_plain(directory: Path, args) -> dict:
    """``stream`` with the tokenizer's own batched call (the first pass before batch_ids)."""
    from scas_jax.data import chat

    chat.batch_ids = lambda tok, texts: tok(texts)["input_ids"]
    return phase_stream(directory, args)


def phase_tokenizer(directory: Path, args) -> dict:
    """The tokenizer alone on the full chat texts of the first ``--tokenizer-rows`` rows:
    answers/s and tokens/s of each way to call it (best of 3), ids checked equal."""
    from itertools import islice

    from scas_jax.data.chat import ChatEncoder, batch_ids, build_messages

    tok = tokenizer()
    enc = ChatEncoder(tok)
    rows = list(islice(rows_of(directory), args.tokenizer_rows))
    t0 = time.time()
    texts = [enc._render(build_messages(r), False) for r in rows]
    render_s = time.time() - t0
    backend = tok._tokenizer
    window = 512

    def windows(f):
        return [ids for i in range(0, len(texts), window) for ids in f(texts[i:i + window])]

    ways = {"call": lambda: windows(lambda xs: tok(xs)["input_ids"]),
            "batch_ids": lambda: windows(lambda xs: batch_ids(tok, xs)),
            "encode_batch": lambda: windows(lambda xs: [e.ids for e in backend.encode_batch(xs)]),
            "one_by_one": lambda: [backend.encode(t).ids for t in texts]}
    ref = ways["call"]()
    out = {"rows": len(texts), "tokens": sum(map(len, ref)), "render_rows_per_s": len(texts) / render_s}
    for name, f in ways.items():
        best = 0.0
        for _ in range(3):
            t0 = time.time()
            got = f()
            best = max(best, len(texts) / (time.time() - t0))
            assert got == ref, name
        out[f"{name}_rows_per_s"] = best
    out["tokens_per_row"] = out["tokens"] / len(texts)
    return out


def _rss_probe(marks: dict, name: str, fn):
    """``fn`` wrapped to record its wall time and the process's peak RSS after it."""
    def wrapped(*a, **k):
        t0 = time.time()
        try:
            return fn(*a, **k)
        finally:
            marks[name] = {"seconds": time.time() - t0, "peak_rss_mb_after": rss_mb()}
    return wrapped


def _score_kw(args) -> dict:
    return dict(batch_tokens=args.batch_tokens, max_length=args.max_length,
                max_segments=args.max_segments, dtype="float32", progress=False)


class _Stop(Exception):
    pass


def phase_score_first(directory: Path, args) -> dict:
    """The real score command, SmolLM2 student, stopped after ``--score-batches`` batches."""
    from scas_jax.data import pool as pool_mod
    from scas_jax.scoring import commands, scorer

    marks: dict = {}
    pool_mod.read_pool = _rss_probe(marks, "validate_pool", pool_mod.read_pool)
    commands._load = _rss_probe(marks, "load_student", commands._load)
    scorer.prepare_stream = _rss_probe(marks, "input_stage", scorer.prepare_stream)
    out_dir = directory / "score_first"
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    t0 = time.time()
    firsts = []

    def stop(done, total):
        firsts.append(time.time() - t0)
        if done >= args.score_batches:
            raise _Stop
    try:
        commands.score("smollm2", directory, out_dir, on_batch=stop, **_score_kw(args))
    except _Stop:
        pass
    return {"marks": marks, "batches_done": len(firsts), "seconds_to_batches": firsts,
            "seconds": time.time() - t0}


def phase_score_whole(directory: Path, args) -> dict:
    """The real score command end to end, the model call replaced by synthetic fields;
    then the same run interrupted halfway and resumed (same score files)."""
    import hashlib

    import numpy as np

    from scas_jax.data import pool as pool_mod
    from scas_jax.scoring import commands, scorer
    from scas_jax.scoring.fields import fields_from_batch

    rng = np.random.default_rng(0)
    per = 64
    stats = {k: rng.uniform(1, 2, (per,)) for k in ("q_nll_sum", "a_nll_sum", "q_sqnorm_sum",
                                                      "a_sqnorm_sum")}
    stats.update({k: np.full((per,), 50.0) for k in ("q_nll_count", "a_nll_count", "q_count",
                                                      "a_count")})
    stats.update({k: rng.normal(size=(per, 8)) for k in ("q_vec_sum", "a_vec_sum")})
    fake = fields_from_batch(stats, 0.5)

    def synthetic(params, model_cfg, prepared, cfg, mesh=None, skip=lambda k: False):
        for k, plan in enumerate(prepared.plans):
            if not skip(k):
                yield k, [(i, dict(fake[i % per])) for i in plan.items]

    marks: dict = {}
    pool_mod.read_pool = _rss_probe(marks, "validate_pool", pool_mod.read_pool)
    commands._load = _rss_probe(marks, "load_student", commands._load)
    scorer.prepare_stream = _rss_probe(marks, "input_stage", scorer.prepare_stream)
    scorer.iter_scored_batches = synthetic
    commands._write = _rss_probe(marks, "write", commands._write)
    out_dir = directory / "score_whole"
    import shutil

    shutil.rmtree(out_dir, ignore_errors=True)
    t0 = time.time()
    m = commands.score("smollm2", directory, out_dir, **_score_kw(args))
    wall = time.time() - t0
    first = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(out_dir.glob("*_scas_scores.jsonl"))}
    whole_marks = dict(marks)
    half = m["batches"] // 2

    def stop(done, total):
        if done >= half:
            raise _Stop
    t1 = time.time()
    try:
        commands.score("smollm2", directory, out_dir, on_batch=stop, **_score_kw(args))
    except _Stop:
        pass
    t2 = time.time()
    m2 = commands.score("smollm2", directory, out_dir, **_score_kw(args))
    again = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(out_dir.glob("*_scas_scores.jsonl"))}
    assert again == first and m2["resumed_batches"] == half, (m2["resumed_batches"], half)
    return {"rows": m["rows"], "batches": m["batches"], "seconds": wall, "marks": whole_marks,
            "manifest_tokenize_time_s": m["tokenize_time_s"],
            "output_mb": sum(p.stat().st_size for p in out_dir.glob("*.jsonl")) / 1e6,
            "interrupted_run_seconds": t2 - t1, "resume_seconds": time.time() - t2,
            "resume_marks": marks, "resumed_batches": m2["resumed_batches"], "same_bytes": True}


def phase_reference(directory: Path, args) -> dict:
    from scas_jax.data.pool import read_pool
    from scas_jax.scoring.scorer import prepare

    tok = tokenizer()
    t0 = time.time()
    pool = read_pool(directory)
    rows = [c.row for _, c in pool.candidates()]
    t_read = time.time() - t0
    t1 = time.time()
    prepared = prepare(rows, tok, _cfg(args))
    t_prep = time.time() - t1
    t_mat, cells = _materialise_all(prepared)
    return {"rows": len(rows), "batches": len(prepared.plans), "read_seconds": t_read,
            "prepare_seconds": t_prep, "materialise_seconds": t_mat, "padded_tokens": cells,
            "digest": prepared.digest()}


def phase_plan(directory: Path, args) -> dict:
    import numpy as np

    from scas_jax.data.packing import plan_batches

    lengths = np.fromfile(directory / ".lengths.int32", dtype=np.int32)
    ok = lengths[lengths > 0].tolist()
    t0 = time.time()
    plans = plan_batches(ok, max_length=args.max_length, batch_tokens=args.batch_tokens,
                         max_segments=args.max_segments)
    return {"rows": len(ok), "batches": len(plans), "seconds": time.time() - t0}


def phase_journal(directory: Path, args) -> dict:
    """A journal of every row's real score fields in plan-sized records, written
    (fsync per batch, as score does) then reloaded by a fresh Journal."""
    import numpy as np

    from scas_jax.scoring.fields import fields_from_batch
    from scas_jax.scoring.journal import Journal

    lengths = np.fromfile(directory / ".lengths.int32", dtype=np.int32)
    n = int(lengths.shape[0])
    per = args.journal_batch
    n_batches = -(-n // per)
    rng = np.random.default_rng(0)
    d = 8  # vector sums only feed the fields; their size does not reach the journal
    stats = {k: rng.uniform(1, 2, (per,)) for k in ("q_nll_sum", "a_nll_sum", "q_sqnorm_sum",
                                                      "a_sqnorm_sum")}
    stats.update({k: np.full((per,), 50.0) for k in ("q_nll_count", "a_nll_count", "q_count",
                                                      "a_count")})
    stats.update({k: rng.normal(size=(per, d)) for k in ("q_vec_sum", "a_vec_sum")})
    fields = fields_from_batch(stats, 0.5)
    out_dir = directory / "journal_bench"
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    t0 = time.time()
    j = Journal(out_dir, "bench", n_batches)
    for k in range(n_batches):
        lo = k * per
        j.record(k, [(lo + s, fields[s]) for s in range(min(per, n - lo))])
    j.close()
    t_write = time.time() - t0
    size = j.path.stat().st_size
    del j
    rss_before = rss_mb()
    from scas_jax.scoring.commands import FieldColumns

    t1 = time.time()  # as score reloads it: the fields into float64 columns
    cols = FieldColumns(n)
    j1 = Journal(out_dir, "bench", n_batches, write=False, sink=cols.put)
    got_cols = j1.rows_done()
    t_cols = time.time() - t1
    rss_cols = rss_mb()
    del j1, cols
    t1 = time.time()  # every batch's fields as dicts (Journal without a sink)
    j2 = Journal(out_dir, "bench", n_batches, write=False)
    got = sum(len(v) for v in j2.done.values())
    t_read = time.time() - t1
    j2.path.unlink()
    assert got == got_cols
    return {"rows": got, "batches": n_batches, "write_seconds": t_write, "reload_seconds": t_read,
            "bytes": size, "rss_before_reload_mb": rss_before, "reload_columns_seconds": t_cols,
            "rss_after_columns_reload_mb": rss_cols}


def phase_build(directory: Path, args) -> dict:
    out = directory / "tfds"
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "scas_jax", "dataset", "build", "--candidate-dir",
                    str(directory), "--out", str(out), "--overwrite"], check=True,
                   stdout=subprocess.DEVNULL)
    dt = time.time() - t0
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"seconds": dt, "child_rss_mb": child}


PHASES = {"read": phase_read, "read_tfds": phase_read_tfds, "stream": phase_stream, "reference": phase_reference,
          "plan": phase_plan, "journal": phase_journal, "build": phase_build,
          "tokenizer": phase_tokenizer, "stream_plain": phase_stream_plain,
          "score_first": phase_score_first, "score_whole": phase_score_whole}


def run_phase(name: str, directory: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--phase", name, "--dir", str(directory),
           "--batch-tokens", str(args.batch_tokens), "--max-length", str(args.max_length),
           "--max-segments", str(args.max_segments), "--journal-batch", str(args.journal_batch),
           "--tokenizer-rows", str(args.tokenizer_rows), "--score-batches", str(args.score_batches)]
    load0 = loadavg()
    res = subprocess.run(cmd, check=True, capture_output=True, text=True)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["load_before"], out["load_after"] = load0, loadavg()
    print(f"{name}: {json.dumps(out)}", file=sys.stderr, flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--answers", type=int, default=50_000)
    ap.add_argument("--dir", type=Path, default=None, help="pool directory (default: a temp dir)")
    ap.add_argument("--tfds", action="store_true", help="also time scas-jax dataset build")
    ap.add_argument("--reference", type=int, default=0,
                    help="also run the in-memory reference path on a pool of this many answers")
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--max-length", type=int, default=4096)
    ap.add_argument("--max-segments", type=int, default=16)
    ap.add_argument("--journal-batch", type=int, default=32,
                    help="rows per journal record (a 4096-token batch holds ~30 GSM8K answers)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--tokenizer-rows", type=int, default=20_000)
    ap.add_argument("--score", action="store_true",
                    help="also run the real score command (score_first, score_whole)")
    ap.add_argument("--score-batches", type=int, default=3)
    ap.add_argument("--only", default=None,
                    help="comma-separated phases to run on an existing --dir pool (no write)")
    ap.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:  # a child: one phase, one JSON line
        out = PHASES[args.phase](args.dir, args)
        out["peak_rss_mb"] = rss_mb()
        print(json.dumps(out))
        return 0

    import tempfile

    directory = args.dir or Path(tempfile.mkdtemp(prefix="bench_input_"))
    results: dict = {"answers": args.answers, "load_start": loadavg(),
                     "machine": machine.describe()}
    if args.only:  # phases on the pool an earlier run wrote under --dir
        for k, name in enumerate(args.only.split(",")):  # a phase may repeat (before/after)
            results[f"{k}:{name}"] = run_phase(name, directory / "pool", args)
        results["load_end"] = loadavg()
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
        print(json.dumps(results, indent=1))
        return 0
    if args.reference:
        ref_dir = directory / "reference_pool"
        write_pool(ref_dir, args.reference)
        results["reference_stream"] = run_phase("stream", ref_dir, args)
        results["reference"] = run_phase("reference", ref_dir, args)
        assert results["reference"]["digest"] == results["reference_stream"]["digest"]
    pool = directory / "pool"
    results["write"] = write_pool(pool, args.answers)
    print(f"write: {results['write']}", file=sys.stderr, flush=True)
    if args.tfds:
        results["build"] = run_phase("build", pool, args)
        results["read_tfds"] = run_phase("read_tfds", pool, args)
    results["read"] = run_phase("read", pool, args)
    results["stream"] = run_phase("stream", pool, args)
    results["plan"] = run_phase("plan", pool, args)
    results["journal"] = run_phase("journal", pool, args)
    results["tokenizer"] = run_phase("tokenizer", pool, args)
    if args.score:
        results["score_first"] = run_phase("score_first", pool, args)
        results["score_whole"] = run_phase("score_whole", pool, args)
    results["load_end"] = loadavg()
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    n = results["write"]["rows"]
    s = results["stream"]
    total = s["pass1_seconds"] + s["materialise_seconds"]
    lines = ["| phase | seconds | answers/s | peak RSS (MB) |", "|---|---:|---:|---:|",
             f"| write JSONL | {results['write']['seconds']:.1f} | {n / results['write']['seconds']:,.0f} | - |"]
    if "build" in results:
        b = results["build"]
        lines.append(f"| dataset build (TFDS) | {b['seconds']:.1f} | {n / b['seconds']:,.0f} | {b['child_rss_mb']:.0f} |")
        rt = results["read_tfds"]
        lines.append(f"| read the TFDS build (parse only) | {rt['seconds']:.1f} | {n / rt['seconds']:,.0f} | {rt['peak_rss_mb']:.0f} |")
    r = results["read"]
    lines += [
        f"| read (parse only) | {r['seconds']:.1f} | {n / r['seconds']:,.0f} | {r['peak_rss_mb']:.0f} |",
        f"| read + encode + plan (pass 1) | {s['pass1_seconds']:.1f} | {n / s['pass1_seconds']:,.0f} | {s['rss_after_pass1_mb']:.0f} |",
        f"| materialise every batch (pass 2) | {s['materialise_seconds']:.1f} | {n / s['materialise_seconds']:,.0f} | {s['peak_rss_mb']:.0f} |",
        f"| input stage total | {total:.1f} | {n / total:,.0f} | {s['peak_rss_mb']:.0f} |",
        f"| plan alone ({results['plan']['batches']} batches) | {results['plan']['seconds']:.1f} | {n / results['plan']['seconds']:,.0f} | {results['plan']['peak_rss_mb']:.0f} |",
        f"| journal write ({results['journal']['bytes'] / 1e6:.0f} MB) | {results['journal']['write_seconds']:.1f} | {n / results['journal']['write_seconds']:,.0f} | - |",
        f"| journal reload | {results['journal']['reload_seconds']:.1f} | {n / results['journal']['reload_seconds']:,.0f} | {results['journal']['peak_rss_mb']:.0f} |",
    ]
    if "reference" in results:
        ref, rs = results["reference"], results["reference_stream"]
        m = ref["rows"]
        rt = ref["read_seconds"] + ref["prepare_seconds"] + ref["materialise_seconds"]
        st = rs["pass1_seconds"] + rs["materialise_seconds"]
        lines += [f"| reference path, {m:,} answers (read_pool + prepare + materialise) | {rt:.1f} | {m / rt:,.0f} | {ref['peak_rss_mb']:.0f} |",
                  f"| streaming path, same {m:,} answers | {st:.1f} | {m / st:,.0f} | {rs['peak_rss_mb']:.0f} |"]
    print("\n".join(lines))
    print(f"load: start {results['load_start']}, end {results['load_end']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
