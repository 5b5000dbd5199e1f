"""Accuracy with a seeded bootstrap interval over questions, and per-teacher means."""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np


def bootstrap_interval(correct: Sequence[bool], *, samples: int = 1000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean of ``correct`` (questions resampled with
    replacement ``samples`` times, ``numpy.random.default_rng(seed)``); None when empty."""
    x = np.asarray(correct, dtype=np.float64)
    if x.size == 0:
        return None
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(samples, x.size))].mean(axis=1)
    alpha = (1.0 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def accuracy_metrics(verdicts: Sequence[bool | None], truncated: Sequence[bool], *,
                     samples: int = 1000, seed: int = 0) -> dict:
    """Counts, accuracy (undecided counts as not correct) and its 95 % bootstrap interval."""
    n = len(verdicts)
    correct = [v is True for v in verdicts]
    ci = bootstrap_interval(correct, samples=samples, seed=seed)
    return {
        "questions": n,
        "correct": sum(correct),
        "incorrect": sum(1 for v in verdicts if v is False),
        "undecided": sum(1 for v in verdicts if v is None),
        "truncated": sum(1 for t in truncated if t),
        "accuracy": sum(correct) / n if n else None,
        "accuracy_ci95": list(ci) if ci else None,
        "bootstrap": {"samples": samples, "seed": seed, "method": "percentile, questions resampled"},
    }


def per_teacher_means(values: Iterable[tuple[str, float]]) -> dict:
    """``{"per_teacher": {t: {"answers", "mean_nll"}}, "macro_mean_nll"}`` from
    ``(teacher, answer_mean_nll)`` pairs; the macro-average weighs teachers equally."""
    by: dict[str, list[float]] = {}
    for teacher, v in values:
        if math.isfinite(v):
            by.setdefault(teacher, []).append(float(v))
    per = {t: {"answers": len(v), "mean_nll": float(np.mean(v))} for t, v in sorted(by.items())}
    macro = float(np.mean([p["mean_nll"] for p in per.values()])) if per else None
    return {"per_teacher": per, "macro_mean_nll": macro, "answers": sum(len(v) for v in by.values())}
