"""DVC stage `fit`: the collaboration laws (params `fit`). Usage: fit.py POOL ORACLE METRICS PLOTS"""
import sys

from mmc.warm import hand_over

hand_over()  # the script runs in a fork of a process with its libraries imported (mmc/warm.py)

from common import params, run  # noqa: E402

from mmc.collaboration import fit_collaboration  # noqa: E402

pool, oracle, metrics, plots = sys.argv[1:]
values = params("fit", "oracle.sample_chunk")
run("fit", lambda: fit_collaboration(pool, oracle, metrics, plots, sample_chunk=values["oracle.sample_chunk"],
                                     **values["fit"]))
