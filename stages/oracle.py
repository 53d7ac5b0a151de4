"""DVC stage `oracle`: `mmc oracle` with the arguments dvc.yaml gives."""
import sys

from mmc.cli import main

sys.exit(main(["oracle", *sys.argv[1:]]))
