"""Cross-training (``both_roles: true``): the experiment twice with the two students'
roles swapped, and one table of both.

Role 1 runs every stage in ``OUT/<student>/`` (both students converted, the split, the
training pool scored by both); role 2 trains ``other_student`` in ``OUT/<other_student>/``
with ``student`` as its other student, reusing role 1's conversions, split and scores
(role 1's ``scored_other`` is role 2's ``scored``), so each student is fine-tuned on its
own SCAS selection (``scas_min``), on the other student's (``scas_min_other``) and on the
strongest teacher's answers, on the same questions, evaluated on the same held-out
questions. ``OUT/cross_training.json`` and ``OUT/cross_training.md`` hold both roles'
arms with their intervals and paired differences, and the comparison of the students.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from scas_jax.errors import ScasError
from scas_jax.experiment.config import ExperimentConfig
from scas_jax.io_utils import write_json_atomic, write_text_atomic

TRAINS_ON = {"base": "nothing (the base student)", "scas_min": "its own SCAS selection",
             "scas_min_other": "the other student's SCAS selection", "strongest": "the strongest teacher",
             "nll_min": "its lowest-NLL answers", "random": "random verified answers",
             "scas_groups": "its lowest SCAS group", "scas_no_diag_min": "its SCAS (no diagonal) selection",
             "dynamic": "in-training SCAS"}


def swapped(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` with ``student`` and ``other_student`` (their templates and learning rates)
    swapped."""
    return dataclasses.replace(cfg, student=cfg.other_student, other_student=cfg.student,
                               chat_template=cfg.other_chat_template, other_chat_template=cfg.chat_template,
                               learning_rate=cfg.other_learning_rate or cfg.learning_rate,
                               other_learning_rate=cfg.learning_rate)


def role_name(spec: str) -> str:
    """A directory name for a student spec: ``smollm2``, ``gemma3-270m``, a path's last part."""
    from scas_jax.selection.api import safe_name

    return safe_name(Path(str(spec).rstrip("/")).name or str(spec))


def role_dirs(cfg: ExperimentConfig, where: str) -> tuple[str, str]:
    a, b = role_name(cfg.student), role_name(cfg.other_student)
    if a == b:
        raise ScasError(f"{where}: both_roles: student and other_student would both write OUT/{a}/; "
                        "give the students different names (or directories)")
    return a, b


def run_both_roles(cfg: ExperimentConfig, where: str, out: Path, stages: Callable[..., tuple],
                   say: Callable[..., None] = print) -> dict[str, Any]:
    """Role 1 then role 2 (``stages(cfg, where, dir, shared=None) -> (results, prep)``);
    writes and returns ``OUT/cross_training.json``'s content."""
    a, b = role_dirs(cfg, where)
    say(f"== role 1: student {cfg.student}, other_student {cfg.other_student} -> {out / a}")
    res_a, prep = stages(cfg, f"{where} (role 1)", out / a)
    shared = {"student": prep["other"], "other": prep["student"], "data": prep["data"], "counts": prep["counts"],
              "scored": prep["scored_other"], "scored_other": prep["scored"]}
    cfg_b = swapped(cfg)
    say(f"== role 2: student {cfg_b.student}, other_student {cfg_b.other_student} -> {out / b} "
        f"(conversions, split and scores of role 1)")
    res_b, _ = stages(cfg_b, f"{where} (role 2)", out / b, shared=shared)
    table = cross_table([(a, res_a), (b, res_b)])
    write_json_atomic(out / "cross_training.json", table)
    write_text_atomic(out / "cross_training.md", cross_markdown(table))
    return table


def cross_table(roles: list[tuple[str, dict]]) -> dict[str, Any]:
    """Both roles' arms (held-out NLL and accuracy, intervals, paired differences)."""
    keep = ("arm", "heldout_nll", "heldout_nll_ci", "compare_to", "heldout_nll_diff", "heldout_nll_diff_ci",
            "accuracy", "accuracy_ci", "accuracy_diff", "accuracy_diff_ci", "seeds", "teacher_shares")
    out: dict[str, Any] = {"roles": [], "arms": []}
    for name, res in roles:
        info = res["info"]
        out["roles"].append({"dir": name, "student": info["student"], "chat_template": info.get("chat_template"),
                             "learning_rate": info.get("learning_rate"),
                             "other_student": info.get("other_student"),
                             "other_chat_template": info.get("other_chat_template"),
                             "comparison": res.get("comparison"), "results": f"{name}/results.json"})
        for arm in res["arms"]:
            out["arms"].append({"student": info["student"], "trains_on": TRAINS_ON.get(arm["arm"], arm["arm"]),
                                **{k: arm.get(k) for k in keep}})
    return out


def _n(x, d: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{d}f}"


def _ci(ci, d: int = 4) -> str:
    return "n/a" if not ci else f"[{ci[0]:.{d}f}, {ci[1]:.{d}f}]"


def cross_markdown(table: dict[str, Any]) -> str:
    ref = table["arms"][0]["compare_to"] if table["arms"] else "scas_min"
    lines = ["# Cross-training: two students", "",
             ("Each student fine-tuned on its own SCAS selection (`scas_min`), on the other student's "
              "(`scas_min_other`) and on the strongest teacher's answers, the same training questions and "
              "held-out questions for both. Held-out NLL: nats per answer token, macro over teachers, mean "
              f"over seeds; intervals 95 % bootstrap; the difference to `{ref}` is paired within a student "
              "(NLLs of different students are not comparable: different tokenizers)."), ""]
    for r in table["roles"]:
        lr = "" if r.get("learning_rate") is None else f", learning rate {r['learning_rate']:g}"
        lines.append(f"- `{r['student']}` (chat template `{r['chat_template']}`{lr}): `{r['results']}`")
    lines += ["", f"| student | arm | trains on | held-out NLL | 95% CI | vs {ref} | 95% CI | accuracy |",
              "|---|---|---|---:|---|---:|---|---:|"]
    for a in table["arms"]:
        lines.append(f"| {a['student']} | {a['arm']} | {a['trains_on']} | {_n(a['heldout_nll'])} | "
                     f"{_ci(a['heldout_nll_ci'])} | {_n(a['heldout_nll_diff'])} | {_ci(a['heldout_nll_diff_ci'])} | "
                     f"{_n(a['accuracy'], 3)} |")
    cmp = table["roles"][0].get("comparison") if table["roles"] else None
    if cmp:
        ci = cmp.get("agreement_ci") or [None, None]
        lines += ["", "## The students' selections", "",
                  (f"Same `scas_min` pick on {cmp['agreeing_questions']}/{cmp['questions']} training questions "
                   f"({_n(cmp['agreement'], 3)} [{_n(ci[0], 3)}, {_n(ci[1], 3)}]); Spearman rho of `scas_score` "
                   f"{_n(cmp['spearman_global'], 3)} over all answers, {_n(cmp['spearman_within_mean'], 3)} within "
                   f"a question (mean over {cmp['spearman_within_questions']} questions). Teacher shares of the "
                   f"picks: `{table['roles'][0]['dir']}/results.md`.")]
    return "\n".join(lines) + "\n"
