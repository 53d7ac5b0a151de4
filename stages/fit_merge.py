"""DVC stage `fit_merge`: fit the merging law over the merge stores of params.yaml's `merging.bases`.

The stores are data/merging/<base>.zarr for the bases listed in params.yaml (the stage's declared param): DVC
cannot put a list into a cmd, and globbing data/merging/ would pick up stores of bases since removed.
"""
import sys
from pathlib import Path

import yaml

from mmc.cli import main

bases = yaml.safe_load(Path("params.yaml").read_text(encoding="utf-8"))["merging"]["bases"]
sys.exit(main(["fit-merge", *sys.argv[1:], *(f"data/merging/{base}.zarr" for base in bases)]))
