"""Benchmarks of the whole oracle: a small in-memory pool on every run, on demand a 100 × 2,000,000 Zarr pool and
1,000-model pools of the sizes in MMC_ORACLE_SAMPLES (default 100,000).

The big ones (MMC_BIG_BENCH=1) write a synthetic dask-generated pool to a temporary Zarr v3 store, then
run `run_oracle` on it in a fresh subprocess so that its peak RSS is the oracle's alone:
    MMC_BIG_BENCH=1 python -m pytest tests/test_bench_oracle.py --benchmark-enable -s
    MMC_BIG_BENCH=1 MMC_ORACLE_SAMPLES=10000,30000,100000 python -m pytest tests/test_bench_oracle.py -s -k 1000
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import xarray as xr

from mmc import oracle

FAMILIES = ("gpt2", "llama", "mamba", "pythia", "qwen")
PEAK_RSS_LIMIT_BYTES = 8 * 1024**3
PEAK_RSS_LIMIT_1000_MODELS_BYTES = 4 * 1024**3  # issue 26: 1,000 models × 100,000 samples within 4 GB
BIG_BENCH = pytest.mark.skipif(os.environ.get("MMC_BIG_BENCH") != "1" or not sys.platform.startswith("linux"),
                               reason="set MMC_BIG_BENCH=1 (writes GB-sized stores; reads peak RSS from Linux /proc)")


def synthetic_pool(n_models: int, n_samples: int, sample_chunk: int, seed: int = 0) -> xr.Dataset:
    """A dask-backed pool generated chunk by chunk (never whole in memory): bigger models of a family are
    better on average, families differ, and every sample has its own difficulty and length."""
    family = np.array(FAMILIES)[np.arange(n_models) % len(FAMILIES)]
    size_rank = np.arange(n_models) // len(FAMILIES)
    n_params = np.round(10 ** (7 + 3 * size_rank / max(size_rank.max(), 1))).astype(np.int64)
    nats_per_byte = (0.6 + 40 * n_params.astype(float) ** -0.3) * (1 + 0.05 * (np.arange(n_models) % 5))
    bytes_per_token = 3.0 + np.arange(n_models) % len(FAMILIES) * 0.25
    chunks = ((n_models,), tuple(np.diff(np.r_[0:n_samples:sample_chunk, n_samples])))

    def sample_block(block_info: dict) -> tuple[np.random.Generator, int]:
        start, stop = block_info[None]["array-location"][-1]
        return np.random.default_rng([seed, start]), stop - start

    def sample_bytes(rng: np.random.Generator, size: int) -> np.ndarray:
        return rng.integers(100, 8000, size)

    def nll_block(block_info=None) -> np.ndarray:
        rng, size = sample_block(block_info)
        n_bytes, difficulty = sample_bytes(rng, size), rng.lognormal(0.0, 0.3, size)
        noise = rng.lognormal(0.0, 0.15, (n_models, size))
        return nats_per_byte[:, None] * (n_bytes * difficulty) * noise

    def tokens_block(block_info=None) -> np.ndarray:
        rng, size = sample_block(block_info)
        return np.ceil(sample_bytes(rng, size) / bytes_per_token[:, None]).astype(np.int32)

    def bytes_block(block_info=None) -> np.ndarray:
        rng, size = sample_block(block_info)
        return sample_bytes(rng, size)

    meta = {"meta": np.empty((0, 0))}
    return xr.Dataset(
        {"nll": (("model", "sample"), da.map_blocks(nll_block, chunks=chunks, dtype=np.float64, **meta)),
         "n_tokens": (("model", "sample"), da.map_blocks(tokens_block, chunks=chunks, dtype=np.int32, **meta))},
        coords={"model": [f"{f}-{r}" for f, r in zip(family, size_rank)],
                "family": ("model", family.astype(object)),
                "n_params": ("model", n_params),
                "n_params_nonembedding": ("model", (n_params * 0.8).astype(np.int64)),
                "n_bytes": ("sample", da.map_blocks(bytes_block, chunks=chunks[1:], dtype=np.int64,
                                                    meta=np.empty(0, np.int64)))})


def check_results(results: dict, n_models: int) -> None:
    table = results["ensembles"]
    full_pool = table.loc[table["k"] == n_models, "oracle_nll"].iloc[0]
    assert results["attribution"]["shapley"].sum() == pytest.approx(full_pool, rel=1e-9)
    assert results["attribution"]["win_share"].sum() == pytest.approx(1.0)
    curves = results["expected_curves"].set_index(["scope", "k"])
    assert curves.loc[("pool", n_models), "expected_oracle_nll"] == pytest.approx(full_pool, rel=1e-9)
    assert (results["ensembles"]["gain"] >= 0).all()


def test_bench_oracle_small_in_memory(benchmark):
    n_models, n_samples = 20, 50_000
    pool = synthetic_pool(n_models, n_samples, sample_chunk=n_samples).load()
    results = benchmark.pedantic(oracle.run_oracle, args=(pool, 20, 0), rounds=1, iterations=1)
    check_results(results, n_models)
    benchmark.extra_info.update(n_models=n_models, n_samples=n_samples, n_ensembles=len(results["ensembles"]))


# Peak RSS is read from VmHWM (this process image's high-water mark): ru_maxrss would also count the pytest
# process that forked it, which inherits its maximum across fork and exec.
RUN_ORACLE = """
import json, sys, time, warnings
import xarray as xr
from mmc import oracle

def high_water_mark_bytes():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    pool = xr.open_zarr(sys.argv[1], chunks={})
baseline = high_water_mark_bytes()
start, cpu_start = time.perf_counter(), time.process_time()
results = oracle.run_oracle(pool, max_subsets_per_k=int(sys.argv[3]), seed=0)
seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
oracle.write_oracle_outputs(results, sys.argv[2])
print(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds,
                  "write_seconds": time.perf_counter() - start - seconds,
                  "write_cpu_seconds": time.process_time() - cpu_start - cpu_seconds,
                  "peak_rss_bytes": high_water_mark_bytes(), "rss_before_bytes": baseline,
                  "n_ensembles": len(results["ensembles"])}))
"""


def run_oracle_subprocess(store: Path, out: Path, max_subsets_per_k: int) -> dict:
    """`run_oracle` then `write_oracle_outputs` in a fresh process: seconds (wall and CPU) and peak RSS."""
    completed = subprocess.run([sys.executable, "-c", RUN_ORACLE, str(store), str(out), str(max_subsets_per_k)],
                               capture_output=True, text=True, check=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@BIG_BENCH
def test_bench_oracle_big_zarr_pool(benchmark, tmp_path):
    n_models, n_samples, sample_chunk, max_subsets_per_k = 100, 2_000_000, 100_000, 50
    store = tmp_path / "pool.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # consolidated-metadata notice of Zarr v3
        synthetic_pool(n_models, n_samples, sample_chunk).to_zarr(store, zarr_format=3, mode="w")

    measured = benchmark.pedantic(run_oracle_subprocess, args=(store, tmp_path / "oracle", max_subsets_per_k),
                                  rounds=1, iterations=1)
    benchmark.extra_info.update(n_models=n_models, n_samples=n_samples, max_subsets_per_k=max_subsets_per_k,
                                **measured)
    print(f"\nrun_oracle on {n_models} × {n_samples:,}: {measured['seconds']:.1f} s, "
          f"peak RSS {measured['peak_rss_bytes'] / 2**30:.2f} GiB ({measured['rss_before_bytes'] / 2**30:.2f} GiB "
          f"before it started), {measured['n_ensembles']} ensembles")
    assert measured["peak_rss_bytes"] < PEAK_RSS_LIMIT_BYTES
    assert sorted(path.name for path in Path(tmp_path / "oracle").iterdir()) == [
        "attribution.csv", "ensembles.csv", "ensembles.parquet", "expected_curves.csv", "pareto.csv"]


@pytest.mark.slow
@BIG_BENCH
@pytest.mark.parametrize("n_samples", [int(size) for size in os.environ.get("MMC_ORACLE_SAMPLES", "100000").split(",")])
def test_bench_oracle_1000_models(n_samples, tmp_path):
    """`mmc oracle`'s defaults (max_subsets_per_k = 100, sample_chunk = 65,536) at 1,000 models: some 120,000
    ensembles of some 450 members on average. Run at several sizes, the seconds give a fixed cost and a cost per
    sample to extrapolate from (docs/results/benchmarks.md)."""
    n_models, sample_chunk, max_subsets_per_k = 1000, 65_536, 100
    store = tmp_path / "pool.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        synthetic_pool(n_models, n_samples, sample_chunk).to_zarr(store, zarr_format=3, mode="w")
    measured = run_oracle_subprocess(store, tmp_path / "oracle", max_subsets_per_k)
    print(f"\nrun_oracle on {n_models} × {n_samples:,}: {measured['seconds']:.1f} s ({measured['cpu_seconds']:.1f} s "
          f"CPU), then written in {measured['write_seconds']:.1f} s ({measured['write_cpu_seconds']:.1f} s CPU); peak "
          f"RSS {measured['peak_rss_bytes'] / 2**30:.2f} GiB; {measured['n_ensembles']} ensembles")
    print(json.dumps(measured))
    assert measured["peak_rss_bytes"] <= PEAK_RSS_LIMIT_1000_MODELS_BYTES
