"""DVC stage merge@<base>: merge k-subsets of a base's experts with every method; score each into data/merging/<base>.zarr.

The experts are data/experts/<base>/<domain> for the domains of params.yaml's `merging.domains` (the stage's
declared param): DVC cannot put a list into a cmd, and globbing data/experts/<base>/ would pick up experts of
domains since removed. Reading params.yaml stays here: the library never reads it.
"""
import sys
from pathlib import Path

import yaml

from mmc.cli import main

domains = yaml.safe_load(Path("params.yaml").read_text(encoding="utf-8"))["merging"]["domains"]
sys.exit(main(["merge-sweep", *sys.argv[1:], "--domains", ",".join(domains)]))
