"""DVC stage check_params: params.yaml against mmc's schema (mmc/params.py) and the merge-method registry.
Usage: check_params.py OUT

Every other stage depends on OUT, so a bad name or a misspelt key stops `dvc repro` here, before any stage runs:
DVC removes a stage's outputs before its command starts, and output paths are built from params names (zoo members,
pool slugs, bases, domains). OUT holds a constant text, so a params change reruns only the stages that read it.
"""
import sys

from mmc.warm import hand_over

hand_over()  # the script runs in a fork of a process with its libraries imported (mmc/warm.py)

from common import params, run  # noqa: E402

from mmc.merge_methods import merge_specs  # noqa: E402
from mmc.params import write_check  # noqa: E402

out, = sys.argv[1:]
methods = params("merging.methods")["merging.methods"]  # the whole file is checked against the schema on the way
run("check_params", lambda: (merge_specs(methods), write_check(out)))
