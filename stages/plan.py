"""DVC stage `plan`: planning answers from the fitted merging law with `mmc plan`."""
import sys

from mmc.cli import main

sys.exit(main(["plan", *sys.argv[1:]]))
