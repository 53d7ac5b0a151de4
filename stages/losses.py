"""DVC stage losses@<slug>: score the eval split with one pool member, or import its losses computed elsewhere.
Usage: losses.py EVAL_SPLIT OUT_TEMPLATE

A pool entry's own engine settings (any key of `losses`: max_length, dtype, shards, ...) override the shared ones
for this model only; an entry with `import` instead of `model` reads lm-eval output or a table (`mmc import`).
"""
import sys

from mmc.warm import hand_over

hand_over()  # the script runs in a fork of a process with its libraries imported (mmc/warm.py)

from common import fill, params, run, stage_key  # noqa: E402

from mmc.interchange import import_losses  # noqa: E402
from mmc.losses import write_losses  # noqa: E402
from mmc.params import ENGINE_SETTINGS  # noqa: E402

eval_split, out = sys.argv[1:]
slug = stage_key("pool slug")
values = params("losses", f"pool.{slug}")
member = values[f"pool.{slug}"]
label = {"family": member["family"], "data": member.get("data") or ""}
if "import" in member:
    run(f"losses@{slug}", lambda: import_losses(
        member["import"], eval_split, fill(out, key=slug), format=member.get("format") or "auto", model=slug,
        n_params=member["n_params"], n_params_nonembedding=member["n_params_nonembedding"], **label))
else:
    settings = values["losses"] | {name: member[name] for name in ENGINE_SETTINGS if name in member}
    run(f"losses@{slug}", lambda: write_losses(member["model"], eval_split, fill(out, key=slug),
                                               revision=member.get("revision"), **label, **settings))
