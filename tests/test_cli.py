"""`scas-jax --help` and every subcommand's help read well: a one-line summary, every
option described with its default, no docstring markup."""

from __future__ import annotations

import argparse
import re

from scas_jax.cli import build_parser


def _subparsers(parser):
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_every_subcommand_describes_itself_and_its_options():
    subs = _subparsers(build_parser())
    assert {"convert", "export", "pipeline", "score", "select", "verify", "report", "train"} <= set(subs)
    for name, p in subs.items():
        assert p.description and p.description.strip(), name
        text = p.format_help()
        assert not re.search(r"``|:(class|func|mod|meth):", text), (name, "docstring markup in --help")
        for action in p._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name} {action.option_strings or action.dest}: no help text"
            shown = p.formatter_class(prog=name)._get_help_string(action)
            has_default = (action.option_strings and not action.required
                           and action.default not in (None, False, "", argparse.SUPPRESS))
            if has_default:
                assert "default" in shown.lower(), f"{name} {action.option_strings}: default not shown"
            assert shown.lower().count("default:") <= 1, f"{name} {action.option_strings}: default twice"
