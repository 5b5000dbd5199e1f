"""One prepared GPU benchmark (issue 13): scoring throughput against the per-row torch
path on the same GPU, and training MFU, both in bfloat16. At most ~10 minutes on one
H100/H200-class GPU with the defaults.

How to run (repository root, a CUDA jax and a CUDA torch installed)::

    python benchmarks/bench_gpu.py                  # full run, prints one JSON object
    python benchmarks/bench_gpu.py --out runs/bench_gpu.json
    python benchmarks/bench_gpu.py --smoke          # tiny sizes; runs on CPU too (~1-2 min)
    python benchmarks/bench_gpu.py --skip-torch     # no torch on the machine
    python benchmarks/bench_gpu.py --profile runs/bench_gpu_trace   # + a jax.profiler trace

(a) Scoring (``score``): the bundled SmolLM2-135M-Instruct student (its Q4_1 GGUF
dequantised, cast to bfloat16) on the bundled GSM8K pool (``--questions`` per teacher,
verified rows). scas_jax: ``score_rows`` with ``ScoreConfig(dtype="bfloat16")``
(packed rows, ``attn_impl="auto"``: cuDNN flash attention on an NVIDIA GPU), timed
after a compiling pass over the same rows. Torch: the reference structure of
``tests/scas_reference.py`` (one unpadded sequence per forward, a forward hook on the
target layer, the full log-softmax over the vocabulary, the full T x T similarity
matrices), but resident on the same GPU in bfloat16 (transformers' default SDPA
attention), on the first ``--torch-rows`` rows after one warm-up row. Reported:
tokens/s of each (real tokens), ``speedup`` (goal >= 10), and the largest relative
difference of ``scas_score`` / ``answer_mean_nll`` between the two (bf16 noise; a
sanity check, not a parity test).

(b) Training MFU (``train``): one jitted train step of ``scas_jax.training.step`` (AdamW,
float32 master weights, bfloat16 compute, ``attn_impl="auto"``) on random parameters of
``--train-model`` (a preset of ``configs/models``, default ``qwen2.5-1.5b-instruct``;
weights are not needed for MFU) over a random token batch ``[--batch, --seq]`` packed
with ``--segments`` sequences per row. MFU = model FLOPs per token
(``scas_jax.training.metrics.flops_per_token``: 6 x matmul params + attention over the
row) x tokens/s / peak dense bf16 FLOP/s of the device (``--peak-tflops``, else the
table ``scas_jax.training.metrics.PEAK_TFLOPS``: H100/H200 989, A100 312, ...); goal
>= 40 %. Step time: median of ``--steps`` steps after ``--warmup`` (compilation).

The JSON carries the device name, jax/torch versions, the attention implementation
chosen for the scoring and training shapes, and every setting. Record the numbers in
docs/benchmarks.md with the machine.

Memory: the training defaults (1.5B, 8 x 2048, no remat) are sized for an H200 (141 GB);
on an 80 GB H100 add ``--remat`` or ``--batch 4``. jax is limited to ``XLA_PYTHON_CLIENT_MEM_FRACTION`` (set to 0.8 here unless
already set) so that torch, run in the same process, has room.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.8")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the torch reference lives with the tests


def log(msg: str) -> None:
    print(f"[bench_gpu {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def gsm8k_rows(questions: int) -> list[dict]:
    """The verified rows of the first ``questions`` questions of every bundled teacher."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_score import gsm8k_rows as rows

    return rows(questions, verified_only=True)


def device_info() -> dict:
    import jax

    d = jax.devices()[0]
    return {"backend": jax.default_backend(), "device_kind": str(getattr(d, "device_kind", d.platform)),
            "devices": jax.device_count(), "jax": jax.__version__}


def attn_choice(seq: int, dtype, head_dim: int) -> str:
    from scas_jax.models import attention_kernels as K
    from scas_jax.models.attention import BLOCK

    impl, why = K.choose_impl(K.current_backend(), seq, dtype, head_dim, block=BLOCK)
    return impl + (f" ({why})" if why else "")


# ---------------------------------------------------------------------------- (a) scoring


def score_jax(rows, student, cfg, profile: str | None) -> dict:
    from scas_jax.scoring.scorer import prepare, score_rows

    prep = prepare(rows, student.tokenizer, cfg)
    t = time.perf_counter()
    score_rows(student.params, student.cfg, student.tokenizer, rows, cfg)  # compiles every shape
    compile_s = time.perf_counter() - t
    if profile:
        import jax

        jax.profiler.start_trace(profile, create_perfetto_trace=True)
    t = time.perf_counter()
    out = score_rows(student.params, student.cfg, student.tokenizer, rows, cfg)
    wall = time.perf_counter() - t
    if profile:
        jax.profiler.stop_trace()
        log(f"profile of the timed scoring pass under {profile}")
    real = prep.stats["real_tokens"]
    return {"scores": out, "real_tokens": real, "wall_s": wall, "tok_s": real / wall,
            "first_pass_s_incl_compile": compile_s, "padding_fraction": prep.stats["padding_fraction"],
            "shapes": prep.stats["shapes"]}


def _torch_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def torch_row(model, tokenizer, row, target: str, lam: float, dev) -> dict:
    """The reference computation of one row (tests/scas_reference.py), on ``dev``."""
    import torch
    import torch.nn.functional as F

    import scas_reference as ref

    tok = ref.reference_tokenize(tokenizer, row)
    ids = tok["ids"].to(dev)
    store = {}
    module = dict(model.named_modules())[target]
    handle = module.register_forward_hook(
        lambda _m, _i, out: store.__setitem__("act", out[0] if isinstance(out, tuple) else out))
    try:
        logits = model(input_ids=ids[None]).logits[0].float()
    finally:
        handle.remove()
    logp = F.log_softmax(logits[:-1], dim=-1)
    nll = torch.full((ids.numel(),), float("nan"), device=dev)
    nll[1:] = -logp.gather(-1, ids[1:, None])[:, 0]
    unit = F.normalize(store["act"][0].float(), p=2, dim=1)
    qm, am = tok["question"].to(dev), tok["answer"].to(dev)
    a, q = unit[am], unit[qm]
    aa = (a @ a.T).mean()
    aq = (a @ q.T).mean() if q.shape[0] else torch.zeros((), device=dev)

    def mean_nll(mask):
        mask = mask.clone()
        mask[0] = False
        return nll[mask].mean() if bool(mask.any()) else torch.zeros((), device=dev)

    na, nq = mean_nll(am), mean_nll(qm)
    score = (1 - lam) * na * na * aa + lam * na * nq * aq
    return {"scas_score": float(score), "answer_mean_nll": float(na), "tokens": int(ids.numel())}


def score_torch(rows, tokenizer, target: str, lam: float) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from scas_jax.loader import bundled_smollm2

    dev = _torch_device()
    p = bundled_smollm2()
    model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
    model = model.to(device=dev, dtype=torch.bfloat16).eval()
    out, tokens = [], 0
    with torch.inference_mode():
        torch_row(model, tokenizer, rows[0], target, lam, dev)  # warm-up
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for r in rows:
            m = torch_row(model, tokenizer, r, target, lam, dev)  # float() syncs every row
            tokens += m["tokens"]
            out.append(m)
        wall = time.perf_counter() - t
    del model
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return {"scores": out, "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall,
            "rows": len(rows), "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
            "torch": torch.__version__}


def bench_score(args) -> dict:
    import jax.numpy as jnp

    from scas_jax.loader import load_student
    from scas_jax.scoring.scorer import ScoreConfig

    rows = gsm8k_rows(args.questions)
    student = load_student("smollm2", dtype="bfloat16")
    cfg = ScoreConfig(dtype="bfloat16", batch_tokens=args.batch_tokens, max_length=args.max_length)
    log(f"scoring {len(rows)} rows with scas_jax (bf16, batch_tokens {args.batch_tokens})")
    ours = score_jax(rows, student, cfg, args.profile)
    res = {"model": "SmolLM2-135M-Instruct (bundled GGUF, bfloat16)", "rows": len(rows),
           "batch_tokens": args.batch_tokens, "target_layer": cfg.target_layer,
           "attn_impl": attn_choice(min(args.batch_tokens, args.max_length), jnp.bfloat16, student.cfg.head_dim),
           "scas_jax": {k: v for k, v in ours.items() if k != "scores"}}
    if args.skip_torch:
        return res
    try:
        import torch  # noqa: F401
    except ImportError:
        res["torch"] = "not installed"
        return res
    n = min(len(rows), args.torch_rows)
    log(f"scoring {n} rows with the per-row torch path (bf16)")
    from scas_jax.models.decoder import parse_tap

    layer, kind = parse_tap(cfg.target_layer, student.cfg.num_layers)
    target = f"model.layers.{layer}.mlp.up_proj" if kind == "up_proj" else f"model.layers.{layer}"
    base = score_torch(rows[:n], student.tokenizer, target, cfg.lambda_scas)
    worst = {}
    for key in ("scas_score", "answer_mean_nll"):
        worst[key] = max(abs(a[key] - b[key]) / max(abs(b[key]), 1e-6)
                         for a, b in zip(ours["scores"][:n], base["scores"]))
    res["torch"] = {k: v for k, v in base.items() if k != "scores"}
    res["speedup"] = ours["tok_s"] / base["tok_s"]
    res["speedup_goal"] = 10.0
    res["max_rel_diff_vs_torch"] = worst
    return res


# ---------------------------------------------------------------------------- (b) training


def packed_batch(rng, b: int, s: int, segments: int, vocab: int) -> dict:
    import numpy as np

    tokens = rng.integers(0, vocab, size=(b, s)).astype(np.int32)
    seg_len = max(1, s // segments)
    seg = np.minimum(np.arange(s) // seg_len, segments - 1) + 1
    starts = (seg - 1) * seg_len
    positions = (np.arange(s) - starts).astype(np.int32)
    targets = np.zeros_like(tokens)
    targets[:, :-1] = tokens[:, 1:]
    weights = np.ones((b, s), np.float32)
    last = np.append(seg[1:] != seg[:-1], True)  # the last token of a segment predicts nothing
    weights[:, last] = 0
    return {"tokens": tokens, "targets": targets, "positions": np.broadcast_to(positions, (b, s)).copy(),
            "segment_ids": np.broadcast_to(seg.astype(np.int32), (b, s)).copy(), "weights": weights}


def bench_train(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from scas_jax.models.decoder import init_params
    from scas_jax.models.presets import load_model_preset
    from scas_jax.parallel import make_mesh
    from scas_jax.training import metrics
    from scas_jax.training import step as st
    from scas_jax.training.config import TrainConfig

    if args.train_model == "smollm2":
        from scas_jax.loader import load_student

        mcfg = load_student("smollm2", with_tokenizer=False).cfg
    else:
        mcfg, _ = load_model_preset(args.train_model)
    cfg = TrainConfig(batch_size=args.batch, seq_len=args.seq, mesh="data=-1", learning_rate=1e-5,
                      warmup_steps=0, compute_dtype="bfloat16", remat=args.remat, attn_impl=args.train_attn)
    log(f"training step: {args.train_model} ({metrics.matmul_params(mcfg) / 1e9:.2f}B matmul params), "
        f"batch {args.batch} x {args.seq}, {args.segments} segments per row, remat {args.remat}")
    mesh = make_mesh(cfg.mesh)
    params = init_params(mcfg, jax.random.PRNGKey(0), jnp.float32)
    opt = st.make_optimizer(cfg, 1000)
    state = st.init_state(params, opt, mesh)
    del params
    fn = st.make_train_step(mcfg, cfg, opt, mesh, st.state_shardings(state, mesh), st.lr_schedule(cfg, 1000))
    host = packed_batch(np.random.default_rng(0), args.batch, args.seq, args.segments, mcfg.vocab_size)
    batch = st.put_batch(st.to_step_batch(host, 1), mesh)
    box = {"state": state}

    def one():
        box["state"], m = fn(box["state"], batch)
        jax.block_until_ready(m["loss"])

    t = time.perf_counter()
    one()
    compile_s = time.perf_counter() - t
    for _ in range(max(0, args.warmup - 1)):
        one()
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        one()
        times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    tokens = float(host["weights"].size)  # every position of the packed rows is computed
    tok_s = tokens / step_s
    fpt = metrics.flops_per_token(mcfg, args.seq)
    peak = metrics.peak_flops(jax.devices(), args.peak_tflops)
    return {"model": args.train_model, "matmul_params": metrics.matmul_params(mcfg),
            "batch": args.batch, "seq": args.seq, "segments": args.segments, "remat": args.remat,
            "attn_impl": (attn_choice(args.seq, jnp.bfloat16, mcfg.head_dim)
                          if args.train_attn == "auto" else args.train_attn),
            "first_step_s_incl_compile": compile_s, "step_s_median": step_s,
            "step_s_all": [round(x, 4) for x in times], "tokens_per_s": tok_s,
            "model_flops_per_token": fpt, "model_tflops_per_s": fpt * tok_s / 1e12,
            "peak_tflops": None if peak is None else peak / 1e12,
            "mfu": None if peak is None else fpt * tok_s / peak, "mfu_goal": 0.40}


def _guarded(fn, args) -> dict:
    """``fn(args)``, or ``{"error": ...}`` (the other part of the benchmark still runs)."""
    import traceback

    try:
        return fn(args)
    except Exception as e:  # noqa: BLE001 - reported in the JSON
        traceback.print_exc()
        return {"error": f"{type(e).__name__}: {e}"[:2000]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (checks the script on CPU)")
    ap.add_argument("--questions", type=int, default=300, help="GSM8K questions per teacher file")
    ap.add_argument("--torch-rows", type=int, default=400, help="rows scored by the torch path")
    ap.add_argument("--batch-tokens", type=int, default=32768)
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--skip-score", action="store_true")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--train-model", default="qwen2.5-1.5b-instruct",
                    help="a preset of configs/models (random weights) or 'smollm2'")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--segments", type=int, default=4, help="packed sequences per training row")
    ap.add_argument("--remat", action="store_true")
    ap.add_argument("--train-attn", default="auto", help="attn_impl of the train step")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--peak-tflops", type=float, default=0.0,
                    help="dense bf16 peak per device; 0: the table by device kind")
    ap.add_argument("--profile", default=None, metavar="DIR",
                    help="jax.profiler trace of the timed scoring pass under DIR")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    if args.smoke:
        args.questions, args.torch_rows, args.batch_tokens, args.max_length = 2, 3, 1024, 1024
        args.train_model, args.batch, args.seq, args.segments = "smollm2", 2, 64, 2
        args.steps, args.warmup = 2, 1

    t0 = time.time()
    result = {"device": device_info(), "platform": platform.platform(), "smoke": args.smoke,
              "settings": {k: v for k, v in vars(args).items() if k not in ("out",)}}
    if not args.skip_score:
        result["score"] = _guarded(bench_score, args)
    if not args.skip_train:
        result["train"] = _guarded(bench_train, args)
        if "error" in result["train"] and args.train_attn == "auto":
            # e.g. a cuDNN limit on the backward with a [batch, 1, seq, seq] mask: say so,
            # and still measure MFU with the portable flash-style attention
            log("train step failed with attn_impl auto; measuring again with blockwise")
            args.train_attn = "blockwise"
            result["train_blockwise"] = _guarded(bench_train, args)
    result["wall_s"] = time.time() - t0
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
