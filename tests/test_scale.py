"""Scoring at scale: resuming after a kill, shards joined into the store a single run writes; the oracle on a
dask.distributed cluster and on fsspec URLs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import fsspec
import numpy as np
import pandas as pd
import pytest
import xarray as xr
from conftest import EVAL_TEXTS, ROOT, synthetic_pool

from mmc import MMCError, losses, oracle, store
from mmc.store import (
    assemble_pool,
    check_outputs,
    dask_scheduler,
    open_store,
    partial_path,
    write_store,
)

OPTIONS = ["--device", "cpu", "--dtype", "float32", "--batch-tokens", "64"]
KILLED_AFTER = 5  # batches a killed run completes


def mmc_run(*args: str, kill_after: int | None = None) -> subprocess.Popen:
    """`mmc ARGS` in a subprocess; with `kill_after`, it SIGKILLs itself when about to score batch kill_after + 1."""
    script = textwrap.dedent(f"""
        import os, signal, sys
        import mmc.losses
        from mmc.cli import main
        score, calls = mmc.losses.window_nll, []
        def window_nll(*args, **kwargs):
            calls.append(1)
            if {kill_after!r} is not None and len(calls) > {kill_after!r}:
                os.kill(os.getpid(), signal.SIGKILL)
            return score(*args, **kwargs)
        mmc.losses.window_nll = window_nll
        sys.exit(main(sys.argv[1:]))
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-c", script, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.fixture
def count_batches(monkeypatch):
    """Counts the batches scored in this process."""
    calls = []
    score = losses.window_nll

    def counting(*args, **kwargs):
        calls.append(1)
        return score(*args, **kwargs)

    monkeypatch.setattr(losses, "window_nll", counting)
    return calls


@pytest.fixture(scope="module")
def whole_run(gpt2_dir, eval_dir, tmp_path_factory):
    """An uninterrupted run, in a subprocess as the others."""
    out = tmp_path_factory.mktemp("whole") / "gpt2.zarr"
    process = mmc_run("losses", "--model", str(gpt2_dir), "--data", str(eval_dir), "--out", str(out), *OPTIONS)
    assert process.wait() == 0, process.stderr.read()
    return open_store(out)


def score(gpt2_dir, eval_dir, out, **options) -> xr.Dataset:
    losses.write_losses(str(gpt2_dir), eval_dir, out, device="cpu", dtype="float32", batch_tokens=64, **options)
    return open_store(out)


def test_a_killed_run_resumes_where_it_stopped(gpt2_dir, eval_dir, tmp_path, whole_run, count_batches):
    out = tmp_path / "losses" / "gpt2.zarr"
    killed = mmc_run("losses", "--model", str(gpt2_dir), "--data", str(eval_dir), "--out", str(out), *OPTIONS,
                     "--flush-every", "0", kill_after=KILLED_AFTER)
    assert killed.wait() == -9
    assert not out.exists() and partial_path(out).is_file()
    assert partial_path(out).name == ".gpt2.zarr.partial"

    resumed = score(gpt2_dir, eval_dir, out, flush_every=0)
    loaded = losses.load_model(str(gpt2_dir), device="cpu", dtype="float32")
    n_batches = len(losses.plan_scoring(loaded, EVAL_TEXTS, batch_tokens=64)[1])
    assert n_batches > KILLED_AFTER + 5
    assert len(count_batches) == n_batches - KILLED_AFTER
    xr.testing.assert_identical(resumed, whole_run)
    assert not partial_path(out).exists()  # the output is written: its progress is gone


def test_progress_of_other_options_is_not_mixed_in(gpt2_dir, eval_dir, tmp_path, count_batches):
    out = tmp_path / "gpt2.zarr"
    killed = mmc_run("losses", "--model", str(gpt2_dir), "--data", str(eval_dir), "--out", str(out), *OPTIONS,
                     "--flush-every", "0", kill_after=KILLED_AFTER)
    assert killed.wait() == -9
    with pytest.warns(UserWarning, match="other inputs or options: starting over"):
        strided = score(gpt2_dir, eval_dir, out, stride=8)
    loaded = losses.load_model(str(gpt2_dir), device="cpu", dtype="float32")
    assert len(count_batches) == len(losses.plan_scoring(loaded, EVAL_TEXTS, stride=8, batch_tokens=64)[1])
    assert strided.attrs["window"] == "stride=8"
    direct = losses.compute_losses(str(gpt2_dir), eval_dir, device="cpu", dtype="float32", batch_tokens=64, stride=8)
    np.testing.assert_array_equal(strided.nll.values, direct.nll.values)


def test_shards_combine_into_the_single_run(gpt2_dir, eval_dir, tmp_path, whole_run):
    shards = [tmp_path / f"gpt2.shard{i}.zarr" for i in range(2)]
    processes = [mmc_run("losses", "--model", str(gpt2_dir), "--data", str(eval_dir), "--out", str(shard), *OPTIONS,
                         "--shard", f"{i}/2") for i, shard in enumerate(shards)]
    for process in processes:
        assert process.wait() == 0, process.stderr.read()
    sizes = [open_store(shard).sizes["window"] for shard in shards]
    assert min(sizes) > 0 and sum(sizes) == json.loads(open_store(shards[0]).attrs["shard"])["n_windows"]

    combined = losses.combine_shards(shards[::-1], tmp_path / "gpt2.zarr")
    xr.testing.assert_identical(open_store(tmp_path / "gpt2.zarr"), whole_run)
    assert "shard" not in combined.attrs

    with pytest.raises(MMCError, match=r"shards of 2 do not combine: missing \[1\]"):
        losses.combine_shards(shards[:1], tmp_path / "one.zarr")
    with pytest.raises(MMCError, match=r"missing \[1\]; given twice \[0\]"):
        losses.combine_shards([shards[0], shards[0]], tmp_path / "twice.zarr")
    other = open_store(shards[1])
    other.attrs["model"] = "another-model"
    write_store(other, tmp_path / "other.zarr", "loss shard")
    with pytest.raises(MMCError, match="does not belong with .* they differ in model"):
        losses.combine_shards([shards[0], tmp_path / "other.zarr"], tmp_path / "mixed.zarr")
    with pytest.raises(MMCError, match="is not a shard store"):
        losses.combine_shards([shards[0], tmp_path / "gpt2.zarr"], tmp_path / "mixed.zarr")
    with pytest.raises(MMCError, match="is one shard of a scoring run: join the shards first"):
        assemble_pool([shards[0], tmp_path / "gpt2.zarr"])


def test_shard_settings_are_checked(gpt2_dir, eval_dir, tmp_path):
    for shard, message in (((2, 2), r"--shard index I must be an integer in \[0, 1\]"),
                           ((0, 0), r"--shard count N must be an integer in \[1, inf\]"),
                           ((0, 10_000), "10000 shards, but scoring these samples takes only")):
        with pytest.raises(MMCError, match=message):
            losses.compute_losses(str(gpt2_dir), eval_dir, device="cpu", dtype="float32", shard=shard)


# ---- the oracle on a cluster and on URLs


@pytest.fixture(scope="module")
def pool_path(tmp_path_factory):
    return synthetic_pool(tmp_path_factory.mktemp("pool") / "pool.zarr", n_samples=300)


def read_tables(folder) -> dict[str, pd.DataFrame]:
    return {name: pd.read_csv(folder / f"{name}.csv") for name in oracle.OUTPUT_CSVS}


def test_oracle_and_bootstrap_on_a_local_cluster_equal_one_process(pool_path, tmp_path):
    distributed = pytest.importorskip("distributed")
    oracle.oracle_study(pool_path, tmp_path / "alone", max_subsets_per_k=20, seed=0, sample_chunk=64)
    pool = open_store(pool_path, chunks={})
    ensembles = oracle.read_ensembles(tmp_path / "alone").members.tolist()  # as `fit` bootstraps them
    boot_alone = oracle.bootstrap_ensembles(pool, ensembles, 30, seed=1, sample_chunk=64)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        oracle.oracle_study(pool_path, tmp_path / "cluster", max_subsets_per_k=20, seed=0, sample_chunk=64,
                            scheduler=cluster.scheduler_address)
        with dask_scheduler(cluster.scheduler_address):
            boot_cluster = oracle.bootstrap_ensembles(pool, ensembles, 30, seed=1, sample_chunk=64)
        read_there = {prefix for prefix in cluster.scheduler.task_prefixes if "open_dataset" in prefix}
    assert read_there  # the workers read the pool's chunks
    for name, table in read_tables(tmp_path / "alone").items():
        pd.testing.assert_frame_equal(read_tables(tmp_path / "cluster")[name], table, check_exact=True)
    np.testing.assert_array_equal(boot_cluster, boot_alone)


def test_unreachable_scheduler_is_one_line(pool_path, tmp_path, monkeypatch):
    pytest.importorskip("distributed")
    monkeypatch.setattr(store, "DASK_CONNECT_SECONDS", 1)
    with pytest.raises(MMCError, match="cannot connect to the dask scheduler at 'tcp://127.0.0.1:9'"):
        oracle.oracle_study(pool_path, tmp_path / "out", max_subsets_per_k=5, seed=0, scheduler="tcp://127.0.0.1:9")


def test_stores_are_read_from_urls_and_written_to_file_urls(pool_path, tmp_path):
    oracle.oracle_study(pool_path, tmp_path / "by_path", max_subsets_per_k=20, seed=0)
    oracle.oracle_study(pool_path.as_uri(), (tmp_path / "by_url").as_uri(), max_subsets_per_k=20, seed=0)
    expected = read_tables(tmp_path / "by_path")
    for name, table in read_tables(tmp_path / "by_url").items():
        pd.testing.assert_frame_equal(table, expected[name], check_exact=True)
    pd.testing.assert_frame_equal(oracle.read_ensembles((tmp_path / "by_url").as_uri()),
                                  oracle.read_ensembles(tmp_path / "by_path"))
    assert (tmp_path / "by_url" / ".mmc-output").read_text() == "oracle tables\n"

    memory = fsspec.filesystem("memory")
    memory.put(str(pool_path), "/scale-test/pool.zarr", recursive=True)
    try:
        xr.testing.assert_identical(open_store("memory://scale-test/pool.zarr"), open_store(pool_path))
        with pytest.raises(MMCError, match="store 'memory://scale-test/missing.zarr' does not exist"):
            open_store("memory://scale-test/missing.zarr")
        with pytest.raises(MMCError, match="cannot write 'memory://scale-test/oracle': mmc writes outputs "
                                           "atomically on a local filesystem only"):
            oracle.oracle_study("memory://scale-test/pool.zarr", "memory://scale-test/oracle", max_subsets_per_k=20,
                                seed=0)
    finally:
        memory.rm("/scale-test", recursive=True)
    with pytest.raises(MMCError, match="cannot write 's3://bucket/pool.zarr'"):
        check_outputs([("s3://bucket/pool.zarr", "pool")])
