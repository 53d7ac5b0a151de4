"""DVC stage `fit`: the collaboration laws (params `fit`). Usage: fit.py POOL ORACLE METRICS PLOTS"""
import sys

from common import params, run

from mmc.collaboration import fit_collaboration

pool, oracle, metrics, plots = sys.argv[1:]
values = params("fit", "oracle.sample_chunk")
run("fit", lambda: fit_collaboration(pool, oracle, metrics, plots, sample_chunk=values["oracle.sample_chunk"],
                                     **values["fit"]))
