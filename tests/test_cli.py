"""The command line as a newcomer meets it: every subcommand listed with its purpose, and an example in its help."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from conftest import ROOT, synthetic_pool
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


MODEL_LIBRARIES = ("torch", "transformers", "datasets", "peft", "lm_eval", "mergekit")
# the modules of every command and stage that neither scores, trains nor merges models
LIGHT_MODULES = ("mmc.cli", "mmc.catalog", "mmc.collaboration", "mmc.corpus", "mmc.interchange", "mmc.laws",
                 "mmc.merge_law", "mmc.merge_methods", "mmc.oracle", "mmc.params", "mmc.presets", "mmc.report",
                 "mmc.routing", "mmc.store")


def modules_loaded_by(code: str) -> set[str]:
    """The modules (`dask`, `dask.array`, ...) a fresh Python process has loaded after running `code` in the project
    root."""
    script = code + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    return set(json.loads(result.stdout.splitlines()[-1]))


def test_commands_that_neither_score_train_nor_merge_start_without_the_model_libraries():
    """Fitting, planning, routing, reporting and checking load no torch, transformers or datasets: each such command
    and stage starts in about a second."""
    assert not modules_loaded_by(f"import {', '.join(LIGHT_MODULES)}") & set(MODEL_LIBRARIES)
    checked = modules_loaded_by("from mmc.cli import main\nassert main(['params', '--params', 'params.yaml']) == 0")
    assert not checked & {*MODEL_LIBRARIES, "sklearn", "scipy", "matplotlib"}


def test_commands_without_a_scheduler_stream_the_pool_without_dask_or_the_params_schema(tmp_path):
    """Without --scheduler, oracle and fit read the pool region by region in this process: neither dask.array
    nor distributed is imported (0.3 s of a command's start), nor the params schema's pydantic."""
    pool = synthetic_pool(tmp_path / "pool.zarr", n_samples=60)
    oracle, fit = (str(tmp_path / name) for name in ("oracle", "fit"))
    loaded = modules_loaded_by(
        "from mmc.cli import main\n"
        f"assert main(['oracle', '--pool', {str(pool)!r}, '--out', {oracle!r}, '--max-subsets-per-k', '5']) == 0\n"
        f"assert main(['fit', '--pool', {str(pool)!r}, '--oracle', {oracle!r}, '--out', {fit + '.json'!r}, "
        f"'--plots', {fit!r}, '--bootstrap', '3']) == 0")
    assert not loaded & {"dask.array", "distributed", "pydantic", "mmc.params"}
