"""Realisable collaboration: mixtures and routers against exact expectations, and the routing stage end to end."""

from __future__ import annotations

import json
import math

import datasets
import numpy as np
import pandas as pd
import pytest
import xarray as xr

from conftest import synthetic_pool
from mmc import routing
from mmc.cli import main
from mmc.report import figure_routing, figure_routing_cost, routing_markdown

LN2 = math.log(2)


def random_losses(seed: int = 0, n_models: int = 5, n_documents: int = 40) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    nll = rng.gamma(4.0, 30.0, (n_models, n_documents))
    member = rng.random((25, n_models)) < 0.5
    member[np.arange(25), rng.integers(0, n_models, 25)] = True  # no empty ensemble
    return nll, member


def test_uniform_mixture_is_the_brute_force_log_sum_exp_and_within_log_k_of_the_oracle():
    nll, member = random_losses()
    mixture = routing.mixture_nll(nll, member)
    oracle = routing.oracle_nll(nll, member)
    for e in range(len(member)):
        rows = np.flatnonzero(member[e])
        for d in range(nll.shape[1]):
            expected = -math.log(sum(math.exp(-nll[i, d] + nll[rows, d].min()) for i in rows) / len(rows)) \
                + nll[rows, d].min()
            assert mixture[e, d] == pytest.approx(expected, rel=1e-12)
            assert oracle[e, d] == nll[rows, d].min()
    k = member.sum(axis=1)[:, None]
    assert (mixture >= oracle - 1e-9).all() and (mixture <= oracle + np.log(k) + 1e-9).all()


def test_fitted_mixture_weights_beat_uniform_on_their_documents_and_find_a_dominant_member():
    nll, member = random_losses(1)
    weights = routing.fit_mixture_weights(nll, member)
    assert np.allclose(np.exp(weights).sum(axis=1), 1.0) and (np.exp(weights)[~member] == 0).all()
    assert (routing.mixture_nll(nll, member, weights).sum(axis=1)
            <= routing.mixture_nll(nll, member).sum(axis=1) + 1e-9).all()
    dominant = nll.copy()
    dominant[2] = nll.min(axis=0) - 50.0  # model 2 is the best on every document by 50 nats: the weights go to it
    weights = routing.fit_mixture_weights(dominant, np.ones((1, 5), dtype=bool))
    assert np.exp(weights[0, 2]) > 0.999


def test_a_router_of_the_true_losses_is_the_oracle_and_a_constant_one_the_best_single_member():
    nll, member = random_losses(2)
    chosen = routing.route(nll, member)
    documents = np.arange(nll.shape[1])
    np.testing.assert_array_equal(nll[chosen, documents], routing.oracle_nll(nll, member))
    train = np.arange(nll.shape[1]) < 20
    data = routing.RouterData(nll / 100.0, train, [""] * 40, np.ones(40), np.arange(5.0))
    chosen = routing.route(routing.ROUTERS["best_single"](data).bpb, member)
    best_on_train = np.where(member, nll[:, train].mean(axis=1), np.inf).argmin(axis=1)
    np.testing.assert_array_equal(chosen, np.repeat(best_on_train[:, None], 40, axis=1))


def test_the_lambda_sweep_runs_from_the_oracle_to_the_cheapest_member():
    rng = np.random.default_rng(3)
    bpb, flops = rng.gamma(4.0, 0.5, (6, 50)), rng.uniform(1.0, 100.0, (6, 50))
    documents = np.arange(50)
    curve = routing.lambda_curve(routing.Prediction(bpb), flops, np.ones(50), 32)
    assert curve.setting[0] == 0.0 and len(curve.setting) <= 32
    np.testing.assert_array_equal(bpb[curve.chosen[0], documents], bpb.min(axis=0))  # perfect router, λ = 0: oracle
    np.testing.assert_array_equal(curve.chosen[-1], flops.argmin(axis=0))  # the last λ: every cheapest member
    cost, loss = curve.flops.sum(axis=1), bpb[curve.chosen, documents].sum(axis=1)
    assert (np.diff(cost) <= 1e-9).all() and (np.diff(loss) >= -1e-12).all()  # a Lagrangian sweep trades monotonically
    constant = routing.lambda_curve(routing.Prediction(np.broadcast_to(bpb.mean(axis=1, keepdims=True), bpb.shape)),
                                    flops, np.ones(50), 32)
    np.testing.assert_array_equal(constant.chosen[0], np.full(50, bpb.mean(axis=1).argmin()))  # the best member
    own = routing.lambda_curve(routing.Prediction(bpb, runs=(2,)), flops, np.ones(50), 32)
    np.testing.assert_allclose(own.flops, flops[2] + np.where(own.chosen == 2, 0.0, flops[own.chosen, documents]))


def test_aiq_is_the_mean_of_the_non_decreasing_convex_hull():
    cost = np.array([0.0, 1.0, 2.0, 3.0, 1.5, 0.5, 2.0])
    quality = np.array([0.0, 2.0, 2.5, 1.0, 1.0, 0.2, 2.4])
    knots, xs, ys = routing.hull(cost, quality)  # (0, 0), (1, 2), (2, 2.5), then flat to the largest cost, 3
    assert knots.tolist() == [0, 1, 2] and xs.tolist() == [0, 1, 2, 3] and ys.tolist() == [0, 2, 2.5, 2.5]
    assert routing.aiq(cost, quality) == pytest.approx((1.0 + 2.25 + 2.5) / 3, rel=1e-15)
    assert routing.aiq(np.array([0.0, 1.0, 2.0]), np.array([0.0, 0.5, 2.0])) == 1.0  # (1, 0.5) is under the chord
    assert routing.aiq(np.array([5.0, 5.0]), np.array([1.0, 3.0])) == 3.0  # one cost: its best quality


def test_the_oracle_gap_at_matched_cost_of_a_perfect_and_a_constant_router():
    # two members, four documents, one byte each: A costs 2 FLOPs per byte, B 6; A − B = 0, 0.5, 0.5, 1 bits per byte
    bpb = np.array([[1.0, 1.0, 2.0, 2.0], [1.0, 0.5, 1.5, 1.0]])
    flops = np.array([[2.0] * 4, [6.0] * 4])
    documents = np.arange(4)

    def points(prediction):
        curve = routing.lambda_curve(prediction, flops, np.ones(4), 16)
        return curve.flops.mean(axis=1), -bpb[curve.chosen, documents].mean(axis=1)

    perfect = points(routing.Prediction(bpb))
    constant = points(routing.Prediction(np.array([[1.5] * 4, [1.0] * 4])))  # the members' means: A 1.5, B 1.0
    assert set(zip(*perfect)) == {(5.0, -1.0), (3.0, -1.25), (2.0, -1.5)}  # the tie on document 0 goes to A
    assert set(zip(*constant)) == {(6.0, -1.0), (2.0, -1.5)}
    assert routing.aiq(*perfect) == pytest.approx(-(1.375 + 2.25) / 3, rel=1e-15)
    assert routing.aiq(*constant) == -1.25
    assert routing.oracle_gap(*perfect, *perfect) == 0.0
    # over [2, 6]: perfect − constant is 0.125·(c − 2) on [2, 3], 0.125 on [3, 5], 0.125·(6 − c) on [5, 6]
    assert routing.oracle_gap(*constant, *perfect) == pytest.approx((0.0625 + 0.25 + 0.0625) / 4, rel=1e-15)


def test_the_cascade_runs_the_cheap_member_and_escalates_below_its_threshold():
    rng = np.random.default_rng(4)
    bpb, flops = rng.gamma(4.0, 0.5, (3, 30)), rng.uniform(1.0, 100.0, (3, 30))
    curve = routing.cascade_curve(bpb, flops, 0, 2, 12)
    assert curve.setting[0] == np.inf and curve.setting[-1] == -np.inf and len(curve.setting) == 12
    np.testing.assert_array_equal(curve.chosen[0], np.zeros(30))  # +∞: never escalates, the cheap member alone
    np.testing.assert_array_equal(curve.flops[0], flops[0])
    np.testing.assert_array_equal(curve.chosen[-1], np.full(30, 2))  # −∞: always escalates, paying both
    np.testing.assert_array_equal(curve.flops[-1], flops[0] + flops[2])
    np.testing.assert_array_equal(curve.chosen == 2, bpb[0][None] > curve.setting[:, None])


@pytest.mark.parametrize("name", ["ngram", "knn", "mlp", "small_model"])
def test_learned_routers_are_cross_fitted(name):
    rng = np.random.default_rng(5)
    words = ["alpha", "beta", "gamma", "delta"]
    texts = [f"{words[i % 4]} {words[(i // 4) % 4]} text {i}" for i in range(60)]
    bpb = rng.gamma(4.0, 0.5, (3, 60))
    train = routing.split_documents(60, 0.5, 0) == False  # noqa: E712
    make = lambda losses: routing.RouterData(losses, train, texts, np.full(60, 40.0), np.array([3.0, 1.0, 2.0]),
                                             ngram_features=256, knn_neighbors=5, mlp_hidden=8)  # noqa: E731
    predicted = routing.ROUTERS[name](make(bpb)).bpb
    changed = bpb.copy()  # the test half's losses, but the smallest member's (model 1: a feature of small_model)
    changed[0, ~train], changed[2, ~train] = changed[0, ~train] + 5.0, changed[2, ~train] * 3.0
    np.testing.assert_array_equal(routing.ROUTERS[name](make(changed)).bpb, predicted)
    own = np.flatnonzero(train)[0]  # a training document's prediction is out of fold: its own losses are not read
    changed = bpb.copy()
    changed[[0, 2], own] += 5.0
    np.testing.assert_array_equal(routing.ROUTERS[name](make(changed)).bpb[:, own], predicted[:, own])


@pytest.fixture(scope="module")
def routed(tmp_path_factory):
    root = tmp_path_factory.mktemp("routing")
    pool_path = synthetic_pool(root / "pool.zarr", n_samples=240)
    pool = xr.open_zarr(pool_path)
    home = np.arange(240) % 3  # each family is best on its own third: texts that say which third
    texts = [f"{['alpha', 'beta', 'gamma'][h]} document {i}: " + ["def f(): pass", "the lazy dog", "a = [1, 2]"][h] * 5
             for i, h in enumerate(home)]
    data = root / "eval"
    datasets.Dataset.from_dict({"sample_id": [str(s) for s in pool.sample.values], "text": texts}).save_to_disk(str(data))
    assert main(["oracle", "--pool", str(pool_path), "--out", str(root / "oracle"), "--max-subsets-per-k", "20"]) == 0
    assert main(["route", "--pool", str(pool_path), "--oracle", str(root / "oracle"), "--data", str(data),
                 "--out", str(root / "routing"), "--metrics", str(root / "routing.json"), "--bootstrap", "50"]) == 0
    return root


def test_the_routing_stage_writes_cross_fitted_strategies_costs_and_laws(routed):
    metrics = json.loads((routed / "routing.json").read_text())
    table = pd.read_parquet(routed / "routing" / "strategies.parquet")
    assert set(table.strategy) == set(routing.STRATEGIES)
    by = table.pivot(index="ensemble", columns="strategy", values="test_bpb")
    assert (by.mixture_uniform >= by.oracle - 1e-12).all() and (by.router_ngram >= by.oracle - 1e-12).all()
    cost = table.pivot(index="ensemble", columns="strategy", values="flops_per_byte")
    assert (cost.router_ngram <= cost.oracle + 1e-6).all()  # a router runs one member, the oracle all of them
    singles = table[(table.k == 1)].pivot(index="ensemble", columns="strategy", values="test_bpb")
    np.testing.assert_allclose(singles.mixture_uniform, singles.oracle)  # one member: every strategy is it
    largest = metrics["at_largest_k"]
    assert largest["k"] == 15 and largest["bpb"]["oracle"]["value"] <= largest["bpb"]["mixture_fitted"]["value"]
    gain = largest["oracle_gain_over_best_single"]  # the best single member and the oracle, paired on resamples
    assert gain["value"] == pytest.approx(largest["bpb"]["best_single"]["value"] - largest["bpb"]["oracle"]["value"],
                                          rel=1e-12)
    assert 0 < gain["ci95"][0] <= gain["value"] <= gain["ci95"][1]
    shares = largest["share_of_oracle_gain"]
    assert shares["mixture_fitted"]["value"] >= shares["mixture_uniform"]["value"] - 0.05
    # the texts say which family's third a document is in: the n-gram router realises most of the oracle's gain
    assert shares["router_ngram"]["value"] > 0.5 > shares["router_best_single"]["value"]
    assert metrics["routing_accuracy_at_largest_k"]["router_ngram"] > 0.2
    for name in ("oracle", "mixture_fitted", "mixture_uniform"):
        assert "params" in metrics["laws"][name] or "skipped" in metrics["laws"][name]
    assert metrics["split"] == {"test_documents": 120, "train_documents": 120}
    assert (routed / "routing" / "curves.csv").is_file()


def test_the_routing_stage_writes_cost_quality_curves_with_aiq_and_oracle_gaps(routed):
    metrics = json.loads((routed / "routing.json").read_text())
    table = pd.read_parquet(routed / "routing" / "strategies.parquet")
    curves = pd.read_csv(routed / "routing" / "router_curves.csv")
    names = {"perfect", "cascade", *(f"router_{name}" for name in routing.ROUTERS)}
    assert set(curves.router) == names and curves.columns.tolist() == routing.ROUTER_CURVE_COLUMNS
    whole = table[table.k == table.k.max()].set_index("strategy")
    first = curves.groupby("router", sort=False).first()  # λ = 0, or the cascade's threshold +∞
    assert first.loc["perfect", "test_bpb"] == pytest.approx(whole.loc["oracle", "test_bpb"], rel=1e-12)
    for name in routing.ROUTERS:  # a router's λ = 0 point is its strategy at the whole pool
        assert first.loc[f"router_{name}", "test_bpb"] == pytest.approx(whole.loc[f"router_{name}", "test_bpb"],
                                                                        rel=1e-12)
    assert first.loc["cascade", "setting"] == np.inf and curves.groupby("router").on_hull.any().all()
    summary = metrics["cost_quality_at_largest_k"]
    assert set(summary["routers"]) == names and "prefix" in summary["cascade"]["note"]
    for name, values in summary["routers"].items():
        own = curves[curves.router == name]
        assert values["aiq"]["value"] == pytest.approx(routing.aiq(own.flops_per_byte.to_numpy(),
                                                                   -own.test_bpb.to_numpy()), rel=1e-12)
        assert values["oracle_gap"]["value"] >= -1e-12  # no router beats the perfect one at matched cost
        if name != "perfect":
            low, high = values["oracle_gap"]["ci95"]
            assert low <= values["oracle_gap"]["value"] <= high
    assert summary["routers"]["perfect"]["oracle_gap"]["value"] == 0.0


def test_shares_by_k_are_the_gain_ratios_of_each_size_and_laws_carry_bands(routed):
    metrics = json.loads((routed / "routing.json").read_text())
    table = pd.read_parquet(routed / "routing" / "strategies.parquet")
    by = table[table.k >= 2].pivot_table(index="k", columns="strategy", values="test_bpb", aggfunc="sum")
    shares = metrics["share_of_oracle_gain_by_k"]
    assert shares["k"] == by.index.tolist() and "router_best_single" not in shares
    for strategy in ("mixture_fitted", "mixture_uniform", "router_ngram", "router_small_model"):
        expected = (by.router_best_single - by[strategy]) / (by.router_best_single - by.oracle)
        np.testing.assert_allclose(shares[strategy]["value"], expected.to_numpy(), rtol=1e-9)
        intervals = shares[strategy]["ci95"]
        assert all(low <= value <= high for value, (low, high) in zip(shares[strategy]["value"], intervals))
    assert "single" in metrics["laws"]  # the single-model frontier beside the realisable ones
    curves = pd.read_csv(routed / "routing" / "curves.csv")
    laws = curves.dropna(subset=["predicted_bpb"])
    fitted = [name for name, fit in metrics["laws"].items() if "params" in fit]
    assert set(laws.strategy) == set(fitted) and fitted
    assert (laws.lower_bpb <= laws.predicted_bpb + 1e-12).all() and (laws.predicted_bpb <= laws.upper_bpb + 1e-12).all()
    assert (laws.groupby("strategy").total_params.max() == table.total_params.max()).all()  # drawn to the whole pool


def test_the_report_draws_the_routing_figures(routed, tmp_path):
    metrics = json.loads((routed / "routing.json").read_text())
    figure_routing(pd.read_csv(routed / "routing" / "curves.csv"), metrics["share_of_oracle_gain_by_k"],
                   tmp_path / "r.png")
    figure_routing_cost(pd.read_csv(routed / "routing" / "strategies.csv"), tmp_path / "c.png",
                        pd.read_csv(routed / "routing" / "router_curves.csv"))
    assert (tmp_path / "r.png").read_bytes().startswith(b"\x89PNG") and (tmp_path / "c.png").is_file()
    text = routing_markdown(metrics)
    assert "| router: n-grams |" in text and "share of the oracle's gain" in text
    assert "| k | mixture, fitted weights |" in text
    assert "| router | AIQ | oracle gap at matched cost | FLOPs per byte spanned |" in text
    assert "| perfect router (bound) |" in text and "| router: nearest neighbours |" in text and "prefix" in text
    metrics.pop("cost_quality_at_largest_k")  # routing metrics written before the curves: the section without them
    assert "AIQ" not in routing_markdown(metrics)
