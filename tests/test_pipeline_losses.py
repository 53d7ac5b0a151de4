"""The `losses` stage as DVC runs it: one stage per pool member, nothing recomputed that did not change."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import EVAL_TEXTS, build_tiny_model, save_eval_set
from mmc.store import open_store

ROOT = Path(__file__).resolve().parents[1]


def sh(repo: Path, *command: str) -> str:
    result = subprocess.run(command, cwd=repo, capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def ran_stages(output: str) -> list[str]:
    return sorted(line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage"))


def pool_entry(name: str, family: str) -> dict:
    return {"model": f"models/{name}", "family": family, "revision": None, "dep": f"models/{name}"}


def stage_project(repo: Path, gpt2_dir: Path, llama_dir: Path, stage_names: list[str], params: dict) -> dict:
    """A git+DVC project with these stages of dvc.yaml, the tiny models gpt2 and llama in the pool, a third model
    on disk that is not in the pool yet (models/gpt2-wide), and an eval set. Returns its params: `params` plus
    `losses` (on the CPU, fp32) and `pool`."""
    repo.mkdir()
    shutil.copytree(ROOT / "stages", repo / "stages")
    shutil.copytree(ROOT / "mmc", repo / "mmc", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(gpt2_dir, repo / "models" / "gpt2")
    shutil.copytree(llama_dir, repo / "models" / "llama")
    build_tiny_model(repo / "models" / "gpt2-wide", "gpt2", "byte_bpe", seed=2, d_model=48)
    save_eval_set(repo / "data" / "corpus" / "eval", EVAL_TEXTS)
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {name: stages[name] for name in stage_names}}))
    defaults = yaml.safe_load((ROOT / "params.yaml").read_text())
    params = {"losses": {**defaults["losses"], "device": "cpu", "dtype": "float32"},
              "pool": {"gpt2": pool_entry("gpt2", "gpt2"), "llama": pool_entry("llama", "llama")}, **params}
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    sh(repo, "git", "init", "-q")
    sh(repo, "dvc", "init", "-q")
    sh(repo, "dvc", "config", "core.analytics", "false")
    return params


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
