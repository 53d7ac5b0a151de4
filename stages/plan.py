"""DVC stage `plan`: planning answers from the fitted merging law (params `plan`). Usage: plan.py LAW OUT"""
import sys

from mmc.warm import hand_over

hand_over()  # the script runs in a fork of a process with its libraries imported (mmc/warm.py)

from common import params, run  # noqa: E402

from mmc.merge_law import plan_from_law, plan_text  # noqa: E402

law, out = sys.argv[1:]
run("plan", lambda: print(plan_text(plan_from_law(law, out=out, **params("plan")["plan"]))))
