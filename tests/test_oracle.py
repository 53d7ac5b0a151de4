"""The oracle's exact formulas against brute force over subsets, on numpy- and dask-backed pools."""

from __future__ import annotations

import itertools
import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from test_bench_oracle import synthetic_pool
from threadpoolctl import threadpool_limits

from mmc import MMCError, oracle
from mmc.store import open_store, write_store


def make_pool(n_models: int = 7, n_samples: int = 60, seed: int = 0, families: list[str] | None = None,
              ties: bool = False) -> xr.Dataset:
    rng = np.random.default_rng(seed)
    families = families or [("abc"[m % 3]) for m in range(n_models)]
    shape = (n_models, n_samples)
    nll = rng.integers(1, 4, shape).astype(float) if ties else rng.gamma(4.0, 20.0, shape)
    return xr.Dataset(
        {"nll": (("model", "sample"), nll),
         "n_tokens": (("model", "sample"), rng.integers(5, 50, (n_models, n_samples)))},
        coords={"model": [f"m{m}" for m in range(n_models)],
                "family": ("model", families),
                "n_params": ("model", (np.arange(n_models) + 1) * 1_000_000),
                "n_params_nonembedding": ("model", (np.arange(n_models) + 1) * 700_000),
                "sample": [f"s{s:04d}" for s in range(n_samples)],
                "domain": ("sample", ["code" if s % 2 else "prose" for s in range(n_samples)]),
                "n_bytes": ("sample", rng.integers(20, 400, n_samples))})


def brute_force_expected_min(nll: np.ndarray, k: int) -> np.ndarray:
    subsets = itertools.combinations(range(nll.shape[0]), k)
    return np.mean([nll[list(subset)].min(axis=0) for subset in subsets], axis=0)


def brute_force_shapley(nll: np.ndarray) -> np.ndarray:
    n_models = nll.shape[0]

    def value(subset: tuple[int, ...]) -> float:
        return float(nll[list(subset)].min(axis=0).mean()) if subset else 0.0

    shapley = np.zeros(n_models)
    for model in range(n_models):
        others = [m for m in range(n_models) if m != model]
        for size in range(n_models):
            weight = math.factorial(size) * math.factorial(n_models - size - 1) / math.factorial(n_models)
            for subset in itertools.combinations(others, size):
                shapley[model] += weight * (value(tuple(sorted(subset + (model,)))) - value(subset))
    return shapley


@pytest.mark.parametrize("ties", [False, True])
def test_expected_subset_min_equals_brute_force(ties):
    rng = np.random.default_rng(1)
    for n_models in range(1, 13):
        shape = (n_models, 9)
        nll = rng.integers(0, 3, shape).astype(float) if ties else rng.gamma(3.0, 10.0, shape)
        for k in range(1, n_models + 1):
            np.testing.assert_allclose(oracle.expected_subset_min(nll, k), brute_force_expected_min(nll, k),
                                       rtol=1e-9, atol=1e-9)


def test_expected_subset_min_extremes_and_validation():
    nll = np.random.default_rng(2).gamma(3.0, 10.0, (5, 11))
    np.testing.assert_allclose(oracle.expected_subset_min(nll, 1), nll.mean(axis=0))
    np.testing.assert_allclose(oracle.expected_subset_min(nll, 5), nll.min(axis=0))
    for bad in (0, 6, 2.0, True):
        with pytest.raises(MMCError, match="subset size"):
            oracle.expected_subset_min(nll, bad)
    with pytest.raises(MMCError, match="NaN"):
        oracle.expected_subset_min(np.array([[1.0, np.nan]]), 1)


def test_subset_min_weights_stay_finite_for_large_pools():
    weights = oracle.subset_min_weights(2000, [1, 7, 1000, 2000])
    assert np.isfinite(weights).all() and (weights >= 0).all()
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(weights[1, :3], [math.comb(1999 - i, 6) / math.comb(2000, 7) for i in range(3)])


@pytest.mark.parametrize("ties", [False, True])
def test_shapley_values_equal_brute_force(ties):
    rng = np.random.default_rng(3)
    for n_models in range(1, 9):
        shape = (n_models, 13)
        nll = rng.integers(1, 4, shape).astype(float) if ties else rng.gamma(3.0, 10.0, shape)
        shapley = oracle.shapley_values(nll)
        np.testing.assert_allclose(shapley.sum(), nll.min(axis=0).mean(), rtol=1e-12)
        np.testing.assert_allclose(shapley, brute_force_shapley(nll), rtol=1e-9, atol=1e-12)


def test_win_shares_split_ties():
    nll = np.array([[1.0, 2.0, 3.0, 1.0],
                    [2.0, 1.0, 3.0, 1.0],
                    [3.0, 3.0, 3.0, 2.0]])
    np.testing.assert_allclose(oracle.win_shares(nll), [11 / 24, 11 / 24, 2 / 24])
    random = np.random.default_rng(4).integers(0, 3, (6, 50)).astype(float)
    assert oracle.win_shares(random).sum() == pytest.approx(1.0)


def test_enumerate_ensembles_exact_counts():
    ensembles = oracle.enumerate_ensembles(["a", "a", "b", "b", "c"], max_subsets_per_k=1000, seed=0)
    kinds = pd.Series([ensemble.kind for ensemble in ensembles]).value_counts().to_dict()
    assert kinds == {"single": 5, "homogeneous": 2, "heterogeneous": 24}
    assert {ensemble.members for ensemble in ensembles if ensemble.kind == "homogeneous"} == {(0, 1), (2, 3)}
    assert len({ensemble.members for ensemble in ensembles}) == 31  # every non-empty subset, once


def test_enumerate_ensembles_draws_are_seeded_distinct_and_of_the_right_kind():
    families = ["a"] * 6 + ["b"] * 5 + ["c"] * 4
    ensembles = oracle.enumerate_ensembles(families, max_subsets_per_k=7, seed=11)
    assert ensembles == oracle.enumerate_ensembles(families, max_subsets_per_k=7, seed=11)
    assert ensembles != oracle.enumerate_ensembles(families, max_subsets_per_k=7, seed=12)
    codes = np.array(families)
    for kind in ("homogeneous", "heterogeneous"):
        for k in range(2, len(families) + 1):
            subsets = [e.members for e in ensembles if e.kind == kind and len(e.members) == k]
            n_families = [len(set(codes[list(subset)])) for subset in subsets]
            homogeneous = sum(math.comb(n, k) for n in (6, 5, 4))
            available = homogeneous if kind == "homogeneous" else math.comb(len(families), k) - homogeneous
            assert len(subsets) == min(7, available) == len(set(subsets))
            assert all(list(subset) == sorted(set(subset)) for subset in subsets)
            assert all((n == 1) == (kind == "homogeneous") for n in n_families)
    with pytest.raises(MMCError, match="max_subsets_per_k"):
        oracle.enumerate_ensembles(families, max_subsets_per_k=0, seed=0)


def expected_table(pool: xr.Dataset, ensembles: list[oracle.Ensemble]) -> pd.DataFrame:
    nll = pool["nll"].values
    rows = []
    for ensemble in ensembles:
        members = list(ensemble.members)
        minimum = nll[members].min(axis=0)
        member_means = nll[members].mean(axis=1)
        winners = np.unique(np.array(members)[nll[members].argmin(axis=0)])  # distinct losses: one best per sample
        rows.append({"oracle_nll": minimum.mean(),
                     "oracle_bpb": minimum.sum() / (pool["n_bytes"].values.sum() * math.log(2)),
                     "total_params": int(pool["n_params"].values[members].sum()),
                     "best_member": str(pool["model"].values[members][member_means.argmin()]),
                     "best_member_nll": member_means.min(),
                     "gain": member_means.min() - minimum.mean(),
                     "winners": pool["model"].values[winners].tolist()})
    return pd.DataFrame(rows)


@pytest.mark.filterwarnings("ignore:The specified chunks separate the stored chunks")
@pytest.mark.parametrize("backing", ["numpy", "dask"])
def test_ensemble_table_equals_brute_force(backing, tmp_path, monkeypatch):
    monkeypatch.setattr(oracle, "ENSEMBLE_BLOCK", 5)  # several ensemble and sample blocks per chunk
    monkeypatch.setattr(oracle, "SAMPLE_BLOCK", 16)
    pool = make_pool(n_models=7, n_samples=61)
    if backing == "dask":
        write_store(pool, tmp_path / "pool.zarr", "pool")
        pool = open_store(tmp_path / "pool.zarr", chunks={"sample": 23})
        assert pool["nll"].chunks is not None
    ensembles = oracle.enumerate_ensembles(pool["family"].values, max_subsets_per_k=1000, seed=0)
    table = oracle.run_oracle(pool, max_subsets_per_k=1000, seed=0, sample_chunk=20)["ensembles"]
    assert len(table) == 2**7 - 1
    expected = expected_table(pool.load(), ensembles)
    for column in ("oracle_nll", "oracle_bpb", "best_member_nll", "gain"):
        np.testing.assert_allclose(table[column], expected[column], rtol=1e-12, atol=1e-12)
    assert (table["total_params"] == expected["total_params"]).all()
    assert (table["best_member"] == expected["best_member"]).all()
    assert table["winners"].tolist() == expected["winners"].tolist()
    assert (table.loc[table["kind"] == "single", "gain"] == 0).all()
    assert (table["gain"] >= 0).all()
    row = table.iloc[-1]
    assert (row.members, row.k, row.families, row.n_families) == ([f"m{i}" for i in range(7)], 7, ["a", "b", "c"], 3)
    assert row.total_params_nonembedding == 700_000 * 28


def test_ensemble_table_with_ties_and_wide_rank_types():
    pool = make_pool(n_models=300, n_samples=40, ties=True, families=["x"] * 150 + ["y"] * 150)
    ensembles = oracle.enumerate_ensembles(pool["family"].values, max_subsets_per_k=2, seed=5)
    table = oracle.run_oracle(pool, max_subsets_per_k=2, seed=5)["ensembles"]
    np.testing.assert_allclose(table["oracle_nll"], expected_table(pool, ensembles)["oracle_nll"], rtol=1e-12)


def test_ensembles_with_the_same_winners_have_one_loss_bit_for_bit():
    """Winners are the members an ensemble's oracle loss comes from, one per sample even where members tie (losses
    1, 2 or 3): their minimum is the ensemble's on every sample, and ensembles with the same winners (an ensemble
    whose added members win nothing, and its best member) have the same oracle loss exactly: one measurement."""
    pool = make_pool(n_models=6, n_samples=12, ties=True)
    table = oracle.run_oracle(pool, max_subsets_per_k=100, seed=0, sample_chunk=5)["ensembles"]
    nll = pool["nll"].to_pandas()
    for members, winners in zip(table.members, table.winners):
        assert set(winners) <= set(members)
        np.testing.assert_array_equal(nll.loc[winners].min(axis=0), nll.loc[members].min(axis=0))
    groups = oracle.winner_groups(table)
    assert len(set(groups)) < len(table)  # with 3 loss values on 12 samples, many ensembles share their winners
    for group in set(groups):
        assert table.oracle_bpb[groups == group].nunique() == 1
    assert (groups[table.kind == "single"] == np.arange(6)).all()
    with pytest.raises(MMCError, match="rerun `mmc oracle`"):
        oracle.winner_groups(table.drop(columns="winners"))


def test_oracle_rejects_bad_input():
    pool = make_pool(n_models=3, n_samples=5)
    with pytest.raises(MMCError, match="distinct model indices"):
        oracle._EnsembleMinima([oracle.Ensemble((0, 3), "heterogeneous")], 3)
    with pytest.raises(MMCError, match="not a pool"):
        oracle.run_oracle(pool.drop_vars("n_bytes"), max_subsets_per_k=1, seed=0)
    broken = pool.copy(deep=True)
    broken["nll"][1, 2] = np.nan
    with pytest.raises(MMCError, match="NaN"):
        oracle.run_oracle(broken, max_subsets_per_k=1, seed=0)


def test_pareto_frontier():
    table = pd.DataFrame({"members": list("abcdefg"),
                          "total_params": [10, 10, 20, 30, 30, 40, 50],
                          "oracle_nll": [5.0, 4.0, 4.0, 3.0, 3.5, 3.0, 1.0]})
    frontier = oracle.pareto_frontier(table)
    assert frontier["members"].tolist() == ["b", "d", "g"]
    assert frontier["total_params"].is_monotonic_increasing
    assert frontier["oracle_nll"].is_monotonic_decreasing


@pytest.mark.parametrize("backing", ["numpy", "dask"])
def test_expected_curves_end_points(backing):
    pool = make_pool(n_models=6, n_samples=50, families=["a", "a", "a", "b", "b", "c"])
    if backing == "dask":
        pool = pool.chunk({"sample": 17})
    curves = oracle.run_oracle(pool, 1, 0, sample_chunk=8)["expected_curves"].set_index(["scope", "k"])
    nll = pool["nll"].values
    bits = pool["n_bytes"].values.sum() * math.log(2)
    assert sorted(curves.index.unique("scope")) == ["a", "b", "c", "pool"]
    for scope, rows in {"pool": slice(None), "a": slice(0, 3), "b": slice(3, 5), "c": slice(5, 6)}.items():
        scoped = nll[rows]
        n_models = len(scoped)
        assert curves.loc[(scope, n_models), "expected_oracle_nll"] == pytest.approx(scoped.min(axis=0).mean())
        assert curves.loc[(scope, 1), "expected_oracle_nll"] == pytest.approx(scoped.mean())
        assert curves.loc[(scope, n_models), "expected_oracle_bpb"] == pytest.approx(scoped.min(axis=0).sum() / bits)
        params = pool["n_params"].values[rows]
        assert curves.loc[(scope, 1), "mean_total_params"] == pytest.approx(params.mean())
        assert curves.loc[(scope, n_models), "mean_total_params"] == pytest.approx(params.sum())
        for k in range(1, n_models + 1):
            expected = brute_force_expected_min(scoped, k).mean()
            assert curves.loc[(scope, k), "expected_oracle_nll"] == pytest.approx(expected, rel=1e-12)


def test_attribution_chunked_matches_in_memory():
    pool = make_pool(n_models=5, n_samples=70, ties=True)
    table = oracle.run_oracle(pool.chunk({"sample": 9}), 1, 0, sample_chunk=4)["attribution"]
    nll = pool["nll"].values
    np.testing.assert_allclose(table["shapley"], brute_force_shapley(nll), rtol=1e-12)
    np.testing.assert_allclose(table["win_share"], oracle.win_shares(nll), rtol=1e-12)
    np.testing.assert_allclose(table["mean_nll"], nll.mean(axis=1), rtol=1e-12)
    assert table["model"].tolist() == [f"m{m}" for m in range(5)]


def test_attribution_by_domain_is_the_attribution_of_each_domains_samples():
    pool = make_pool(n_models=4, n_samples=60, ties=True)
    domains = np.array(["b", "a", "c"])[np.arange(60) % 3]
    pool = pool.assign_coords(domain=("sample", domains))
    table = oracle.run_oracle(pool.chunk({"sample": 7}), 1, 0, sample_chunk=5)["attribution_by_domain"]
    assert table["domain"].unique().tolist() == ["a", "b", "c"] and (table["n_samples"] == 20).all()
    nll = pool["nll"].values
    for domain, rows in table.groupby("domain"):
        own = nll[:, domains == domain]
        np.testing.assert_allclose(rows["shapley"], brute_force_shapley(own), rtol=1e-12)
        np.testing.assert_allclose(rows["win_share"], oracle.win_shares(own), rtol=1e-12)
        np.testing.assert_allclose(rows["mean_nll"], own.mean(axis=1), rtol=1e-12)
    whole = oracle.run_oracle(pool, 1, 0)["attribution"]  # the domains' shares, weighted by their sizes, add up
    np.testing.assert_allclose(table.groupby("model", sort=False).shapley.mean(), whole["shapley"], rtol=1e-12)


def test_run_oracle_writes_outputs_atomically(tmp_path):
    pool = make_pool(n_models=6, n_samples=40)
    results = oracle.run_oracle(pool, max_subsets_per_k=4, seed=0)
    assert set(results) == {"ensembles", "expected_curves", "pareto", "attribution", "attribution_by_domain"}
    table = results["ensembles"]
    ensembles = oracle.enumerate_ensembles(pool["family"].values, max_subsets_per_k=4, seed=0)
    np.testing.assert_allclose(table["oracle_nll"], expected_table(pool, ensembles)["oracle_nll"], rtol=1e-12)
    out = tmp_path / "oracle"
    (out / "stale").mkdir(parents=True)
    with pytest.raises(MMCError, match="not written by mmc: refusing to replace it"):
        oracle.write_oracle_outputs(results, out)
    assert [path.name for path in out.iterdir()] == ["stale"]  # a folder mmc did not write is left alone
    (out / "stale").rmdir()
    oracle.write_oracle_outputs(results, out)
    oracle.write_oracle_outputs(results, out)  # its own output, replaced
    assert sorted(path.name for path in out.iterdir()) == [
        ".mmc-output", "attribution.csv", "attribution_by_domain.csv", "ensembles.csv", "ensembles.parquet",
        "expected_curves.csv", "pareto.csv"]
    pd.testing.assert_frame_equal(oracle.read_ensembles(out), table)
    for column in ("members", "winners"):
        assert pd.read_csv(out / "ensembles.csv")[column].map(json.loads).tolist() == table[column].tolist()
    np.testing.assert_array_equal(pd.read_csv(out / "ensembles.csv")["oracle_nll"], table["oracle_nll"])
    assert [path.name for path in tmp_path.iterdir()] == ["oracle"]  # no temporary left behind


def test_bootstrap_replicates_are_weighted_ensemble_losses(monkeypatch):
    rng = np.random.default_rng(3)
    nll = rng.gamma(2.0, 50.0, (4, 3000))
    n_bytes = rng.integers(50, 500, 3000)
    pool = xr.Dataset({"nll": (("model", "sample"), nll)},
                      coords={"model": ["a", "b", "c", "d"], "family": ("model", ["x", "x", "y", "y"]),
                              "n_params": ("model", [1, 2, 3, 4]), "n_params_nonembedding": ("model", [1, 2, 3, 4]),
                              "n_bytes": ("sample", n_bytes)})
    members = [["a"], ["a", "c"], ["b", "c", "d"]]
    replicates = oracle.bootstrap_ensembles(pool, members, n_bootstrap=5, seed=1, sample_chunk=1000)
    assert replicates.shape == (3, 5)
    # the weights are drawn per fixed block of samples, seeded by (seed, block index)
    weights = np.concatenate([np.random.default_rng([1, block]).poisson(1.0, (oracle.WEIGHT_BLOCK, 5))
                              for block in range(-(-3000 // oracle.WEIGHT_BLOCK))])[:3000]
    np.testing.assert_array_equal(oracle.poisson_weights(1, 0, 3000, 5), weights)
    np.testing.assert_array_equal(oracle.poisson_weights(1, 1500, 2500, 5), weights[1500:2500])
    for row, rows in enumerate([[0], [0, 2], [1, 2, 3]]):
        minima = nll[rows].min(axis=0)
        expected = (minima @ weights) / ((n_bytes @ weights) * np.log(2))
        np.testing.assert_allclose(replicates[row], expected, rtol=1e-10)
    assert not np.allclose(replicates[2], replicates[2, 0])  # replicates differ
    monkeypatch.setattr(oracle, "ENSEMBLE_BLOCK", 1)  # the same bits however many threads take the ensembles
    by_threads = []
    for threads in (1, 3):
        monkeypatch.setattr(oracle, "THREADS", threads)
        by_threads.append(oracle.bootstrap_ensembles(pool, members, 5, 1, 1000))
    np.testing.assert_array_equal(by_threads[0], by_threads[1])
    np.testing.assert_allclose(by_threads[0], replicates, rtol=1e-12)
    monkeypatch.undo()
    # the same replicates however the pool is chunked or streamed
    for sample_chunk, chunks in [(7, None), (65536, {"sample": 999})]:
        again = oracle.bootstrap_ensembles(pool if chunks is None else pool.chunk(chunks), members, 5, 1, sample_chunk)
        np.testing.assert_allclose(again, replicates, rtol=1e-12)
    # the replicates and the halves in one pass are the two passes' values, bit for bit
    together, halves = oracle.bootstrap_and_halves_ensembles(pool, members, 5, 1, sample_chunk=1000)
    np.testing.assert_array_equal(together, replicates)
    np.testing.assert_array_equal(halves, oracle.halves_ensembles(pool, members, 1, sample_chunk=1000))
    assert oracle.bootstrap_and_halves_ensembles(pool, members, 0, 1)[0] is None


def test_bootstrap_sums_do_not_depend_on_blas_threads(tmp_path):
    """The bootstrap's (ensembles × samples) @ (samples × resamples) products run with BLAS held to one thread
    (`one_library_thread`), so they do not depend on the machine's cores. Without it OpenBLAS gave 4 of these 5,332
    ensembles other last bits with 2 BLAS threads than with 1 (two AMD EPYC cores)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # consolidated-metadata notice of Zarr v3
        synthetic_pool(48, 2048, 65_536).to_zarr(tmp_path / "pool.zarr", zarr_format=3, mode="w")
    oracle.oracle_study(tmp_path / "pool.zarr", tmp_path / "oracle", max_subsets_per_k=100, seed=0)
    members = oracle.read_ensembles(tmp_path / "oracle").members.tolist()
    pool = open_store(tmp_path / "pool.zarr")
    by_blas_threads = []
    for threads in (1, 2):
        with threadpool_limits(threads, "blas"):
            by_blas_threads.append(oracle.bootstrap_ensembles(pool, members, 200, 0))
    np.testing.assert_array_equal(by_blas_threads[0], by_blas_threads[1])


@pytest.mark.parametrize("ties", [False, True])
def test_ensemble_minima_scan_and_elementwise_minimum_agree_with_brute_force(ties, monkeypatch):
    """Large ensembles are scanned from each sample's best model, small ones take the elementwise minimum of
    member ranks, and samples a short scan leaves unresolved fall back to it: every way gives the brute-force
    minimum over members, the same sums bit for bit and the same winners (ties between models included)."""
    monkeypatch.setattr(oracle, "ENSEMBLE_BLOCK", 4)
    monkeypatch.setattr(oracle, "SAMPLE_BLOCK", 16)
    n_models, n_samples = 40, 90
    rng = np.random.default_rng(7)
    shape = (n_models, n_samples)
    nll = rng.integers(1, 4, shape).astype(float) if ties else rng.gamma(3.0, 10.0, shape)
    ensembles = [oracle.Ensemble(tuple(sorted(rng.choice(n_models, k, replace=False).tolist())), "")
                 for k in range(1, n_models + 1) for _ in range(3)]
    chunk = oracle._Chunk(nll)
    best_rank = np.array([chunk.ranks[list(ensemble.members)].min(axis=0) for ensemble in ensembles])
    expected_sums = np.take_along_axis(chunk.ascending.T, best_rank, axis=0).sum(axis=1)
    expected_winners = np.zeros((len(ensembles), n_models), dtype=bool)
    expected_winners[np.arange(len(ensembles))[:, None], chunk.order[np.arange(n_samples), best_rank]] = True
    np.testing.assert_allclose(expected_sums, [nll[list(e.members)].min(axis=0).sum() for e in ensembles], rtol=1e-12)

    def minima(scan_step_cost: float = oracle.SCAN_STEP_COST, scan_miss: float = oracle.SCAN_MISS,
               threads: int = 1) -> oracle._EnsembleMinima:
        monkeypatch.setattr(oracle, "SCAN_STEP_COST", scan_step_cost)
        monkeypatch.setattr(oracle, "SCAN_MISS", scan_miss)
        monkeypatch.setattr(oracle, "THREADS", threads)
        result = oracle._EnsembleMinima(ensembles, n_models)
        for start in range(0, n_samples, 25):  # several chunks, as a pool is streamed
            result.update(oracle._Chunk(nll[:, start:start + 25], start))
        return result

    default = minima()
    assert {block.padded is None for block in default.blocks} == {True, False}  # both ways in use
    for settings in [{"scan_step_cost": 10**9},  # the elementwise minimum only
                     {"scan_step_cost": 0},  # a scan everywhere, deep enough to resolve every sample
                     {"scan_step_cost": 0, "scan_miss": 10.0**9},  # a scan of one position: mostly unresolved
                     {"threads": 3}]:  # blocks of ensembles taken by threads
        other = minima(**settings)
        np.testing.assert_array_equal(other.sums, default.sums)
        np.testing.assert_array_equal(other.winners, default.winners)
    np.testing.assert_allclose(default.sums, expected_sums, rtol=1e-12)
    np.testing.assert_array_equal(default.winners, expected_winners)
