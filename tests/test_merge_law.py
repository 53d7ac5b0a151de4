"""The merging law end to end: the merge sweep, per-merge losses by domain, the fitted law, and planning."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from conftest import ROOT
from mmc import MMCError
from mmc.cli import main
from mmc.laws import get_law
from mmc.losses import compute_losses
from mmc.merge_law import baselines, fit_merge_laws, fit_merging_law, merge_points, plan_from_law, plan_merging, plan_text
from mmc.merging import MergeSpec
from mmc.sweep import expert_subsets, merge_sweep
from mmc.store import write_store
from test_merging import make_experts

LN2 = math.log(2)


# ------------------------------------------------------------------------------------------- the sweep

def test_merge_sweep_scores_the_base_and_every_merge(gpt2_dir, eval_dir, tmp_path):
    expert_dirs = make_experts(gpt2_dir, tmp_path)
    experts = {"code": expert_dirs[0], "prose": expert_dirs[1]}
    store = merge_sweep(str(gpt2_dir), experts, eval_dir, [MergeSpec("average"), MergeSpec("ties", density=0.5)],
                        max_subsets_per_k=10, seed=0, device="cpu", progress=False)
    # the base, then per method every subset: {code}, {prose}, {code, prose}
    assert list(store.method.values) == ["base"] + ["average"] * 3 + ["ties"] * 3
    assert list(store.k.values) == [0, 1, 1, 2, 1, 1, 2]
    assert list(store.experts.values) == ["", "code", "prose", "code,prose", "code", "prose", "code,prose"]
    assert store.attrs["expert_domains"] == "code,prose" and store.attrs["base"] == str(gpt2_dir)

    def scored(model) -> np.ndarray:
        return compute_losses(str(model), eval_dir, device="cpu", dtype="float32").nll.values

    base = compute_losses(str(gpt2_dir), eval_dir, device="cpu", dtype="float32")
    np.testing.assert_allclose(store.nll.values[0], base.nll.values, rtol=1e-6)
    # the texts are tokenized once for the sweep: every merge scores the base's tokens
    np.testing.assert_array_equal(store.n_tokens.values, np.tile(base.n_tokens.values, (store.sizes["merge"], 1)))
    # averaging one expert gives it back bit for bit: its row is the expert's own losses
    np.testing.assert_allclose(store.nll.values[1], scored(expert_dirs[0]), rtol=1e-6)
    np.testing.assert_allclose(store.nll.values[2], scored(expert_dirs[1]), rtol=1e-6)
    assert not np.allclose(store.nll.values[3], store.nll.values[1])


def test_merge_sweep_refuses_experts_without_eval_samples(gpt2_dir, eval_dir, tmp_path):
    expert_dirs = make_experts(gpt2_dir, tmp_path)
    with pytest.raises(MMCError, match="no samples of expert domain"):
        merge_sweep(str(gpt2_dir), {"legal": expert_dirs[0]}, eval_dir, [MergeSpec("average")],
                    max_subsets_per_k=10, seed=0, device="cpu", progress=False)


def test_expert_subsets_enumerate_or_draw_per_k():
    every = expert_subsets(4, 100, seed=0)
    assert len(every) == 15 and len(set(every)) == 15
    drawn = expert_subsets(6, 5, seed=3)
    sizes = np.bincount([len(subset) for subset in drawn])
    assert list(sizes) == [0, 5, 5, 5, 5, 5, 1]  # C(6, k) > 5 is drawn, C(6, 6) = 1 is enumerated
    assert drawn == expert_subsets(6, 5, seed=3) and drawn != expert_subsets(6, 5, seed=4)


# ---------------------------------------------------------------------------------- losses by domain

def merge_store(n_params: int, rows: list[tuple[str, int, str]], per_domain_bpb: np.ndarray,
                domains: list[str], expert_domains: list[str], per_domain: int = 2) -> xr.Dataset:
    """A merge store whose samples have the given bits per byte in each domain (rows x domains)."""
    sample_domains = np.repeat(domains, per_domain)
    n_bytes = np.arange(100, 100 + len(sample_domains)) * 7  # unequal sizes: bits per byte weights by bytes
    codes = np.repeat(np.arange(len(domains)), per_domain)
    nll = per_domain_bpb[:, codes] * n_bytes * LN2
    return xr.Dataset(
        {"nll": (("merge", "sample"), nll), "n_tokens": (("merge", "sample"), np.ones_like(nll, dtype=np.int64))},
        coords={"merge": np.arange(len(rows)), "method": ("merge", [r[0] for r in rows]),
                "k": ("merge", [r[1] for r in rows]), "experts": ("merge", [r[2] for r in rows]),
                "sample": [f"s{i}" for i in range(len(sample_domains))], "domain": ("sample", sample_domains),
                "n_bytes": ("sample", n_bytes)},
        attrs={"base": f"base-{n_params}", "n_params": n_params, "expert_domains": ",".join(expert_domains)})


def test_merge_points_macro_average_each_loss_over_its_domains():
    domains = ["a", "b", "c", "x"]  # x has no expert: it is cross-domain
    bpb = np.array([[2.0, 3.0, 4.0, 5.0],   # base
                    [1.0, 3.0, 4.0, 5.5],   # expert a alone
                    [1.5, 2.5, 3.5, 5.2]])  # a and b merged
    store = merge_store(1000, [("base", 0, ""), ("average", 1, "a"), ("average", 2, "a,b")], bpb, domains,
                        ["a", "b", "c"])
    points = merge_points(store)
    np.testing.assert_allclose(points.in_domain_bpb, [3.0, 8 / 3, 2.5])
    np.testing.assert_allclose(points.cross_domain_bpb, [5.0, 5.5, 5.2])
    np.testing.assert_allclose(points.merged_domains_bpb, [np.nan, 1.0, 2.0])
    # bootstrap weights reweight samples within their domain; every domain still counts once
    weights = np.ones(store.sizes["sample"])
    weights[:2] = 3.0  # domain a's samples counted thrice: per-domain bits per byte do not move
    np.testing.assert_allclose(merge_points(store, weights).in_domain_bpb, points.in_domain_bpb)


TRUE_LAW = {"L_star": 1.0, "B": 30.0, "beta": 0.4, "A0": 20.0, "gamma": 0.3, "b": 0.5}
TRUE_CROSS = {"L_star": 1.5, "B": 20.0, "beta": 0.3, "A0": 5.0, "gamma": 0.2, "b": 1.0}


def law_following_store(n_params: int, methods: dict[str, float]) -> xr.Dataset:
    """Every merge's in-domain loss is the true law (times a per-method factor), cross-domain another law."""
    law = get_law("merging")
    expert_domains = ["d0", "d1", "d2", "d3"]
    rows, bpb = [("base", 0, "")], [[3.0] * 5]
    for method, factor in methods.items():
        for subset in expert_subsets(4, 100, seed=0):
            k = len(subset)
            in_domain = factor * float(law.predict(TRUE_LAW, N=n_params, k=k))
            cross = float(law.predict(TRUE_CROSS, N=n_params, k=k))
            rows.append((method, k, ",".join(expert_domains[i] for i in subset)))
            bpb.append([in_domain] * 4 + [cross])
    return merge_store(n_params, rows, np.array(bpb), [*expert_domains, "x"], expert_domains)


def test_fit_merge_laws_recover_a_known_law(tmp_path):
    paths = []
    for n_params in (1e4, 4e4, 1.6e5, 6.4e5):
        path = tmp_path / f"{int(n_params)}.zarr"
        write_store(law_following_store(int(n_params), {"average": 1.0, "ties": 1.0}), path, "merge sweep")
        paths.append(path)
    metrics, points, curves = fit_merge_laws(paths, bootstrap=5, seed=0)
    assert set(metrics["fits"]) == {"average", "ties", "joint"}
    assert metrics["bases"]["n_params"] == [10000, 40000, 160000, 640000]
    assert len(points) == 4 * (1 + 2 * 15) and len(curves) == 4 * 2 * 4
    law = get_law("merging")
    for method in ("average", "joint"):
        for target, truth in (("in_domain", TRUE_LAW), ("cross_domain", TRUE_CROSS)):
            fit = metrics["fits"][method][target]
            assert fit["r2_log"] > 0.999999, (method, target)
            predicted = law.predict(fit["params"], N=curves.n_params.to_numpy(float), k=curves.k.to_numpy(float))
            np.testing.assert_allclose(predicted, law.predict(truth, N=curves.n_params.to_numpy(float),
                                                              k=curves.k.to_numpy(float)), rtol=1e-4)
            for name in ("b", "gamma"):
                assert fit["params"][name] == pytest.approx(truth[name], rel=0.05, abs=0.02), (method, target, name)
            # the checks extrapolate noise-free data: the last two k, and the whole curve from k in {1, 2, 4}
            assert fit["holdout"]["held_out"] == [3.0, 4.0] and fit["holdout"]["max_abs_relative_error"] < 1e-3
            assert fit["forecast"]["held_out"] == [3.0] and fit["forecast"]["max_abs_relative_error"] < 1e-3
    # the spread over subsets is zero here: every subset of a size has the same loss
    assert metrics["spread_over_subsets_by_k"][2]["in_domain"] == pytest.approx(0.0, abs=1e-12)
    assert metrics["spread_over_subsets_by_k"][4]["in_domain"] is None  # one subset of 4: no spread


def test_fit_merge_laws_refuses_stores_of_other_samples(tmp_path):
    first, second = tmp_path / "a.zarr", tmp_path / "b.zarr"
    write_store(law_following_store(10000, {"average": 1.0}), first, "merge sweep")
    other = law_following_store(40000, {"average": 1.0})
    write_store(other.assign_coords(sample=[f"t{i}" for i in range(other.sizes["sample"])]), second, "merge sweep")
    with pytest.raises(MMCError, match="scored other samples"):
        fit_merge_laws([first, second], bootstrap=0, seed=0)


# ---------------------------------------------------------------------------------------- planning

# L(N, k) = 1 + 2 N^-0.5 + 4 N^-0.5 / (k + 1): at N = 100 the floor is 1.2 and A(N) = 0.4, so L = 1.2 + 0.4 / (k + 1)
PLAN_LAW = {"L_star": 1.0, "B": 2.0, "beta": 0.5, "A0": 4.0, "gamma": 0.5, "b": 1.0}


def test_plan_answers_computed_by_hand():
    plan = plan_merging(PLAN_LAW, 100, target=1.3, epsilon=0.01, budget=400, sizes=[100, 400])
    assert plan["floor"] == pytest.approx(1.2) and plan["amplitude"] == pytest.approx(0.4)
    assert plan["predicted_at_k1"] == pytest.approx(1.4)
    # (a) 0.4 / (k + 1) <= 0.1 first at k = 3, where the target is met exactly
    assert plan["target"]["k"] == 3 and plan["target"]["predicted"] == pytest.approx(1.3)
    # (b) the gain of expert k + 1 is 0.4 / ((k + 1)(k + 2)): 0.4 / 30 at k = 4, 0.4 / 42 < 0.01 at k = 5
    assert plan["stop"]["k"] == 5 and plan["stop"]["marginal_gain_at_k"] == pytest.approx(0.4 / 42)
    assert plan["stop"]["k_within_epsilon_of_floor"] == pytest.approx(39.0)
    # 1 - 2 / (k + 1) of the gain beyond one expert: 80% at k = 9, 90% at k = 19
    assert [(row["fraction"], row["k"]) for row in plan["gain_fractions"]] == [(0.8, 9), (0.9, 19)]
    # (c) 400 expert-parameters: 4 experts of N = 100 (1.2 + 0.4 / 5 = 1.28) or 1 of N = 400 (1.1 + 0.2 / 2 = 1.2)
    options = {option["n_params"]: (option["k"], option["predicted"]) for option in plan["budget"]["options"]}
    assert options[100.0] == (4, pytest.approx(1.28)) and options[400.0] == (1, pytest.approx(1.2))
    assert plan["budget"]["best"]["n_params"] == 400.0
    assert plan_merging(PLAN_LAW, 100, target=1.25)["target"]["k"] == 7
    unreachable = plan_merging(PLAN_LAW, 100, target=1.2)["target"]
    assert unreachable["k"] is None and "floor" in unreachable["reason"]
    with pytest.raises(MMCError, match="epsilon"):
        plan_merging(PLAN_LAW, 100, epsilon=0.0)


def test_plan_cli_reads_the_fitted_law_and_writes_json(tmp_path, capsys):
    law_path = tmp_path / "merge_law.json"
    law_path.write_text(json.dumps({"bases": {"n_params": [25, 100]},
                                    "fits": {"joint": {"in_domain": {"params": PLAN_LAW}},
                                             "dare": {"in_domain": {"skipped": "too few points"}}}}))
    out = tmp_path / "metrics" / "plan.json"
    assert main(["plan", "--law", str(law_path), "--target", "1.3", "--epsilon", "0.01", "--budget-multiple", "4",
                 "--out", str(out)]) == 0
    plan = json.loads(out.read_text())
    assert plan["n_params"] == 100 and plan["target"]["k"] == 3 and plan["stop"]["k"] == 5
    assert [option["n_params"] for option in plan["budget"]["options"]] == [25, 100]
    assert "(a) target 1.3: k = 3" in capsys.readouterr().out
    assert main(["plan", "--law", str(law_path), "--method", "dare"]) == 2
    assert capsys.readouterr().err.strip() == (f"mmc plan: error: '{law_path}' has no fitted in_domain law for "
                                               "method 'dare' (too few points)")
    assert main(["plan", "--law", str(tmp_path / "missing.json")]) == 2
    assert "fit the merging law first" in capsys.readouterr().err


def law_curves(truth: dict, sizes=(1e4, 4e4, 1.6e5, 6.4e5), ks=range(1, 7), noise: float = 0.0, seed: int = 0
               ) -> pd.DataFrame:
    """Merge curves (one row per base size and k) that follow `truth` exactly, or with lognormal noise."""
    n_params, k = np.meshgrid(np.array(sizes, dtype=float), np.array(list(ks), dtype=float))
    loss = get_law("merging").predict(truth, N=n_params.ravel(), k=k.ravel())
    loss = loss * np.random.default_rng(seed).lognormal(0.0, noise, loss.shape) if noise else loss
    return pd.DataFrame({"n_params": n_params.ravel(), "method": "average", "k": k.ravel(), "in_domain_bpb_mean": loss})


def test_gamma_may_be_negative_and_the_amplitude_is_said_to_grow_with_n():
    truth = {**TRUE_LAW, "gamma": -0.2, "A0": 0.5}  # the amplitude grows with N, as the default study's average
    result = fit_merging_law(law_curves(truth), "in_domain_bpb_mean")
    assert result["params"]["gamma"] == pytest.approx(-0.2, abs=1e-3) and result["amplitude_grows_with_n"] is True
    assert result["within_base_r2_log"] > 0.999999 and "amplitude_grows_with_n_reason" not in result
    assert all(a > 0 for a in result["per_base_amplitude"].values())
    assert fit_merging_law(law_curves(TRUE_LAW), "in_domain_bpb_mean")["amplitude_grows_with_n"] is False


def k_independent_curves(pattern: np.ndarray, size: float = 0.002) -> pd.DataFrame:
    """Merge curves whose loss depends on the base size alone: a floor per base, times exp(size · pattern)
    (pattern: (k, base), no trend in k)."""
    curves = law_curves(TRUE_LAW)
    floor = TRUE_LAW["L_star"] + TRUE_LAW["B"] * curves.n_params ** -TRUE_LAW["beta"]
    return curves.assign(in_domain_bpb_mean=floor * np.exp(size * pattern.ravel()))


@pytest.mark.parametrize("pattern", ["alternating in k, phase by base", "random"])
def test_curves_without_k_dependence_get_no_within_base_r2_and_no_amplitude_flag(pattern):
    """One mean per base explains such curves almost wholly (overall R² > 0.99): the law's R² within bases, its
    headline, says that it explains nothing about k, and whether the amplitude grows with N is not determined."""
    k, base = np.meshgrid(np.arange(1, 7), np.arange(4), indexing="ij")
    values = (-1.0) ** (k + base) if pattern != "random" else np.random.default_rng(0).normal(size=k.shape)
    result = fit_merging_law(k_independent_curves(values), "in_domain_bpb_mean")
    assert result["r2_log"] > 0.99 and result["base_means_r2_log"] > 0.99
    assert result["within_base_r2_log"] <= 0.05
    assert result["amplitude_grows_with_n"] is None and "not identified" in result["amplitude_grows_with_n_reason"]


def test_loss_rising_with_k_at_the_largest_bases_claims_no_amplitude_growth():
    """The default study's TIES cross-domain: the loss falls with k at the small bases and rises at the two largest;
    the fit switches the k term off (A0 tiny, γ at its bound), so no claim about the amplitude is made."""
    curves = law_curves(TRUE_LAW)
    floor = TRUE_LAW["L_star"] + TRUE_LAW["B"] * curves.n_params ** -TRUE_LAW["beta"]
    amplitude = curves.n_params.map({1e4: 0.006, 4e4: 0.002, 1.6e5: -0.0005, 6.4e5: -0.014})
    result = fit_merging_law(curves.assign(in_domain_bpb_mean=floor + amplitude / curves.k), "in_domain_bpb_mean")
    assert result["per_base_amplitude"] == pytest.approx({"10000": 0.006, "40000": 0.002, "160000": -0.0005,
                                                          "640000": -0.014}, rel=1e-9)
    assert result["amplitude_grows_with_n"] is None
    assert "the per-base amplitudes (a of c + a/k per base) are not all of one sign" in \
        result["amplitude_grows_with_n_reason"]


def test_the_default_studys_ties_cross_domain_fit_claims_no_amplitude_growth():
    """The committed default study's curves: TIES's cross-domain loss rises with k at the two largest bases, and
    the law, refitted on them, says the growth of the amplitude with N is not determined (the metrics of older code
    said it grows); the per-base baseline beats the law on the held-out k."""
    curves = pd.read_csv(ROOT / "plots" / "merging" / "curves.csv")
    result = fit_merging_law(curves[curves.method == "ties"], "cross_domain_bpb_mean")
    assert result["amplitude_grows_with_n"] is None
    assert "not all of one sign" in result["amplitude_grows_with_n_reason"]
    amplitudes = list(result["per_base_amplitude"].values())
    assert amplitudes[0] > 0 > amplitudes[-1]
    assert result["within_base_r2_log"] < 0 < 0.99 < result["base_means_r2_log"]
    assert result["baselines"]["lowest_max_error"] != "law"


def test_within_base_r2_baselines_and_the_held_out_base_size():
    curves = law_curves(TRUE_LAW)
    result = fit_merging_law(curves, "in_domain_bpb_mean", holdout_k=2)
    assert result["within_base_r2_log"] == pytest.approx(1.0, abs=1e-8)
    assert result["within_base_r2_log_by_base"] == pytest.approx(
        {"10000": 1.0, "40000": 1.0, "160000": 1.0, "640000": 1.0}, abs=1e-8)
    # one mean per base: 1 − SS(deviations from each base's mean) / SS(deviations from the overall mean), by hand
    log_loss = np.log(curves.in_domain_bpb_mean)
    within = ((log_loss - log_loss.groupby(curves.n_params).transform("mean")) ** 2).sum()
    assert result["base_means_r2_log"] == pytest.approx(1 - within / ((log_loss - log_loss.mean()) ** 2).sum(), rel=1e-12)
    assert result["held_out_base"]["held_out"] == [640000.0] and result["held_out_base"]["max_abs_relative_error"] < 1e-5
    baselines = result["baselines"]
    assert baselines["held_out_k"] == [5.0, 6.0]
    assert baselines["law"]["max_abs_relative_error"] == result["holdout"]["max_abs_relative_error"]
    # c + a/k is the law at b = 0: here b = 0.5, so it is close but not exact; carrying k = 4 forward overestimates
    k4 = curves[curves.k == 4].set_index("n_params").in_domain_bpb_mean
    held = curves[curves.k >= 5]
    carried = np.abs(k4.loc[held.n_params].to_numpy() / held.in_domain_bpb_mean.to_numpy() - 1)
    assert baselines["carry_last_k_forward"]["max_abs_relative_error"] == pytest.approx(carried.max(), rel=1e-12)
    assert baselines["carry_last_k_forward"]["mean_abs_relative_error"] == pytest.approx(carried.mean(), rel=1e-12)
    assert result["holdout"]["max_abs_relative_error"] < baselines["per_base_c_plus_a_over_k"]["max_abs_relative_error"]
    assert baselines["lowest_max_error"] == "law"
    # data that are exactly c + a/k per base (the same c and a whatever the law says): that baseline's error is 0
    exact = law_curves(TRUE_LAW, sizes=(1e4, 4e4, 1.6e5))
    exact["in_domain_bpb_mean"] = exact.n_params.map({1e4: 2.0, 4e4: 1.8, 1.6e5: 1.7}) \
        + exact.n_params.map({1e4: 0.3, 4e4: 0.5, 1.6e5: 0.6}) / exact.k
    exact_result = fit_merging_law(exact, "in_domain_bpb_mean")
    per_base = exact_result["baselines"]["per_base_c_plus_a_over_k"]
    assert per_base["max_abs_relative_error"] == pytest.approx(0.0, abs=1e-12)
    assert exact_result["baselines"]["lowest_max_error"] == "per_base_c_plus_a_over_k"
    assert "held_out_base" not in exact_result  # three bases: none held out


def test_baselines_on_points_of_several_methods_per_base_and_k():
    """A joint fit's curves hold one row per method at each (base, k): the per-base baseline is one least-squares
    c + a/k through all of them, the carried loss the mean over methods at the last training k."""
    rows = [(n, method, k, 1.0 + shift + 0.4 / k) for n in (1e4, 4e4) for method, shift in (("a", 0.0), ("b", 0.2))
            for k in range(1, 6)]
    curves = pd.DataFrame(rows, columns=["n_params", "method", "k", "loss"])
    k, sizes, loss = curves.k.to_numpy(float), curves.n_params.to_numpy(float), curves.loss.to_numpy()
    result = baselines(k, sizes, loss, k == 5, {"max_abs_relative_error": 0.5, "mean_abs_relative_error": 0.25})
    # the least-squares line through both methods is their mean, 1.1 + 0.4/k (1.18 at k = 5, where the methods
    # have 1.08 and 1.28); carried forward: their mean at k = 4, 1.2
    assert result["per_base_c_plus_a_over_k"]["max_abs_relative_error"] == pytest.approx(0.1 / 1.08, rel=1e-12)
    assert result["carry_last_k_forward"]["max_abs_relative_error"] == pytest.approx(0.12 / 1.08, rel=1e-12)
    assert result["law"] == {"max_abs_relative_error": 0.5, "mean_abs_relative_error": 0.25}
    assert result["lowest_max_error"] == "per_base_c_plus_a_over_k"
    one_training_k = baselines(k, sizes, loss, k >= 2, {"max_abs_relative_error": 0.5, "mean_abs_relative_error": 0.25})
    assert "skipped" in one_training_k["per_base_c_plus_a_over_k"]
    assert one_training_k["lowest_max_error"] in {"law", "carry_last_k_forward"}


def test_the_plan_marks_extrapolation_with_intervals(tmp_path):
    curves = law_curves(TRUE_LAW, noise=0.003)
    replicates = [law_curves(TRUE_LAW, noise=0.003, seed=seed) for seed in range(1, 21)]
    fit = fit_merging_law(curves, "in_domain_bpb_mean", np.array([r.in_domain_bpb_mean.to_numpy() for r in replicates]))
    law = {"fits": {"joint": {"in_domain": fit}}, "bases": {"n_params": [1e4, 4e4, 1.6e5, 6.4e5]},
           "expert_domains": ["d1", "d2", "d3", "d4", "d5", "d6"]}
    (tmp_path / "law.json").write_text(json.dumps(law))

    plan = plan_from_law(tmp_path / "law.json", epsilon=1e-4, budget_multiple=4)
    assert plan["observed"] == {"max_k": 6, "max_n_params": 6.4e5, "n_params_extrapolated": False}
    fractions = {row["fraction"]: row for row in plan["gain_fractions"]}
    for row in [plan["stop"], *fractions.values()]:
        assert row["extrapolation"] == (row["k"] > 6)
        low, high = row["ci95"]
        assert low <= row["k"] and (high is None or row["k"] <= high + 1)
    assert plan["stop"]["extrapolation"] is True  # a gain of 1e-4 per expert comes far beyond six experts
    # the floor, A(N) and the loss of one expert carry intervals: percentiles of each resample's law at N
    draws = np.array(fit["bootstrap_params"])  # L_star, B, beta, A0, gamma, b
    n = 6.4e5
    floor = draws[:, 0] + draws[:, 1] * n ** -draws[:, 2]
    amplitude = draws[:, 3] * n ** -draws[:, 4]
    one_expert = floor + amplitude / (1 + draws[:, 5])
    for key, values in [("floor", floor), ("amplitude", amplitude), ("predicted_at_k1", one_expert)]:
        assert plan[f"{key}_ci95"] == pytest.approx(np.percentile(values, [2.5, 97.5]).tolist(), rel=1e-12)
        assert plan[f"{key}_ci95"][0] <= plan[key] <= plan[f"{key}_ci95"][1]
    assert "floor " in plan_text(plan) and f"[{plan['floor_ci95'][0]:.4g}, " in plan_text(plan)
    larger = plan_from_law(tmp_path / "law.json", n_params=1e7)
    assert larger["observed"]["n_params_extrapolated"] and larger["stop"]["extrapolation"]
    assert plan["b"]["determined"] and plan["b"]["identified"] and not plan["b"]["at_bound"]
    assert not any(row["rests_on_undetermined_b"] for row in [plan["stop"], *fractions.values()])


def test_the_plan_marks_answers_that_rest_on_an_undetermined_b(tmp_path, capsys):
    """b at its upper bound, its profile interval open above (the default study's TIES cross-domain): every answer
    computed through b says it rests on it, and the plan says what the data do say about b."""
    b_at_bound = {**PLAN_LAW, "b": 50.0}
    draws = [[*PLAN_LAW.values()][:5] + [b] for b in (50.0, 49.99, 30.0, 50.0)]
    fit = {"law": "merging", "params": b_at_bound, "identified": {name: name != "b" for name in PLAN_LAW},
           "profile_ci95": {"b": [15.8, None]}, "bootstrap_params": draws}
    (tmp_path / "law.json").write_text(json.dumps({"fits": {"joint": {"in_domain": fit}},
                                                   "bases": {"n_params": [25, 100]}}))
    plan = plan_from_law(tmp_path / "law.json", target=1.3, budget_multiple=4)
    assert plan["b"] == {"estimate": 50.0, "profile_ci95": [15.8, None], "identified": False, "at_bound": True,
                         "share_of_resamples_at_bound": 0.75, "determined": False}
    answers = [plan["target"], plan["stop"], *plan["gain_fractions"], *plan["budget"]["options"]]
    assert all(answer["rests_on_undetermined_b"] for answer in answers)
    # the k reaching 80% of the gain is a function of b alone: (1 + b) / (1 − 0.8) − b = 5 + 4b
    assert plan["gain_fractions"][0]["k"] == 5 + 4 * 50
    text = plan_text(plan)
    assert "b = 50 is not determined by the data (profile interval [15.8, open]; at its bound; 75% of the bootstrap " \
           "refits at a bound)" in text and "rests on b, not determined" in text
    with np.errstate(invalid="ignore"):  # no resample reaches it either: its interval is [inf, unreachable]
        unreachable = plan_from_law(tmp_path / "law.json", target=1.0)["target"]
    assert unreachable["k"] is None and "rests_on_undetermined_b" not in unreachable  # the floor alone says so


def test_one_base_size_fits_c_plus_a_over_k_plus_b_and_plans_only_at_that_size(tmp_path):
    """Merges of one base: N is constant, so the law reduces to c + a/(k + b) with c = L* + B·N^-β and a = A0·N^-γ;
    the held-out check and the baselines run on it, and the plan refuses another base size."""
    n = 1.35e8
    curves = law_curves(TRUE_LAW, sizes=(n,), ks=range(1, 7))
    result = fit_merging_law(curves, "in_domain_bpb_mean", holdout_k=1)
    c = TRUE_LAW["L_star"] + TRUE_LAW["B"] * n ** -TRUE_LAW["beta"]
    a = TRUE_LAW["A0"] * n ** -TRUE_LAW["gamma"]
    assert result["law"] == "merging_one_base" and "amplitude_grows_with_n" not in result
    assert result["params"] == pytest.approx({"c": c, "a": a, "b": TRUE_LAW["b"]}, rel=1e-5)
    assert result["holdout"]["held_out"] == [6.0] and result["holdout"]["max_abs_relative_error"] < 1e-6
    k5 = curves[curves.k == 5].in_domain_bpb_mean.iloc[0]
    k6 = curves[curves.k == 6].in_domain_bpb_mean.iloc[0]
    assert result["baselines"]["carry_last_k_forward"]["max_abs_relative_error"] == pytest.approx(k5 / k6 - 1, rel=1e-12)
    law = {"fits": {"average": {"in_domain": result}}, "bases": {"n_params": [n]},
           "expert_domains": ["d1", "d2", "d3", "d4", "d5", "d6"]}
    (tmp_path / "law.json").write_text(json.dumps(law))
    plan = plan_from_law(tmp_path / "law.json", method="average", epsilon=1e-3)
    assert plan["floor"] == pytest.approx(c, rel=1e-5) and plan["amplitude"] == pytest.approx(a, rel=1e-5)
    with pytest.raises(MMCError, match="one base size"):
        plan_from_law(tmp_path / "law.json", method="average", n_params=2 * n)
