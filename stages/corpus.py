"""DVC stage `corpus`: build the train/eval corpus from params `corpus`. Usage: corpus.py OUT"""
import sys

from mmc.warm import hand_over

hand_over()  # the script runs in a fork of a process with its libraries imported (mmc/warm.py)

from common import comma_list, params, run  # noqa: E402

from mmc.corpus import make_corpus  # noqa: E402

out, = sys.argv[1:]
settings = params("corpus")["corpus"]
settings.pop("dep")  # a path dvc.yaml depends on, not a setting
settings["domains"] = comma_list(settings["domains"])
run("corpus", lambda: make_corpus(out, **settings))
