"""The merging law end to end: the merge sweep, per-merge losses by domain, the fitted law, and planning."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from mmc import MMCError
from mmc.cli import main
from mmc.laws import get_law
from mmc.losses import compute_losses
from mmc.merge_law import fit_merge_laws, fit_merging_law, merge_points, plan_from_law, plan_merging, plan_text
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

    np.testing.assert_allclose(store.nll.values[0], scored(gpt2_dir), rtol=1e-6)
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
    assert fit_merging_law(law_curves(TRUE_LAW), "in_domain_bpb_mean")["amplitude_grows_with_n"] is False


def test_within_base_r2_baselines_and_the_held_out_base_size():
    curves = law_curves(TRUE_LAW)
    result = fit_merging_law(curves, "in_domain_bpb_mean", holdout_k=2)
    assert result["within_base_r2_log"] == pytest.approx({"10000": 1.0, "40000": 1.0, "160000": 1.0, "640000": 1.0},
                                                        abs=1e-8)
    assert result["held_out_base"]["held_out"] == [640000.0] and result["held_out_base"]["max_abs_relative_error"] < 1e-5
    baselines = result["baselines"]
    assert baselines["held_out_k"] == [5.0, 6.0]
    # c + a/k is the law at b = 0: here b = 0.5, so it is close but not exact; carrying k = 4 forward overestimates
    k4 = curves[curves.k == 4].set_index("n_params").in_domain_bpb_mean
    held = curves[curves.k >= 5]
    carried = np.abs(k4.loc[held.n_params].to_numpy() / held.in_domain_bpb_mean.to_numpy() - 1)
    assert baselines["carry_last_k_forward"]["max_abs_relative_error"] == pytest.approx(carried.max(), rel=1e-12)
    assert result["holdout"]["max_abs_relative_error"] < baselines["per_base_c_plus_a_over_k"]["max_abs_relative_error"]
    # data that are exactly c + a/k per base: that baseline's error is 0
    exact = law_curves({**TRUE_LAW, "b": 0.0}, sizes=(1e4, 4e4, 1.6e5))
    assert fit_merging_law(exact, "in_domain_bpb_mean")["baselines"]["per_base_c_plus_a_over_k"][
        "max_abs_relative_error"] == pytest.approx(0.0, abs=1e-12)
    assert "held_out_base" not in fit_merging_law(exact, "in_domain_bpb_mean")  # three bases: none held out


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
