"""``scas-jax evaluate``: the CLI shell over :func:`scas_jax.evaluation.evaluate.evaluate`."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``evaluate`` subcommand."""
    from scas_jax.data.chat import CHAT_TEMPLATE_FLAG, CHAT_TEMPLATE_HELP

    p = subparsers.add_parser(
        "evaluate",
        help="evaluate a student: greedy answers judged by the rule judge, accuracy, answer NLL",
        description=(
            "Answer every question of --questions greedily with the student, judge each answer "
            "against its reference_answer, and write predictions.jsonl and metrics.json (accuracy "
            "with a 95%% bootstrap interval; with --pool, the mean NLL of the pool's verified "
            "answers of these questions, per teacher and macro-averaged) to --output-dir."),
    )
    p.add_argument("--student", required=True,
                   help="converted checkpoint, Hugging Face directory, GGUF file, 'smollm2', a "
                        "training output directory or one of its checkpoints")
    p.add_argument("--questions", required=True, type=Path,
                   help="JSONL of questions (id, instruction, optional system, reference_answer), or its "
                        "TFDS build (scas-jax dataset build --data FILE)")
    p.add_argument("--output-dir", required=True, type=Path, help="where predictions.jsonl and metrics.json go")
    p.add_argument("--pool", type=Path, default=None,
                   help="pool directory (or its TFDS build) whose verified answers' mean NLL is measured")
    p.add_argument("--max-new-tokens", type=int, default=512,
                   help="longest answer; a longer one is truncated and judged undecided")
    p.add_argument("--limit", type=int, default=None, help="only the first N questions")
    p.add_argument("--mesh", default="data=-1", help="device mesh, e.g. data=-1 or data=2,fsdp=4")
    p.add_argument("--batch-size", type=int, default=16, help="rows per compiled generation call")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
    p.add_argument("--tokenizer", default=None,
                   help="where to read the tokenizer when --student is a training checkpoint without one")
    p.add_argument(CHAT_TEMPLATE_FLAG, dest="chat_template", default=None,
                   metavar="chatml|gemma|plain|FILE.jinja", help=CHAT_TEMPLATE_HELP)
    p.add_argument("--bootstrap-samples", type=int, default=1000, help="bootstrap resamples")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from scas_jax.evaluation.evaluate import evaluate

    m = evaluate(args.student, args.questions, args.output_dir, pool=args.pool,
                 max_new_tokens=args.max_new_tokens, limit=args.limit, mesh=args.mesh,
                 batch_size=args.batch_size, dtype=args.dtype, tokenizer=args.tokenizer,
                 chat_template=args.chat_template,
                 bootstrap_samples=args.bootstrap_samples, seed=args.seed, overwrite=args.overwrite,
                 progress=True)
    lo, hi = m["accuracy_ci95"]
    print(f"evaluate: accuracy {m['accuracy']:.3f} (95% CI {lo:.3f}-{hi:.3f}) over {m['questions']} "
          f"questions; {m['undecided']} undecided ({m['truncated']} truncated) -> {args.output_dir}")
    nll = m.get("answer_nll")
    if nll:
        for t, v in nll["per_teacher"].items():
            print(f"  answer NLL {t:<32} {v['mean_nll']:.4f} over {v['answers']} verified answers")
        if nll["macro_mean_nll"] is not None:
            print(f"  answer NLL macro-average over {len(nll['per_teacher'])} teachers: {nll['macro_mean_nll']:.4f}")
    return 0
