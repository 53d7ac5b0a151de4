"""DVC stage `routing`: what a real system realises of the oracle's gain, and at what cost (params `routing`).
Usage: routing.py POOL ORACLE EVAL_SPLIT OUT METRICS"""
import sys

from common import params, run

from mmc.routing import routing_study

pool, oracle, eval_split, out, metrics = sys.argv[1:]
run("routing", lambda: routing_study(pool, oracle, eval_split, out, metrics, **params("routing")["routing"]))
