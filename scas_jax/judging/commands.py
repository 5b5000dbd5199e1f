"""``scas-jax verify``: the CLI shell over :func:`scas_jax.judging.verify.verify`."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``verify`` subcommand."""
    p = subparsers.add_parser(
        "verify",
        help="judge teacher answers against reference answers (rule-based math judge)",
        description=(
            "Set teacher_correct (true, false, or null when undecided) and judge_reason on every row "
            "of a candidate pool, by comparing the final answer (\\boxed{}, ####, 'A:', 'The answer is') "
            "with reference_answer. Writes the pool, same file names, to --output-dir."
        ),
    )
    p.add_argument("--input-dir", required=True, type=Path, help="candidate pool (one JSONL per teacher)")
    p.add_argument("--output-dir", required=True, type=Path, help="where the verified pool is written")
    p.add_argument("--answer-field", default=None, help="field holding the answer (default: teacher_output, else output)")
    p.add_argument("--reference-field", default=None, help="field holding the reference (default: reference_answer, else answer)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty --output-dir")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """CLI entry: verify, then print accuracy per teacher and agreement with existing flags."""
    from scas_jax.judging.verify import verify

    m = verify(
        args.input_dir,
        args.output_dir,
        answer_field=args.answer_field,
        reference_field=args.reference_field,
        overwrite=args.overwrite,
    )
    print(f"verify: {m['rows']} rows -> {m['output_dir']}")
    print(f"  {'teacher':<32} {'rows':>6} {'correct':>8} {'incorrect':>9} {'undecided':>9} {'accuracy':>8}")
    for t, c in m["teachers"].items():
        print(f"  {t:<32} {c['rows']:>6} {c['correct']:>8} {c['incorrect']:>9} {c['undecided']:>9} {c['accuracy']:>8.3f}")
    a = m["agreement_with_input_flags"]
    if a["compared_rows"]:
        print(
            f"  agreement with the input's flags: {a['agree']}/{a['compared_rows']} = {a['agreement']:.4f} "
            f"({a['undecided']} undecided, {a['compared_rows'] - a['agree'] - a['undecided']} decided differently)"
        )
    return 0
