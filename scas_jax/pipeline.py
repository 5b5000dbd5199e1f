"""``scas-jax pipeline``: the main job, end to end on the embedded default.

Today: convert the bundled SmolLM2-135M-Instruct into ``OUT/student`` (once; reused on
later runs) and print a forward-pass sanity report on GSM8K pool rows: per-row answer
NLL and next-token accuracy of the student on the human reference answers.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def sanity_report(student, rows: list[dict]) -> list[dict]:
    """Answer-token mean NLL and greedy accuracy per row, from one jitted batched forward."""
    import jax
    import numpy as np

    from scas_jax.models.decoder import forward

    tok = student.tokenizer
    seqs, starts = [], []
    for r in rows:
        msgs = [{"role": "system", "content": r.get("system") or "You are a helpful assistant."},
                {"role": "user", "content": r["instruction"]}]
        prompt = tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))["input_ids"]
        msgs.append({"role": "assistant", "content": r["teacher_output"]})
        full = tok(tok.apply_chat_template(msgs, tokenize=False))["input_ids"]
        seqs.append(full)
        starts.append(len(prompt))
    t = max(map(len, seqs))
    ids = np.zeros((len(seqs), t), np.int32)
    seg = np.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], seg[i, : len(s)] = s, 1
    pos = np.tile(np.arange(t), (len(seqs), 1)) * seg
    logits, _ = jax.jit(forward, static_argnums=(1,))(student.params, student.cfg, ids, pos, seg)
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    out = []
    for i, (s, n0) in enumerate(zip(seqs, starts)):
        tgt = np.asarray(s[n0:])
        lp = logp[i, n0 - 1 : len(s) - 1]
        nll = -lp[np.arange(len(tgt)), tgt]
        acc = (lp.argmax(-1) == tgt).mean()
        out.append({"id": rows[i]["id"], "tokens": len(s), "answer_tokens": len(tgt),
                    "answer_mean_nll": float(nll.mean()), "next_token_acc": float(acc),
                    "finite": bool(np.isfinite(logits[i, : len(s)]).all())})
    return out


def run_pipeline(out_dir: str | Path = "runs/demo", student: str = "smollm2", rows: int = 4) -> dict:
    from scas_jax.assets import GSM8K_POOL
    from scas_jax.convert.checkpoint import is_converted
    from scas_jax.convert.commands import convert
    from scas_jax.loader import load_student

    out_dir = Path(out_dir)
    conv = out_dir / "student"
    t0 = time.time()
    if not is_converted(conv):
        print(f"[1/2] converting {student} -> {conv}")
        convert(student, conv)
    else:
        print(f"[1/2] reusing converted student at {conv}")
    st = load_student(conv)
    t_load = time.time() - t0
    with open(GSM8K_POOL / "human_reference.jsonl", encoding="utf-8") as f:
        data = [json.loads(line) for _, line in zip(range(rows), f)]
    print(f"[2/2] forward pass on {len(data)} GSM8K rows")
    t1 = time.time()
    report = sanity_report(st, data)
    t_fwd = time.time() - t1
    import jax

    print(f"\nstudent: {st.cfg.model_type}, {st.num_params / 1e6:.1f}M params, {st.param_dtype}, "
          f"{jax.device_count()} x {jax.devices()[0].platform}")
    print(f"{'id':<18}{'tokens':>8}{'answer':>8}{'ans NLL':>10}{'top-1':>8}")
    for r in report:
        print(f"{r['id']:<18}{r['tokens']:>8}{r['answer_tokens']:>8}"
              f"{r['answer_mean_nll']:>10.3f}{r['next_token_acc']:>8.2f}")
    ok = all(r["finite"] for r in report)
    print(f"\nlogits finite: {ok}; convert+load {t_load:.1f}s, forward (incl. compile) {t_fwd:.1f}s")
    return {"student": str(conv), "rows": report, "ok": ok}


def _cmd(args: argparse.Namespace) -> int:
    return 0 if run_pipeline(args.out, args.student, args.rows)["ok"] else 1


def register(sub) -> None:
    p = sub.add_parser("pipeline", help="the main job end to end on the embedded default student")
    p.add_argument("--out", default="runs/demo", help="working directory (default runs/demo)")
    p.add_argument("--student", default="smollm2", help="HF dir, GGUF or converted dir")
    p.add_argument("--rows", type=int, default=4, help="GSM8K rows for the sanity report")
    p.set_defaults(func=_cmd)
