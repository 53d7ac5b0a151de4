"""DVC stage `assemble`: the loss stores of the pool's members into one pool store. Usage: assemble.py LOSSES OUT

The stores are LOSSES/<slug>.zarr for the slugs of params `pool` (declared by the stage): globbing the folder
would take stores of members since removed from the pool.
"""
import sys
from pathlib import Path

from mmc.warm import hand_over

hand_over()  # the script runs in a fork of a process with its libraries imported (mmc/warm.py)

from common import params, run, safe_names  # noqa: E402

from mmc.store import write_pool  # noqa: E402

losses, out = sys.argv[1:]
slugs = safe_names("pool slug", list(params("pool")["pool"]))
run("assemble", lambda: write_pool({slug: Path(losses) / f"{slug}.zarr" for slug in slugs}, out))
