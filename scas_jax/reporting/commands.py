"""``scas-jax report``: the CLI shell over :func:`scas_jax.reporting.report.report`."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``report`` subcommand."""
    p = subparsers.add_parser(
        "report",
        help="Markdown report with plots: scores per teacher, selections, agreement, accuracy",
        description=(
            "Write DIR/report.md with PNG figures: the distribution of each score field per teacher, "
            "the share of each teacher under every selection, what each selection picked beside the "
            "alternatives (all items in DIR/picks.csv), how often selections agree per item, and "
            "per-teacher accuracy (from --verified) and answer length."
        ),
    )
    p.add_argument("--scores", required=True, type=Path, help="directory of <teacher>_scas_scores.jsonl (or a candidate pool)")
    p.add_argument("--selections", nargs="*", default=[], type=Path, metavar="OUT",
                   help="`scas-jax select` output directories or manifest.json files (searched recursively)")
    p.add_argument("--verified", default=None, type=Path, metavar="DIR",
                   help="output directory of `scas-jax verify` on the full pool: teacher accuracy over every answer "
                        "(without it the report says accuracy is unknown)")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="report directory")
    p.add_argument("--fields", nargs="+", default=None, metavar="FIELD",
                   help="score fields to plot (default: the SCAS fields present, scas_score first)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty DIR")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """CLI entry: build the report and print where it is."""
    from scas_jax.reporting.report import report

    summary = report(args.scores, args.selections, args.out, verified=args.verified, fields=args.fields,
                     overwrite=args.overwrite)
    print(f"report: {summary['report']} ({len(summary['selections'])} selections, {len(summary['teachers'])} teachers)")
    return 0
