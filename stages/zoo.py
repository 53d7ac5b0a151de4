"""DVC stage zoo@<member>: train one member of the embedded model zoo into data/zoo/<member>/."""
import sys

from mmc.cli import main

sys.exit(main(["zoo", "train", *sys.argv[1:]]))
