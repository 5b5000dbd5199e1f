"""``report()``: a Markdown report with PNG figures about scores and selections.

``DIR/report.md`` (read this first), ``DIR/figures/*.png`` and ``DIR/report.json`` (the
same numbers, machine-readable). The directory is built aside and moved into place
only when complete.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from scas_jax.errors import ScasError
from scas_jax.io_utils import atomic_dir, write_json_atomic, write_text_atomic
from scas_jax.reporting import plots
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
from scas_jax.selection.output import cleanup_created


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
    fields: list[str] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Build the report in ``out``; returns the summary also written to ``report.json``."""
    out = Path(out)
    data = load_scores(scores)
    sels = load_selections(list(selections))
    chosen_fields = choose_fields(data, fields)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ScasError(f"output directory {out} exists and is not empty (pass --overwrite to replace it)")
    with cleanup_created(out), atomic_dir(out, overwrite=True) as tmp:
        (tmp / "figures").mkdir()
        summary, text = _build(data, sels, chosen_fields, tmp / "figures")
        write_text_atomic(tmp / "report.md", text)
        write_json_atomic(tmp / "report.json", summary)
    summary["report"] = str(out / "report.md")
    return summary


def _build(data: ScoreSet, sels: list[Selection], fields: list[str], fig_dir: Path) -> tuple[dict[str, Any], str]:
    stats = teacher_stats(data)
    teachers = data.teachers
    colors = plots.teacher_colors(sorted(set(teachers) | {str(r.get("teacher_name")) for s in sels for r in s.rows.values()}))
    items = len({str(r.get("id")) for rows in data.rows.values() for r in rows if r.get("id") is not None})
    md: list[str] = []
    summary: dict[str, Any] = {"scores_dir": str(data.input_dir), "input_kind": data.kind, "teachers": {}, "fields": {},
                               "selections": [], "agreement": {}}

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
            "accuracy": s.accuracy, "median_words": median(s.words), "scoring_errors": s.scoring_errors,
        }

    md.append("# SCAS report\n")
    md.append(
        f"Scores: `{data.input_dir}` ({len(data.files)} {'score' if data.kind == 'scores' else 'candidate'} files, "
        f"{sum(s.rows for s in stats.values())} rows, {len(teachers)} teachers, {items} items). "
        f"Selections: {len(sels)}.\n"
    )
    md.append("## At a glance\n")
    md.extend(f"- {line}" for line in _findings(data, stats, fields, field_values, sels))
    md.append("")

    # --- teachers ---------------------------------------------------------------------
    plots.teacher_overview(fig_dir / "teachers.png", teachers, {t: stats[t].accuracy for t in teachers},
                           {t: stats[t].words for t in teachers}, colors)
    main_field = fields[0] if fields else None
    header = ["teacher", "rows", "correct", "incorrect", "undecided", "accuracy", "median words", "scoring errors"]
    if main_field:
        header.append(f"median {main_field}")
    rows = []
    for t in teachers:
        s = stats[t]
        row = [t, s.rows, s.correct, s.incorrect, s.undecided, _pct(s.accuracy), _f(median(s.words)), s.scoring_errors]
        if main_field:
            row.append(_f(median(field_values[main_field][t])))
        rows.append(row)
    md += ["## Teachers\n",
           "Accuracy is the share of a teacher's rows flagged `teacher_correct` (or `is_correct`) true; "
           "`undecided` rows (null flags, e.g. from `scas-jax verify`) count as not verified.\n",
           _table(header, rows), "", "![accuracy and answer length per teacher](figures/teachers.png)\n"]

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
            q = selected_quality(sel, data)
            skipped = sum(sel.manifest.get("skipped", {}).values())
            rows.append([f"({i + 1})", sel.label, sel.manifest.get("items", "–"), q["rows"], skipped,
                         _pct(q["verified_share"]), _f(q["mean_words"]),
                         "–" if q["mean_score"] is None else f"{q['mean_score']:.4g} ({q['score_key']})",
                         f"`{sel.manifest_path}`"])
            summary["selections"].append({"label": sel.label, "manifest": str(sel.manifest_path),
                                          "strategy": sel.strategy, **q})
        md += ["`verified` is the share of selected rows whose (id, teacher) is flagged correct in the scores.\n",
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
    md.append("---\nWritten by `scas-jax report`. Numbers behind every table: `report.json`.\n")
    return summary, "\n".join(md)


def _findings(data: ScoreSet, stats, fields: list[str], field_values, sels: list[Selection]) -> list[str]:
    out = []
    flagged = {t: s.accuracy for t, s in stats.items() if s.accuracy is not None}
    if flagged:
        best = max(flagged, key=lambda t: (flagged[t], t))
        worst = min(flagged, key=lambda t: (flagged[t], t))
        out.append(f"Most accurate teacher: **{best}** ({flagged[best]:.1%} verified correct); "
                   f"least: **{worst}** ({flagged[worst]:.1%}).")
    else:
        out.append("No correctness flags: run `scas-jax verify` to add them.")
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
