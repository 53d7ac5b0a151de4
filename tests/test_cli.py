"""The command line as a newcomer meets it: every subcommand listed with its purpose, and an example in its help."""

from __future__ import annotations

import argparse

from mmc.cli import build_parser


def subcommands(parser: argparse.ArgumentParser, prefix: str = "mmc") -> dict[str, argparse.ArgumentParser]:
    """Every leaf command (`mmc zoo train`, `mmc losses`, …) with its parser."""
    (actions,) = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    leaves = {}
    for name, child in actions.choices.items():
        nested = [action for action in child._actions if isinstance(action, argparse._SubParsersAction)]
        leaves.update(subcommands(child, f"{prefix} {name}") if nested else {f"{prefix} {name}": child})
    return leaves


def test_every_subcommand_has_a_purpose_and_an_example():
    parser = build_parser()
    top_help = parser.format_help()
    leaves = subcommands(parser)
    assert {"mmc losses", "mmc zoo train", "mmc experts train", "mmc merge-sweep", "mmc fit-merge", "mmc plan",
            "mmc report"} <= set(leaves)
    (actions,) = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    for choice in actions._choices_actions:  # the one-line purposes `mmc --help` lists
        assert choice.help and choice.dest in top_help, choice.dest
    for command, child in leaves.items():
        epilog = child.epilog or ""
        assert epilog.startswith("example") and f"\n  {command} " in epilog, command
        assert "--debug" in child.format_help(), command  # one-line errors, tracebacks on demand
