"""``scas-jax select``: the CLI shell over :func:`scas_jax.selection.api.select`."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``select`` subcommand."""
    from scas_jax.selection.api import STRATEGIES

    p = subparsers.add_parser(
        "select",
        help="turn SCAS scores (or a verified pool) into SFT training files",
        description=(
            "Select one teacher answer per item. groups/min read <teacher>_scas_scores.jsonl "
            "files and follow the reference SCAS selection exactly; the baselines strongest, "
            "teacher and random read score files or a raw candidate pool."
        ),
    )
    p.add_argument("--input-dir", required=True, type=Path, help="directory of score files (or candidate files for baselines)")
    p.add_argument("--output-dir", required=True, type=Path, help="root of the selection outputs")
    p.add_argument("--strategy", default="groups", choices=STRATEGIES, help="selection strategy (default: groups)")
    p.add_argument("--score-key", default="scas_score", help="numeric field to rank by (default: scas_score)")
    p.add_argument("--num-groups", default=5, type=int, help="groups: number of score groups G (default: 5)")
    p.add_argument("--selected-group", default=1, type=int, help="groups: group written as selected_group_<g>.jsonl (default: 1, lowest cost)")
    p.add_argument("--seed", default=42, type=int, help="groups/random: seed of random.Random (default: 42)")
    p.add_argument("--teacher", default=None, help="teacher: the fixed teacher's name")
    p.add_argument("--teacher-accuracy", default=None, type=Path, metavar="FILE",
                   help="strongest: teacher accuracies measured on the full pool (teacher_accuracy.json written by "
                        "`scas-jax verify`, or JSON {\"teacher\": accuracy}); needed when the pool's flags "
                        "cannot tell the teachers apart")
    v = p.add_mutually_exclusive_group()
    v.add_argument("--verified-only", dest="verified_only", action="store_true", default=None,
                   help="drop candidates flagged teacher_correct/is_correct false or undecided (default for baselines)")
    v.add_argument("--include-unverified", dest="verified_only", action="store_false",
                   help="keep every candidate (default for groups/min, as in the reference)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs of the same run")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """CLI entry: select, then print one summary line."""
    from scas_jax.selection.api import select

    m = select(
        args.input_dir,
        args.output_dir,
        args.strategy,
        score_key=args.score_key,
        num_groups=args.num_groups,
        selected_group=args.selected_group,
        seed=args.seed,
        teacher=args.teacher,
        teacher_accuracy=args.teacher_accuracy,
        verified_only=args.verified_only,
        overwrite=args.overwrite,
    )
    skipped = sum(m["skipped"].values())
    shares = ", ".join(f"{t} {v['share']:.1%}" for t, v in list(m["teacher_share"].items())[:4])
    print(
        f"select {args.strategy}: items={m['items']} selected={m['selected_rows']} skipped_rows={skipped} "
        f"-> {m['output_dir']}/{m['selected_file']} ({shares})"
    )
    return 0
