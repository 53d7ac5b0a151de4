"""Scoring at scale: resuming after a kill, shards joined into the store a single run writes; the oracle on a
dask.distributed cluster and on fsspec URLs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import datasets
import fsspec
import numpy as np
import pandas as pd
import pytest
import xarray as xr
from conftest import EVAL_TEXTS, ROOT, flip_byte, synthetic_pool

from mmc import MMCError, losses, oracle, store
from mmc.collaboration import fit_collaboration
from mmc.cli import main
from mmc.store import (
    assemble_pool,
    check_outputs,
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


@pytest.fixture(scope="module")
def shard_stores(gpt2_dir, eval_dir, tmp_path_factory):
    """The two shard stores of one run (`--shard 0/2`, `--shard 1/2`), scored in this process."""
    root = tmp_path_factory.mktemp("shards")
    paths = [root / f"gpt2.shard{i}.zarr" for i in range(2)]
    for i, path in enumerate(paths):
        losses.write_losses(str(gpt2_dir), eval_dir, path, device="cpu", dtype="float32", batch_tokens=64,
                            shard=(i, 2))
    return paths


def rewritten_shard(path, out, change=None, **schedule):
    """The shard store at `path` written to `out`, its schedule (the shard attr) updated with `schedule` and its
    dataset passed through `change`."""
    dataset = open_store(path)
    dataset.attrs[losses.SHARD_ATTR] = json.dumps({**json.loads(dataset.attrs[losses.SHARD_ATTR]), **schedule})
    write_store(change(dataset) if change else dataset, out, "loss shard")
    return out


def test_shards_scored_on_several_gpus_combine_into_the_single_run(shard_stores, tmp_path, whole_run):
    first, second = shard_stores
    assert json.loads(open_store(first).attrs[losses.SHARD_ATTR])["device"] == "cpu"  # the device type, no index
    # `mmc losses --device cuda:$LOCAL_RANK --shard I/N`: each rank records its own device (shards written before
    # devices were recorded by type hold the index); only the type decides
    for devices in (("cuda:0", "cuda:1"), ("cuda:0", "cuda"), ("cuda", "cuda:3")):
        shards = [rewritten_shard(path, tmp_path / f"{device}.{i}.zarr", device=device)
                  for i, (path, device) in enumerate(zip(shard_stores, devices))]
        out = tmp_path / f"{'-'.join(devices)}.zarr"
        losses.combine_shards(shards, out)
        xr.testing.assert_identical(open_store(out), whole_run)
    # another device type computes other numbers: refused
    on_gpu = rewritten_shard(second, tmp_path / "gpu.zarr", device="cuda:1")
    with pytest.raises(MMCError, match=f"shard '{on_gpu}' does not belong with '{first}': they differ in device$"):
        losses.combine_shards([first, on_gpu], tmp_path / "mixed.zarr")
    assert not (tmp_path / "mixed.zarr").exists()


def shift_window(dataset, to):
    windows = dataset["window"].values.copy()
    windows[-1] = to(windows)
    return dataset.assign_coords(window=windows)


MALFORMED_SHARDS = {
    "a window index beyond the schedule": (
        lambda d, n: shift_window(d, lambda w: n + 5), r"its window indices run from \d+ to {n5}, outside the {n} "
                                                       r"windows of its schedule"),
    "a negative window index": (lambda d, n: shift_window(d, lambda w: -1), "its window indices run from -1 to"),
    "a window of the other shard": (
        lambda d, n: shift_window(d, lambda w: min(set(range(n)) - set(w.tolist()))),
        r"it repeats 1 windows of '{first}' \(first window \d+\): the shards of one run hold disjoint windows"),
    "per-window losses of another length": (
        lambda d, n: d.assign(window_nll=("other", d.window_nll.values[:-1])),
        r"its window_nll is float64 over \('other',\), not float over \('window',\)"),
    "window documents as floats": (lambda d, n: d.assign(window_doc=d.window_doc.astype(float)),
                                   r"its window_doc is float64 over \('window',\), not integer over \('window',\)"),
    "window documents beyond the samples": (lambda d, n: d.assign(window_doc=d.window_doc + 100),
                                            r"its windows belong to samples \d+ to \d+, outside the 6 samples"),
}


@pytest.mark.parametrize("craft", MALFORMED_SHARDS)
def test_a_malformed_shard_is_refused_in_one_line_naming_it(craft, shard_stores, tmp_path, capsys):
    first, second = shard_stores
    n_windows = json.loads(open_store(first).attrs[losses.SHARD_ATTR])["n_windows"]
    change, needle = MALFORMED_SHARDS[craft]
    crafted = rewritten_shard(second, tmp_path / "crafted.zarr", lambda dataset: change(dataset, n_windows))
    out = tmp_path / "gpt2.zarr"
    assert main(["combine-shards", "--out", str(out), str(first), str(crafted)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"mmc combine-shards: error: shard '{crafted}' cannot be combined: "), err
    assert re.search(needle.format(n=n_windows, n5=n_windows + 5, first=re.escape(str(first))), err), err
    assert not out.exists()


def test_shards_that_leave_a_window_unscored_are_refused(shard_stores, tmp_path, capsys):
    first, second = shard_stores
    truncated = rewritten_shard(second, tmp_path / "truncated.zarr", lambda dataset: dataset.isel(window=slice(1, None)))
    assert main(["combine-shards", "--out", str(tmp_path / "gpt2.zarr"), str(first), str(truncated)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "the shards leave 1 of the" in err and "windows of their schedule unscored" \
        in err, err


# ---- the oracle on a cluster and on URLs


@pytest.fixture(scope="module")
def pool_path(tmp_path_factory):
    return synthetic_pool(tmp_path_factory.mktemp("pool") / "pool.zarr", n_samples=300)


def read_tables(folder) -> dict[str, pd.DataFrame]:
    return {name: pd.read_csv(folder / f"{name}.csv") for name in oracle.OUTPUT_CSVS}


def files_of(folder) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def local_cluster():
    """A dask LocalCluster of two worker processes of one thread each."""
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        yield cluster


def test_oracle_and_fit_on_a_local_cluster_equal_one_process_to_the_byte(tmp_path, local_cluster):
    """With --scheduler every block of samples is read and summed on a worker, and the blocks' sums are added in
    their order, as one process adds them: every output of oracle and fit is the same to the byte (attribution by
    domain included), and the blocks were summed by both workers, none in this process."""
    distributed = pytest.importorskip("distributed")
    # 8,200 samples in 4 blocks of 2,050, each summed in two parts (oracle.SAMPLE_BLOCK is 2,048): sums of sums
    n_samples, sample_chunk, blocks = 8200, 2050, 4
    pool = open_store(synthetic_pool(tmp_path / "unlabelled.zarr", n_samples=n_samples))
    pool_path = tmp_path / "pool.zarr"
    write_store(pool.assign_coords(domain=("sample", np.array(["code", "prose", "math"])[np.arange(n_samples) % 3])),
                pool_path, "pool")
    for where in ("alone", "cluster"):
        (tmp_path / where).mkdir()

    def study(where: str, scheduler: str | None) -> None:
        folder = tmp_path / where
        oracle.oracle_study(pool_path, folder / "oracle", max_subsets_per_k=20, seed=0, sample_chunk=sample_chunk,
                            scheduler=scheduler)
        fit_collaboration(pool_path, folder / "oracle", folder / "laws.json", folder / "plots", bootstrap=30, seed=1,
                          sample_chunk=sample_chunk, scheduler=scheduler)

    local_blocks = []
    original = oracle._BlockWork.__call__
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(oracle._BlockWork, "__call__", lambda work, *block: local_blocks.append(block[:2])
                      or original(work, *block))
        study("alone", None)
        assert len(local_blocks) == 3 * blocks  # oracle, fit's bootstrap and halves, fit's matched ensembles
        local_blocks.clear()
        with distributed.Client(local_cluster.scheduler_address) as observer:
            before = observer.run(summed_blocks)
            study("cluster", local_cluster.scheduler_address)
            summed = {worker: count - before[worker] for worker, count in observer.run(summed_blocks).items()}
    assert local_blocks == []  # nothing summed here
    assert len(summed) == 2 and all(summed.values()) and sum(summed.values()) == 3 * blocks
    assert files_of(tmp_path / "cluster") == files_of(tmp_path / "alone")
    assert set(pd.read_csv(tmp_path / "alone" / "oracle" / "attribution_by_domain.csv").domain) == {"code", "prose",
                                                                                                   "math"}


def summed_blocks(dask_worker) -> int:
    """Blocks of samples this worker has summed (run on the worker by `Client.run`)."""
    return len({entry[0] for entry in dask_worker.state.log if "_work_on_worker" in str(entry[0])})


def test_a_corrupt_block_read_on_a_worker_is_named(tmp_path, local_cluster, capsys):
    pool = open_store(synthetic_pool(tmp_path / "one-chunk.zarr", n_samples=400))
    chunked = tmp_path / "pool.zarr"
    write_store(pool.chunk({"sample": 100}), chunked, "pool")
    flip_byte(chunked / "nll" / "c" / "0" / "3")
    assert main(["oracle", "--pool", str(chunked), "--out", str(tmp_path / "oracle"),
                 "--scheduler", local_cluster.scheduler_address]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"store '{chunked}' cannot be read at samples 300..399, it is corrupt" in err


def test_a_cluster_without_workers_or_with_a_worker_that_cannot_sum_is_one_line(pool_path, tmp_path, capsys):
    distributed = pytest.importorskip("distributed")
    oracle_args = ["oracle", "--pool", str(pool_path), "--out", str(tmp_path / "oracle"), "--scheduler"]
    with distributed.LocalCluster(n_workers=0, processes=True, dashboard_address=None) as cluster:
        assert main([*oracle_args, cluster.scheduler_address]) == 2  # not a wait for a worker that never comes
    assert capsys.readouterr().err.strip() == (f"mmc oracle: error: the dask scheduler at '{cluster.scheduler_address}' "
                                               f"has no workers: start some (`dask worker {cluster.scheduler_address}`)")
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        with distributed.Client(cluster.scheduler_address) as client:  # as if mmc were not installed there
            client.run(lambda: sys.modules.__setitem__("mmc.oracle", None))
        assert main([*oracle_args, cluster.scheduler_address]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("mmc oracle: error: a worker of the dask cluster failed: ")
    assert "import of mmc.oracle halted" in error
    assert not (tmp_path / "oracle").exists()


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


# ---- a pool of more than one chunk of samples, through every stage


def big_loss_stores(root, n_samples: int) -> tuple[list, np.ndarray]:
    """Loss stores of 6 models (3 families x 2 sizes) over `n_samples` samples, written as `mmc losses` writes them
    (`loss_dataset`, `write_store`), and their (models, samples) nll. As `synthetic_pool`: each family is best on
    its own third of the samples."""
    rng = np.random.default_rng(3)
    n_bytes = rng.integers(20, 400, n_samples)
    home = np.arange(n_samples) % 3
    coords = {"sample": np.array([f"s{i}" for i in range(n_samples)], dtype=object),
              "domain": ("sample", np.array(["code", "prose"], dtype=object)[np.arange(n_samples) % 2])}
    paths, rows = [], []
    for f, family in enumerate(("alpha", "beta", "gamma")):
        for size in (10_000, 160_000):
            bits = (1.2 + 0.4 * f / 3 + 30.0 * size ** -0.3) * np.where(home == f, 0.8, 1.1)
            rows.append(bits * rng.lognormal(0, 0.02, n_samples) * n_bytes * np.log(2))
            attrs = {"model": f"{family}-{size}", "family": family, "n_params": size,
                     "n_params_nonembedding": size // 2, "dataset_fingerprint": "fp-big"}
            paths.append(root / f"{family}-{size}.zarr")
            write_store(losses.loss_dataset(rows[-1], n_bytes // 3 + 1, n_bytes, coords, attrs), paths[-1], "loss store")
    return paths, np.array(rows)


def test_a_pool_of_more_than_one_chunk_of_samples_runs_through_every_stage(tmp_path, monkeypatch):
    n_samples = store.SAMPLE_CHUNK + 1
    # the learned routers fit on a sample of 2,000 training documents, not 20,000: 150 s of this test otherwise
    # (the sample itself is tested in test_routing_stream; every document is still featurised, routed and scored)
    monkeypatch.setattr("mmc.routing.ROUTER_TRAINING_MAX", 2_000)
    paths, nll = big_loss_stores(tmp_path, n_samples)
    pool = tmp_path / "pool.zarr"
    assert main(["assemble", "--out", str(pool), *map(str, paths)]) == 0
    # every variable along `sample` in the chunks of nll: xarray's chunksizes refuses inconsistent ones
    lazy = xr.open_zarr(pool)
    assert lazy.chunksizes["sample"] == lazy.nll.chunksizes["sample"] == (store.SAMPLE_CHUNK, 1)
    for name in ("nll", "n_tokens", "n_bytes", "domain"):
        assert lazy[name].variable.chunksizes["sample"] == (store.SAMPLE_CHUNK, 1), name
    loaded = open_store(pool)
    np.testing.assert_array_equal(loaded.nll.values, nll)
    assert loaded.domain.values[-1] == "code" and loaded.n_bytes.dtype.kind == "i"

    assert main(["oracle", "--pool", str(pool), "--out", str(tmp_path / "oracle"), "--max-subsets-per-k", "20"]) == 0
    ensembles = oracle.read_ensembles(tmp_path / "oracle")
    everyone = ensembles[ensembles.k == len(paths)].iloc[0]
    np.testing.assert_allclose(everyone.oracle_nll, nll.min(axis=0).mean(), rtol=1e-12)  # the last sample counts
    attribution = pd.read_csv(tmp_path / "oracle" / "attribution.csv", float_precision="round_trip")
    np.testing.assert_array_equal(attribution.win_share, np.bincount(nll.argmin(axis=0), minlength=6) / n_samples)
    np.testing.assert_allclose(attribution.mean_nll, nll.mean(axis=1), rtol=1e-12)

    # a pool written before the sample coords were chunked like nll (one chunk each): read in consistent chunks
    legacy = assemble_pool(paths)
    legacy = legacy.assign_coords(n_bytes=legacy.n_bytes.compute(), domain=legacy.domain.compute())
    write_store(legacy, tmp_path / "legacy.zarr", "pool")
    assert xr.open_zarr(tmp_path / "legacy.zarr").n_bytes.variable.chunksizes["sample"] == (n_samples,)
    assert main(["oracle", "--pool", str(tmp_path / "legacy.zarr"), "--out", str(tmp_path / "legacy_oracle"),
                 "--max-subsets-per-k", "20"]) == 0
    for name, table in read_tables(tmp_path / "legacy_oracle").items():
        pd.testing.assert_frame_equal(table, read_tables(tmp_path / "oracle")[name], check_exact=True)

    laws = {}
    for name in ("pool", "legacy"):
        assert main(["fit", "--pool", str(tmp_path / f"{name}.zarr"), "--oracle", str(tmp_path / "oracle"),
                     "--out", str(tmp_path / f"{name}_laws.json"), "--plots", str(tmp_path / f"{name}_plots"),
                     "--bootstrap", "8"]) == 0
        laws[name] = json.loads((tmp_path / f"{name}_laws.json").read_text())
    assert laws["legacy"] == laws["pool"]
    assert laws["pool"]["bootstrap"]["resamples"] == 8 and "params" in laws["pool"]["fits"]["single/pooled"]

    texts = [f"{['alpha', 'beta', 'gamma'][i % 3]} document {i}" for i in range(n_samples)]
    datasets.Dataset.from_dict({"sample_id": [f"s{i}" for i in range(n_samples)], "text": texts}).save_to_disk(
        str(tmp_path / "eval"))
    assert main(["route", "--pool", str(pool), "--oracle", str(tmp_path / "oracle"), "--data", str(tmp_path / "eval"),
                 "--out", str(tmp_path / "routing"), "--metrics", str(tmp_path / "routing.json"), "--bootstrap", "8",
                 "--ngram-features", "64"]) == 0
    routed = json.loads((tmp_path / "routing.json").read_text())
    assert sum(routed["split"].values()) == n_samples
    assert routed["router_training"]["documents"] == 2_000 and routed["router_training"]["sampled"]
    strategies = pd.read_parquet(tmp_path / "routing" / "strategies.parquet")
    oracle_bpb = strategies[(strategies.strategy == "oracle") & (strategies.k == len(paths))]
    assert len(oracle_bpb) == 1 and oracle_bpb.test_bpb.iloc[0] > 0

    assert main(["report", "--laws", str(tmp_path / "pool_laws.json"), "--law-plots", str(tmp_path / "pool_plots"),
                 "--oracle", str(tmp_path / "oracle"), "--routing", str(tmp_path / "routing"),
                 "--routing-metrics", str(tmp_path / "routing.json"), "--out", str(tmp_path / "reports")]) == 0
    figures = {path.name for path in (tmp_path / "reports").glob("*.png")}
    assert {"scaling.png", "kinds.png", "expected_k.png", "attribution.png", "routing.png"} <= figures
    assert "(scaling.png)" in (tmp_path / "reports" / "README.md").read_text()
