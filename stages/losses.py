"""DVC stage losses@<slug>: score the eval split with one pool member. Usage: losses.py EVAL_SPLIT OUT_TEMPLATE"""
import sys

from common import fill, params, run, stage_key

from mmc.losses import write_losses

eval_split, out = sys.argv[1:]
slug = stage_key("pool slug")
values = params("losses", f"pool.{slug}")
member = values[f"pool.{slug}"]
run(f"losses@{slug}", lambda: write_losses(member["model"], eval_split, fill(out, key=slug), family=member["family"],
                                           data=member.get("data") or "",
                                           revision=member["revision"], **values["losses"]))
