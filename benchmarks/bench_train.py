"""Training throughput vs a plain transformers + PyTorch step, and the cost of in-training
SCAS as a fraction of step time, in one run on this machine.

    python benchmarks/bench_train.py                              # defaults below
    python benchmarks/bench_train.py --batch 2 --seq 128 --steps 3 --ks 1,10   # smoke

Both sides train SmolLM2-135M-Instruct (the bundled GGUF, dequantised to float32) on the
same random token batch ``[batch, seq]`` (every position a target), float32, AdamW with
global-norm clipping at 1.0. tokens/s = batch * seq / median step time (after warm-up
steps that include compilation); each side also lists every timed step, since a shared
machine's speed can drift within a run.

Selection cost: for each K, the candidates of the questions of K steps (``batch``
questions per step from the bundled GSM8K pool, ``seq`` as the length limit) are scored
with the current parameters by the training loop's own code
(:func:`scas_jax.training.dynamic.score_candidates` + ``choose``);
``fraction = scoring seconds / (K * step seconds)``. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import machine  # benchmarks/machine.py


def timed(fn, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def side(times: list[float], tokens: int) -> dict:
    """One side's row: median step seconds, tokens/s at the median, every timed step."""
    med = statistics.median(times)
    return {"step_s": round(med, 4), "tokens_per_s": round(tokens / med, 1),
            "each_step_s": [round(t, 3) for t in times]}


def jax_step(student, batch_tokens, cfg, warmup: int, steps: int):
    """Seconds per step of our jitted train step, and the train state after it."""
    import jax
    import numpy as np

    from scas_jax.parallel import make_mesh
    from scas_jax.training import step as st

    mesh = make_mesh(cfg.mesh)
    opt = st.make_optimizer(cfg, 1000)
    state = st.init_state(student.params, opt, mesh)
    fn = st.make_train_step(student.cfg, cfg, opt, mesh, st.state_shardings(state, mesh),
                            st.lr_schedule(cfg, 1000))
    b, s = batch_tokens.shape
    targets = np.zeros_like(batch_tokens)
    targets[:, :-1] = batch_tokens[:, 1:]
    weights = np.ones((b, s), np.float32)
    weights[:, -1] = 0
    host = {"tokens": batch_tokens, "targets": targets, "positions": np.broadcast_to(np.arange(s), (b, s)).astype(np.int32),
            "segment_ids": np.ones((b, s), np.int32), "weights": weights}
    batch = st.put_batch(st.to_step_batch(host, 1), mesh)
    box = {"state": state}

    def one():
        box["state"], m = fn(box["state"], batch)
        jax.block_until_ready(m["loss"])

    return timed(one, warmup, steps), box["state"], mesh


def torch_step(path: str, gguf: str, batch_tokens, warmup: int, steps: int) -> list[float]:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf, dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
    ids = torch.tensor(batch_tokens, dtype=torch.long)

    def one():
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    out = timed(one, warmup, steps)
    del model, opt
    return out


def selection_cost(student, state, mesh, cfg, ks: list[int], step_s: float) -> dict:
    """Scoring seconds for the questions of K steps, and its fraction of K step times."""
    from scas_jax.assets import GSM8K_POOL
    from scas_jax.training import dynamic as dyn

    pool = dyn.load_candidates(GSM8K_POOL, student.tokenizer, cfg)
    order = dyn.QuestionOrder(len(pool.keys), cfg.step_questions, cfg.seed)
    out = {"questions_in_pool": len(pool.keys), "candidates_in_pool": len(pool.rows), "per_k": {}}

    def run(k: int, offset: int) -> tuple[float, int]:
        qs = sorted({int(q) for s in range(offset, offset + k) for q in order.questions(s)})
        cands = [c for q in qs for c in pool.members[q]]
        t = time.perf_counter()
        fields = dyn.score_candidates(state.params, student.cfg, pool, cands, cfg, mesh)
        dyn.choose(pool, qs, fields, cfg, 0)
        return time.perf_counter() - t, len(cands)

    run(1, 0)  # compile
    offset = 1
    for k in ks:
        seconds, n = run(k, offset)
        offset += k
        out["per_k"][str(k)] = {"candidates": n, "score_seconds": round(seconds, 3),
                                "fraction_of_step_time": round(seconds / (k * step_s), 4)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=4, help="rows per step (and questions per step)")
    ap.add_argument("--seq", type=int, default=512, help="tokens per row")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per side")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per side (compilation)")
    ap.add_argument("--ks", default="1,10,100", help="rescore_every values for the selection cost")
    ap.add_argument("--score-batch-tokens", type=int, default=8192)
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--skip-selection", action="store_true")
    args = ap.parse_args()

    import numpy as np

    from scas_jax.loader import bundled_smollm2, load_student
    from scas_jax.training.config import TrainConfig

    gguf = bundled_smollm2()
    student = load_student(gguf, dtype="float32")
    cfg = TrainConfig(batch_size=args.batch, seq_len=args.seq, mesh="data=-1", learning_rate=1e-5,
                      warmup_steps=0, score_batch_tokens=args.score_batch_tokens, selection="dynamic")
    tokens = np.random.default_rng(0).integers(0, student.cfg.vocab_size, size=(args.batch, args.seq)).astype(np.int32)
    ours, state, mesh = jax_step(student, tokens, cfg, args.warmup, args.steps)
    ours_s = statistics.median(ours)
    result = {
        "machine": machine.describe(),
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantised to float32)",
        "batch": args.batch, "seq": args.seq, "steps": args.steps, "warmup": args.warmup,
        "scas_jax": side(ours, args.batch * args.seq),
    }
    if not args.skip_torch:
        theirs = torch_step(str(gguf.parent), gguf.name, tokens, args.warmup, args.steps)
        result["torch"] = side(theirs, args.batch * args.seq)
        result["speedup"] = round(statistics.median(theirs) / ours_s, 3)
    if not args.skip_selection:
        ks = [int(k) for k in args.ks.split(",") if k]
        result["selection"] = selection_cost(student, state, mesh, cfg, ks, ours_s)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
