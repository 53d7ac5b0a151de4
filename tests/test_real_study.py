"""The real study (presets/real-study.yaml) end to end on a few documents: the four real models installed from their
packages, the corpus of real texts, the collaboration study and the merging law on SmolLM2-135M. Skipped where the
models or texts are not installed (CI installs SmolLM2 alone); `docs/results/real-study.md` holds the full run."""

from __future__ import annotations

import json

import pytest
import xarray as xr
import yaml

from conftest import ROOT, make_project, ran_stages, sh
from mmc import MMCError
from mmc.catalog import install_models, list_models
from mmc.corpus import read_source
from mmc.losses import convert_gguf

pytestmark = pytest.mark.slow


def real_study_installed() -> bool:
    try:
        read_source("real")
    except MMCError:
        return False
    return all(row["packages"] == "installed" for row in list_models())


@pytest.mark.skipif(not real_study_installed(), reason="the real study's models and texts are not installed "
                                                      "(docs/how-to/real-models.md)")
def test_the_real_study_runs_offline_on_a_few_documents(tmp_path):
    repo = make_project(tmp_path / "repo", ROOT / "presets" / "real-study.yaml")
    install_models(out=repo / "models")
    convert_gguf(repo / "models" / "smollm2-135m.gguf", repo / "models" / "smollm2-135m")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["corpus"].update(max_eval_docs_per_domain=2, max_train_docs_per_domain=20)
    params["merging"].update(domains=["scripture", "drama", "news", "python_docs", "python_code"], expert_tokens=512,
                             methods={"average": {}, "ties": {"density": 0.2, "lambda": 1.0}}, max_subsets_per_k=1,
                             docs_per_domain=1, bootstrap=5)
    params["fit"]["bootstrap"] = params["routing"]["bootstrap"] = 5
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    output = sh(repo, "dvc", "repro")
    pool = ["gemma3-270m", "qwen-coder-0_5b", "qwen-coder-1_5b", "smollm2-135m"]
    experts = ["drama", "news", "python_code", "python_docs", "scripture"]
    assert ran_stages(output) == sorted(["assemble", "corpus", "fit", "fit_merge@law", "merge@smollm2-135m", "oracle",
                                         "plan@law", "report", "routing", *(f"losses@{slug}" for slug in pool),
                                         *(f"experts@smollm2-135m-{domain}" for domain in experts)])
    counts = {}
    for slug in pool:
        store = xr.open_zarr(repo / "data" / "losses" / f"{slug}.zarr")
        assert store.sizes["sample"] == 14 and store.attrs["tied_embeddings"] == "true"  # every one of them ties
        counts[slug] = store.attrs["n_params"]
    # the sizes the models define (their heads counted once): Qwen2.5-Coder-0.5B has about 494M, not the file's 630M
    assert 134e6 < counts["smollm2-135m"] < 135e6 and 267e6 < counts["gemma3-270m"] < 269e6
    assert 490e6 < counts["qwen-coder-0_5b"] < 500e6 and 1.5e9 < counts["qwen-coder-1_5b"] < 1.6e9
    law = json.loads((repo / "metrics" / "merge_law.json").read_text())
    assert law["law"].startswith("merging_one_base") and law["fits"]["average"]["in_domain"]["law"] == "merging_one_base"
    report = (repo / "reports" / "README.md").read_text()
    assert "**Per domain.**" in report and "| method | loss | c | a | b |" in report
