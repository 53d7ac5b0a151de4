"""DVC stage `fit`: `mmc fit` with the arguments dvc.yaml gives."""
import sys

from mmc.cli import main

sys.exit(main(["fit", *sys.argv[1:]]))
