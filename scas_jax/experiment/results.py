"""Aggregate the runs: per arm, held-out NLL (macro-averaged over teachers) and accuracy
with seeded bootstrap intervals over questions and seeds, and the paired difference to
the ``compare_to`` arm; ``results.json``, ``results.csv``, ``results.md``.

The bootstrap: ``B`` draws, each resampling the held-out questions with replacement (one
draw shared by every arm, so differences are paired) and, per arm, its seeds with
replacement (arm ``a`` with ``S`` runs uses ``floor(u * S)`` of shared uniforms ``u``, so
arms with the same seeds pair by seed too). A draw's statistic is the mean over the drawn
seeds of the macro-average over teachers of the mean NLL of the drawn questions'
answers (accuracy: the share of drawn questions answered correctly). Intervals are the
2.5 and 97.5 percentiles; ``numpy.random.default_rng(bootstrap_seed)``.
"""

from __future__ import annotations

import csv
import io
import math
from typing import Any

import numpy as np

from scas_jax.data.rows import id_key


def _question_matrix(run: dict, index: dict[str, int], teachers: list[str], rows: list[dict]):
    """``(sums [T, Q], counts [T, Q])`` of a run's finite held-out NLLs."""
    t_index = {t: i for i, t in enumerate(teachers)}
    s = np.zeros((len(teachers), len(index)))
    n = np.zeros((len(teachers), len(index)))
    for v, r in zip(run["answer_nll"], rows):
        if v is None or not math.isfinite(v):
            continue
        ti, qi = t_index[r["teacher_name"]], index[id_key(r["id"])]
        s[ti, qi] += v
        n[ti, qi] += 1
    return s, n


def _interval(x: np.ndarray) -> list[float] | None:
    x = x[np.isfinite(x)]
    if not x.size:
        return None
    lo, hi = np.quantile(x, [0.025, 0.975])
    return [float(lo), float(hi)]


def aggregate(arms: list[str], runs: dict[str, list[dict]], heldout_ids: list[str], rows: list[dict],
              teachers: list[str], compare_to: str, samples: int, seed: int) -> list[dict[str, Any]]:
    """One record per arm (see ``results.json`` in docs/experiment.md)."""
    index = {k: i for i, k in enumerate(heldout_ids)}
    q = len(index)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, q, size=(samples, q))
    w = np.stack([np.bincount(d, minlength=q) for d in draws]).astype(np.float64)  # [B, Q]
    max_seeds = max(len(r) for r in runs.values())
    u = rng.random((samples, max_seeds))
    nll_boot, acc_boot, point = {}, {}, {}
    for arm in arms:
        rs = runs[arm]
        per_run = []
        for run in rs:
            s, n = _question_matrix(run, index, teachers, rows)
            with np.errstate(invalid="ignore", divide="ignore"):
                per_teacher = (w @ s.T) / (w @ n.T)  # [B, T]
            per_run.append(np.nanmean(per_teacher, axis=1))
        m = np.stack(per_run)  # [S, B]
        pick = np.floor(u[:, :len(rs)] * len(rs)).astype(int)  # [B, S]
        nll_boot[arm] = m[pick, np.arange(samples)[:, None]].mean(axis=1)
        if all(r.get("verdicts") is not None for r in rs):
            c = np.stack([[float(r["verdicts"].get(k, False)) for k in heldout_ids] for r in rs])  # [S, Q]
            a = (c @ w.T) / w.sum(axis=1)  # [S, B]
            acc_boot[arm] = a[pick, np.arange(samples)[:, None]].mean(axis=1)
        point[arm] = (float(np.mean([r["heldout_nll"] for r in rs])),
                      float(np.mean([r["accuracy"] for r in rs])) if arm in acc_boot else None)
    out = []
    for arm in arms:
        rs = runs[arm]
        nll, acc = point[arm]
        rec: dict[str, Any] = {
            "arm": arm, "heldout_nll": nll, "heldout_nll_ci": _interval(nll_boot[arm]),
            "accuracy": acc, "accuracy_ci": _interval(acc_boot[arm]) if arm in acc_boot else None,
            "seeds": [r["seed"] for r in rs],
            "train_examples": _mean([r["train_examples"] for r in rs]),
            "train_tokens": _mean([r["train_tokens"] for r in rs]),
            "teacher_shares": _mean_shares([r["teacher_shares"] for r in rs]),
            "compare_to": compare_to,
            "heldout_nll_diff": nll - point[compare_to][0],
            "heldout_nll_diff_ci": _interval(nll_boot[arm] - nll_boot[compare_to]),
        }
        if arm in acc_boot and compare_to in acc_boot:
            rec["accuracy_diff"] = acc - point[compare_to][1]
            rec["accuracy_diff_ci"] = _interval(acc_boot[arm] - acc_boot[compare_to])
        out.append(rec)
    return out


def _mean(values: list) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def _mean_shares(shares: list[dict]) -> dict[str, float]:
    teachers = sorted({t for s in shares for t in s})
    if not shares or not teachers:
        return {}
    return {t: round(float(np.mean([s.get(t, 0.0) for s in shares])), 6) for t in teachers}


def _fmt(x, digits=4) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def _ci(ci, digits=4) -> str:
    return "" if not ci else f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


CSV_COLUMNS = ("arm", "heldout_nll", "heldout_nll_lo", "heldout_nll_hi", "heldout_nll_diff",
               "heldout_nll_diff_lo", "heldout_nll_diff_hi", "accuracy", "accuracy_lo", "accuracy_hi",
               "seeds", "train_examples", "train_tokens")


def to_csv(arms: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for a in arms:
        ci = a["heldout_nll_ci"] or [None, None]
        dci = a["heldout_nll_diff_ci"] or [None, None]
        aci = a["accuracy_ci"] or [None, None]
        w.writerow([a["arm"], a["heldout_nll"], *ci, a["heldout_nll_diff"], *dci, a["accuracy"], *aci,
                    len(a["seeds"]), a["train_examples"], a["train_tokens"]])
    return buf.getvalue()


def to_markdown(arms: list[dict], info: dict[str, Any]) -> str:
    ref = arms[0]["compare_to"] if arms else ""
    lines = [
        f"# scas-jax experiment: {info['config_file']}",
        "",
        f"Student `{info['student']}`"
        + (f" (chat template `{info['chat_template']}`)" if info.get("chat_template", "tokenizer") != "tokenizer"
           else "")
        + (f", other student `{info['other_student']}` (chat template `{info['other_chat_template']}`)"
           if info.get("other_student") else "")
        + f"; {info['train_questions']} training questions, "
        f"{info['heldout_questions']} held-out questions ({info['heldout_answers']} verified answers, "
        f"teachers {', '.join(info['teachers'])}); {info['steps']} steps of {info['batch']} answers "
        f"at learning rate {info['learning_rate']:g}; seeds {', '.join(map(str, info['seeds']))}.",
        "",
        "Held-out NLL: mean answer NLL (nats) of the held-out questions' verified answers, macro-averaged "
        f"over teachers, mean over seeds (lower is better). Intervals: 95 % bootstrap over questions and "
        f"seeds; the difference to `{ref}` is paired (same resampled questions and seeds).",
        "",
        f"| arm | held-out NLL | 95% CI | vs {ref} | 95% CI | accuracy | 95% CI | seeds | examples | answer tokens |",
        "|---|---:|---|---:|---|---:|---|---:|---:|---:|",
    ]
    for a in arms:
        lines.append(
            f"| {a['arm']} | {_fmt(a['heldout_nll'])} | {_ci(a['heldout_nll_ci'])} | "
            f"{_fmt(a['heldout_nll_diff'])} | {_ci(a['heldout_nll_diff_ci'])} | {_fmt(a['accuracy'], 3)} | "
            f"{_ci(a['accuracy_ci'], 3)} | {len(a['seeds'])} | {_fmt(a['train_examples'], 0)} | "
            f"{_fmt(a['train_tokens'], 0)} |")
    lines += ["", "## Teacher shares of the training answers", "",
              "| arm | " + " | ".join(info["teachers"]) + " |", "|---|" + "---:|" * len(info["teachers"])]
    for a in arms:
        if a["teacher_shares"]:
            lines.append(f"| {a['arm']} | " + " | ".join(f"{a['teacher_shares'].get(t, 0.0):.2f}"
                                                      for t in info["teachers"]) + " |")
    lines += ["", "Figures: `figures/heldout_nll.png`, `figures/teacher_shares.png`"
              + (", `figures/accuracy.png`" if any(a["accuracy"] is not None for a in arms) else "")
              + ". Per-run numbers: `results.json` (`runs`).", ""]
    return "\n".join(lines)
