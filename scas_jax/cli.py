"""`scas-jax <stage>`: one subcommand per stage, each a thin shell over a Python function.

Every command module listed in ``COMMAND_MODULES`` exposes ``register(subparsers)``,
which adds its subparser(s) and sets ``func`` (``args -> exit code``). Modules keep
heavy imports (jax, transformers) inside their functions so that ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from scas_jax import distributed, host_memory
from scas_jax.errors import ScasError

COMMAND_MODULES = (
    "scas_jax.convert.commands",  # convert, export
    "scas_jax.pipeline",  # pipeline (the README's main job)
    "scas_jax.scoring.commands",  # score
    "scas_jax.selection.commands",  # select
    "scas_jax.judging.commands",  # verify
    "scas_jax.reporting.commands",  # report
    "scas_jax.training.commands",  # train
    "scas_jax.generation.commands",  # generate
    "scas_jax.evaluation.commands",  # evaluate
    "scas_jax.experiment.commands",  # experiment
    "scas_jax.data.dataset_commands",  # dataset build (TFDS; imported only when it runs)
)
# Subcommands that touch JAX devices: they take the multi-process start-up flags and
# start the process group (scas_jax.distributed) before they run.
JAX_COMMANDS = frozenset({"convert", "export", "pipeline", "score", "train", "generate", "evaluate",
                          "experiment"})


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, except where there is none to show
    (required options, flags that default to off, options whose default is unset) or
    where the help already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text.lower() or action.required or action.default in (None, False, "")
                or action.default is argparse.SUPPRESS or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scas-jax",
        description="Student-Centric Answer Sampling for LLM distillation, in JAX.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<stage>")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    # one look for every subcommand: its one-line summary heads its own --help too
    summaries = {a.dest: a.help for a in sub._get_subactions()}
    for name, p in sub.choices.items():
        if name in JAX_COMMANDS:
            distributed.add_args(p)
        p.formatter_class = HelpFormatter
        if not p.description:
            p.description = summaries.get(name)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in JAX_COMMANDS:
        host_memory.limit_arenas()  # before JAX starts its threads
    try:
        if getattr(args, "before_devices", None) is not None:
            args.before_devices(args)  # what must be set before JAX starts (score: the CPU split)
        if args.command in JAX_COMMANDS:
            distributed.initialize_from_args(args)
        code = int(args.func(args) or 0)
    except ScasError as e:
        print(f"scas-jax {args.command}: error: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print(f"scas-jax {args.command}: interrupted", file=sys.stderr)
        code = 130
    if code != 0:
        distributed.abandon(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
