"""DVC stage `fit_merge`: the merging law over the sweeps of params `merging.bases`.
Usage: fit_merge.py MERGING METRICS PLOTS

The stores are MERGING/<base>.zarr for the bases listed (globbing the folder would take bases since removed).
"""
import sys
from pathlib import Path

from mmc.warm import hand_over

hand_over()  # the script runs in a fork of a process with its libraries imported (mmc/warm.py)

from common import params, run, safe_names  # noqa: E402

from mmc.merge_law import fit_merge_study  # noqa: E402

merging, metrics, plots = sys.argv[1:]
values = params("merging.bases", "merging.bootstrap", "merging.seed", "merging.holdout_k")
bases = safe_names("base", values["merging.bases"])
run("fit_merge", lambda: fit_merge_study(
    [Path(merging) / f"{base}.zarr" for base in bases], metrics, plots,
    bootstrap=values["merging.bootstrap"], seed=values["merging.seed"], holdout_k=values["merging.holdout_k"]))
