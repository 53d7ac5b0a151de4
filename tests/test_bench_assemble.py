"""Benchmark of `mmc assemble` on demand: N loss stores of S samples joined into one pool within 2 GiB.

It writes N synthetic loss stores as `mmc losses` writes them (`loss_dataset`, `write_store`), then runs
`write_pool` in a fresh subprocess so that its peak RSS is the assemble's alone. Sizes come from MMC_ASSEMBLE_SIZES
(comma-separated MODELSxSAMPLES, default 1000x100000: about 1.6 GB of stores, written first):
    MMC_BIG_BENCH=1 MMC_ASSEMBLE_SIZES=96x100000 python -m pytest tests/test_bench_assemble.py -s
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mmc.store import loss_dataset, open_store, write_store

PEAK_RSS_LIMIT_BYTES = 2 * 1024**3
SIZES = [tuple(int(n) for n in size.split("x"))
         for size in os.environ.get("MMC_ASSEMBLE_SIZES", "1000x100000").split(",")]

# Peak RSS is read from VmHWM (this process image's high-water mark): ru_maxrss would also count the pytest
# process that forked it, which inherits its maximum across fork and exec.
RUN_ASSEMBLE = """
import json, resource, sys, time
from mmc.store import write_pool

def high_water_mark_bytes():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))

def cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime

baseline, cpu = high_water_mark_bytes(), cpu_seconds()
start = time.perf_counter()
pool = write_pool(sys.argv[2:], sys.argv[1])
print(json.dumps({"seconds": time.perf_counter() - start, "cpu_seconds": cpu_seconds() - cpu,
                  "peak_rss_bytes": high_water_mark_bytes(), "rss_before_bytes": baseline}))
"""


def model_losses(model: int, n_bytes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Model `model`'s nll and n_tokens, the same whenever they are asked for (the check regenerates them)."""
    rng = np.random.default_rng([7, model])
    nll = n_bytes * (0.8 + 0.01 * (model % 50)) * rng.lognormal(0.0, 0.2, n_bytes.size)
    return nll, (n_bytes // (3 + model % 3) + 1).astype(np.int64)


def write_loss_stores(root, n_models: int, n_samples: int) -> tuple[list, np.ndarray]:
    n_bytes = np.random.default_rng(0).integers(20, 4000, n_samples)
    coords = {"sample": np.array([f"doc-{i:09d}" for i in range(n_samples)], dtype=object),
              "domain": ("sample", np.array(["code", "prose", "wiki"], dtype=object)[np.arange(n_samples) % 3])}
    paths = []
    for model in range(n_models):
        nll, n_tokens = model_losses(model, n_bytes)
        attrs = {"model": f"org/model-{model}", "family": f"family-{model % 7}", "n_params": 10**6 * (model + 1),
                 "n_params_nonembedding": 9 * 10**5 * (model + 1), "dataset_fingerprint": "fp-bench"}
        paths.append(root / f"m{model:04d}.zarr")
        write_store(loss_dataset(nll, n_tokens, n_bytes, coords, attrs), paths[-1], "loss store")
    return paths, n_bytes


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("MMC_BIG_BENCH") != "1" or not sys.platform.startswith("linux"),
                    reason="set MMC_BIG_BENCH=1 (writes N loss stores, 1.6 GB at the default size; reads peak RSS "
                           "from Linux /proc)")
@pytest.mark.parametrize(("n_models", "n_samples"), SIZES, ids=[f"{m}x{s}" for m, s in SIZES])
def test_bench_assemble(tmp_path, n_models, n_samples):
    paths, n_bytes = write_loss_stores(tmp_path, n_models, n_samples)
    out = tmp_path / "pool.zarr"
    completed = subprocess.run([sys.executable, "-c", RUN_ASSEMBLE, str(out), *map(str, paths)],
                               capture_output=True, text=True, check=True)
    measured = json.loads(completed.stdout.strip().splitlines()[-1])
    print(f"\nassemble {n_models} x {n_samples:,}: {measured['seconds']:.1f} s ({measured['cpu_seconds']:.1f} CPU s), "
          f"peak RSS {measured['peak_rss_bytes'] / 2**30:.2f} GiB ({measured['rss_before_bytes'] / 2**30:.2f} GiB "
          f"before it started)")
    assert measured["peak_rss_bytes"] <= PEAK_RSS_LIMIT_BYTES

    pool = open_store(out, chunks={})
    assert dict(pool.sizes) == {"model": n_models, "sample": n_samples}
    np.testing.assert_array_equal(pool.n_bytes.values, n_bytes)
    for model in sorted({0, n_models // 2, n_models - 1}):
        nll, n_tokens = model_losses(model, n_bytes)
        for start in sorted({0, n_samples // 2, max(n_samples - 1000, 0)}):
            row = pool.isel(model=model, sample=slice(start, start + 1000))
            np.testing.assert_array_equal(row.nll.values, nll[start:start + 1000])
            np.testing.assert_array_equal(row.n_tokens.values, n_tokens[start:start + 1000])
        assert pool.family.values[model] == f"family-{model % 7}" and pool.model.values[model] == f"m{model:04d}"
