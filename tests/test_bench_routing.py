"""Benchmarks of `mmc route` on pools of real size: 10k, 30k and 100k documents × 48 models, on demand.

Each size writes a synthetic pool (family structure: each family is best on its own domain's documents, and the
texts name their domain), its eval split and the oracle's ensembles, then runs `mmc route` in a fresh subprocess so
that its peak RSS is the route stage's alone (read from VmHWM, as in test_bench_oracle.py):
    MMC_BIG_BENCH=1 python -m pytest tests/test_bench_routing.py --benchmark-enable -s
`MMC_ROUTING_SIZES=10000,30000` picks the sizes. Memory is a contract (at most 4 GiB); time is recorded, not asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import datasets
import numpy as np
import pytest
import xarray as xr

from mmc.cli import main
from mmc.oracle import read_ensembles
from mmc.store import write_store

FAMILIES = ("gpt2", "llama", "mamba", "pythia", "qwen", "falcon")
DOMAIN_WORDS = ("def return import", "the river and the hill", "theorem proof lemma", "dear sir regards",
                "int main void", "chapter verse psalm")
PEAK_RSS_LIMIT_BYTES = 4 * 1024**3
N_MODELS = 48
MAX_SUBSETS_PER_K = 20  # the oracle's ensembles: 48 singles and up to 20 drawn per (kind, k)
SIZES = tuple(int(size) for size in os.environ.get("MMC_ROUTING_SIZES", "10000,30000,100000").split(","))


def write_routing_inputs(root: Path, n_models: int, n_documents: int, seed: int = 0) -> dict[str, Path]:
    """A pool of per-document NLLs with family structure, its eval split and the oracle's ensembles under `root`.

    A model's nll = bytes · (family floor + A·N^-0.3) · (0.8 on its family's domain, else 1.1) · noise, so the
    oracle gains across families and the texts (which name their domain) let routers learn who wins where."""
    rng = np.random.default_rng(seed)
    family = np.array(FAMILIES)[np.arange(n_models) % len(FAMILIES)]
    size_rank = np.arange(n_models) // len(FAMILIES)
    n_params = np.round(10 ** (6 + 3 * size_rank / max(size_rank.max(), 1))).astype(np.int64)
    domain = rng.integers(0, len(FAMILIES), n_documents)
    n_bytes = rng.integers(200, 4000, n_documents)
    floor = 1.0 + 0.1 * (np.arange(n_models) % len(FAMILIES))
    bits = (floor + 30.0 * n_params.astype(float) ** -0.3)[:, None] * np.where(
        (np.arange(n_models) % len(FAMILIES))[:, None] == domain[None], 0.8, 1.1)
    nll = bits * rng.lognormal(0.0, 0.05, (n_models, n_documents)) * n_bytes * np.log(2)
    bytes_per_token = 3.0 + 0.25 * (np.arange(n_models) % len(FAMILIES))
    sample_ids = np.char.add("s", np.arange(n_documents).astype(str))
    pool = xr.Dataset({"nll": (("model", "sample"), nll),
                       "n_tokens": (("model", "sample"), np.ceil(n_bytes / bytes_per_token[:, None]).astype(np.int32))},
                      coords={"model": [f"{f}-{r}" for f, r in zip(family, size_rank)], "family": ("model", family),
                              "n_params": ("model", n_params), "n_params_nonembedding": ("model", n_params // 2),
                              "n_bytes": ("sample", n_bytes), "sample": sample_ids})
    paths = {"pool": root / "pool.zarr", "data": root / "eval", "oracle": root / "oracle"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # consolidated-metadata notice of Zarr v3
        write_store(pool, paths["pool"], "pool")
    words = np.array(DOMAIN_WORDS)[domain]
    texts = np.char.add(np.char.add(words, " document "), np.arange(n_documents).astype(str))
    datasets.Dataset.from_dict({"sample_id": sample_ids.tolist(), "text": texts.tolist()}).save_to_disk(
        str(paths["data"]))
    assert main(["oracle", "--pool", str(paths["pool"]), "--out", str(paths["oracle"]),
                 "--max-subsets-per-k", str(MAX_SUBSETS_PER_K)]) == 0
    return paths


# Peak RSS from VmHWM: ru_maxrss of the children would also count the pytest process that forked them.
RUN_ROUTE = """
import json, sys, time
from mmc.cli import main

def high_water_mark_bytes():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))

baseline = high_water_mark_bytes()
start = time.perf_counter()
assert main(["route", *sys.argv[1:]]) == 0
print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_bytes": high_water_mark_bytes(),
                  "rss_before_bytes": baseline}))
"""


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("MMC_BIG_BENCH") != "1" or not sys.platform.startswith("linux"),
                    reason="set MMC_BIG_BENCH=1 (minutes per size; reads peak RSS from Linux /proc)")
@pytest.mark.parametrize("n_documents", SIZES)
def test_bench_route_at_real_size(benchmark, tmp_path, n_documents):
    paths = write_routing_inputs(tmp_path, N_MODELS, n_documents)

    def run() -> dict:
        completed = subprocess.run(
            [sys.executable, "-c", RUN_ROUTE, "--pool", str(paths["pool"]), "--oracle", str(paths["oracle"]),
             "--data", str(paths["data"]), "--out", str(tmp_path / "routing"), "--metrics",
             str(tmp_path / "routing.json")], capture_output=True, text=True, check=True)
        return json.loads(completed.stdout.strip().splitlines()[-1])

    measured = benchmark.pedantic(run, rounds=1, iterations=1)
    metrics = json.loads((tmp_path / "routing.json").read_text())
    n_ensembles = len(read_ensembles(paths["oracle"]))
    benchmark.extra_info.update(n_models=N_MODELS, n_documents=n_documents, n_ensembles=n_ensembles,
                                max_subsets_per_k=MAX_SUBSETS_PER_K,
                                router_training=metrics["router_training"], **measured)
    print(f"\nmmc route on {N_MODELS} × {n_documents:,}: {measured['seconds']:.1f} s, peak RSS "
          f"{measured['peak_rss_bytes'] / 2**30:.2f} GiB ({measured['rss_before_bytes'] / 2**30:.2f} GiB before it "
          f"started), {n_ensembles} ensembles")
    assert measured["peak_rss_bytes"] <= PEAK_RSS_LIMIT_BYTES
    assert sum(metrics["split"].values()) == n_documents
