"""DVC stage `report`: figures and a readable summary of the studies that ran (params `studies`), saying which
did not. Usage: report.py LAWS LAW_PLOTS ORACLE MERGE_LAW MERGE_PLOTS PLAN ROUTING ROUTING_METRICS OUT"""
import sys

from mmc.warm import hand_over

hand_over()  # the script runs in a fork of a process with its libraries imported (mmc/warm.py)

from common import params, run  # noqa: E402

from mmc.report import write_report  # noqa: E402

laws, law_plots, oracle, merge_law, merge_plots, plan, routing, routing_metrics, out = sys.argv[1:]
merging_ran = bool(params("studies.merging")["studies.merging"])
run("report", lambda: write_report(laws, law_plots, oracle, out, merge_law_path=merge_law, merge_plots=merge_plots,
                                   plan_path=plan, routing_dir=routing, routing_path=routing_metrics,
                                   merging_ran=merging_ran))
