"""Benchmark of `mmc oracle` and `mmc fit` with `--scheduler` on a two-process dask LocalCluster against one process
(issue 26), at 48 models × 100,000 samples; opt-in (MMC_BIG_BENCH=1):
    MMC_BIG_BENCH=1 python -m pytest tests/test_bench_cluster.py -s

Each command runs as a user runs it, `mmc ...` in a fresh process, three ways: alone (its default threads), alone
on one core (`taskset -c 0`: what one worker thread has), and with `--scheduler` on a LocalCluster of two worker
processes of one thread each, started beforehand (a cluster is up before its users' commands). Every output file
of the three is compared byte for byte. Blocks of MMC_CLUSTER_CHUNK samples (default 16,384: seven blocks, so that
two workers share them evenly; the default 65,536 makes two blocks of unequal size). Timings are printed, not
asserted: they depend on the machine.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import warnings

import pytest

from conftest import ROOT
from test_bench_oracle import synthetic_pool

N_MODELS, N_SAMPLES = 48, 100_000
SAMPLE_CHUNK = int(os.environ.get("MMC_CLUSTER_CHUNK", "16384"))
ROUNDS = 2


def files_of(folder) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("MMC_BIG_BENCH") != "1" or not shutil.which("taskset"),
                    reason="set MMC_BIG_BENCH=1 (writes a 48 × 100,000 pool; needs taskset)")
def test_bench_oracle_and_fit_on_a_two_process_cluster(tmp_path):
    distributed = pytest.importorskip("distributed")
    pool = tmp_path / "pool.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # consolidated-metadata notice of Zarr v3
        synthetic_pool(N_MODELS, N_SAMPLES, 65_536).to_zarr(pool, zarr_format=3, mode="w")

    def commands(out, scheduler: list[str]) -> list[list[str]]:
        chunk = ["--sample-chunk", str(SAMPLE_CHUNK)]
        return [["oracle", "--pool", str(pool), "--out", str(out / "oracle"), "--max-subsets-per-k", "100", *chunk,
                 *scheduler],
                ["fit", "--pool", str(pool), "--oracle", str(out / "oracle"), "--out", str(out / "laws.json"),
                 "--plots", str(out / "plots"), "--bootstrap", "200", *chunk, *scheduler]]

    def run(way: str, prefix: list[str], scheduler: list[str], round_: int) -> list[float]:
        out = tmp_path / f"{way}-{round_}"
        seconds = []
        for command in commands(out, scheduler):
            start = time.perf_counter()
            subprocess.run([*prefix, sys.executable, "-m", "mmc.cli", *command], check=True, cwd=ROOT,
                           capture_output=True)
            seconds.append(time.perf_counter() - start)
        return seconds

    timings: dict[str, list[list[float]]] = {}
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        ways = {"alone": ([], []), "one core": (["taskset", "-c", "0"], []),
                "cluster": ([], ["--scheduler", cluster.scheduler_address])}
        for round_ in range(ROUNDS):  # interleaved: a drift of the machine's speed touches every way alike
            for way, (prefix, scheduler) in ways.items():
                timings.setdefault(way, []).append(run(way, prefix, scheduler, round_))
    expected = files_of(tmp_path / "alone-0")
    for way in ways:
        for round_ in range(ROUNDS):
            assert files_of(tmp_path / f"{way}-{round_}") == expected, (way, round_)
    print(f"\n{N_MODELS} models × {N_SAMPLES:,} samples, blocks of {SAMPLE_CHUNK:,}; seconds per round "
          f"(oracle, fit), {ROUNDS} rounds:")
    for way, rounds in timings.items():
        print(f"  {way:9s} " + "  ".join(f"({oracle_s:5.1f}, {fit_s:5.1f})" for oracle_s, fit_s in rounds))
    for command, column in (("oracle", 0), ("fit", 1)):
        best = {way: min(rounds[column] for rounds in timings[way]) for way in timings}
        print(f"  {command}: cluster {best['alone'] / best['cluster']:.2f}× one process, "
              f"{best['one core'] / best['cluster']:.2f}× one process on one core (best of {ROUNDS})")
