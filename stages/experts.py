"""DVC stage experts@<base>-<domain>: fine-tune one zoo base on one domain into data/experts/<base>/<domain>/."""
import sys

from mmc.cli import main

sys.exit(main(["experts", "train", *sys.argv[1:]]))
