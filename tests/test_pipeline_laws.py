"""The assemble, oracle and fit stages as DVC runs them: each reruns only when what it reads changes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, build_tiny_model, pool_entry, ran_stages, sh, stage_order, stage_project
from mmc.store import open_store

STAGES = ("losses", "assemble", "oracle", "fit")


def write_params(repo: Path, params: dict) -> None:
    (repo / "params.yaml").write_text(yaml.safe_dump(params))


def laws_project(repo: Path, gpt2_dir: Path, llama_dir: Path) -> dict:
    """The losses, assemble, oracle and fit stages over five tiny models (see `stage_project`)."""
    defaults = yaml.safe_load((ROOT / "params.yaml").read_text())
    params = stage_project(repo, gpt2_dir, llama_dir, list(STAGES),
                           {"oracle": defaults["oracle"], "fit": {**defaults["fit"], "bootstrap": 20}})
    # three more models of other seeds: five single models with five distinct losses, the least a law of 3
    # parameters is fitted on (parameters + 2; copies of a model would be one measurement, counted once)
    for name, family, tokenizer, seed in [("gpt2-b", "gpt2", "byte_bpe", 3), ("llama-b", "llama", "metaspace_bpe", 4),
                                          ("gpt2-c", "gpt2", "byte_bpe", 5)]:
        build_tiny_model(repo / "models" / name, family, tokenizer, seed=seed)
        params["pool"][name] = pool_entry(name, family)
    write_params(repo, params)
    return params


@pytest.mark.slow
def test_fit_params_rerun_only_fit_and_the_pool_follows_params(tmp_path, gpt2_dir, llama_dir):
    repo = tmp_path / "repo"
    params = laws_project(repo, gpt2_dir, llama_dir)
    params["pool"]["gpt2-wide"] = pool_entry("gpt2-wide", "gpt2")
    write_params(repo, params)

    # assemble depends on the folder holding the losses@ outputs: DVC runs it after all of them
    output = sh(repo, "dvc", "repro")
    check, *order = stage_order(output)
    assert check == "check_params"
    assert sorted(order[:6]) == ["losses@gpt2", "losses@gpt2-b", "losses@gpt2-c", "losses@gpt2-wide",
                                 "losses@llama", "losses@llama-b"]
    assert order[6:] == ["assemble", "oracle", "fit"]
    laws = json.loads((repo / "metrics" / "laws.json").read_text())
    assert laws["bootstrap"]["resamples"] == 20 and "single/pooled" in laws["fits"]
    assert (repo / "plots" / "laws" / "points.csv").is_file() and (repo / "plots" / "laws" / "curves.csv").is_file()
    assert ran_stages(sh(repo, "dvc", "repro")) == []

    for key, value in [("bootstrap", 10), ("holdout_fraction", 0.5)]:
        params["fit"][key] = value
        write_params(repo, params)
        assert ran_stages(sh(repo, "dvc", "repro")) == ["fit"], key
    assert json.loads((repo / "metrics" / "laws.json").read_text())["bootstrap"]["resamples"] == 10

    # a member leaves the pool: its store stays on disk, but the pool is what params.yaml says
    del params["pool"]["gpt2-wide"]
    write_params(repo, params)
    assert ran_stages(sh(repo, "dvc", "repro")) == ["assemble", "fit", "oracle"]
    assert (repo / "data" / "losses" / "gpt2-wide.zarr").is_dir()
    assert list(open_store(repo / "data" / "pool.zarr").model.values) == ["gpt2", "gpt2-b", "gpt2-c", "llama", "llama-b"]

    # killed mid-fit: the metrics and plots (kept in git, not in DVC's cache) stay as the last run left them
    kept = {path: path.read_bytes() for path in [repo / "metrics" / "laws.json", *(repo / "plots" / "laws").iterdir()]}
    params["fit"]["bootstrap"] = 15
    write_params(repo, params)
    repro = subprocess.Popen(["dvc", "repro"], cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    for line in repro.stdout:
        if line.startswith("Running stage 'fit'"):
            time.sleep(1.0)  # the stage's command has started: DVC would have removed its outputs by now
            os.killpg(repro.pid, signal.SIGKILL)
            break
    assert repro.wait() == -signal.SIGKILL
    assert {path: path.read_bytes() for path in kept} == kept
    assert sorted((repo / "plots" / "laws").iterdir()) == sorted(path for path in kept if path.parent.name == "laws")


@pytest.mark.slow
def test_experiment_adds_a_pool_member_and_shows_its_metrics(tmp_path, gpt2_dir, llama_dir):
    """The README's recipe: `dvc exp run -S` adds a model to the pool; only its losses are computed; `dvc exp
    show --json` has the experiment's law metrics. (Hydra's override grammar takes no '-' in keys: slug gpt2_wide.)"""
    repo = tmp_path / "repo"
    laws_project(repo, gpt2_dir, llama_dir)
    sh(repo, "dvc", "repro")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "a pool of five")
    output = sh(repo, "dvc", "exp", "run", "-n", "wide", "-S",
                "+pool.gpt2_wide={model: models/gpt2-wide, family: gpt2, revision: null, dep: models/gpt2-wide}")
    assert ran_stages(output) == ["assemble", "fit", "losses@gpt2_wide", "oracle"]
    shown = json.loads(sh(repo, "dvc", "exp", "show", "--json"))
    (baseline,) = [row for row in shown if row.get("experiments")]  # the commit the experiment started from
    (wide,) = [exp for exp in baseline["experiments"] if exp.get("name") == "wide"]
    revision = wide["revs"][0]["data"]
    assert "gpt2_wide" in revision["params"]["params.yaml"]["data"]["pool"]

    def pooled_fit(data: dict) -> dict:
        return data["metrics"]["metrics/laws.json"]["data"]["fits"]["single/pooled"]

    # the experiment's pooled law is fitted on its six models, the baseline's on five
    assert pooled_fit(revision)["n_points"] == 6 and pooled_fit(baseline["data"])["n_points"] == 5
