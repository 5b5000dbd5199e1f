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
  every row, written then reloaded (what a resume reads).

Each phase runs in its own process (ru_maxrss is that process's peak RSS). Prints a
Markdown table and writes ``--json``.

    python benchmarks/bench_input.py --answers 1000000 [--tfds] [--reference 50000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

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
    t1 = time.time()
    j2 = Journal(out_dir, "bench", n_batches, write=False)
    got = sum(len(v) for v in j2.done.values())
    t_read = time.time() - t1
    j2.path.unlink()
    return {"rows": got, "batches": n_batches, "write_seconds": t_write, "reload_seconds": t_read,
            "bytes": size, "rss_before_reload_mb": rss_before}


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
          "plan": phase_plan, "journal": phase_journal, "build": phase_build}


def run_phase(name: str, directory: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--phase", name, "--dir", str(directory),
           "--batch-tokens", str(args.batch_tokens), "--max-length", str(args.max_length),
           "--max-segments", str(args.max_segments), "--journal-batch", str(args.journal_batch)]
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
                     "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
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
