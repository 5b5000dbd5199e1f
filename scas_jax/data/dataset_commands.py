"""``scas-jax dataset build``: a pool directory or an SFT file as a TFDS dataset.

The CLI shell over :func:`scas_jax.data.tfds_pool.build_pool_dataset` and
:func:`scas_jax.data.tfds_pool.build_sft_dataset` (docs/datasets.md).
tensorflow_datasets is imported only when the command runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``dataset`` subcommand (with its ``build`` action)."""
    p = subparsers.add_parser(
        "dataset",
        help="build a TFDS dataset (ArrayRecord) from a pool directory or an SFT file",
        description=(
            "Datasets at scale: 'dataset build' writes a pool directory (one JSONL per teacher) or an "
            "SFT file as a versioned TFDS dataset (ArrayRecord, one record per answer, file order kept, "
            "the input files' sha256 in its metadata). Every stage that reads a pool directory "
            "(score, select, verify, report, evaluate --pool, train --candidate-dir, experiment) "
            "reads the built dataset directory alike; a build of one file (--data) serves as "
            "train --data or generate/evaluate --questions."
        ),
    )
    actions = p.add_subparsers(dest="dataset_action", metavar="<action>",
                               help="what to do (build)")
    actions.required = True
    b = actions.add_parser(
        "build",
        help="build DATA_DIR/NAME/VERSION from --candidate-dir or --data",
        description=(
            "Build a TFDS dataset into DATA_DIR/NAME/1.0.0, atomically (nothing is left on an "
            "error, which names the input file:line)."
        ),
    )
    src = b.add_mutually_exclusive_group(required=True)
    src.add_argument("--candidate-dir", type=Path, metavar="POOL",
                     help="pool directory: one <teacher>.jsonl (or score file) per teacher")
    src.add_argument("--data", type=Path, metavar="FILE.jsonl", help="an SFT file (one row per line)")
    b.add_argument("--out", required=True, type=Path, metavar="DATA_DIR", help="TFDS data directory to build into")
    b.add_argument("--name", default=None,
                   help="dataset name, lowercase letters, digits and _ (default: scas_pool for a pool, "
                        "the file's stem for --data)")
    b.add_argument("--overwrite", action="store_true", help="rebuild DATA_DIR/NAME/VERSION when it exists")
    b.set_defaults(func=run_build)
    from scas_jax.cli import HelpFormatter

    b.formatter_class = HelpFormatter
    return p


def run_build(args: argparse.Namespace) -> int:
    """CLI entry: build, then print where the dataset is and how many rows it holds."""
    from scas_jax.data.tfds_pool import build_pool_dataset, build_sft_dataset, read_metadata

    if args.candidate_dir is not None:
        out = build_pool_dataset(args.candidate_dir, args.out, args.name or "scas_pool",
                                 overwrite=args.overwrite)
    else:
        out = build_sft_dataset(args.data, args.out, args.name, overwrite=args.overwrite)
    teachers = read_metadata(out)["teachers"]
    for t in teachers:
        print(f"{t['file']}: {t['rows']} rows ({t['kind']}, sha256 {t['sha256'][:12]}...)")
    print(f"dataset: {out} ({sum(t['rows'] for t in teachers)} rows)")
    return 0
