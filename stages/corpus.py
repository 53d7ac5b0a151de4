"""DVC stage `corpus`: build data/corpus/ (train/eval splits and corpus.json) with `mmc corpus`."""
import sys

from mmc.cli import main

sys.exit(main(["corpus", *sys.argv[1:]]))
