"""Team sharing through a DVC remote: losses are computed once, pulled by teammates, extended one model at a time."""

from __future__ import annotations

import pytest
import yaml

from conftest import pool_entry, ran_stages, sh, stage_project



@pytest.mark.slow
def test_push_clone_pull_then_one_new_model(tmp_path, gpt2_dir, llama_dir):
    origin, clone, remote = tmp_path / "origin", tmp_path / "clone", tmp_path / "remote"
    params = stage_project(origin, gpt2_dir, llama_dir, ["losses"], {})  # models/ are committed to git
    sh(origin, "dvc", "add", "-q", "data/corpus/eval")
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

    params["pool"]["gpt2-wide"] = pool_entry("gpt2-wide", "gpt2")
    (clone / "params.yaml").write_text(yaml.safe_dump(params))
    assert ran_stages(sh(clone, "dvc", "repro")) == ["losses@gpt2-wide"]

    # another teammate skips `dvc pull`: `dvc repro --pull` fetches what the pipeline needs instead of running it
    second = tmp_path / "second"
    sh(tmp_path, "git", "clone", "-q", str(origin), str(second))
    assert ran_stages(sh(second, "dvc", "repro", "--pull")) == []
    assert (second / "data" / "losses" / "llama.zarr").is_dir()
