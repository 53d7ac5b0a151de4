"""DVC stage `oracle`: oracle ensembles of the pool (params `oracle`). Usage: oracle.py POOL OUT"""
import sys

from mmc.warm import hand_over

hand_over()  # the script runs in a fork of a process with its libraries imported (mmc/warm.py)

from common import params, run  # noqa: E402

from mmc.oracle import oracle_study  # noqa: E402

pool, out = sys.argv[1:]
run("oracle", lambda: oracle_study(pool, out, **params("oracle")["oracle"]))
