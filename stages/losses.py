"""DVC stage losses@<slug>: score the eval split with one model into data/losses/<slug>.zarr."""
import sys

from mmc.cli import main

sys.exit(main(["losses", *sys.argv[1:]]))
