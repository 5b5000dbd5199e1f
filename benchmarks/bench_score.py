"""Scoring throughput and memory: scas_jax vs the per-row PyTorch path, in one run.

The baseline is the reference's structure (tests/scas_reference.py): one unpadded
sequence per forward, a forward hook on the target layer, the full log-softmax over
the vocabulary and the full T x T similarity matrices.

    python benchmarks/bench_score.py throughput [--questions 200]
    python benchmarks/bench_score.py command --questions 50    # whole programs, wall clock
    python benchmarks/bench_score.py memory --tokens 8192      # each path in a subprocess,
                                                               # then the scas-jax score command
    python benchmarks/bench_score.py bf16 [--questions 50]

Prints a Markdown table; record it in docs/benchmarks.md with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the torch oracle lives with the tests
sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402  (benchmarks/machine.py)


def gsm8k_rows(questions: int, verified_only: bool = True) -> list[dict]:
    from scas_jax.assets import GSM8K_POOL

    rows = []
    for f in sorted(GSM8K_POOL.glob("*.jsonl")):
        with open(f, encoding="utf-8") as fh:
            for i, line in enumerate(fh):
                if i >= questions:
                    break
                r = json.loads(line)
                if r.get("teacher_correct") is False and verified_only:
                    continue
                rows.append(r)
    return rows


def _rate(f, args, flops: float, reps: int) -> float:
    """FLOP/s of ``f(*args)`` over ``reps`` timed calls after one untimed."""
    f(*args).block_until_ready()
    t = time.perf_counter()
    for _ in range(reps):
        f(*args).block_until_ready()
    return flops * reps / (time.perf_counter() - t)


def matmul_flops(n: int = 2048, reps: int = 5) -> float:
    import jax
    import jax.numpy as jnp

    return _rate(jax.jit(lambda x: x @ x), (jnp.ones((n, n), jnp.float32),), 2 * n**3, reps)


def matmul_flops_split(n: int = 2048, reps: int = 5) -> float | None:
    """The same product on every JAX device at once (``[devices * n, n] @ [n, n]``, rows
    sharded over a data mesh); None with one device. Where the CPU is split into several
    devices this is the machine's matmul rate as a data-parallel program sees it."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from scas_jax.parallel import make_mesh

    d = jax.device_count()
    if d == 1:
        return None
    mesh = make_mesh("data=-1")
    a = jax.device_put(jnp.ones((d * n, n), jnp.float32), NamedSharding(mesh, P("data")))
    b = jax.device_put(jnp.ones((n, n), jnp.float32), NamedSharding(mesh, P()))
    return _rate(jax.jit(lambda x, y: x @ y), (a, b), 2 * d * n**3, reps)


def model_flops_per_token(cfg, seq: float) -> float:
    """Forward FLOPs per token: 2 x matmul params + attention (QK^T and PV) + lm head."""
    d, f, h, kv, hd = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    per_layer = 2 * (d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * f) + 4 * h * hd * seq
    return cfg.num_layers * per_layer + 2 * d * cfg.vocab_size


def run_torch(rows, tokenizer, max_rows=None):
    import torch
    from transformers import AutoModelForCausalLM

    import scas_reference as ref
    from scas_jax.loader import bundled_smollm2

    torch.set_num_threads(os.cpu_count() or 1)
    p = bundled_smollm2()
    model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32).eval()
    rows = rows[:max_rows] if max_rows else rows
    ref.reference_metrics(model, tokenizer, rows[0])  # warm-up
    tokens = 0
    t = time.perf_counter()
    out = []
    with torch.inference_mode():
        for r in rows:
            tok = ref.reference_tokenize(tokenizer, r)
            tokens += int(tok["ids"].numel())
            out.append(ref.reference_metrics(model, tokenizer, r))
    return out, tokens, time.perf_counter() - t


def split_cpu(value: str, answers: int) -> None:
    """Split the CPU into JAX devices as ``scas-jax score --cpu-devices value`` would for
    ``answers`` answers (before JAX starts; see scas_jax/cpu_devices.py)."""
    from scas_jax import cpu_devices

    n = cpu_devices.choose(value, answers=answers, default_mesh=True, multi_process=False)
    if n is not None:
        cpu_devices.split(n, explicit=True)


def run_jax(rows, student, cfg):
    """The library scorer on every JAX device (a data mesh where there are several, as
    ``scas-jax score`` runs); ``batch_tokens`` per device."""
    import jax

    from scas_jax.parallel import batch_divisor, make_mesh, shard_params
    from scas_jax.scoring.scorer import prepare, score_rows

    mesh = make_mesh("data=-1") if jax.device_count() > 1 else None
    params = student.params if mesh is None else shard_params(student.params, mesh)
    prep = prepare(rows, student.tokenizer, cfg, batch_divisor(mesh) if mesh else 1)
    t0 = time.perf_counter()
    score_rows(params, student.cfg, student.tokenizer, rows, cfg, mesh)  # compiles every shape
    t_first = time.perf_counter() - t0  # compilation and one whole pass
    t = time.perf_counter()
    out = score_rows(params, student.cfg, student.tokenizer, rows, cfg, mesh)
    wall = time.perf_counter() - t
    return out, prep.stats, wall, t_first


def throughput(args):
    from scas_jax.loader import load_student
    from scas_jax.scoring.scorer import ScoreConfig

    rows = gsm8k_rows(args.questions)
    split_cpu(args.cpu_devices, len(rows))
    import jax

    student = load_student("smollm2")
    cfg = ScoreConfig(batch_tokens=args.batch_tokens, max_length=args.max_length)
    mm, mm_split = matmul_flops(), matmul_flops_split()
    ours, stats, wall_j, t_first = run_jax(rows, student, cfg)
    real = stats["real_tokens"]
    base, tokens_t, wall_t = run_torch(rows, student.tokenizer, args.torch_rows)
    assert tokens_t <= real
    avg_len = real / len(rows)
    fpt = model_flops_per_token(student.cfg, avg_len)
    worst = 0.0
    for a, b in zip(ours, base):
        for k in ("scas_score", "answer_mean_nll", "answer_question_similarity"):
            worst = max(worst, abs(a[k] - b[k]) / max(abs(b[k]), 1e-6))
    res = {
        "rows": len(rows), "real_tokens": real, "padding_fraction": stats["padding_fraction"],
        "shapes": stats["shapes"], "torch_rows": len(base),
        "torch_tok_s": tokens_t / wall_t, "jax_tok_s": real / wall_j,
        "speedup": (real / wall_j) / (tokens_t / wall_t), "jax_warmup_s (compile + one whole pass)": t_first,
        "jax_devices": jax.device_count(),
        "matmul_gflops": mm / 1e9, "matmul_gflops_split": mm_split and mm_split / 1e9,
        "jax_gflops": fpt * real / wall_j / 1e9,
        # against the better of the one-program and the split rate
        "jax_share_of_matmul": fpt * real / wall_j / max(mm, mm_split or 0),
        "torch_gflops": fpt * tokens_t / wall_t / 1e9, "max_rel_diff": worst,
        "machine": machine.one_line(),
    }
    print(json.dumps(res, indent=2))


def _peak_mb() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: ru_maxrss survives exec, so a child
    would report its parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def long_row(tokens: int) -> dict:
    """A GSM8K question whose answer repeats real solutions until ~``tokens`` tokens."""
    rows = gsm8k_rows(200)
    text, i = "", 0
    while len(text) < tokens * 4.2:
        text += rows[i % len(rows)]["teacher_output"] + "\n"
        i += 1
    return {"id": "long", "instruction": rows[0]["instruction"], "teacher_output": text}


def _bench_models(root: Path) -> tuple[Path, Path]:
    """SmolLM2 converted for scas_jax and exported for transformers (made once): each
    path then loads the student from its own native format."""
    from scas_jax.convert.commands import convert, export

    conv, hf = root / "smollm2", root / "smollm2-hf"
    if not conv.exists():
        convert("smollm2", conv)
    if not hf.exists():
        export(conv, hf)
    return conv, hf


def _rss_mb() -> float:
    """This process's resident set now (VmRSS)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _encoded_length(row: dict, tok) -> int:
    """Tokens of ``row`` as the scorer encodes it (the scorer's own encoder, which imports
    neither jax nor torch, so the torch child carries no JAX runtime)."""
    from scas_jax.data.chat import ChatEncoder

    e = ChatEncoder(tok).encode_rows([row])[0]
    if not hasattr(e, "length"):
        raise SystemExit(f"the long row does not encode: {e}")
    return e.length


def memory_child(which: str, tokens: int, root: str):
    """One path in its own process: tokenize and trim the row, load the student, score.

    Each side reads its tokenizer the way its path does: torch through transformers'
    ``AutoTokenizer`` from the Hugging Face export, scas_jax through its loader
    (``load_tokenizer``, what ``load_student`` and ``scas-jax score`` use) from the
    converted checkpoint; both hold the same ``tokenizer.json``, so the row and its
    token count are the same (printed as ``tokens``). ``phases`` records (VmRSS, VmHWM)
    after each step: what the peak is made of."""
    conv, hf = Path(root) / "smollm2", Path(root) / "smollm2-hf"
    phases = {"start": (_rss_mb(), _peak_mb())}
    if which == "torch":
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(hf))
    else:
        from scas_jax.loader import load_tokenizer

        tok = load_tokenizer(conv)
    phases["tokenizer"] = (_rss_mb(), _peak_mb())
    row = long_row(tokens)
    n = _encoded_length(row, tok)
    while n > tokens:  # trim to at most `tokens` tokens in all
        row["teacher_output"] = row["teacher_output"][: int(len(row["teacher_output"]) * tokens / n) - 1]
        n = _encoded_length(row, tok)
    from scas_jax.host_memory import release  # imports neither jax nor torch

    release()  # the trimming above is harness work: free it on both sides alike
    phases["row"] = (_rss_mb(), _peak_mb())
    if which == "torch":
        import torch
        from transformers import AutoModelForCausalLM

        import scas_reference as ref

        model = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()
        base = _peak_mb()
        phases["model"] = (_rss_mb(), base)
        t = time.perf_counter()
        with torch.inference_mode():
            ref.reference_metrics(model, tok, row)
        wall = time.perf_counter() - t
    else:
        import jax

        from scas_jax.loader import load_student
        from scas_jax.scoring.scorer import ScoreConfig, score_rows

        pool = Path(root) / f"memory_pool_{tokens}"  # the same row for the `scas-jax score` run
        pool.mkdir(exist_ok=True)
        with open(pool / "long.jsonl", "w", encoding="utf-8") as f:
            f.write(json.dumps({**row, "teacher_name": "long", "teacher_correct": True}) + "\n")
        student = load_student(conv, with_tokenizer=False)  # `tok` above is its tokenizer
        jax.block_until_ready(student.params)
        base = _peak_mb()
        phases["model"] = (_rss_mb(), base)
        cfg = ScoreConfig(batch_tokens=tokens, max_length=tokens)
        t = time.perf_counter()
        score = score_rows(student.params, student.cfg, tok, [row], cfg)[0]["scas_score"]
        wall = time.perf_counter() - t
    if which == "torch":
        score = None  # the reference's score is not the point here; parity is tested elsewhere
    phases["scored"] = (_rss_mb(), _peak_mb())
    print(json.dumps({"which": which, "tokens": n, "peak_mb": round(_peak_mb()), "scas_score": score,
                      "peak_before_scoring_mb": round(base), "wall_s_incl_compile": round(wall, 1),
                      "torch_imported": "torch" in sys.modules,
                      "phases_rss_hwm_mb": {k: [round(a), round(b)] for k, (a, b) in phases.items()}}))


def _tree_pids(pid: int) -> list[int]:
    """``pid`` and its descendants (Linux /proc)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def _status_mb(pid: int, key: str) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def memory_cli(tokens: int, root: Path) -> dict:
    """Peak RSS of the process tree of the real command, ``scas-jax score``, on the row the
    jax child scored (its pool file): the command's own VmHWM, polled every 10 ms until it
    exits (VmHWM is reset by exec, so the launcher does not count), and the largest sum of
    VmRSS over the tree seen by the polls."""
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "scas_jax.cli", "score", "--student", str(root / "smollm2"),
               "--candidate-dir", str(root / f"memory_pool_{tokens}"), "--output-dir", out,
               "--batch-tokens", str(tokens), "--max-length", str(tokens)]
        log_path = Path(out) / "command.log"  # a file, not a pipe: nothing can block the command
        t = time.perf_counter()
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
            hwm = tree = 0.0
            while proc.poll() is None:
                hwm = max(hwm, _status_mb(proc.pid, "VmHWM"))
                tree = max(tree, sum(_status_mb(p, "VmRSS") for p in _tree_pids(proc.pid)))
                time.sleep(0.01)
        if proc.returncode != 0:
            raise SystemExit(f"scas-jax score failed ({proc.returncode}):\n{log_path.read_text()[-3000:]}")
        with open(Path(out) / "long_scas_scores.jsonl", encoding="utf-8") as f:
            score = json.loads(f.readline())["scas_score"]
    return {"which": "scas-jax score (CLI)", "peak_mb": round(max(hwm, tree)), "command_vmhwm_mb": round(hwm),
            "tree_rss_max_sampled_mb": round(tree), "scas_score": score,
            "wall_s": round(time.perf_counter() - t, 1)}


def memory(args):
    root = ROOT / "runs" / "bench"
    _bench_models(root)
    res = []
    for which in ("torch", "jax"):
        out = subprocess.run([sys.executable, __file__, "memory-child", which, str(args.tokens), str(root)],
                             capture_output=True, text=True, check=True)
        res.append(json.loads(out.stdout.strip().splitlines()[-1]))
    if res[0]["tokens"] != res[1]["tokens"]:
        raise SystemExit(f"the two children scored different rows: {res[0]['tokens']} vs {res[1]['tokens']} tokens")
    res.append(memory_cli(args.tokens, root))
    res.append({"machine": machine.one_line(),
                "ratio_peak": res[1]["peak_mb"] / res[0]["peak_mb"],
                "ratio_peak_cli": res[2]["peak_mb"] / res[0]["peak_mb"],
                "ratio_scoring_increment": (res[1]["peak_mb"] - res[1]["peak_before_scoring_mb"])
                / max(1, res[0]["peak_mb"] - res[0]["peak_before_scoring_mb"])})
    print(json.dumps(res, indent=2))


def bf16(args):
    import numpy as np

    from scas_jax.loader import load_student
    from scas_jax.scoring.scorer import ScoreConfig

    rows = gsm8k_rows(args.questions)
    out = {}
    for dt in ("float32", "bfloat16"):
        student = load_student("smollm2", dtype=dt)
        scores, stats, wall, _ = run_jax(rows, student, ScoreConfig(dtype=dt))
        out[dt] = (scores, stats["real_tokens"] / wall)
    f32, b16 = out["float32"][0], out["bfloat16"][0]
    d_nll = np.array([abs(a["answer_mean_nll"] - b["answer_mean_nll"]) for a, b in zip(f32, b16)])
    d_s = np.array([abs(a["scas_score"] - b["scas_score"]) / max(abs(a["scas_score"]), 1e-6)
                    for a, b in zip(f32, b16)])
    same_min = _same_min(rows, f32, b16)
    print(json.dumps({"f32_tok_s": out["float32"][1], "bf16_tok_s": out["bfloat16"][1],
                      "answer_mean_nll_abs_diff_max": float(d_nll.max()),
                      "answer_mean_nll_abs_diff_mean": float(d_nll.mean()),
                      "scas_score_rel_diff_median": float(np.median(d_s)),
                      "min_selection_agreement": same_min}, indent=2))


def _same_min(rows, a, b):
    best = {}
    for r, x, y in zip(rows, a, b):
        best.setdefault(r["id"], []).append((x["scas_score"], y["scas_score"], r["teacher_name"]))
    agree = sum(min(v)[2] == min(v, key=lambda t: t[1])[2] for v in best.values())
    return agree / len(best)


def _write_pool(questions: int, pool: Path) -> None:
    """The first ``questions`` lines of every bundled teacher file (the rows of
    :func:`gsm8k_rows` and the unverified ones, which ``score`` skips as it does)."""
    from scas_jax.assets import GSM8K_POOL

    pool.mkdir(parents=True, exist_ok=True)
    for f in sorted(GSM8K_POOL.glob("*.jsonl")):
        with open(f, encoding="utf-8") as fh:
            lines = [line for _, line in zip(range(questions), fh)]
        (pool / f.name).write_text("".join(lines), encoding="utf-8")


def torch_all(questions: int, hf: str, out: str) -> None:
    """The per-row path as a whole program: load the exported student and its tokenizer
    through transformers, score every verified row of the first ``questions`` questions
    one sequence at a time, write ``{teacher/id: fields}`` to ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import scas_reference as ref

    torch.set_num_threads(os.cpu_count() or 1)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(hf)
    res = {}
    with torch.inference_mode():
        for r in gsm8k_rows(questions):
            res[f"{r['teacher_name']}/{r['id']}"] = ref.reference_metrics(model, tok, r)
    Path(out).write_text(json.dumps(res), encoding="utf-8")


def _timed(cmd: list[str], log: Path) -> float:
    """Wall seconds of one subprocess (its output to ``log``; shown if it fails)."""
    t = time.perf_counter()
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"{cmd[:4]} failed ({rc}):\n{log.read_text()[-3000:]}")
    return round(time.perf_counter() - t, 1)


def command(args):
    """Whole programs, same rows, one run: ``scas-jax score`` (process start, imports,
    loading, compile, scoring, writing) against :func:`torch_all` (the same), each a
    subprocess timed by wall clock; scores compared row by row."""
    import tempfile

    root = ROOT / "runs" / "bench"
    conv, hf = _bench_models(root)
    res = {"machine": machine.one_line(), "questions": args.questions, "load_before": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _write_pool(args.questions, tmp / "pool")
        res["scas_jax_s"] = _timed([sys.executable, "-m", "scas_jax.cli", "score", "--student", str(conv),
                                    "--candidate-dir", str(tmp / "pool"), "--output-dir",
                                    str(tmp / "scored"), "--batch-tokens", str(args.batch_tokens),
                                    "--max-length", str(args.max_length),
                                    "--cpu-devices", args.cpu_devices], tmp / "jax.log")
        res["torch_s"] = _timed([sys.executable, __file__, "torch-all", str(args.questions), str(hf),
                                 str(tmp / "torch.json")], tmp / "torch.log")
        base = json.loads((tmp / "torch.json").read_text(encoding="utf-8"))
        ours = {}
        for f in sorted((tmp / "scored").glob("*_scas_scores.jsonl")):
            for line in f.read_text(encoding="utf-8").splitlines():
                r = json.loads(line)
                ours[f"{r['teacher_name']}/{r['id']}"] = r
    if sorted(ours) != sorted(base):
        raise SystemExit(f"different rows: {len(ours)} scored by scas-jax, {len(base)} by torch")
    res["rows"] = len(ours)
    res["max_rel_diff"] = max(abs(ours[k][f] - base[k][f]) / max(abs(base[k][f]), 1e-6)
                              for k in base for f in ("scas_score", "answer_mean_nll",
                                                      "answer_question_similarity"))
    res["speedup"] = round(res["torch_s"] / res["scas_jax_s"], 2)
    res["load_after"] = os.getloadavg()
    print(json.dumps(res, indent=2))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["throughput", "command", "torch-all", "memory", "memory-child", "bf16"])
    ap.add_argument("rest", nargs="*")
    ap.add_argument("--questions", type=int, default=200)
    ap.add_argument("--torch-rows", type=int, default=None)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--cpu-devices", default="auto",
                    help="scas-jax score's --cpu-devices (throughput: the same split in-process)")
    args = ap.parse_args()
    if args.mode == "throughput":
        throughput(args)
    elif args.mode == "command":
        command(args)
    elif args.mode == "torch-all":
        torch_all(int(args.rest[0]), args.rest[1], args.rest[2])
    elif args.mode == "memory":
        memory(args)
    elif args.mode == "memory-child":
        memory_child(args.rest[0], int(args.rest[1]), args.rest[2])
    else:
        bf16(args)


if __name__ == "__main__":
    main()
