"""What every stage script shares: the one way params reach code, stage keys, and one-line errors.

A stage script reads the params keys its stage declares in dvc.yaml (`params(...)`), calls one library
function with them and the paths dvc.yaml gives on its command line, and exits through `run` (an MMCError
becomes one line and exit status 2; MMC_DEBUG=1 keeps the traceback). No params value, not even a `foreach`
key, is written into a command: a foreach stage learns its key from DVC_STAGE (which DVC sets to the stage's
name, e.g. losses@gpt2-s), checks it against the safe-name pattern and params, and fills `{key}` in the path
templates of its command line. So no value of params.yaml is ever interpreted by a shell.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from mmc import check_name, exit_status
from mmc.params import read_params

PARAMS_FILE = Path("params.yaml")


def params(*keys: str) -> dict:
    """The values of dotted params keys (`zoo.seed`, `pool.gpt2-s`), by key, from params.yaml checked whole against
    mmc's schema (mmc/params.py): a bad or unknown key ends the stage in one line before any work."""
    found: dict = {}
    _exit_on_error(os.environ.get("DVC_STAGE", "params").rsplit(":", 1)[-1],
                   lambda: found.update(tree=read_params(PARAMS_FILE)))
    values = {}
    for key in keys:
        node = found["tree"]
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise SystemExit(f"mmc: error: {PARAMS_FILE} has no '{key}'")
            node = node[part]
        values[key] = node
    return values


def stage_name() -> str:
    """This stage's name as DVC gives it (DVC_STAGE, without a dvc.yaml path prefix)."""
    name = os.environ.get("DVC_STAGE", "")
    if not name:
        raise SystemExit("mmc: error: DVC_STAGE is not set: stage scripts run under `dvc repro` (or use `mmc`)")
    return name.rsplit(":", 1)[-1]


def stage_key(kind: str) -> str:
    """The foreach key of this stage (`losses@<key>`), checked as a safe name."""
    name = stage_name()
    key = name.partition("@")[2]
    _exit_on_error(name, lambda: check_name(kind, key))
    return key


def stage_pair(kinds: tuple[str, str]) -> tuple[str, str]:
    """The two matrix items of this stage (`experts@<base>-<domain>`), split at the last '-' (a domain label
    holds none), each checked as a safe name."""
    name = stage_name()
    first, _, second = name.partition("@")[2].rpartition("-")
    _exit_on_error(name, lambda: [check_name(kind, item) for kind, item in zip(kinds, (first, second))])
    return first, second


def fill(template: str, **items: str) -> str:
    """A path template of the command line (`data/losses/{key}.zarr`) with this stage's checked items."""
    for name, value in items.items():
        template = template.replace("{" + name + "}", value)
    return template


def safe_names(kind: str, names: list) -> list:
    """Names from params that become paths (bases, domains), each checked as a safe name."""
    _exit_on_error(stage_name(), lambda: [check_name(kind, name) for name in names])
    return names


def _exit_on_error(where: str, call: Callable[[], object]) -> None:
    status = exit_status(where, call, debug=os.environ.get("MMC_DEBUG") == "1")
    if status:
        sys.exit(status)


def run(stage: str, call: Callable[[], object]) -> None:
    """Run the stage's library call and exit: 0, or 2 with one line for an MMCError."""
    if not sys.stderr.isatty():  # library progress bars only on a terminal: DVC logs stay readable
        if "datasets" in sys.modules:  # only where the stage's library imported them: no import for a fit stage
            sys.modules["datasets"].disable_progress_bars()
        if "transformers" in sys.modules:
            sys.modules["transformers"].utils.logging.disable_progress_bar()
    sys.exit(exit_status(stage, call, debug=os.environ.get("MMC_DEBUG") == "1"))


def comma_list(value: str | list | None) -> list[str] | None:
    """A params list given as a list or a comma-separated string (null: none)."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else value
    return [str(item).strip() for item in items if str(item).strip()] or None
