"""Routing streams over blocks of documents: any block size gives the one-block results (up to summation order),
and the learned routers fit on a seeded sample of the training documents where there are many."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from mmc import routing


def losses(seed: int = 0, n_models: int = 6, n_documents: int = 300) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    nll = rng.gamma(4.0, 30.0, (n_models, n_documents))
    member = rng.random((20, n_models)) < 0.5
    member[np.arange(20), rng.integers(0, n_models, 20)] = True
    return nll, member


def test_blocks_of_any_size_give_the_one_block_results(monkeypatch):
    nll, member = losses()
    rng = np.random.default_rng(1)
    flops = rng.uniform(1.0, 100.0, nll.shape)
    one_block = {"oracle": routing.oracle_nll(nll, member), "uniform": routing.mixture_nll(nll, member),
                 "weights": routing.fit_mixture_weights(nll, member), "route": routing.route(nll, member),
                 "curve": routing.lambda_curve(routing.Prediction(nll), flops, np.ones(nll.shape[1]), 16)}
    monkeypatch.setattr(routing, "BLOCK_CELLS", 7 * member.size)  # 43 blocks of 7 documents, the last of 6
    assert len(routing.document_blocks(nll.shape[1], member.size)) == 43
    np.testing.assert_array_equal(routing.oracle_nll(nll, member), one_block["oracle"])
    np.testing.assert_array_equal(routing.route(nll, member), one_block["route"])
    np.testing.assert_allclose(routing.mixture_nll(nll, member), one_block["uniform"], rtol=1e-14)
    np.testing.assert_allclose(routing.fit_mixture_weights(nll, member), one_block["weights"], rtol=1e-12, atol=1e-12)
    curve = routing.lambda_curve(routing.Prediction(nll), flops, np.ones(nll.shape[1]), 16)
    np.testing.assert_array_equal(curve.setting, one_block["curve"].setting)
    np.testing.assert_array_equal(curve.chosen, one_block["curve"].chosen)


def test_learned_routers_fit_on_a_seeded_sample_of_many_training_documents(monkeypatch):
    monkeypatch.setattr(routing, "ROUTER_TRAINING_MAX", 40)
    monkeypatch.setattr(routing, "PREDICT_BLOCK", 32)  # features built four blocks at a time
    rng = np.random.default_rng(2)
    texts = [f"{['alpha', 'beta', 'gamma'][i % 3]} text {i}" for i in range(120)]
    bpb = rng.gamma(4.0, 0.5, (3, 120))
    train = ~routing.split_documents(120, 0.5, 0)
    make = lambda losses: routing.RouterData(losses, train, texts, np.full(120, 40.0), np.array([3.0, 1.0, 2.0]),
                                             ngram_features=256, knn_neighbors=5)  # noqa: E731
    data = make(bpb)
    assert len(data.fit_rows) == 40 and train[data.fit_rows].all() and (np.diff(data.fit_rows) > 0).all()
    np.testing.assert_array_equal(make(bpb).fit_rows, data.fit_rows)  # seeded
    predicted = routing.ROUTERS["knn"](data).bpb
    unsampled = np.setdiff1d(np.flatnonzero(train), data.fit_rows)
    changed = bpb.copy()
    changed[:, unsampled] += 5.0  # losses of training documents outside the sample are never read
    np.testing.assert_array_equal(routing.ROUTERS["knn"](make(changed)).bpb, predicted)


@pytest.mark.parametrize("n_train, sampled", [(30, False), (50, True)])
def test_the_metrics_say_how_many_training_documents_the_routers_fit_on(monkeypatch, n_train, sampled):
    monkeypatch.setattr(routing, "ROUTER_TRAINING_MAX", 40)
    nll, _ = losses(3, n_models=3, n_documents=2 * n_train)
    pool = xr.Dataset({"nll": (("model", "sample"), nll), "n_tokens": (("model", "sample"), np.ones_like(nll))},
                      coords={"model": ["a", "b", "c"], "n_params": ("model", [1e6, 2e6, 4e6]),
                              "n_bytes": ("sample", np.full(2 * n_train, 100))})
    texts = [f"text {i}" for i in range(2 * n_train)]
    result = routing.realised(pool, [["a"], ["b"], ["c"], ["a", "b", "c"]], texts, test_fraction=0.5, seed=0,
                              bootstrap=4, ngram_features=64, knn_neighbors=3, mlp_hidden=4, sweep_points=4)
    training = result["router_training"]
    assert training["documents"] == min(n_train, 40) and training["training_documents"] == n_train
    assert training["sampled"] is sampled and ("sample" in training["note"]) is sampled
