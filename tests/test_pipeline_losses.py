"""The `losses` stage as DVC runs it: one stage per pool member, nothing recomputed that did not change."""

from __future__ import annotations


import numpy as np
import pytest
import yaml

from conftest import EVAL_TEXTS, pool_entry, ran_stages, sh, stage_project
from mmc.store import open_store

@pytest.mark.slow
def test_losses_stages_run_once_per_model(tmp_path, gpt2_dir, llama_dir):
    repo = tmp_path / "repo"
    params = stage_project(repo, gpt2_dir, llama_dir, ["losses"], {})

    assert ran_stages(sh(repo, "dvc", "repro")) == ["losses@gpt2", "losses@llama"]
    first = open_store(repo / "data" / "losses" / "gpt2.zarr")
    assert first.attrs["family"] == "gpt2" and first.sizes["sample"] == len(EVAL_TEXTS)
    assert np.all(first.nll.values > 0)

    assert ran_stages(sh(repo, "dvc", "repro")) == []

    params["pool"]["gpt2-wide"] = pool_entry("gpt2-wide", "gpt2")
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    assert ran_stages(sh(repo, "dvc", "repro")) == ["losses@gpt2-wide"]
    assert "up to date" in sh(repo, "dvc", "status")
