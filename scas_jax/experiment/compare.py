"""Student comparison: the same training pool scored by two students (``OUT/scored`` by
``student``, ``OUT/scored_other`` by ``other_student``).

- **agreement**: the fraction of training questions where both students' ``scas_min``
  picks (the verified answer with the lowest ``scas_score``, ties by teacher name, as the
  arms choose) are the same answer (same teacher), with a 95 % percentile bootstrap
  interval over questions; ``agreement_multi`` the same over the questions with at least
  two answers (a question with one answer agrees trivially);
- **teacher shares** of each student's picks, and per teacher how often each student
  picks it and how often both do (``by_teacher``);
- **rank correlation** of the two students' ``scas_score`` over the same candidates
  (the verified answers both scored): Spearman's rho over all of them (``global``), and
  the mean of the within-question rho over the questions with at least 3 such answers
  (a question whose scores are all tied under a student has no rho and is left out),
  with a bootstrap interval over those questions.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

MIN_WITHIN = 3  # answers a question needs for a within-question rank correlation


def _scores(scored: Path, ids: dict) -> dict[str, dict[str, float]]:
    """``{question key: {teacher: scas_score}}`` of the verified, scored answers (``ids``
    collects each key's row id)."""
    from scas_jax.data.files import require_score_files
    from scas_jax.selection.candidates import load_pool

    pool = load_pool(require_score_files(scored), score_key="scas_score", require_score=True, verified_only=True)
    for k, cands in pool.items.items():
        if cands:
            ids.setdefault(k, cands[0].row["id"])
    return {k: {str(c.teacher): float(c.score) for c in cands} for k, cands in pool.items.items() if cands}


def pick(scores: dict[str, float]) -> str:
    """The teacher of the lowest score (ties by teacher name): ``select_min``'s choice."""
    return min(scores, key=lambda t: (scores[t], t))


def rankdata(x: np.ndarray) -> np.ndarray:
    """Average ranks (1-based; ties share their mean rank), as ``scipy.stats.rankdata``."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def spearman(a, b) -> float:
    """Spearman's rho (Pearson correlation of average ranks); NaN when either side is constant."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 2:
        return math.nan
    ra, rb = rankdata(a) - (len(a) + 1) / 2.0, rankdata(b) - (len(b) + 1) / 2.0
    den = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / den) if den > 0 else math.nan


def _ci(values: np.ndarray, samples: int, seed: int) -> list[float] | None:
    """95 % percentile bootstrap interval of the mean of ``values`` (the evaluation's
    :func:`~scas_jax.evaluation.metrics.bootstrap_interval`), as a list."""
    from scas_jax.evaluation.metrics import bootstrap_interval

    ci = bootstrap_interval(values, samples=samples, seed=seed)
    return None if ci is None else list(ci)


def _shares(counts: Counter, total: int) -> dict[str, float]:
    return {t: round(n / total, 6) for t, n in sorted(counts.items())} if total else {}


def compare_students(scored: Path, scored_other: Path, bootstrap_samples: int = 1000,
                     bootstrap_seed: int = 0) -> dict[str, Any]:
    """The comparison of ``scored`` (the student) and ``scored_other`` (the other student)
    over the questions and answers both scored; see the module docstring."""
    ids: dict = {}
    a, b = _scores(Path(scored), ids), _scores(Path(scored_other), ids)
    questions = sorted(set(a) & set(b))
    pairs = {q: sorted(set(a[q]) & set(b[q])) for q in questions}
    questions = [q for q in questions if pairs[q]]
    picks_a = {q: pick({t: a[q][t] for t in pairs[q]}) for q in questions}
    picks_b = {q: pick({t: b[q][t] for t in pairs[q]}) for q in questions}
    same = np.array([picks_a[q] == picks_b[q] for q in questions], dtype=np.float64)
    teachers = sorted({t for q in questions for t in pairs[q]})
    ca, cb = Counter(picks_a.values()), Counter(picks_b.values())
    both = Counter(picks_a[q] for q in questions if picks_a[q] == picks_b[q])
    n = len(questions)
    by_teacher = {t: {"student": ca[t], "other_student": cb[t], "both": both[t],
                      "candidates": sum(t in pairs[q] for q in questions)} for t in teachers}

    xs = [a[q][t] for q in questions for t in pairs[q]]
    ys = [b[q][t] for q in questions for t in pairs[q]]
    within = []
    for q in questions:
        if len(pairs[q]) >= MIN_WITHIN:
            rho = spearman([a[q][t] for t in pairs[q]], [b[q][t] for t in pairs[q]])
            if math.isfinite(rho):
                within.append(rho)
    within_arr = np.array(within, dtype=np.float64)
    eligible = sum(len(pairs[q]) >= MIN_WITHIN for q in questions)
    rho_global = spearman(xs, ys)
    multi = np.array([picks_a[q] == picks_b[q] for q in questions if len(pairs[q]) >= 2], dtype=np.float64)
    return {
        "questions": n,
        "candidates": len(xs),
        "agreement": float(same.mean()) if n else None,
        "agreement_ci": _ci(same, bootstrap_samples, bootstrap_seed),
        "agreeing_questions": int(same.sum()),
        "questions_with_one_answer": sum(len(pairs[q]) == 1 for q in questions),
        "agreement_multi": float(multi.mean()) if len(multi) else None,
        "agreement_multi_ci": _ci(multi, bootstrap_samples, bootstrap_seed),
        "teacher_shares": {"student": _shares(ca, n), "other_student": _shares(cb, n),
                           "both": _shares(both, n)},
        "by_teacher": by_teacher,
        "spearman_global": rho_global if math.isfinite(rho_global) else None,
        "spearman_within_mean": float(within_arr.mean()) if len(within) else None,
        "spearman_within_ci": _ci(within_arr, bootstrap_samples, bootstrap_seed),
        "spearman_within_questions": len(within),
        "spearman_within_skipped_ties": eligible - len(within),
        "picks": [{"id": ids[q], "student": picks_a[q], "other_student": picks_b[q]} for q in questions],
    }


def _f(x, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def comparison_markdown(cmp: dict[str, Any], student: str, other: str) -> str:
    """The ``results.md`` section of the comparison."""
    ci = cmp.get("agreement_ci") or [None, None]
    wci = cmp.get("spearman_within_ci") or [None, None]
    mci = cmp.get("agreement_multi_ci") or [None, None]
    lines = [
        "## Student comparison", "",
        (f"`student` = {student}, `other_student` = {other}: the same {cmp['candidates']} verified training "
         f"answers of {cmp['questions']} questions, scored by both."), "",
        (f"- same `scas_min` pick: {cmp['agreeing_questions']}/{cmp['questions']} questions = "
         f"{_f(cmp['agreement'])} [{_f(ci[0])}, {_f(ci[1])}] (95 % bootstrap over questions; "
         f"{cmp['questions_with_one_answer']} questions have one answer, so agree trivially); "
         f"{_f(cmp['agreement_multi'])} [{_f(mci[0])}, {_f(mci[1])}] over the questions with two or more"),
        (f"- Spearman rho of `scas_score`: {_f(cmp['spearman_global'])} over all answers; "
         f"{_f(cmp['spearman_within_mean'])} [{_f(wci[0])}, {_f(wci[1])}] mean within a question "
         f"({cmp['spearman_within_questions']} questions with >= {MIN_WITHIN} answers"
         + (f", {cmp['spearman_within_skipped_ties']} left out: all tied" if cmp["spearman_within_skipped_ties"]
            else "") + ")"),
        "",
        "| teacher | answers | picked by student | picked by other_student | picked by both |",
        "|---|---|---|---|---|",
    ]
    n = max(cmp["questions"], 1)
    for t, c in cmp["by_teacher"].items():
        lines.append(f"| {t} | {c['candidates']} | {c['student']} ({c['student'] / n:.2f}) | "
                     f"{c['other_student']} ({c['other_student'] / n:.2f}) | {c['both']} ({c['both'] / n:.2f}) |")
    return "\n".join(lines) + "\n"
