"""DVC stage `report`: figures and reports/README.md from the fitted laws with `mmc report`."""
import sys

from mmc.cli import main

sys.exit(main(["report", *sys.argv[1:]]))
