"""DVC stage `assemble`: combine the loss stores of the pool in params.yaml into data/pool.zarr.

The pool's slugs come from params.yaml (declared as the stage's `pool` param): DVC cannot pass a dict's keys
on the command line, and globbing data/losses/ would pick up stores of models since removed from the pool.
"""
import sys

import yaml

from mmc.cli import main

pool = yaml.safe_load(open("params.yaml", encoding="utf-8"))["pool"]
sys.exit(main(["assemble", *sys.argv[1:], *(f"data/losses/{slug}.zarr" for slug in pool)]))
