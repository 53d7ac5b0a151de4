"""The command line as a newcomer meets it: every subcommand listed with its purpose, and an example in its help."""

from __future__ import annotations

import argparse

from conftest import ROOT
from mmc.cli import build_parser, cli_reference, leaf_parsers


def test_every_subcommand_has_a_purpose_and_an_example():
    parser = build_parser()
    top_help = parser.format_help()
    leaves = leaf_parsers(parser)
    assert {"mmc losses", "mmc zoo train", "mmc experts train", "mmc merge-sweep", "mmc fit-merge", "mmc plan",
            "mmc report"} <= set(leaves)
    (actions,) = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    for choice in actions._choices_actions:  # the one-line purposes `mmc --help` lists
        assert choice.help and choice.dest in top_help, choice.dest
    for command, child in leaves.items():
        epilog = child.epilog or ""
        assert epilog.startswith("example") and f"\n  {command} " in epilog, command
        assert "--debug" in child.format_help(), command  # one-line errors, tracebacks on demand


def test_the_cli_reference_in_the_docs_is_the_parsers():
    page = ROOT / "docs" / "reference" / "cli.md"
    assert page.read_text(encoding="utf-8") == cli_reference(), \
        "docs/reference/cli.md is out of date: regenerate it with the command at its top"
    for command in leaf_parsers(build_parser()):
        assert f"\n## {command}\n" in page.read_text(encoding="utf-8")
