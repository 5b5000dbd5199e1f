"""``report()``: a Markdown report with PNG figures about scores and selections.

``DIR/report.md`` (read this first), ``DIR/figures/*.png``, ``DIR/picks.csv`` (every
item of every scored selection: the pick beside its alternatives) and
``DIR/report.json`` (the same numbers, machine-readable). The directory is built aside
and moved into place only when complete.

Teacher accuracy is shown only from ``verified`` (``scas-jax verify``'s output: the
judge's verdicts over every answer); the score files hold scored answers only, and
their flags would make most teachers look 100 % accurate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from scas_jax.errors import ScasError
from scas_jax.io_utils import atomic_dir, cleanup_created, refuse_non_empty, write_json_atomic, write_text_atomic
from scas_jax.reporting import plots, token_view
from scas_jax.reporting.accuracy import VERIFY_MANIFEST, VerifiedSet, load_verified
from scas_jax.reporting.data import (
    DEFAULT_FIELDS,
    ScoreSet,
    Selection,
    agreement_matrix,
    all_agree,
    load_scores,
    load_selections,
    median,
    selected_quality,
    share_table,
    teacher_stats,
)
from scas_jax.reporting.picks import item_index, markdown_rows, picks_for, write_csv

PICKS_SHOWN = 10  # items per selection in "What was picked" (all of them are in picks.csv)


def _f(x: float | None, digits: int = 4) -> str:
    return "–" if x is None else f"{x:.{digits}g}"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x:.1%}"


def _table(header: list[str], rows: Iterable[list[Any]], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def choose_fields(scores: ScoreSet, fields: list[str] | None) -> list[str]:
    """The requested fields (each must be numeric somewhere), else the default ones present."""
    numeric = scores.numeric_fields()
    if fields:
        unknown = [f for f in fields if f not in numeric]
        if unknown:
            raise ScasError(
                f"score field(s) {', '.join(unknown)} hold no finite number in {scores.input_dir}; "
                f"numeric fields: {', '.join(numeric) or 'none'}"
            )
        return list(fields)
    return [f for f in DEFAULT_FIELDS if f in numeric]


def report(
    scores: str | Path,
    selections: Iterable[str | Path] = (),
    out: str | Path = "report",
    *,
    verified: str | Path | None = None,
    fields: list[str] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Build the report in ``out``; returns the summary also written to ``report.json``.

    verified: ``scas-jax verify``'s output directory for the same pool; gives teacher
    accuracy (correct / all answers judged) and the verdicts of selected answers.
    Without it the report says that accuracy is unknown.
    """
    out = Path(out)
    data = load_scores(scores)
    judged = load_verified(verified) if verified is not None else None
    sels = load_selections(list(selections))
    chosen_fields = choose_fields(data, fields)
    if not overwrite:
        refuse_non_empty(out)
    with cleanup_created(out), atomic_dir(out, overwrite=True) as tmp:
        (tmp / "figures").mkdir()
        summary, text, picks = _build(data, judged, sels, chosen_fields, tmp / "figures")
        tokens = token_view.render(data.input_dir, item_index(data), tmp, tmp / "figures")
        if tokens is not None:  # the score directory has `score --per-token` files
            summary["token_costs"] = tokens
            text = _with_token_section(text, tokens)
        summary["picks_csv_rows"] = write_csv(tmp / "picks.csv", picks)
        write_text_atomic(tmp / "report.md", text)
        write_json_atomic(tmp / "report.json", summary)
    summary["report"] = str(out / "report.md")
    return summary


def _build(data: ScoreSet, judged: VerifiedSet | None, sels: list[Selection], fields: list[str],
           fig_dir: Path) -> tuple[dict[str, Any], str, dict[str, tuple[str, list]]]:
    stats = teacher_stats(data)
    teachers = data.teachers
    accuracy = {t: (judged.teachers[t].accuracy if judged and t in judged.teachers else None) for t in teachers}
    verdicts = judged.verdicts if judged else data.verdicts
    colors = plots.teacher_colors(sorted(set(teachers) | {str(r.get("teacher_name")) for s in sels for r in s.rows.values()}))
    items = len({str(r.get("id")) for rows in data.rows.values() for r in rows if r.get("id") is not None})
    md: list[str] = []
    picks: dict[str, tuple[str, list]] = {}
    summary: dict[str, Any] = {"scores_dir": str(data.input_dir), "input_kind": data.kind, "teachers": {}, "fields": {},
                               "accuracy": _accuracy_summary(judged), "selections": [], "picks": {}, "agreement": {}}

    # --- field values and findings --------------------------------------------------
    field_values = {}
    for name in fields:
        values, skipped = data.values(name)
        field_values[name] = values
        summary["fields"][name] = {
            "skipped_rows": skipped,
            "median": {t: median(v) for t, v in values.items()},
            "mean": {t: (sum(v) / len(v) if v else None) for t, v in values.items()},
        }
    for t in teachers:
        s = stats[t]
        summary["teachers"][t] = {
            "rows": s.rows, "correct": s.correct, "incorrect": s.incorrect, "undecided": s.undecided,
            "accuracy": accuracy[t], "median_words": median(s.words), "scoring_errors": s.scoring_errors,
        }

    md.append("# SCAS report\n")
    md.append(
        f"Scores: `{data.input_dir}` ({len(data.files)} {'score' if data.kind == 'scores' else 'candidate'} files, "
        f"{sum(s.rows for s in stats.values())} rows, {len(teachers)} teachers, {items} items). "
        f"Selections: {len(sels)}.\n"
    )
    md.append("## At a glance\n")
    md.extend(f"- {line}" for line in _findings(data, judged, stats, fields, field_values, sels))
    md.append("")

    # --- teachers ---------------------------------------------------------------------
    plots.teacher_overview(fig_dir / "teachers.png", teachers, accuracy, {t: stats[t].words for t in teachers}, colors)
    md += ["## Teachers\n", *_accuracy_text(judged), _teacher_table(teachers, stats, judged, fields, field_values), "",
           "![accuracy and answer length per teacher](figures/teachers.png)\n"]

    # --- score distributions ----------------------------------------------------------
    md.append("## Score distributions\n")
    if not fields:
        md.append(f"No score fields in `{data.input_dir}` (a candidate pool, or score files without SCAS fields).\n")
    else:
        md.append("Lower is better for every `*score*` field: SCAS prefers answers with a lower estimated "
                  "learning cost for this student. Rows with a scoring error or a non-finite value are left out "
                  "(counted in the table).\n")
        rows = [[t] + [_f(median(field_values[f][t])) for f in fields] for t in teachers]
        rows.append(["rows left out"] + [summary["fields"][f]["skipped_rows"] for f in fields])
        md += ["Medians per teacher:\n", _table(["teacher"] + [f"`{f}`" for f in fields], rows), ""]
        for i, name in enumerate(fields):
            fname = f"score_{i + 1}_{name}.png"
            plots.score_distribution(fig_dir / fname, name, field_values[name], colors)
            md.append(f"### `{name}`\n\n![{name} per teacher](figures/{fname})\n")

    # --- selections -----------------------------------------------------------------
    md.append("## Selections\n")
    if not sels:
        md.append("No selections given (pass `--selections OUT` with directories written by `scas-jax select`).\n")
    else:
        rows = []
        for i, sel in enumerate(sels):
            q = selected_quality(sel, verdicts)
            skipped = sum(sel.manifest.get("skipped", {}).values())
            rows.append([f"({i + 1})", sel.label, sel.manifest.get("items", "–"), q["rows"], skipped,
                         _pct(q["verified_share"]), _f(q["mean_words"]),
                         "–" if q["mean_score"] is None else f"{q['mean_score']:.4g} ({q['score_key']})",
                         f"`{sel.manifest_path}`"])
            summary["selections"].append({"label": sel.label, "manifest": str(sel.manifest_path),
                                          "strategy": sel.strategy, **q})
        md += [("`verified` is the share of selected rows the judge found correct (`--verified`)."
                if judged else "`verified` is the share of selected rows whose (id, teacher) is flagged correct in the "
                "scores.") + "\n",
               _table(["", "selection", "items", "selected", "skipped rows", "verified", "mean words", "mean score",
                       "manifest"], rows, "llrrrrrrl"), ""]
        shares = share_table(sels)
        for entry, sel in zip(summary["selections"], sels):
            entry["teacher_share"] = shares[sel.label]
        plots.stacked_shares(fig_dir / "teacher_share.png", "share of each teacher under every selection", shares, colors)
        sel_teachers = sorted({t for s in shares.values() for t in s})
        md += ["### Share of each teacher\n",
               _table(["selection"] + sel_teachers, [[lab] + [_pct(shares[lab].get(t, 0.0)) for t in sel_teachers]
                                                    for lab in shares]),
               "", "![teacher share per selection](figures/teacher_share.png)\n"]
        for i, sel in enumerate(sels):
            by_group = sel.manifest.get("teacher_share_by_group")
            if sel.strategy == "groups" and by_group:
                counts = sel.manifest.get("group_counts", {})
                table = {f"{g} ({counts.get(g + '.jsonl', '?')} rows)": {t: v["share"] for t, v in shares_g.items()}
                         for g, shares_g in by_group.items()}
                fname = f"groups_{i + 1}.png"
                plots.stacked_shares(fig_dir / fname, f"({i + 1}) {sel.label}: teachers in each score group "
                                     "(group_1 = lowest cost)", table, colors)
                missing = sel.manifest.get("missing_groups", {})
                md.append(f"### ({i + 1}) {sel.label}: what each group holds\n")
                md.append("Items missing a group (fewer candidates than groups): "
                          + ", ".join(f"group {g}: {n}" for g, n in missing.items()) + ".\n")
                md.append(f"![teachers per group](figures/{fname})\n")

        # --- what was picked --------------------------------------------------------
        md += _picks_section(sels, item_index(data), verdicts, picks, summary)

        # --- agreement ----------------------------------------------------------------
        matrix = agreement_matrix(sels)
        labels = [s.label for s in sels]
        plots.agreement_heatmap(fig_dir / "agreement.png", labels, matrix)
        same, common = all_agree(sels)
        summary["agreement"] = {"labels": labels, "same_common": [[list(c) for c in row] for row in matrix],
                                "all_agree": [same, common]}
        md += ["## How often selections agree\n",
               "Cell (i, j): among the items both selections cover, the share where they chose the same teacher.\n",
               _table(["selection"] + [f"({j + 1})" for j in range(len(sels))],
                      [[f"({i + 1}) {labels[i]}"] + [f"{s / c:.0%} of {c}" if c else "–" for s, c in row]
                       for i, row in enumerate(matrix)]),
               "", f"All {len(sels)} selections chose the same teacher on {same} of the {common} items they all cover"
               + (f" ({same / common:.1%})." if common else "."), "",
               "![agreement between selections](figures/agreement.png)\n"]
    md.append("---\nWritten by `scas-jax report`. Numbers behind every table: `report.json`; every pick beside "
              "its alternatives: `picks.csv`.\n")
    return summary, "\n".join(md), picks


def _with_token_section(text: str, tokens: dict[str, Any]) -> str:
    """The report with a "Token costs" section before its closing line."""
    ids = ", ".join(f"`{e['id']}`" for e in tokens["examples"])
    section = ("## Token costs\n\nThe cheapest and the costliest answer of a few questions, every answer token "
               "shaded by its share of `scas_score` (from `score --per-token`): "
               f"[token_costs.html]({tokens['html']}) ({ids}).\n\n![answers shaded by token cost]({tokens['png']})\n\n")
    head, sep, tail = text.rpartition("---\nWritten by")
    return head + section + sep + tail if sep else text + "\n" + section


def _findings(data: ScoreSet, judged: VerifiedSet | None, stats, fields: list[str], field_values,
              sels: list[Selection]) -> list[str]:
    out = []
    acc = {t: a.accuracy for t, a in judged.teachers.items() if a.accuracy is not None} if judged else {}
    if acc:
        best = max(acc, key=lambda t: (acc[t], t))
        worst = min(acc, key=lambda t: (acc[t], t))
        out.append(f"Most accurate teacher: **{best}** ({acc[best]:.1%} of all its answers judged correct); "
                   f"least: **{worst}** ({acc[worst]:.1%}).")
    else:
        out.append("Teacher accuracy is **unknown** in this report: pass `--verified DIR` (the output of "
                   "`scas-jax verify` on the full pool).")
    words = {t: median(s.words) for t, s in stats.items()}
    out.append("Median answer length: " + ", ".join(f"{t} {w:g}" for t, w in sorted(words.items(), key=lambda kv: kv[1])) + " words.")
    if fields:
        f = fields[0]
        med = {t: median(v) for t, v in field_values[f].items() if v}
        if med:
            lo, hi = min(med, key=med.get), max(med, key=med.get)
            out.append(f"Lowest median `{f}` (cheapest for this student to learn): **{lo}** ({med[lo]:.4g}); "
                       f"highest: **{hi}** ({med[hi]:.4g}).")
    errors = sum(s.scoring_errors for s in stats.values())
    if errors:
        out.append(f"{errors} rows carry `scas_scoring_error` and are never selected.")
    for sel in sels:
        shares = share_table([sel])[sel.label]
        if shares:
            top = max(shares, key=lambda t: (shares[t], t))
            out.append(f"`{sel.label}` takes **{top}** for {shares[top]:.1%} of its {len(sel.rows)} rows.")
        items = sel.manifest.get("items")
        if sel.strategy == "groups" and isinstance(items, int) and len(sel.rows) < items:
            g = sel.manifest.get("selected_group")
            missing = sel.manifest.get("missing_groups", {}).get(str(g), items - len(sel.rows))
            out.append(f"**Note:** `{sel.label}` covers only {len(sel.rows)} of {items} items: {missing} items have "
                       f"no answer in group {g} (with fewer candidates than groups, the low groups stay empty).")
    if len(sels) > 1:
        same, common = all_agree(sels)
        if common:
            out.append(f"All selections agree on {same}/{common} items ({same / common:.1%}).")
    return out


def _accuracy_summary(judged: VerifiedSet | None) -> dict[str, Any]:
    if judged is None:
        return {"source": None, "teachers": {}, "verify_manifest_check": None}
    return {"source": str(judged.directory), "teachers": {t: a.as_dict() for t, a in judged.teachers.items()},
            "verify_manifest_check": judged.manifest_check}


def _accuracy_text(judged: VerifiedSet | None) -> list[str]:
    if judged is None:
        return ["**Teacher accuracy is unknown here.** The score files hold only the answers that were scored "
                "(`scas-jax score` skips answers flagged incorrect), so the share flagged correct among them is "
                "not a teacher's accuracy (it is 100 % for every teacher whose wrong answers were skipped). "
                "The `flagged …` columns count flags among the scored rows only. Pass `--verified DIR`, the "
                "output of `scas-jax verify` on the full pool, to show accuracy.\n"]
    lines = [f"Accuracy = correct / all answers the judge saw in `{judged.directory}` (`scas-jax verify`'s output; "
             "undecided answers count as not correct)."]
    if judged.manifest_check is None:
        lines.append(f"(No `{VERIFY_MANIFEST}` there to cross-check.)")
    elif not judged.manifest_check:
        lines.append(f"The counts equal those of its `{VERIFY_MANIFEST}`.")
    else:
        lines.append(f"**Warning:** the rows disagree with `{VERIFY_MANIFEST}`: "
                     + "; ".join(judged.manifest_check[:5]) + ".")
    return [" ".join(lines) + "\n"]


def _teacher_table(teachers: list[str], stats, judged: VerifiedSet | None, fields: list[str], field_values) -> str:
    main_field = fields[0] if fields else None
    header = (["teacher", "answers judged", "correct", "incorrect", "undecided", "accuracy"] if judged else ["teacher"])
    header += ["scored rows", "flagged correct", "flagged incorrect", "flagged undecided", "median words",
               "scoring errors"]
    if main_field:
        header.append(f"median {main_field}")
    rows = []
    for t in teachers:
        s = stats[t]
        row: list[Any] = [t]
        if judged:
            a = judged.teachers.get(t)
            row += ["–"] * 5 if a is None else [a.total, a.correct, a.incorrect, a.undecided, _pct(a.accuracy)]
        row += [s.rows, s.correct, s.incorrect, s.undecided, _f(median(s.words)), s.scoring_errors]
        if main_field:
            row.append(_f(median(field_values[main_field][t])))
        rows.append(row)
    return _table(header, rows)


def _picks_section(sels: list[Selection], index, verdicts, picks: dict, summary: dict[str, Any]) -> list[str]:
    """"What was picked": the first items of every scored selection; fills ``picks`` for picks.csv."""
    md = ["## What was picked\n",
          f"For the first {PICKS_SHOWN} items of every selection that ranks by a score: the chosen answer "
          "(teacher, score, rank among the answers the selection could use) and every answer to the item, "
          "cheapest first. Bold: the pick; ✗: judged incorrect; ?: undecided; struck through: an answer the "
          "selection could not use, with the reason. Every item is in `picks.csv`.\n"]
    shown = 0
    for i, sel in enumerate(sels):
        items = picks_for(sel, index, verdicts)
        if items is None:
            continue
        score_key = next(r.get("score_key") for r in sel.rows.values() if r.get("score_key"))
        picks[sel.label] = (score_key, items)
        summary["picks"][sel.label] = {"items": len(items), "score_key": score_key}
        md += [f"### ({i + 1}) {sel.label}\n",
               _table(["item", f"picked (`{score_key}`)", "every answer, cheapest first"], markdown_rows(items, PICKS_SHOWN),
                      "lll"), ""]
        shown += 1
    if not shown:
        md.append("No selection ranks by a score (baselines on a raw pool have none).\n")
    return md
