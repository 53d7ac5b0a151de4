"""DVC stage `plan`: planning answers from the fitted merging law (params `plan`). Usage: plan.py LAW OUT"""
import sys

from common import params, run

from mmc.merge_law import plan_from_law, plan_text

law, out = sys.argv[1:]
run("plan", lambda: print(plan_text(plan_from_law(law, out=out, **params("plan")["plan"]))))
