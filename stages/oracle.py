"""DVC stage `oracle`: oracle ensembles of the pool (params `oracle`). Usage: oracle.py POOL OUT"""
import sys

from common import params, run

from mmc.oracle import oracle_study

pool, out = sys.argv[1:]
run("oracle", lambda: oracle_study(pool, out, **params("oracle")["oracle"]))
