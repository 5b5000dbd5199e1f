"""``scas-jax train``: fine-tune a student on selected SFT answers."""

from __future__ import annotations

import argparse
import json

EXIT_ON_SIGNAL = {"SIGINT": 130, "SIGTERM": 143}


def _train_cmd(args: argparse.Namespace) -> int:
    from scas_jax.training.loop import train

    if args.dry_run:  # per-device memory on the config's mesh; no weights or data read
        from scas_jax.sizing import dry_run_train, format_report

        print(format_report(dry_run_train(args.student, args.config, args.overrides)))
        return 0
    overrides = list(args.overrides)
    if args.eval_data:
        overrides.append(f"eval_data={args.eval_data}")
    if args.dataset:
        overrides.append(f"dataset={args.dataset}")
    if args.chat_template:
        overrides.append(f"chat_template={args.chat_template}")
    summary = train(
        args.student, args.data, args.output_dir, args.config, overrides,
        candidate_dir=args.candidate_dir, resume=args.resume, export_hf=args.export_hf, progress=not args.no_progress,
        profile=args.profile,
    )
    if summary.get("interrupted"):
        print(f"interrupted by {summary['interrupted']}: checkpoint saved at step "
              f"{summary['final_step']}; continue with --resume")
        return EXIT_ON_SIGNAL.get(summary["interrupted"], 1)
    print(json.dumps({k: v for k, v in summary.items() if k != "data"}, indent=2))
    d = summary["data"]
    if "questions" in d:
        print(f"candidates: {d['questions']} questions, {d['candidates']} candidates "
              f"({d['rows_read']} rows read; skipped: " + ", ".join(
                  f"{k}={v}" for k, v in d.items() if k not in ("questions", "candidates", "rows_read"))
              + ")")
    else:
        print(f"data: {d['examples']} sequences trained on ({d['rows']} rows, {d['errors']} without an "
              f"answer, {d['dropped_long']} dropped as longer than seq_len)")
    return 0


def register(sub) -> None:
    p = sub.add_parser("train", help="fine-tune the student on SFT JSONL (e.g. select's output)")
    from scas_jax.data.chat import CHAT_TEMPLATE_HELP

    p.add_argument("--student", default="smollm2",
                   help="converted dir, HF dir, GGUF, 'smollm2' or 'gemma3-270m'")
    p.add_argument("--data", default=None,
                   help="SFT JSONL (system/instruction/output), a LLaMA-Factory dataset_info.json, or a "
                        "TFDS dataset built by scas-jax dataset build --data FILE (selection=static)")
    p.add_argument("--candidate-dir", default=None,
                   help="teacher candidate directory (or its TFDS build): re-score and select during training "
                        "(selection=dynamic, implied when --data is absent)")
    p.add_argument("--dataset", default=None, help="dataset name inside dataset_info.json")
    p.add_argument("--output-dir", required=True, help="checkpoints, metrics and the final model")
    p.add_argument("--config", default=None, help="YAML (see configs/train/default.yaml)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--eval-data", default=None, help="held-out SFT JSONL for the eval loss")
    p.add_argument("--chat-template", default=None, metavar="chatml|gemma|plain|FILE.jinja",
                   help=CHAT_TEMPLATE_HELP)
    p.add_argument("--export-hf", default=None, help="also write the final model for transformers")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="write a jax.profiler trace of a few steps (the 3rd to 5th of this run, after "
                        "compilation) under DIR; view with TensorBoard's profile plugin or ui.perfetto.dev")
    p.add_argument("--dry-run", action="store_true",
                   help="print per-device memory (parameters, optimiser state, activations) "
                        "and the batch plan on the config's mesh, which may be larger than "
                        "this machine; reads no weights and no data (--output-dir is unused); "
                        "--student may be a preset of configs/models (qwen3-8b)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.set_defaults(func=_train_cmd)
