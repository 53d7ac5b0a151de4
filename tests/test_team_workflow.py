"""Team sharing through a DVC remote: losses are computed once, pulled by teammates, extended one model at a time."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from conftest import EVAL_TEXTS, build_tiny_model, save_eval_set
from test_pipeline_losses import ROOT, pool_entry, ran_stages, sh


def losses_project(repo: Path, models: dict[str, Path]) -> dict:
    """A git+DVC project with the losses stage, tiny models committed to git and an eval set, as a team shares."""
    repo.mkdir()
    shutil.copytree(ROOT / "stages", repo / "stages")
    shutil.copytree(ROOT / "mmc", repo / "mmc", ignore=shutil.ignore_patterns("__pycache__"))
    for name, path in models.items():
        shutil.copytree(path, repo / "models" / name)
    save_eval_set(repo / "data" / "corpus" / "eval", EVAL_TEXTS)
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"losses": stages["losses"]}}))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params = {"losses": {**params["losses"], "device": "cpu", "dtype": "float32"},
              "pool": {name: pool_entry(name, "gpt2" if "gpt2" in name else "llama") for name in models}}
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    sh(repo, "git", "init", "-q")
    sh(repo, "dvc", "init", "-q")
    sh(repo, "dvc", "config", "core.analytics", "false")
    sh(repo, "dvc", "add", "-q", "data/corpus/eval")
    return params


@pytest.mark.slow
def test_push_clone_pull_then_one_new_model(tmp_path, gpt2_dir, llama_dir):
    origin, clone, remote = tmp_path / "origin", tmp_path / "clone", tmp_path / "remote"
    params = losses_project(origin, {"gpt2": gpt2_dir, "llama": llama_dir})
    assert ran_stages(sh(origin, "dvc", "repro")) == ["losses@gpt2", "losses@llama"]
    sh(origin, "dvc", "remote", "add", "-d", "team", str(remote))
    sh(origin, "git", "add", "-A")
    sh(origin, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "losses of two models")
    sh(origin, "dvc", "push", "--run-cache")

    sh(tmp_path, "git", "clone", "-q", str(origin), str(clone))
    assert not (clone / "data" / "losses" / "gpt2.zarr").exists()  # git holds only the .dvc pointers and lock
    sh(clone, "dvc", "pull")
    assert (clone / "data" / "losses" / "gpt2.zarr").is_dir()
    assert "Data and pipelines are up to date" in sh(clone, "dvc", "status")
    assert ran_stages(sh(clone, "dvc", "repro")) == []

    build_tiny_model(clone / "models" / "gpt2-wide", "gpt2", "byte_bpe", seed=2, d_model=48)
    params["pool"]["gpt2-wide"] = pool_entry("gpt2-wide", "gpt2")
    (clone / "params.yaml").write_text(yaml.safe_dump(params))
    assert ran_stages(sh(clone, "dvc", "repro")) == ["losses@gpt2-wide"]
