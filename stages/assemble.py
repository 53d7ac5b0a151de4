"""DVC stage `assemble`: combine the loss stores of the pool in params.yaml into data/pool.zarr.

The stores are data/losses/<slug>.zarr for the slugs of params.yaml's `pool` (the stage's declared param):
DVC cannot pass a dict's keys on the command line, and globbing data/losses/ would pick up stores of models
since removed from the pool. Reading params.yaml stays here: the library never reads it.
"""
import sys
from pathlib import Path

import yaml

from mmc.cli import main

pool = yaml.safe_load(Path("params.yaml").read_text(encoding="utf-8")).get("pool") or {}
sys.exit(main(["assemble", *sys.argv[1:], *(f"data/losses/{slug}.zarr" for slug in pool)]))
