"""The SCAS proxy against the true gradient cost, on GSM8K answers with SmolLM2.

For the first questions of the bundled pool (``scas_jax/assets/gsm8k``) with at least
``--min-answers`` verified-correct answers, until ``--answers`` answers are taken, it
computes

* the SCAS fields with the library scorer (``scas_jax.api.score_rows``: the code
  behind ``scas-jax score``), and
* the exact gradient cost of each answer (``scas_jax.gradcost``): the squared norm of
  the gradient of the answer's mean NLL w.r.t. ``layers.-1.mlp.up_proj``'s kernel
  (``target``) and w.r.t. all parameters (``all``),

then the Spearman correlation of each true cost with ``scas_score``, its parts and a
random score (a floor), with a 95 % bootstrap interval over answers, the mean
within-question Spearman, and how often a score's per-question ``min`` pick is the
true-gradient pick. Writes a JSON file, a Markdown table on stdout and a scatter plot.

    python benchmarks/bench_proxy.py --answers 200 \
        --json docs/figures/proxy_vs_gradient.json --figure docs/figures/proxy_vs_gradient.png
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

import machine  # benchmarks/machine.py

from scas_jax.experiment.compare import spearman  # one Spearman (average ranks) for the project

SCORES = ("scas_score", "answer_mean_nll", "answer_answer_block", "answer_question_block",
          "nll_weight_score", "scas_score_no_diag", "random")
TRUTHS = ("target", "all")


def bootstrap(a, b, n=1000, seed=0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    vals = [spearman(a[i], b[i]) for i in (rng.integers(0, len(a), len(a)) for _ in range(n))]
    return float(np.nanpercentile(vals, 2.5)), float(np.nanpercentile(vals, 97.5))


def pick_rows(pool: Path, answers: int, min_answers: int) -> list[dict]:
    files = sorted(pool.glob("*.jsonl"))
    by_id: dict[str, list[dict]] = defaultdict(list)
    order: list[str] = []
    for f in files:
        for line in f.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            if row.get("teacher_correct") is True:
                if row["id"] not in by_id:
                    order.append(row["id"])
                by_id[row["id"]].append(row)
    rows: list[dict] = []
    for i in sorted(order):
        if len(by_id[i]) >= min_answers and len(rows) < answers:
            rows += by_id[i]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--answers", type=int, default=200)
    ap.add_argument("--min-answers", type=int, default=3, help="verified answers per question, at least")
    ap.add_argument("--lambda-scas", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--figure", type=Path, default=None)
    args = ap.parse_args()

    import jax

    from scas_jax import api, gradcost
    from scas_jax.assets import GSM8K_POOL
    from scas_jax.loader import load_student

    t0 = time.time()
    st = load_student("smollm2")
    rows = pick_rows(GSM8K_POOL, args.answers, args.min_answers)
    cfg = api.ScoreConfig(lambda_scas=args.lambda_scas, batch_tokens=4096, max_length=2048)
    t1 = time.time()
    fields = api.score_rows(st.params, st.cfg, st.tokenizer, rows, cfg)
    t_score = time.time() - t1
    assert not any("scas_scoring_error" in f for f in fields)
    encoded = api.ChatEncoder(st.tokenizer).encode_rows(rows)
    t2 = time.time()
    truth = gradcost.grad_costs(st.params, st.cfg, encoded)
    t_grad = time.time() - t2

    rng = np.random.default_rng(args.seed)
    table = {s: np.array([f[s] for f in fields]) for s in SCORES if s != "random"}
    table["random"] = rng.random(len(rows))
    true = {t: np.array([g[t] for g in truth]) for t in TRUTHS}
    loss_err = max(abs(g["loss"] - f["answer_mean_nll"]) / f["answer_mean_nll"] for g, f in zip(truth, fields))
    qid = np.array([r["id"] for r in rows])
    groups = [np.flatnonzero(qid == q) for q in dict.fromkeys(qid.tolist())]

    result = {"answers": len(rows), "questions": len(groups),
              "answers_per_question": {str(k): int(v) for k, v in zip(*np.unique([len(g) for g in groups], return_counts=True))},
              "tokens": int(sum(e.length for e in encoded)),
              "max_rel_diff_loss_vs_answer_mean_nll": loss_err, "scores": {}}
    for s, v in table.items():
        entry = {}
        for t in TRUTHS:
            within = [spearman(v[g], true[t][g]) for g in groups]
            hits = [int(np.argmin(v[g]) == np.argmin(true[t][g])) for g in groups]
            entry[t] = {"spearman": spearman(v, true[t]), "ci95": bootstrap(v, true[t], seed=args.seed),
                        "within_question_spearman": float(np.nanmean(within)),
                        "min_pick_agreement": float(np.mean(hits))}
        result["scores"][s] = entry
    result["chance_min_pick"] = float(np.mean([1 / len(g) for g in groups]))
    result["truth_target_vs_all_spearman"] = spearman(true["target"], true["all"])
    result["timing_s"] = {"scoring": round(t_score, 1), "gradients": round(t_grad, 1),
                          "per_answer_gradient": round(t_grad / len(rows), 2), "total": round(time.time() - t0, 1)}
    result["machine"] = {**machine.describe(), "devices": str(jax.devices()[0]),
                         "jax": jax.__version__, "python": platform.python_version(),
                         "load_after": os.getloadavg()}
    print(markdown(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.figure:
        scatter(args.figure, table, true, [r["teacher_name"] for r in rows])


def markdown(r: dict) -> str:
    lines = [f"{r['answers']} answers to {r['questions']} questions, {r['tokens']} tokens; "
             f"chance of a min pick matching: {r['chance_min_pick']:.3f}",
             "", "| score | Spearman vs target (95% CI) | Spearman vs all | within-question Spearman "
             "(target / all) | min pick = true pick (target / all) |", "|---|---:|---:|---:|---:|"]
    for s, e in r["scores"].items():
        t, a = e["target"], e["all"]
        lines.append(f"| `{s}` | {t['spearman']:.3f} ({t['ci95'][0]:.2f}, {t['ci95'][1]:.2f}) | "
                     f"{a['spearman']:.3f} ({a['ci95'][0]:.2f}, {a['ci95'][1]:.2f}) | "
                     f"{t['within_question_spearman']:.3f} / {a['within_question_spearman']:.3f} | "
                     f"{t['min_pick_agreement']:.1%} / {a['min_pick_agreement']:.1%} |")
    lines.append(f"\ntarget vs all (Spearman): {r['truth_target_vs_all_spearman']:.3f}; "
                 f"loss vs answer_mean_nll max rel diff {r['max_rel_diff_loss_vs_answer_mean_nll']:.1e}; "
                 f"timing {r['timing_s']}")
    return "\n".join(lines)


def scatter(path: Path, table: dict, true: dict, teachers: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(set(teachers))
    cmap = plt.get_cmap("tab10")
    colors = [cmap(names.index(t)) for t in teachers]
    panels = [("scas_score", "target"), ("scas_score", "all"), ("answer_mean_nll", "all")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    for ax, (s, t) in zip(axes, panels):
        ax.scatter(table[s], true[t], c=colors, s=14, alpha=0.75)
        ax.set_yscale("log")
        ax.set_xlabel(s)
        ax.set_ylabel(f"true gradient cost ({'up_proj kernel of the last layer' if t == 'target' else 'all parameters'})")
        ax.set_title(f"{s} vs ||grad||² ({t}): Spearman {spearman(table[s], true[t]):.2f}")
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], marker="o", ls="", color=cmap(i), label=n) for i, n in enumerate(names)]
    fig.legend(handles=handles, loc="lower center", ncol=len(names), frameon=False, fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
