"""The pool dataset, and the fit stage on a synthetic pool whose laws are known."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import zarr

from conftest import loss_store, synthetic_pool
from mmc import MMCError, collaboration, store
from mmc.cli import main
from mmc.collaboration import WILD_BOOTSTRAP, JointPoints, _joint_fit, design_cells, matched_heterogeneity
from mmc.laws import LAWS, fit_law
from mmc.oracle import run_oracle, winner_groups
from mmc.store import assemble_pool, loss_dataset, open_store, write_store

FAMILIES = ("alpha", "beta", "gamma")
FIT_KEYS = {"law", "formula", "params", "identified", "profile_ci95", "ci95", "r2_log", "rmse_log", "n_points", "n_bootstrap",
            "n_bootstrap_converged", "holdout"}


def reject_constant(name):
    raise AssertionError(f"laws.json holds {name}: not strict JSON")


def test_assemble_builds_the_model_by_sample_pool(tmp_path):
    a = loss_store(tmp_path / "a.zarr", [1.0, 2.0, 3.0, 4.0], "alpha", 100)
    b = loss_store(tmp_path / "b.zarr", [0.5, 2.5, 2.0, 5.0], "beta", 300)
    assert main(["assemble", "--out", str(tmp_path / "pool.zarr"), str(a), str(b)]) == 0
    pool = open_store(tmp_path / "pool.zarr")
    assert pool.nll.dims == ("model", "sample") and list(pool.model.values) == ["a", "b"]
    np.testing.assert_array_equal(pool.nll.sel(model="b").values, [0.5, 2.5, 2.0, 5.0])
    assert list(pool.family.values) == ["alpha", "beta"] and list(pool.n_params.values) == [100, 300]
    assert list(pool.n_params_nonembedding.values) == [50, 150]
    np.testing.assert_array_equal(pool.n_bytes.values, [10, 11, 12, 13])
    assert list(pool.domain.values) == ["a", "b", "a", "b"]
    assert pool.attrs["dataset_fingerprint"] == "fp-1"


def test_assembled_pool_is_stored_in_chunks_of_samples(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "SAMPLE_CHUNK", 4)
    stores = [loss_store(tmp_path / f"{name}.zarr", np.arange(10.0) + i, "alpha", 10 * (i + 1))
              for i, name in enumerate("abc")]
    write_store(assemble_pool(stores), tmp_path / "pool.zarr", "pool")
    pool = xr.open_zarr(tmp_path / "pool.zarr")  # anyone can open it with xarray alone
    assert pool.nll.encoding["chunks"] == (3, 4) and pool.nll.chunks == ((3,), (4, 4, 2))
    np.testing.assert_array_equal(pool.nll.sel(model="c").values, np.arange(10.0) + 2)


def seven_loss_stores(root, n_samples=300):
    """Seven loss stores as `mmc losses` writes them (`loss_dataset`, `write_store`): four families, n_tokens of two
    integer widths."""
    rng = np.random.default_rng(5)
    n_bytes = rng.integers(20, 400, n_samples)
    coords = {"sample": np.array([f"doc{i}" for i in range(n_samples)], dtype=object),
              "domain": ("sample", np.array(["code", "prose", "wiki"], dtype=object)[np.arange(n_samples) % 3])}
    paths = []
    for i in range(7):
        attrs = {"model": f"org/m{i}", "family": "abcd"[i % 4], "data": f"mix-{i % 2}", "n_params": 1000 * (i + 1),
                 "n_params_nonembedding": 900 * (i + 1), "dataset_fingerprint": "fp-7"}
        n_tokens = (n_bytes // 3 + i).astype(np.int32 if i % 2 else np.int64)
        paths.append(root / f"m{i}.zarr")
        write_store(loss_dataset(n_bytes * rng.lognormal(0, 0.3, n_samples), n_tokens, n_bytes, coords, attrs),
                    paths[-1], "loss store")
    return paths


def in_memory_pool(paths):
    """The pool as `assemble_pool` built it before issue 26: every store read whole, then concatenated."""
    opened = [open_store(path) for path in paths]
    first = opened[0]
    return xr.Dataset(
        {var: xr.concat([dataset[var].reset_coords(drop=True) for dataset in opened], dim="model")
         for var in ("nll", "n_tokens")},
        coords={"model": [path.name.removesuffix(".zarr") for path in paths],
                "family": ("model", [dataset.attrs["family"] for dataset in opened]),
                "data": ("model", [dataset.attrs["data"] for dataset in opened]),
                "n_params": ("model", [dataset.attrs["n_params"] for dataset in opened]),
                "n_params_nonembedding": ("model", [dataset.attrs["n_params_nonembedding"] for dataset in opened]),
                "source": ("model", [dataset.attrs["model"] for dataset in opened]),
                "domain": first.domain, "n_bytes": first.n_bytes},
        attrs={"dataset_fingerprint": "fp-7"})


def test_assemble_writes_region_by_region_what_the_in_memory_pool_holds(tmp_path, monkeypatch):
    paths = seven_loss_stores(tmp_path)
    expected = in_memory_pool(paths)
    monkeypatch.setattr(store, "SAMPLE_CHUNK", 128)
    assert main(["assemble", "--out", str(tmp_path / "whole.zarr"), *map(str, paths)]) == 0  # one chunk of models
    monkeypatch.setattr(store, "MODEL_CHUNK", 3)
    assert main(["assemble", "--out", str(tmp_path / "pool.zarr"), *map(str, paths)]) == 0  # 3 x 3 regions
    pool = open_store(tmp_path / "pool.zarr")
    xr.testing.assert_identical(pool, expected)
    assert pool.n_tokens.dtype == np.int64 and pool.nll.dtype == np.float64
    xr.testing.assert_identical(open_store(tmp_path / "whole.zarr"), expected)
    # every variable in the chunks of nll along its dimensions: xarray refuses inconsistent ones
    lazy = xr.open_zarr(tmp_path / "pool.zarr")
    assert dict(lazy.chunksizes) == {"model": (3, 3, 1), "sample": (128, 128, 44)}
    assert lazy.nll.encoding["chunks"] == (3, 128) and lazy.family.encoding["chunks"] == (3,)
    # readers of blocks of samples across all models read chunks of models alike
    run = {name: main(["oracle", "--pool", str(tmp_path / name), "--out", str(tmp_path / f"oracle-{name}"),
                       "--max-subsets-per-k", "10", "--sample-chunk", "100"]) for name in ("pool.zarr", "whole.zarr")}
    assert run == {"pool.zarr": 0, "whole.zarr": 0}
    for name in ("ensembles", "attribution", "expected_curves"):
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "oracle-pool.zarr" / f"{name}.csv"),
                                      pd.read_csv(tmp_path / "oracle-whole.zarr" / f"{name}.csv"), check_exact=True)


def test_assemble_checks_every_store_before_writing_and_a_crash_leaves_the_old_pool(tmp_path, monkeypatch, capsys):
    paths = seven_loss_stores(tmp_path)
    monkeypatch.setattr(store, "MODEL_CHUNK", 3)
    monkeypatch.setattr(store, "SAMPLE_CHUNK", 128)
    out = tmp_path / "pool.zarr"
    assert main(["assemble", "--out", str(out), *map(str, paths[:2])]) == 0
    before = {path.relative_to(out): path.read_bytes() for path in out.rglob("*") if path.is_file()}
    shuffled = open_store(paths[5]).isel(sample=np.r_[1, 0, 2:300])
    write_store(shuffled, tmp_path / "late.zarr", "loss store")
    assert main(["assemble", "--out", str(out), *map(str, paths), str(tmp_path / "late.zarr")]) == 2
    assert capsys.readouterr().err.strip() == ("mmc assemble: error: loss stores m0 and late hold different samples "
                                              "despite one fingerprint (the same ids in another order)")

    writes = []

    def crash(array, selection, value):  # the machine dies while the losses are written, after two regions
        if value.ndim == 2:
            writes.append(selection)
            if len(writes) == 5:
                raise KeyboardInterrupt
        original(array, selection, value)

    original = zarr.Array.__setitem__
    monkeypatch.setattr(zarr.Array, "__setitem__", crash)
    with pytest.raises(KeyboardInterrupt):
        main(["assemble", "--out", str(out), *map(str, paths)])
    monkeypatch.undo()
    assert len(writes) == 5
    assert {path.relative_to(out): path.read_bytes() for path in out.rglob("*") if path.is_file()} == before
    assert sorted(path.name for path in tmp_path.iterdir() if "pool" in path.name) == ["pool.zarr"]


def test_assemble_refuses_different_eval_sets_naming_the_models(tmp_path, capsys):
    stores = [loss_store(tmp_path / "a.zarr", [1.0, 2.0], "alpha", 1),
              loss_store(tmp_path / "b.zarr", [1.0, 2.0], "alpha", 2),
              loss_store(tmp_path / "c.zarr", [1.0, 2.0], "beta", 3, fingerprint="fp-2")]
    assert main(["assemble", "--stage", "assemble", "--out", str(tmp_path / "pool.zarr"), *map(str, stores)]) == 2
    assert capsys.readouterr().err.strip() == ("mmc assemble: error: loss stores scored different eval sets: "
                                              "a, b scored fp-1; c scored fp-2; rerun their losses stages on one dataset")
    assert not (tmp_path / "pool.zarr").exists()
    loss_store(tmp_path / "d.zarr", [1.0, 2.0], "beta", 3, samples=["x", "y"])
    with pytest.raises(MMCError, match="a and d hold different samples"):
        assemble_pool({"a": tmp_path / "a.zarr", "d": tmp_path / "d.zarr"})


def test_assemble_refuses_repeated_names_and_other_samples_in_one_line(tmp_path, capsys):
    a = loss_store(tmp_path / "a.zarr", [1.0, 2.0], "alpha", 1)
    again = loss_store(tmp_path / "other" / "a.zarr", [3.0, 4.0], "beta", 2)
    shuffled = loss_store(tmp_path / "s.zarr", [1.0, 2.0], "beta", 2, samples=["s1", "s0"])
    out = tmp_path / "pool.zarr"
    for stores, needle in [((a, again), "model names must be unique in a pool: a given more than once"),
                           ((a, shuffled), "loss stores a and s hold different samples despite one fingerprint "
                                           "(the same ids in another order)")]:
        assert main(["assemble", "--stage", "assemble", "--out", str(out), *map(str, stores)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("mmc assemble: error: ") and needle in err, err
        assert not out.exists()


def test_fit_writes_laws_with_intervals_and_the_papers_comparisons(tmp_path):
    pool = synthetic_pool(tmp_path / "pool.zarr")
    assert main(["oracle", "--pool", str(pool), "--out", str(tmp_path / "oracle"), "--max-subsets-per-k", "30"]) == 0
    assert main(["fit", "--pool", str(pool), "--oracle", str(tmp_path / "oracle"), "--out", str(tmp_path / "laws.json"),
                 "--plots", str(tmp_path / "plots"), "--bootstrap", "40"]) == 0
    laws = json.loads((tmp_path / "laws.json").read_text(), parse_constant=reject_constant)
    assert set(laws) == {"loss", "law", "x", "bootstrap", "holdout", "member_jackknife", "intervals", "fits",
                         "comparisons"}
    assert laws["member_jackknife"]["members"] == 15 and "document bootstrap only" in laws["bootstrap"]["bands"]
    assert "bits per byte" in laws["loss"] and laws["bootstrap"]["resamples"] == 40
    assert {"single/pareto", "single/pooled", "single/alpha", "multi/pareto", "multi/heterogeneous",
            "multi/homogeneous/beta"} <= set(laws["fits"])
    for name, fit in laws["fits"].items():
        if name.endswith("/cross_fitted"):  # chosen on one half of the samples, scored on the other: no resampling
            assert fit["n_bootstrap"] == 0 and fit["ci95"] is None, name
            continue
        assert fit["n_bootstrap"] == 40 and fit["n_bootstrap_converged"] >= 36, name
        assert set(fit) >= FIT_KEYS, name
        if name.split("/")[-1] in FAMILIES:  # five models: leaving out one of them leaves too few measurements;
            # the other 10 drops do not touch the series, so the members' variation is unmeasured (not zero): no
            # combined interval, and the note says why wherever a parameter is identified
            assert fit["jackknife"] == {"members": 15, "refits": 10}, name
            assert set(fit["ci95"].values()) == set(fit["ci95_members"].values()) == {None}, name
            assert ("members: no usable jackknife" in (fit["ci95_note"] or "")) == any(fit["identified"].values()), name
            continue
        assert fit["jackknife"] == {"members": 15, "refits": 15}, name  # 14 models still fit the series
        assert fit["ci95_note"] is None, name
        for param, interval in fit["ci95"].items():
            assert interval is None or interval[1] > interval[0], (name, param)  # never a zero-width interval
            assert (interval is None) == (not fit["identified"][param]), (name, param)
            if interval is not None:  # the combined interval holds the members' alone (same centre, larger SE)
                low, high = fit["ci95_members"][param]
                assert interval[0] <= low <= fit["params"][param] <= high <= interval[1], (name, param)
                assert fit["ci95_documents"][param] is not None, (name, param)
        assert "max_abs_relative_error" in fit["holdout"] or "skipped" in fit["holdout"]
    for name in ("single/pareto", "multi/pareto", "multi/homogeneous/alpha"):
        assert laws["fits"][name]["r2_log"] > 0.9
    assert laws["fits"]["multi/heterogeneous"]["r2_log"] > 0.8  # every heterogeneous ensemble: a cloud per budget
    for name in ("multi/pareto", "multi/heterogeneous", "multi/homogeneous/alpha"):
        assert laws["fits"][name]["holdout"]["max_abs_relative_error"] < 0.1
    # five sizes: holding out the largest leaves four points, too few for three parameters + 2
    assert laws["fits"]["single/pareto"]["holdout"] == {
        "skipped": "4 points left to fit 3 parameters (at least 5 needed)"}
    # the best single model at each size is family alpha's: the single-model frontier recovers its law
    assert laws["fits"]["single/pareto"]["params"] == laws["fits"]["single/alpha"]["params"]
    # a family's single-model law: its floor is its own (1.2 + 0.4f/3, scaled by its sample mix), alpha near 0.3
    alpha = laws["fits"]["single/alpha"]["params"]
    assert 0.15 < alpha["alpha"] < 0.6 and 0.8 < alpha["E"] < 1.3
    comparisons = laws["comparisons"]
    assert set(comparisons) == {"floor", "heterogeneous_vs_homogeneous", "matched_budgets", "matched_frontiers",
                                "joint_fit", "with_nonembedding_parameters"}
    assert set(comparisons["floor"]) >= {"single", "single_ci95", "multi", "multi_ci95", "multi_minus_single"}
    assert set(comparisons["heterogeneous_vs_homogeneous"]) >= {
        "alpha_heterogeneous", "alpha_heterogeneous_ci95", "alpha_homogeneous", "alpha_homogeneous_not_determined",
        "mean_gain_bpb", "mean_gain_bpb_by_k", "matched"}
    kinds = comparisons["heterogeneous_vs_homogeneous"]
    homogeneous = {name.rsplit("/", 1)[1]: fit for name, fit in laws["fits"].items()
                   if name.startswith("multi/homogeneous/") and "params" in fit}
    assert homogeneous  # an exponent is averaged only where the data determine it
    assert set(kinds["alpha_homogeneous"]) == {family for family, fit in homogeneous.items() if fit["identified"]["alpha"]}
    assert set(kinds["alpha_homogeneous_not_determined"]) == set(homogeneous) - set(kinds["alpha_homogeneous"])
    matched = comparisons["heterogeneous_vs_homogeneous"]["matched"]["by_data"]["unlabelled"]
    assert sorted(matched["by_k"]) == ["2", "3", "4", "5"] and matched["replicated_cells"] == []
    for entry in matched["by_k"].values():  # each family best on its own third: mixing families gains
        low, high = entry["ci95_documents"]
        assert 0.03 < low < entry["heterogeneous_minus_homogeneous_gain_bpb"] < high
        assert "ci95_models" not in entry  # no seeds: model variation unmeasured, and said so
    assert "not in any interval" in comparisons["heterogeneous_vs_homogeneous"]["matched"]["uncertainty"]["note"]
    gains = comparisons["heterogeneous_vs_homogeneous"]["mean_gain_bpb"]
    assert gains["heterogeneous"] > 0.05 and gains["heterogeneous"] > 5 * gains["homogeneous"] >= 0
    at_pool = comparisons["floor"]["predicted_bpb_at"]["whole_pool"]
    assert at_pool["multi/pareto"] < at_pool["single/pareto"]
    largest_single = comparisons["floor"]["predicted_bpb_at"]["largest_single"]["total_params"]
    # the whole pool lies beyond every single model: the single-model law extrapolates there, by that factor
    assert at_pool["extrapolation"]["single/pareto"] == pytest.approx(at_pool["total_params"] / largest_single)
    assert "single/pareto" not in comparisons["floor"]["predicted_bpb_at"]["largest_single"]["extrapolation"]
    low, high = at_pool["ci95"]["multi/pareto"]
    assert low <= at_pool["multi/pareto"] <= high
    assert "alpha_difference_note" in kinds  # a difference with an interval, or why the mean is not a comparison
    points = (tmp_path / "plots" / "points.csv").read_text().splitlines()
    assert points[0] == "series,total_params,bpb" and len(points) > 12
    curves = (tmp_path / "plots" / "curves.csv").read_text().splitlines()
    assert curves[0] == "series,total_params,predicted_bpb,lower_bpb,upper_bpb"


def test_fit_with_too_few_points_everywhere_says_so_for_every_series_and_fits_no_law(tmp_path, capsys):
    """Four models, as the real study: their 15 ensembles are subsets of four models, not independent points, and no
    series may fit the power law's 3 parameters (it needs 5 models): a pool of a few real models is a study too,
    whose report gives the data and says that no law is determined."""
    rng = np.random.default_rng(1)
    pool = xr.Dataset({"nll": (("model", "sample"), rng.gamma(5.0, 20.0, (4, 40)))},
                      coords={"model": ["a", "b", "c", "d"], "family": ("model", ["x", "x", "y", "z"]),
                              "n_params": ("model", [10, 40, 20, 80]), "n_params_nonembedding": ("model", [5, 20, 10, 40]),
                              "n_bytes": ("sample", rng.integers(50, 90, 40))})
    write_store(pool, tmp_path / "pool.zarr", "pool")
    assert main(["oracle", "--pool", str(tmp_path / "pool.zarr"), "--out", str(tmp_path / "oracle")]) == 0
    capsys.readouterr()
    with pytest.warns(UserWarning, match="no series has enough points to fit"):
        assert main(["fit", "--pool", str(tmp_path / "pool.zarr"), "--oracle", str(tmp_path / "oracle"),
                     "--out", str(tmp_path / "laws.json"), "--plots", str(tmp_path / "plots"), "--bootstrap",
                     "10"]) == 0
    assert "0 of 12 laws fitted" in capsys.readouterr().out
    fits = json.loads((tmp_path / "laws.json").read_text())["fits"]
    assert not [series for series, fit in fits.items() if "params" in fit]
    reason = ("a pool of 4 models: its 15 ensembles are subsets of those 4, not independent points, and a law with 3 "
              "parameters needs at least 5 models")
    assert {fit["skipped"] for fit in fits.values()} == {reason} and "multi/pareto" in fits
    assert (tmp_path / "plots" / "curves.csv").read_text().splitlines()[1:] == []


def test_fit_skips_the_series_with_too_few_points(tmp_path):
    """Seven models: the pooled single-model series fits, a family of two is skipped with why; a tiny sample
    set makes some resamples draw nothing: they are left out of the intervals and counted."""
    rng = np.random.default_rng(1)
    pool = xr.Dataset({"nll": (("model", "sample"), rng.gamma(5.0, 20.0, (7, 4)))},
                      coords={"model": list("abcdefg"), "family": ("model", ["x"] * 5 + ["y"] * 2),
                              "n_params": ("model", [10, 20, 40, 80, 160, 15, 30]),
                              "n_params_nonembedding": ("model", [5, 10, 20, 40, 80, 7, 15]),
                              "n_bytes": ("sample", [50, 60, 70, 80])})
    write_store(pool, tmp_path / "pool.zarr", "pool")
    assert main(["oracle", "--pool", str(tmp_path / "pool.zarr"), "--out", str(tmp_path / "oracle")]) == 0
    assert main(["fit", "--pool", str(tmp_path / "pool.zarr"), "--oracle", str(tmp_path / "oracle"),
                 "--out", str(tmp_path / "laws.json"), "--plots", str(tmp_path / "plots"), "--bootstrap", "60"]) == 0
    laws = json.loads((tmp_path / "laws.json").read_text(), parse_constant=reject_constant)
    assert laws["fits"]["single/y"] == {"skipped": "law power: 2 points cannot determine 3 parameters (a fit needs "
                                                   "at least 5: parameters + 2)"}
    pooled = laws["fits"]["single/pooled"]
    assert pooled["n_points"] == 7 and pooled["n_bootstrap"] == 60 and pooled["holdout"]["held_out"] == [160.0]
    assert pooled["n_bootstrap_converged"] <= 60


def test_the_joint_fit_tells_a_shared_floor_from_separate_exponents():
    """Frontiers with one floor and different exponents: separate floors are not supported, separate exponents
    are (the calibrated p at its smallest, 1 / (draws + 1)); with different floors, the shared-floor fit is
    rejected (at 5%; the single bootstrap's p at its smallest)."""
    rng = np.random.default_rng(0)
    x = np.geomspace(1e4, 1e7, 8)

    def frontier(e, a, alpha):
        return x, (e + a * x ** -alpha) * rng.lognormal(0, 0.002, len(x))

    same_floor = _joint_fit(JointPoints.of(frontier(1.5, 40, 0.3), frontier(1.5, 40, 0.45)))
    assert same_floor["separate_floors_supported"]["p_value"] > 0.05
    assert same_floor["separate_exponents_supported"]["p_value"] == 1 / (WILD_BOOTSTRAP + 1)
    assert same_floor["separate_exponents_supported"]["p_value_uncalibrated"] < 1e-3
    assert same_floor["shared_floor"]["E"] == pytest.approx(1.5, rel=0.02)
    assert same_floor["shared_floor"]["alpha_multi_minus_single"] == pytest.approx(0.15, abs=0.02)
    low, high = same_floor["shared_floor"]["alpha_multi_minus_single_ci95_wild"]
    assert 0 < low < 0.15 < high
    assert same_floor["reading"].startswith("the calibrated test rejects one exponent")
    other_floor = _joint_fit(JointPoints.of(frontier(1.5, 40, 0.3), frontier(1.0, 40, 0.3)))
    # the single bootstrap's p at its smallest; the fast double bootstrap's above it but rejecting: 16 points in
    # blocks of 3 give 2^6 sign patterns, and the draws whose signs are mostly the data's own reproduce its misfit
    assert other_floor["separate_floors_supported"]["p_value_single_bootstrap"] == 1 / (WILD_BOOTSTRAP + 1)
    assert other_floor["separate_floors_supported"]["p_value"] <= 0.05


def test_fit_reports_matched_budgets_the_joint_test_and_cross_fitted_frontiers(tmp_path):
    pool = synthetic_pool(tmp_path / "pool.zarr")
    assert main(["oracle", "--pool", str(pool), "--out", str(tmp_path / "oracle"), "--max-subsets-per-k", "30"]) == 0
    assert main(["fit", "--pool", str(pool), "--oracle", str(tmp_path / "oracle"), "--out", str(tmp_path / "l.json"),
                 "--plots", str(tmp_path / "plots"), "--bootstrap", "30", "--x", "nonembedding"]) == 0
    laws = json.loads((tmp_path / "l.json").read_text(), parse_constant=reject_constant)
    assert laws["x"].startswith("total_params_nonembedding")
    matched = laws["comparisons"]["matched_budgets"]
    assert len(matched["total_params"]) == 5
    for block in ("data", "law"):
        assert len(matched[block]["multi_minus_single_ci95"]) == 5
        for low, high in matched[block]["multi_minus_single_ci95"]:
            assert low <= high
    assert len(matched["law"]["agrees_with_data"]) == 5
    frontiers = laws["comparisons"]["matched_frontiers"]
    assert frontiers["multi_lower"] + frontiers["equal"] + frontiers["multi_higher"] == len(frontiers["total_params"])
    joint = laws["comparisons"]["joint_fit"]
    assert 0 < joint["separate_floors_supported"]["p_value"] <= 1 and joint["shared_floor"]["n_bootstrap"] == 30
    for name in ("E", "alpha_single", "alpha_multi", "alpha_multi_minus_single"):  # every shared-floor figure
        low, high = joint["shared_floor"][f"{name}_ci95"]
        assert low <= high, name
    assert {"single/pareto/cross_fitted", "multi/pareto/cross_fitted"} <= set(laws["fits"])
    assert "matched_budgets" in laws["comparisons"]["with_total_parameters"]


def factorial_pool(n_samples: int = 40) -> xr.Dataset:
    """Two data labels x two families x two sizes, one cell with a second seed; every sample is 10 bytes.

    Label "own": family a is good on the first half of the samples, b on the second (nll c on its half, 2c on the
    other; c = 1.5 for size 0, 1 for size 1). Within a family the larger model wins everywhere: homogeneous
    ensembles gain 0. {a0, b1} and {a1, b0}: oracle (1.5 + 1)/2 = 1.25 per sample, best member (2 + 1)/2 = 1.5,
    gain 0.25 nats per sample. Label "mix": both families have a's pattern, so mixing them gains nothing either.
    The replicate a1' of own/a/size 1 is worse on every sample (c = 1.2): {a0, a1'} still gains 0, and
    {a1', b0} gains 0.45 (oracle (1.2 + 1.5)/2 = 1.35, best member a1' (1.2 + 2.4)/2 = 1.8)."""
    first = np.arange(n_samples) < n_samples // 2
    rows, names, families, labels, sizes = [], [], [], [], []
    for label, family, size, good_first, scale, name in [
            ("own", "a", 100, True, 1.5, "own-a0"), ("own", "a", 400, True, 1.0, "own-a1"),
            ("own", "a", 400, True, 1.2, "own-a1-seed1"), ("own", "b", 110, False, 1.5, "own-b0"),
            ("own", "b", 420, False, 1.0, "own-b1"), ("mix", "a", 100, True, 1.5, "mix-a0"),
            ("mix", "a", 400, True, 1.0, "mix-a1"), ("mix", "b", 110, True, 1.5, "mix-b0"),
            ("mix", "b", 420, True, 1.0, "mix-b1")]:
        rows.append(scale * np.where(first == good_first, 1.0, 2.0))
        names.append(name), families.append(family), labels.append(label), sizes.append(size)
    return xr.Dataset({"nll": (("model", "sample"), np.array(rows))},
                      coords={"model": names, "family": ("model", families), "data": ("model", labels),
                              "n_params": ("model", sizes), "n_params_nonembedding": ("model", sizes),
                              "n_bytes": ("sample", np.full(n_samples, 10)),
                              "sample": [f"s{i}" for i in range(n_samples)]})


def test_design_cells_name_label_family_size_and_replicates():
    cells = design_cells(factorial_pool())
    assert cells.size_rank.tolist() == [0, 1, 1, 0, 1, 0, 1, 0, 1]  # ranks within label and family
    assert cells.groupby(["data", "family", "size_rank"]).size().max() == 2  # own/a/1 has two seeds


def test_matched_heterogeneity_gives_the_derived_gains_with_intervals_over_documents_and_models():
    bits = 1 / (10 * np.log(2))  # nats per sample -> bits per byte
    result = matched_heterogeneity(factorial_pool(), 400, seed=3)
    own, mix = result["by_data"]["own"], result["by_data"]["mix"]
    assert own["families"] == ["a", "b"] and own["replicated_cells"] == ["a size 1"] and mix["replicated_cells"] == []
    # own: heterogeneous {a0, b1} and {a1, b0} (seed 0) both gain 0.25; homogeneous ensembles gain 0
    entry = own["by_k"][2]
    assert entry["size_sets"] == 1 and entry["homogeneous_gain_bpb"] == 0
    np.testing.assert_allclose(entry["heterogeneous_minus_homogeneous_gain_bpb"], 0.25 * bits, rtol=1e-12)
    # totals: heterogeneous 100 + 420 and 400 + 110, homogeneous 100 + 400 and 110 + 420 (geometric means)
    np.testing.assert_allclose(entry["total_params_ratio"], np.sqrt(520 * 510 / (500 * 530)), rtol=1e-12)
    # over models: the seed of own/a/1 is either 0 (gains 0.25 and 0.25) or 1 (0.25 and 0.45), nothing else
    np.testing.assert_allclose(entry["ci95_models"], [0.25 * bits, 0.35 * bits], rtol=1e-12)
    # over documents: with a share p of first-half samples, {a0, b1} gains 0.5p and {a1, b0} 0.5(1 - p): their
    # mean is 0.25 on every resample
    np.testing.assert_allclose(entry["ci95_documents"], [0.25 * bits, 0.25 * bits], rtol=1e-12)
    # both: seed 1 with p varying, mean gain 0.45 - 0.2p: the interval widens above the models' one
    low, high = entry["ci95_documents_and_models"]
    np.testing.assert_allclose(low, 0.25 * bits, rtol=1e-12)
    assert 0.36 * bits < high < 0.4 * bits
    # mix: both families alike, so heterogeneity gains nothing on any resample
    assert mix["by_k"][2]["heterogeneous_minus_homogeneous_gain_bpb"] == 0
    assert mix["by_k"][2]["ci95_documents"] == [0, 0] and "ci95_models" not in mix["by_k"][2]
    uncertainty = result["uncertainty"]
    assert uncertainty["seed_replicates"][0]["members"] == ["own-a1", "own-a1-seed1"]
    np.testing.assert_allclose(uncertainty["seed_replicates"][0]["spread_bpb"], 0.2 * 1.5 * bits, rtol=1e-12)
    assert uncertainty["dominant"] in ("documents", "models")


def test_matched_heterogeneity_needs_two_families_with_common_sizes():
    pool = factorial_pool()
    assert "skipped" in matched_heterogeneity(pool.isel(model=[0, 1]), 10, seed=0)  # family a alone
    # a label with one family has nothing to mix: only the other label is compared
    assert list(matched_heterogeneity(pool.isel(model=[0, 1, 5, 6, 7, 8]), 10, seed=0)["by_data"]) == ["mix"]


def test_matched_heterogeneity_leaves_out_the_k_with_too_many_ensembles(monkeypatch):
    monkeypatch.setattr(collaboration, "MAX_MATCHED_PER_K", 3)  # k = 2 of 2 families x 2 sizes: 4 ensembles
    assert "at most 3 ensembles at k = 2" in matched_heterogeneity(factorial_pool(), 10, seed=0)["skipped"]


def six_member_table():
    """The oracle's table of a pool of two families x three sizes, every ensemble enumerated (63)."""
    rng = np.random.default_rng(5)
    n_samples, home = 300, np.arange(300) % 2
    n_bytes = rng.integers(200, 2000, n_samples)
    names, families, sizes, rows = [], [], [], []
    for f, family in enumerate(FAMILIES[:2]):
        for size in (1e4, 1e5, 1e6):
            bits = (1.2 + 0.3 * f + 30.0 * size ** -0.3) * np.where(home == f, 0.8, 1.1) * rng.lognormal(0, 0.05, n_samples)
            names.append(f"{family}-{int(size)}"), families.append(family), sizes.append(int(size))
            rows.append(bits * n_bytes * np.log(2))
    pool = xr.Dataset({"nll": (("model", "sample"), np.array(rows)),
                       "n_tokens": (("model", "sample"), np.ones((len(rows), n_samples), int))},
                      coords={"model": names, "family": ("model", families), "n_params": ("model", sizes),
                              "n_params_nonembedding": ("model", sizes), "n_bytes": ("sample", n_bytes),
                              "sample": [f"s{i}" for i in range(n_samples)]})
    return run_oracle(pool, 1000, 0)["ensembles"]


def test_the_member_jackknife_is_the_delete_one_jackknife_over_re_enumerated_pools():
    """Each member left out: every ensemble holding it removed, the series chosen again on what is left, the law
    refitted; the jackknife's refits are those fits, and the jackknife SE on log E, log A and alpha of its refits,
    by hand with loops, gives the members' interval in the metrics to 1e-12."""
    table = six_member_table()
    assert len(table) == 63
    params, bpb, groups = table.total_params.to_numpy(float), table.oracle_bpb.to_numpy(float), winner_groups(table)
    members = [names[0] for names, k in zip(table.members, table.k) if k == 1]
    by_hand: dict[str, list[list[float]]] = {}
    determined: dict[str, list[list[bool]]] = {}  # which parameters each drop's data determine (profile intervals)
    for left_out in members:
        kept = np.array([left_out not in names for names in table.members])
        positions = np.flatnonzero(kept)
        for name, rows in collaboration._series_points(table[kept]).items():
            chosen = positions[rows]
            try:
                fit = fit_law("power", {"x": params[chosen]}, bpb[chosen], groups=groups[chosen])
            except MMCError:
                continue
            by_hand.setdefault(name, []).append([math.log(fit.params["E"]), math.log(fit.params["A"]),
                                                 fit.params["alpha"]])
            determined.setdefault(name, []).append(list(fit.identified.values()))
    metrics, _, _ = collaboration.collaboration_laws(table)
    fitted = [name for name, fit in metrics["fits"].items() if "params" in fit and "jackknife" in fit]
    assert fitted and set(fitted) <= set(by_hand)
    refits = collaboration.member_jackknife(table, params, bpb, groups, fitted)
    for name in fitted:
        rows = by_hand[name]
        n = len(rows)
        assert metrics["fits"][name]["jackknife"] == {"members": 6, "refits": n}
        fit = metrics["fits"][name]
        # The drops are refitted together from the fit on all members (`refit_subsets`), not each by fit_law's
        # five-start search: both reach the optimum (objectives within 1e-8, relative; now one path, now the other
        # the lower), to 1e-4 on every parameter the drop's data determine. One they do not determine (E → 0 here)
        # lies along a valley flat to rounding, where an optimiser stops depends on its path, not on the data.
        mask = np.array(determined[name])
        np.testing.assert_allclose(refits[name][mask], np.array(rows)[mask], rtol=1e-4, atol=0)
        for j, param in enumerate(("E", "A", "alpha")):
            values = refits[name][:, j].tolist()
            mean = sum(values) / n
            se = math.sqrt((n - 1) / n * sum((value - mean) ** 2 for value in values))
            if not fit["identified"][param] or se == 0:
                assert fit["ci95_members"][param] is None, (name, param)
                continue
            estimate = math.log(fit["params"][param]) if param != "alpha" else fit["params"][param]
            low, high = estimate - 1.96 * se, estimate + 1.96 * se
            expected = [math.exp(low), math.exp(high)] if param != "alpha" else [max(low, 0.0), min(high, 3.0)]
            assert fit["ci95_members"][param] == pytest.approx(expected, rel=1e-12), (name, param)
            assert fit["ci95"][param] is None and fit["ci95_documents"] is None  # no bootstrap ran
            assert fit["ci95_note"].startswith("documents: no document bootstrap ran"), name


def test_the_series_fitted_side_by_side_are_the_series_fitted_one_after_another(monkeypatch):
    """`collaboration_laws` fits the series, and refits them for the member jackknife, on THREADS threads
    (`mmc.in_threads`): the metrics, points and curves are those of one thread, to the bit."""
    import mmc

    table = six_member_table()
    replicates = np.random.default_rng(3).normal(1.0, 0.01, (len(table), 40)) * table.oracle_bpb.to_numpy()[:, None]
    results = {}
    for threads in (1, 3):
        monkeypatch.setattr(mmc, "THREADS", threads)
        results[threads] = collaboration.collaboration_laws(table, replicates)
    assert json.dumps(results[1][0], sort_keys=True) == json.dumps(results[3][0], sort_keys=True)
    for one, three in zip(results[1][1:], results[3][1:]):
        pd.testing.assert_frame_equal(one, three, check_exact=True)
    assert sum("jackknife" in fit for fit in results[1][0]["fits"].values()) >= 3  # several series, each refitted


def test_the_interval_shown_combines_documents_and_members_on_the_fitted_scale():
    x = np.geomspace(1e4, 1e8, 12)
    truth = {"E": 1.5, "A": 40.0, "alpha": 0.3}
    rng = np.random.default_rng(2)
    loss = LAWS["power"].predict(truth, x=x) * rng.lognormal(0, 0.01, len(x))
    replicates = loss * rng.lognormal(0, 0.01, (60, len(x)))
    fit = fit_law("power", {"x": x}, loss, replicates=replicates)
    assert all(fit.identified.values())
    members_se = np.array([0.05, 0.2, 0.01])
    intervals = collaboration.combined_intervals(fit, members_se)
    assert intervals["ci95_note"] is None
    for j, (param, scale) in enumerate((("E", "log"), ("A", "log"), ("alpha", "natural"))):
        draws = fit.bootstrap_params[:, j]
        to, back = (np.log, np.exp) if scale == "log" else (float, float)
        low, high = np.percentile([to(d) for d in draws], [2.5, 97.5])
        documents_se = (high - low) / 3.92
        half = 1.96 * math.sqrt(documents_se**2 + members_se[j] ** 2)
        estimate = to(fit.params[param])
        assert intervals["ci95"][param] == pytest.approx([back(estimate - half), back(estimate + half)], rel=1e-12)
        assert intervals["ci95_members"][param] == pytest.approx(
            [back(estimate - 1.96 * members_se[j]), back(estimate + 1.96 * members_se[j])], rel=1e-12)
        assert intervals["ci95_documents"][param] == list(fit.ci95[param])
    alone = collaboration.combined_intervals(fit, np.zeros(3))  # members that never move it: the documents' width
    for j, param in enumerate(("E", "A", "alpha")):
        span = np.diff(LAWS["power"].to_fitted_scale(param, alone["ci95"][param]))[0]
        assert span == pytest.approx(np.diff(np.percentile(
            LAWS["power"].to_fitted_scale(param, fit.bootstrap_params[:, j]), [2.5, 97.5]))[0], rel=1e-12)
    assert collaboration.combined_intervals(fit, None)["ci95"] == dict.fromkeys(("E", "A", "alpha"))
    assert collaboration.jackknife_se(np.ones((5, 3))) is None and collaboration.jackknife_se(np.ones((1, 3))) is None
