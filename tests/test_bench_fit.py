"""Benchmark of `mmc fit` at 96 models × 100,000 samples with the default parameters (issue 26: at most 60 s).

Opt-in (MMC_BIG_BENCH=1): writes a synthetic pool (`synthetic_pool` of test_bench_oracle) to a temporary Zarr v3
store, runs the oracle stage on it as `mmc oracle` does, then times the fit stage (`fit_collaboration`, what
`mmc fit` calls) in a fresh subprocess, so that its peak RSS is the fit's alone:
    MMC_BIG_BENCH=1 python -m pytest tests/test_bench_fit.py --benchmark-enable -s
The 60 s target is printed beside the measured figure, not asserted: timings depend on the machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import yaml

from mmc.oracle import oracle_study
from conftest import ROOT
from test_bench_oracle import synthetic_pool

TARGET_SECONDS = 60.0
PEAK_RSS_LIMIT_BYTES = 4 * 1024**3

# Peak RSS from VmHWM, as in test_bench_oracle.RUN_ORACLE; CPU seconds beside wall seconds (a shared machine)
RUN_FIT = """
import json, sys, time
from mmc.collaboration import fit_collaboration

def high_water_mark_bytes():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))

pool, oracle, out, plots, settings = sys.argv[1:]
settings = json.loads(settings)
baseline = high_water_mark_bytes()
start, cpu = time.perf_counter(), time.process_time()
fit_collaboration(pool, oracle, out, plots, **settings)
seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
print(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds, "peak_rss_bytes": high_water_mark_bytes(),
                  "rss_before_bytes": baseline}))
"""


def default_settings() -> tuple[dict, dict]:
    """The oracle's and the fit's keyword arguments from params.yaml, as the DVC stages pass them."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    return params["oracle"], {**params["fit"], "sample_chunk": params["oracle"]["sample_chunk"]}


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("MMC_BIG_BENCH") != "1" or not sys.platform.startswith("linux"),
                    reason="set MMC_BIG_BENCH=1 (runs the oracle and the fit at 96 × 100,000; reads /proc for RSS)")
def test_bench_fit_96_models_100k_samples(benchmark, tmp_path):
    n_models, n_samples = 96, 100_000
    oracle_settings, fit_settings = default_settings()
    store, oracle_dir = tmp_path / "pool.zarr", tmp_path / "oracle"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # consolidated-metadata notice of Zarr v3
        synthetic_pool(n_models, n_samples, oracle_settings["sample_chunk"]).to_zarr(store, zarr_format=3, mode="w")
    n_ensembles = len(oracle_study(store, oracle_dir, **oracle_settings)["ensembles"])
    out, plots = tmp_path / "laws.json", tmp_path / "plots"

    def run() -> dict:
        completed = subprocess.run([sys.executable, "-c", RUN_FIT, str(store), str(oracle_dir), str(out), str(plots),
                                    json.dumps(fit_settings)], capture_output=True, text=True, check=True, cwd=ROOT)
        return json.loads(completed.stdout.strip().splitlines()[-1])

    measured = benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(n_models=n_models, n_samples=n_samples, n_ensembles=n_ensembles, **fit_settings,
                                **measured)
    print(f"\nmmc fit on {n_models} × {n_samples:,} ({n_ensembles} ensembles, bootstrap {fit_settings['bootstrap']}): "
          f"{measured['seconds']:.1f} s wall, {measured['cpu_seconds']:.1f} s CPU (target ≤ {TARGET_SECONDS:.0f} s), "
          f"peak RSS {measured['peak_rss_bytes'] / 2**30:.2f} GiB ({measured['rss_before_bytes'] / 2**30:.2f} GiB "
          f"before it started)")
    assert measured["peak_rss_bytes"] < PEAK_RSS_LIMIT_BYTES
    assert json.loads(out.read_text())["fits"]
    assert sorted(path.name for path in plots.iterdir() if not path.name.startswith(".")) == ["curves.csv",
                                                                                            "points.csv"]
