"""The whole pipeline on the tiny preset, as a user runs it: `dvc repro` in a fresh copy of the project."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import transformers
import yaml

from conftest import ROOT, make_project, ran_stages, sh
from mmc import zoo
from mmc.corpus import load_samples
from mmc.store import open_store



@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory) -> tuple[Path, list[str], float]:
    """The tiny preset, reproduced once: (repo, stages that ran, seconds)."""
    repo = make_project(tmp_path_factory.mktemp("tiny") / "repo", ROOT / "presets" / "tiny.yaml")
    start = time.perf_counter()
    output = sh(repo, "dvc", "repro")
    return repo, ran_stages(output), time.perf_counter() - start


@pytest.mark.slow
def test_tiny_preset_runs_every_stage_within_budget(tiny_repo):
    repo, ran, seconds = tiny_repo
    print(f"tiny preset: dvc repro took {seconds:.1f} s")  # a figure for the notes, not a pass/fail target
    stages = sorted(line.split()[0] for line in sh(repo, "dvc", "stage", "list").splitlines() if line.strip())
    assert sorted(["check_params", *ran]) == stages
    assert ran_stages(sh(repo, "dvc", "repro")) == []


@pytest.mark.slow
def test_tiny_zoo_members_are_real_models_that_beat_unigram(tiny_repo):
    repo, _, _ = tiny_repo
    params = yaml.safe_load((repo / "params.yaml").read_text())
    train = list(load_samples(repo / "data" / "corpus" / "train")["text"])
    evaluation = load_samples(repo / "data" / "corpus" / "eval")
    corpus = json.loads((repo / "data" / "corpus" / "corpus.json").read_text())
    vocabularies: dict[str, set[int]] = {}
    for member, spec in params["zoo"]["members"].items():
        path = repo / "data" / "zoo" / member
        model = transformers.AutoModelForCausalLM.from_pretrained(path)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        assert model.config.model_type == spec["family"] and model.config.hidden_size == spec["d_model"]
        store = open_store(repo / "data" / "losses" / f"{member}.zarr")
        assert store.attrs["dataset_fingerprint"] == corpus["fingerprint"]
        assert store.attrs["n_params"] == sum(p.numel() for p in model.parameters())
        curve = (repo / "plots" / "zoo" / f"{member}.csv").read_text().splitlines()
        assert curve[0] == "step,tokens,loss,lr"
        unigram = zoo.unigram_nll(tokenizer, train, list(evaluation["text"]))
        assert float(store.nll.sum()) < 0.95 * unigram.sum(), member
        vocabularies.setdefault(spec["family"], set()).add(len(tokenizer))
    # at least three families, each with its own tokenizer (one vocabulary per family, no two alike)
    assert len(vocabularies) >= 3 and all(len(sizes) == 1 for sizes in vocabularies.values())
    assert len(set.union(*vocabularies.values())) == len(vocabularies)
    assert np.array_equal(np.sort(open_store(repo / "data" / "losses" / "gpt2-xs.zarr").sample.values),
                          np.sort(np.asarray(evaluation["sample_id"])))


@pytest.mark.slow
def test_tiny_report_figures_are_real_images(tiny_repo):
    import matplotlib.image

    repo, _, _ = tiny_repo
    figures = {"scaling.png", "kinds.png", "expected_k.png", "attribution.png", "merging.png", "merging_spread.png"}
    assert figures <= {path.name for path in (repo / "reports").glob("*.png")}
    for name in figures:
        image = matplotlib.image.imread(repo / "reports" / name)
        height, width = image.shape[:2]
        assert height >= 300 and width >= 500, name
        # drawn, not blank: many distinct colours, and a good share of the pixels are not background
        pixels = image[..., :3].reshape(-1, 3)
        assert len(np.unique(np.round(pixels, 2), axis=0)) > 50, name
        assert (pixels.min(axis=1) < 0.9).mean() > 0.02, name
    summary = (repo / "reports" / "README.md").read_text()
    for name in figures:
        assert f"({name})" in summary
    assert "## Planning" in summary and "| (b) stop adding experts" in summary


@pytest.mark.slow
def test_tiny_merging_law_and_plan(tiny_repo):
    repo, _, _ = tiny_repo
    law = json.loads((repo / "metrics" / "merge_law.json").read_text())
    params = yaml.safe_load((repo / "params.yaml").read_text())["merging"]
    assert law["expert_domains"] == params["domains"]
    assert set(law["fits"]) == set(params["methods"]) | {"joint"}
    store = open_store(repo / "data" / "merging" / f"{params['bases'][0]}.zarr")
    assert store.attrs["dataset_fingerprint"] and set(store.method.values) == {"base", *params["methods"]}
    # every method has a finite curve at exactly the k it is defined for; the plain average's merged in-domain loss
    # (mean over subsets and bases) falls from one expert to all of them. Other methods need not fall: with these
    # tiny experts della's curve rises (2.587 bits per byte at k = 1, 2.602 at k = 3 in CI)
    curves = pd.read_csv(repo / "plots" / "merging" / "curves.csv").groupby(["method", "k"]).in_domain_bpb_mean.mean()
    methods_k = json.loads(store.attrs["methods_k"])
    for method in params["methods"]:
        by_k = curves[method]
        assert list(by_k.index) == methods_k[method] and np.isfinite(by_k).all(), (method, by_k.to_dict())
    assert curves["average"].iloc[-1] < curves["average"].iloc[0], curves["average"].to_dict()
    # the default study's six methods (the tiny preset keeps them), each with its law's row in the report, per loss
    assert len(params["methods"]) >= 6
    summary = (repo / "reports" / "README.md").read_text()
    for method in params["methods"]:
        for target in ("in_domain", "cross_domain"):
            assert f"| {method} | {target} | " in summary, (method, target)
    plan = json.loads((repo / "metrics" / "plan.json").read_text())
    assert {"floor", "stop", "gain_fractions", "budget"} <= set(plan)


@pytest.mark.slow
def test_dvc_plots_show_renders_the_tiny_outputs(tiny_repo):
    repo, _, _ = tiny_repo
    output = sh(repo, "dvc", "plots", "show", "--out", "dvc_plots")
    page = repo / "dvc_plots" / "index.html"
    assert page.is_file() and "dvc_plots" in output
    html = page.read_text()
    titles = ["oracle loss against total parameters", "expected oracle loss of a random k-subset",
              "merged in-domain loss against k", "plots/zoo/gpt2-xs.csv", "plots/experts/neox-s-core.csv"]
    for title in titles:  # every plot drawn: its spec has data and a title
        assert f'"title": {{"text": "{title}"' in html, title
    assert "var spec = {};" not in html  # no plot left empty


@pytest.mark.slow
def test_tiny_zoo_replicate_feeds_the_matched_comparison_and_the_report(tiny_repo):
    repo, _, _ = tiny_repo
    pool = open_store(repo / "data" / "pool.zarr")
    assert set(pool.data.values) == {"own"}
    replicate, original = (open_store(repo / "data" / "losses" / f"{name}.zarr") for name in ("gpt2-xs-seed1", "gpt2-xs"))
    assert replicate.attrs["n_params"] == original.attrs["n_params"]  # one configuration, another seed
    assert not np.array_equal(replicate.nll.values, original.nll.values)
    laws = json.loads((repo / "metrics" / "laws.json").read_text())
    matched = laws["comparisons"]["heterogeneous_vs_homogeneous"]["matched"]
    own = matched["by_data"]["own"]
    assert list(matched["by_data"]) == ["own"] and own["replicated_cells"] == ["gpt2 size 0"]
    entry = own["by_k"]["2"]
    assert entry["size_sets"] == 1 and {"ci95_documents", "ci95_models", "ci95_documents_and_models"} <= set(entry)
    low, high = entry["ci95_documents"]
    assert low <= entry["heterogeneous_minus_homogeneous_gain_bpb"] <= high
    assert [r["members"] for r in matched["uncertainty"]["seed_replicates"]] == [["gpt2-xs", "gpt2-xs-seed1"]]
    report = (repo / "reports" / "README.md").read_text()
    assert "Heterogeneous minus homogeneous gain at matched k" in report
    attribution = pd.read_csv(repo / "data" / "oracle" / "attribution.csv").sort_values("n_params")
    largest = attribution.iloc[-1]
    assert f"is the best model on {largest.win_share:.1%} of the samples" in report
    assert f"| {largest.model} | {largest.family} | {largest.n_params:,.0f} |" in report
