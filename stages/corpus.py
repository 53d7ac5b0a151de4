"""DVC stage `corpus`: build the train/eval corpus from params `corpus`. Usage: corpus.py OUT"""
import sys

from common import comma_list, params, run

from mmc.corpus import make_corpus

out, = sys.argv[1:]
settings = params("corpus")["corpus"]
settings.pop("dep")  # a path dvc.yaml depends on, not a setting
settings["domains"] = comma_list(settings["domains"])
run("corpus", lambda: make_corpus(out, **settings))
