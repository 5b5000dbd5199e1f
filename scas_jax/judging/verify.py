"""``verify()``: judge every row of a pool and write the pool back with the verdicts.

Each output row is the input row plus ``teacher_correct`` (True, False or None for
undecided), ``judge_reason`` and ``judge_answer`` (the extracted final answer, or
None). A row that already had a ``teacher_correct`` keeps the old value in
``teacher_correct_previous``. ``verify_manifest.json`` counts verdicts per teacher and
measures agreement with the flags the pool already had (read by
:mod:`scas_jax.data.verdicts`; only decided flags are compared), listing every
disagreement. ``teacher_accuracy.json`` holds the per-teacher counts and accuracy in the
form ``select --strategy strongest --teacher-accuracy`` reads.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from scas_jax import __version__
from scas_jax.errors import ScasError
from scas_jax.data.files import discover_pool, input_sha256, iter_rows
from scas_jax.data.rows import row_answer, row_teacher
from scas_jax.data.verdicts import correctness_at
from scas_jax.io_utils import publish_dir
from scas_jax.judging.judge import Verdict, judge, reference_text

MANIFEST_NAME = "verify_manifest.json"
ACCURACY_NAME = "teacher_accuracy.json"


def _label(flag: bool | None) -> str:
    return {True: "correct", False: "incorrect", None: "undecided"}[flag]


def answer_to_judge(row: dict[str, Any], answer_field: str | None = None) -> Any:
    """The answer to judge: ``answer_field`` if given, else the row's answer (:func:`row_answer`)."""
    return row.get(answer_field) if answer_field else row_answer(row)


def row_reference(row: dict[str, Any], reference_field: str | None = None) -> Any:
    """The reference: ``reference_field`` if given, else ``reference_answer``, else ``answer``."""
    if reference_field:
        return row.get(reference_field)
    ref = row.get("reference_answer")
    return row.get("answer") if ref is None or ref == "" else ref


TRUNCATED_REASON = "undecided: truncated generation (hit --max-new-tokens before a stop token)"


def judge_row(row: dict[str, Any], answer_field: str | None = None, reference_field: str | None = None) -> Verdict:
    """Judge one pool row. A row flagged ``truncated: true`` (``scas-jax generate`` hit
    ``--max-new-tokens``) is undecided whatever it says: its final answer may be cut off."""
    if row.get("truncated") is True:
        found = judge(answer_to_judge(row, answer_field), row_reference(row, reference_field)).answer
        return Verdict(None, TRUNCATED_REASON, found)
    answer = answer_to_judge(row, answer_field)
    if not isinstance(answer, str) or not answer.strip():
        return Verdict(None, "undecided: no teacher answer in the row")
    return judge(answer, row_reference(row, reference_field))


def verify(
    input_dir: str | Path,
    output_dir: str | Path,
    *,
    answer_field: str | None = None,
    reference_field: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Judge the pool in ``input_dir``; write it to ``output_dir`` (same file names); return the manifest."""
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if input_dir.resolve() == output_dir.resolve():
        raise ScasError("--output-dir must differ from --input-dir (verify never rewrites its input in place)")
    files = discover_pool(input_dir)
    outputs: dict[str, list[dict[str, Any]]] = {}
    per_teacher: dict[str, Counter] = {}
    agreement: dict[str, Counter] = {}
    confusion: Counter = Counter()
    disagreements: list[dict[str, Any]] = []
    rows_total = with_reference = 0
    for pf in files:
        rows = []
        for line_no, row in iter_rows(pf):
            rows_total += 1
            before = correctness_at(row, f"{pf.path}:{line_no}")  # the flag the row came with
            verdict = judge_row(row, answer_field, reference_field)
            if reference_text(row_reference(row, reference_field)) is not None:
                with_reference += 1
            teacher = str(row_teacher(row, pf.teacher))
            out = dict(row)
            if "teacher_correct" in row:
                out["teacher_correct_previous"] = row["teacher_correct"]
            out["teacher_correct"] = verdict.correct
            out["judge_reason"] = verdict.reason
            out["judge_answer"] = verdict.answer
            rows.append(out)
            per_teacher.setdefault(teacher, Counter())[_label(verdict.correct)] += 1
            if before is not None:  # only decided flags are compared
                confusion[f"flag_{_label(before)}/judge_{_label(verdict.correct)}"] += 1
                agree = agreement.setdefault(teacher, Counter())
                agree["compared"] += 1
                if verdict.correct == before:
                    agree["agree"] += 1
                else:
                    agree["disagree_undecided" if verdict.correct is None else "disagree"] += 1
                    disagreements.append({
                        "file": pf.path.name, "line": line_no, "id": row.get("id"), "teacher": teacher,
                        "flag": before, "judge": verdict.correct, "judge_answer": verdict.answer,
                        "reason": verdict.reason,
                    })
        outputs[pf.path.name] = rows
    if rows_total == 0:
        raise ScasError(f"empty pool: no rows in {', '.join(pf.path.name for pf in files)}")
    if with_reference == 0:
        field = reference_field or "reference_answer/answer"
        raise ScasError(f"no row of {input_dir} has a reference answer ({field}); nothing can be verified")

    manifest = _manifest(input_dir, output_dir, files, per_teacher, agreement, confusion, disagreements, rows_total)
    publish_dir(output_dir, {**outputs, MANIFEST_NAME: manifest, ACCURACY_NAME: teacher_accuracy(manifest)},
                overwrite=overwrite)
    return manifest


def teacher_accuracy(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{teacher: {"correct", "incorrect", "undecided", "total", "accuracy"}}`` over every answer
    judged (``accuracy`` = correct / total; undecided counts as not correct): the file
    ``select --strategy strongest --teacher-accuracy`` reads."""
    return {
        t: {"correct": c["correct"], "incorrect": c["incorrect"], "undecided": c["undecided"],
            "total": c["rows"], "accuracy": c["accuracy"]}
        for t, c in manifest["teachers"].items()
    }


def _manifest(input_dir, output_dir, files, per_teacher, agreement, confusion, disagreements, rows_total) -> dict[str, Any]:
    teachers = {}
    for t in sorted(per_teacher):
        c = per_teacher[t]
        n = sum(c.values())
        teachers[t] = {
            "rows": n, "correct": c["correct"], "incorrect": c["incorrect"], "undecided": c["undecided"],
            "accuracy": round(c["correct"] / n, 6) if n else None,
        }
    compared = sum(a["compared"] for a in agreement.values())
    agreed = sum(a["agree"] for a in agreement.values())
    undecided_disagree = sum(a["disagree_undecided"] for a in agreement.values())
    decided = compared - undecided_disagree
    return {
        "command": "verify",
        "judge": "rule-based math judge (scas_jax.judging.judge)",
        "teacher_accuracy_file": ACCURACY_NAME,
        "input_dir": str(input_dir),
        "output_dir": str(output_dir),
        "input_files": [str(input_dir / f.path.name) for f in files],
        "input_checksums": {f.path.name: "sha256:" + input_sha256(f) for f in files},
        "rows": rows_total,
        "teachers": teachers,
        "agreement_with_input_flags": {
            "compared_rows": compared,
            "agree": agreed,
            "agreement": round(agreed / compared, 6) if compared else None,
            "decided_rows": decided,
            "agreement_on_decided": round(agreed / decided, 6) if decided else None,
            "undecided": undecided_disagree,
            "confusion": dict(sorted(confusion.items())),
            "per_teacher": {t: dict(sorted(a.items())) for t, a in sorted(agreement.items())},
            "disagreements": disagreements,
        },
        "scas_jax_version": __version__,
    }
