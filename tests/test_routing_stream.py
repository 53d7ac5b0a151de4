"""Routing streams over blocks of documents: any block size gives the one-block results (up to summation order),
the learned routers fit on a seeded sample of the training documents where there are many, and blocks and fits run on
threads with the same results, to the bit, as on one."""

from __future__ import annotations

import threading

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from sklearn import config_context, get_config
from threadpoolctl import threadpool_info, threadpool_limits

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


def routing_inputs(n_models: int = 6, n_documents: int = 400) -> tuple[xr.Dataset, list[list[str]], list[str]]:
    """A pool whose documents name the member best on them (routers have something to learn), every single member
    and 20 drawn ensembles, and the texts."""
    nll, member = losses(4, n_models, n_documents)
    rng = np.random.default_rng(5)
    best = rng.integers(0, n_models, n_documents)
    nll[best, np.arange(n_documents)] *= 0.6
    models = [f"m{i}" for i in range(n_models)]
    pool = xr.Dataset({"nll": (("model", "sample"), nll),
                       "n_tokens": (("model", "sample"), rng.integers(20, 60, nll.shape).astype(np.float64))},
                      coords={"model": models, "n_params": ("model", 1e6 * 2.0 ** np.arange(n_models)),
                              "n_bytes": ("sample", rng.integers(100, 400, n_documents))})
    members = [[name] for name in models] + [[models[i] for i in np.flatnonzero(row)] for row in member]
    texts = [f"{['alpha', 'beta', 'gamma', 'delta', 'omega', 'sigma'][b]} text {i}" for i, b in enumerate(best)]
    return pool, members, texts


def test_routing_is_the_same_to_the_bit_on_one_thread_or_several(monkeypatch):
    pool, members, texts = routing_inputs()
    monkeypatch.setattr(routing, "BLOCK_CELLS", 9 * 26 * 6)  # blocks of 9 documents: 45 of them, EM steps' too
    monkeypatch.setattr(routing, "PREDICT_BLOCK", 64)  # routers' predictions in 7 blocks
    summed_on: set[int] = set()
    block_sums = routing.block_sums

    def recorded(*args, **kwargs):
        summed_on.add(threading.get_ident())
        return block_sums(*args, **kwargs)

    monkeypatch.setattr(routing, "block_sums", recorded)
    results = {}
    for threads in (1, 3):
        monkeypatch.setattr(routing, "THREADS", threads)
        summed_on.clear()
        results[threads] = routing.realised(pool, members, texts, test_fraction=0.5, seed=0, bootstrap=8,
                                            ngram_features=128, knn_neighbors=3, mlp_hidden=4, sweep_points=6)
        main_thread_only = summed_on == {threading.get_ident()}
        assert main_thread_only if threads == 1 else (len(summed_on) >= 2 and threading.get_ident() not in summed_on)
    one, several = results[1], results[3]
    pd.testing.assert_frame_equal(several["table"], one["table"], check_exact=True)
    for strategy, replicates in one["replicates"].items():
        np.testing.assert_array_equal(several["replicates"][strategy], replicates)
    for name, point in one["curves"].items():
        for key in ("test_bpb", "flops_per_byte", "replicate_bpb", "replicate_flops"):
            np.testing.assert_array_equal(several["curves"][name][key], point[key])
        np.testing.assert_array_equal(several["curves"][name]["curve"].chosen, point["curve"].chosen)


def test_the_routing_holds_blas_and_openmp_to_one_thread_under_its_own(monkeypatch):
    """A BLAS's own threads change a perceptron's L-BFGS path (0.3% of bits per byte on a 3,000-document pool) and
    contend with the routing's threads: inside `realised`, every BLAS and OpenMP library runs one thread."""
    pool, members, texts = routing_inputs(n_documents=60)
    seen = []
    best_single = routing.ROUTERS["best_single"]

    def recorded(data):
        seen.extend(info["num_threads"] for info in threadpool_info() if info["user_api"] in ("blas", "openmp"))
        return best_single(data)

    monkeypatch.setitem(routing.ROUTERS, "best_single", recorded)
    with threadpool_limits(limits=2):  # as on a machine of two cores or more
        routing.realised(pool, members, texts, test_fraction=0.5, seed=0, bootstrap=2, ngram_features=64,
                         knn_neighbors=3, mlp_hidden=4, sweep_points=4)
        assert {info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"} == {2}  # restored
    assert seen and set(seen) == {1}


def test_work_in_threads_comes_back_in_order_and_at_most_two_per_thread_ahead(monkeypatch):
    monkeypatch.setattr(routing, "THREADS", 3)
    started: list[int] = []
    lock = threading.Lock()

    def compute(item: int) -> int:
        with lock:
            started.append(item)
        return item * item

    for index, value in enumerate(routing._in_threads(compute, range(40))):
        assert value == index * index
        assert max(started) <= index + 2 * 3  # the one yielded and 2·THREADS ahead of it, no more
    assert sorted(started) == list(range(40))


def test_work_in_threads_keeps_the_callers_scikit_learn_config_and_one_openmp_thread(monkeypatch):
    """scikit-learn's config is the calling thread's: without it the knn router's neighbour search ran at 1 GiB
    chunks in the threads, 4.17 GiB peak at 30,000 documents instead of 0.77."""
    monkeypatch.setattr(routing, "THREADS", 2)

    def seen(_) -> tuple:
        openmp = {info["num_threads"] for info in threadpool_info() if info["user_api"] == "openmp"}
        return threading.get_ident(), get_config()["working_memory"], openmp

    with config_context(working_memory=routing.KNN_WORKING_MEMORY_MB):
        found = list(routing._in_threads(seen, range(8)))
    assert threading.get_ident() not in {thread for thread, _, _ in found}
    assert {memory for _, memory, _ in found} == {routing.KNN_WORKING_MEMORY_MB}
    assert all(openmp <= {1} for _, _, openmp in found)
