"""DVC stage `routing`: what a real system realises of the oracle's gain, and at what cost (params `routing`).
Usage: routing.py POOL ORACLE EVAL_SPLIT OUT METRICS"""
import sys

from mmc.warm import hand_over

hand_over()  # the script runs in a fork of a process with its libraries imported (mmc/warm.py)

from common import params, run  # noqa: E402

from mmc.routing import routing_study  # noqa: E402

pool, oracle, eval_split, out, metrics = sys.argv[1:]
run("routing", lambda: routing_study(pool, oracle, eval_split, out, metrics, **params("routing")["routing"]))
