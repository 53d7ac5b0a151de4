"""Bad input ends with a non-zero exit and one clear line, and leaves nothing at the output path."""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import datasets
import fsspec
import numpy as np
import pytest
import torch
import xarray as xr
from safetensors.torch import load_file

import mmc.store
from conftest import loss_store, save_eval_set, synthetic_pool
from mmc import MMCError
from mmc.cli import main
from mmc.corpus import split_text
from mmc.routing import routing_study
from mmc.store import MARKER, atomic_path, write_store


def run_losses(capsys, model, data, out, *extra):
    code = main(["losses", "--stage", "losses@tiny", "--model", str(model), "--data", str(data),
                 "--out", str(out), "--device", "cpu", *extra])
    err = capsys.readouterr().err.strip()
    return code, err


def assert_one_line_error(code, err, *needles):
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("mmc losses@tiny: error: ")
    for needle in needles:
        assert needle in err


@pytest.fixture()
def pickle_only_dir(gpt2_dir, tmp_path):
    target = tmp_path / "pickled"
    shutil.copytree(gpt2_dir, target)
    state = load_file(target / "model.safetensors")
    (target / "model.safetensors").unlink()
    torch.save(state, target / "pytorch_model.bin")
    return target


def test_unknown_hub_id(capsys, eval_dir, tmp_path):
    code, err = run_losses(capsys, "no-such-org/no-such-model", eval_dir, tmp_path / "o.zarr")
    assert_one_line_error(code, err, "no-such-org/no-such-model", "check the id")
    assert not (tmp_path / "o.zarr").exists()


def test_missing_local_path(capsys, eval_dir, tmp_path):
    code, err = run_losses(capsys, tmp_path / "models" / "absent", eval_dir, tmp_path / "o.zarr")
    assert_one_line_error(code, err, "absent", "neither a local directory nor")


def test_missing_or_fake_gguf_file(capsys, eval_dir, tmp_path):
    code, err = run_losses(capsys, tmp_path / "absent.gguf", eval_dir, tmp_path / "o.zarr")
    assert_one_line_error(code, err, f"GGUF file '{tmp_path / 'absent.gguf'}' does not exist")
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 a zip file named .gguf")
    code, err = run_losses(capsys, fake, eval_dir, tmp_path / "o.zarr")
    assert_one_line_error(code, err, f"'{fake}' is not a GGUF file")
    assert main(["convert-gguf", str(fake), "--out", str(tmp_path / "converted")]) == 2
    assert f"'{fake}' is not a GGUF file" in capsys.readouterr().err
    assert not (tmp_path / "o.zarr").exists() and not (tmp_path / "converted").exists()


def test_directory_without_weights(capsys, gpt2_dir, eval_dir, tmp_path):
    empty = tmp_path / "noweights"
    empty.mkdir()
    shutil.copy(gpt2_dir / "config.json", empty)
    code, err = run_losses(capsys, empty, eval_dir, tmp_path / "o.zarr")
    assert_one_line_error(code, err, str(empty), "has no weights")


def test_pickle_weights_refused_unless_allowed(capsys, pickle_only_dir, eval_dir, tmp_path):
    code, err = run_losses(capsys, pickle_only_dir, eval_dir, tmp_path / "o.zarr")
    assert_one_line_error(code, err, "pytorch_model.bin", "--allow-pickle")
    assert not (tmp_path / "o.zarr").exists()
    code, _ = run_losses(capsys, pickle_only_dir, eval_dir, tmp_path / "o.zarr", "--allow-pickle")
    assert code == 0 and (tmp_path / "o.zarr").is_dir()


def test_dataset_without_required_columns(capsys, gpt2_dir, tmp_path):
    data = tmp_path / "nocols"
    datasets.Dataset.from_dict({"id": ["a"], "body": ["hello"]}).save_to_disk(str(data))
    code, err = run_losses(capsys, gpt2_dir, data, tmp_path / "o.zarr")
    assert_one_line_error(code, err, str(data), "sample_id, text")


def test_empty_dataset(capsys, gpt2_dir, tmp_path):
    data = save_eval_set(tmp_path / "empty", [])
    code, err = run_losses(capsys, gpt2_dir, data, tmp_path / "o.zarr")
    assert_one_line_error(code, err, str(data), "empty")


def test_missing_dataset_and_wrong_split(capsys, gpt2_dir, eval_dir, tmp_path):
    code, err = run_losses(capsys, gpt2_dir, tmp_path / "nowhere", tmp_path / "o.zarr")
    assert_one_line_error(code, err, "nowhere", "does not exist")
    splits = tmp_path / "splits"
    datasets.DatasetDict({"train": datasets.load_from_disk(str(eval_dir))}).save_to_disk(str(splits))
    code, err = run_losses(capsys, gpt2_dir, splits, tmp_path / "o.zarr")
    assert_one_line_error(code, err, "no split 'eval'", "train")


def test_console_script_exit_code_and_debug_traceback(eval_dir, tmp_path):
    command = [sys.executable, "-m", "mmc.cli", "losses", "--model", "no-such-org/x", "--data", str(eval_dir),
               "--out", str(tmp_path / "o.zarr")]
    quiet = subprocess.run(command, capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    assert quiet.returncode == 2
    assert quiet.stderr.strip().splitlines()[-1].startswith("mmc losses: error: cannot load model 'no-such-org/x'")
    assert "Traceback" not in quiet.stderr
    loud = subprocess.run([*command, "--debug"], capture_output=True, text=True,
                          env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    assert loud.returncode != 0 and "Traceback" in loud.stderr


def test_failed_write_keeps_previous_output_and_leaves_no_temp(tmp_path):
    target = tmp_path / "store.zarr"
    with atomic_path(target, "loss store") as tmp:
        tmp.mkdir()
        (tmp / "old").write_text("previous")
    with pytest.raises(RuntimeError):
        with atomic_path(target, "loss store") as tmp:
            tmp.mkdir()
            (tmp / "partial").write_text("half")
            raise RuntimeError("crash mid-write")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store.zarr"]
    assert (target / "old").read_text() == "previous"
    with atomic_path(target, "loss store") as tmp:
        tmp.mkdir()
        (tmp / "new").write_text("complete")
    assert sorted(p.name for p in target.iterdir()) == [MARKER, "new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store.zarr"]


# ---- Issue 25: OS errors, malformed GGUF files, URLs, silent schedulers, router settings, very long lines

def run_cli(capsys, *argv):
    """`mmc ARGV` in this process: its exit status and its stderr, stripped."""
    code = main([str(arg) for arg in argv])
    return code, capsys.readouterr().err.strip()


def assert_one_line(code, err, where, *needles):
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith(f"mmc {where}: error: "), err
    for needle in needles:
        assert needle in err, err


def digest(path: Path) -> str:
    """A hash of a file, or of a folder's file names and contents: equal before and after means untouched."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    hashed = hashlib.sha256()
    for file in files:
        hashed.update(str(file.relative_to(path) if path.is_dir() else file.name).encode() + b"\0")
        hashed.update(file.read_bytes())
    return hashed.hexdigest()


@pytest.fixture(scope="module")
def small_pool(tmp_path_factory):
    """A synthetic pool store (15 models x 12 samples) and the oracle folder written from it."""
    folder = tmp_path_factory.mktemp("small_pool")
    synthetic_pool(folder / "pool.zarr", n_samples=12)
    assert main(["oracle", "--pool", str(folder / "pool.zarr"), "--out", str(folder / "oracle")]) == 0
    return folder


def _file_size_limit(limit):
    def apply():  # in the child, before mmc starts
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of killing the child
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_file_size_limit_while_writing_is_one_line_and_keeps_the_file(tmp_path):
    params = tmp_path / "params.yaml"  # the project's params, padded with comments to ~300 KB
    params.write_text((Path(__file__).resolve().parents[1] / "params.yaml").read_text()
                      + "".join(f"# note {i}: {'x' * 90}\n" for i in range(3000)))
    preset = tmp_path / "preset.yaml"
    preset.write_text("routing:\n  seed: 1\n")
    before, listing = digest(params), sorted(p.name for p in tmp_path.iterdir())
    result = subprocess.run([sys.executable, "-m", "mmc.cli", "preset", str(preset), "--params", str(params)],
                            capture_output=True, text=True, preexec_fn=_file_size_limit(64_000),
                            env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"), timeout=120)
    err = result.stderr.strip()
    assert_one_line(result.returncode, err, "preset", f"OSError in apply_preset (mmc/presets.py) on '{params}': "
                    f"File too large [EFBIG]")
    assert "Traceback" not in err
    assert digest(params) == before and sorted(p.name for p in tmp_path.iterdir()) == listing  # no temporary left


def test_os_error_is_one_line_naming_the_file_and_debug_keeps_the_traceback(capsys):
    from mmc import exit_status

    def full_disk():
        raise OSError(28, "No space left on device", "/data/pool.zarr/nll/c/0")

    assert exit_status("assemble", full_disk) == 2
    err = capsys.readouterr().err.strip()
    assert_one_line(2, err, "assemble", "OSError on '/data/pool.zarr/nll/c/0': No space left on device [ENOSPC]")
    with pytest.raises(OSError):
        exit_status("assemble", full_disk, debug=True)


def write_tiny_gguf(path: Path, file_type: int) -> Path:
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_file_type(file_type)
    writer.add_tensor("blk.0.attn_q.weight", np.ones((4, 32), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _malformed_gguf(case: str, folder: Path) -> tuple[Path, str]:
    """A malformed GGUF file made from a tiny valid one, and what its error must say."""
    valid = write_tiny_gguf(folder / "valid.gguf", 1)  # MOSTLY_F16
    data = valid.read_bytes()
    bad = folder / f"{case}.gguf"
    if case == "truncated":
        bad.write_bytes(data[:-200])  # the tensor data ends early
        return bad, "is truncated or corrupt: the gguf reader fails with ValueError"
    if case == "truncated_header":
        bad.write_bytes(data[:10])
        return bad, "is truncated: 10 bytes, less than its 24-byte header"
    if case == "huge_tensor_count":
        bad.write_bytes(data[:8] + struct.pack("<Q", 2**62) + data[16:])
        return bad, f"its header claims {2**62} tensors"
    if case == "unknown_file_type":
        return write_tiny_gguf(bad, 9999), "has an unknown general.file_type 9999"
    bad.symlink_to(bad.name)  # a symlink loop
    return bad, "symlink loop"


@pytest.mark.parametrize("case", ["truncated", "truncated_header", "huge_tensor_count", "unknown_file_type",
                                  "symlink_loop"])
def test_malformed_gguf_is_one_line_naming_the_file(capsys, eval_dir, tmp_path, case):
    bad, reason = _malformed_gguf(case, tmp_path)
    code, err = run_losses(capsys, bad, eval_dir, tmp_path / "o.zarr")
    assert_one_line_error(code, err, f"'{bad}'", reason)
    code, err = run_cli(capsys, "convert-gguf", bad, "--out", tmp_path / "converted")
    assert_one_line(code, err, "convert-gguf", f"'{bad}'", reason)
    assert not (tmp_path / "o.zarr").exists() and not (tmp_path / "converted").exists()


def free_port() -> int:
    """A port on 127.0.0.1 that nobody listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_http_urls_nobody_answers_are_one_line(capsys, small_pool, tmp_path):
    url = f"http://127.0.0.1:{free_port()}/data"
    pool = small_pool / "pool.zarr"
    outputs = {"out": tmp_path / "out", "laws": tmp_path / "laws.json", "plots": tmp_path / "plots"}
    for command, argv, what in [
        ("oracle", ["--pool", f"{url}/pool.zarr", "--out", outputs["out"]], f"store '{url}/pool.zarr'"),
        ("fit", ["--pool", pool, "--oracle", f"{url}/oracle", "--out", outputs["laws"], "--plots", outputs["plots"]],
         f"oracle folder '{url}/oracle'"),
        ("route", ["--pool", pool, "--oracle", f"{url}/oracle", "--data", tmp_path / "eval", "--out", outputs["out"],
                   "--metrics", outputs["laws"]], f"oracle folder '{url}/oracle'"),
    ]:
        code, err = run_cli(capsys, command, *argv)
        assert_one_line(code, err, command, what, "cannot be reached", "Connection refused")
    assert not any(path.exists() for path in outputs.values())


@pytest.fixture()
def no_cloud_credentials(monkeypatch, tmp_path):
    """No credentials anywhere the cloud SDKs look, not a cloud VM, and any network attempt fails the test."""
    for name in list(os.environ):
        if name.startswith(("AWS_", "GOOGLE_", "CLOUDSDK_", "FSSPEC_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(fsspec.config, "conf", {})
    monkeypatch.setattr(mmc.store, "_read_text", lambda path: "")  # no DMI vendor: not an EC2 or GCE machine

    def no_network(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(fsspec.core, "url_to_fs", no_network)
    return monkeypatch


def test_cloud_urls_without_credentials_are_refused_before_any_network(capsys, no_cloud_credentials, small_pool,
                                                                       tmp_path):
    no_cloud_credentials.setattr(fsspec, "get_filesystem_class", lambda scheme: object)  # as if s3fs, gcsfs were there
    for scheme, needle in (("s3", "no AWS credentials are configured"), ("gs", "no Google Cloud credentials")):
        code, err = run_cli(capsys, "oracle", "--pool", f"{scheme}://bucket/pool.zarr", "--out", tmp_path / "out")
        assert_one_line(code, err, "oracle", f"store '{scheme}://bucket/pool.zarr' cannot be read", needle)
        code, err = run_cli(capsys, "fit", "--pool", small_pool / "pool.zarr", "--oracle", f"{scheme}://bucket/oracle",
                            "--out", tmp_path / "laws.json", "--plots", tmp_path / "plots")
        assert_one_line(code, err, "fit", f"oracle folder '{scheme}://bucket/oracle' cannot be read", needle)
    assert not mmc.store._cloud_credentials("aws", "s3")
    no_cloud_credentials.setenv("AWS_PROFILE", "team")
    assert mmc.store._cloud_credentials("aws", "s3")
    no_cloud_credentials.setenv("FSSPEC_GS_TOKEN", "anon")  # read by fsspec into its config when it is imported
    no_cloud_credentials.setattr(fsspec.config, "conf", {"gs": {"token": "anon"}})
    assert mmc.store._cloud_credentials("gcp", "gs")
    assert not (tmp_path / "out").exists() and not (tmp_path / "laws.json").exists()


def test_url_whose_fsspec_package_is_missing_is_refused_before_any_network(capsys, no_cloud_credentials, tmp_path):
    import importlib.util

    if importlib.util.find_spec("s3fs") is not None:
        pytest.skip("s3fs is installed")
    code, err = run_cli(capsys, "oracle", "--pool", "s3://bucket/pool.zarr", "--out", tmp_path / "out")
    assert_one_line(code, err, "oracle", "store 's3://bucket/pool.zarr' cannot be read", "pip install s3fs")


@pytest.fixture()
def silent_server():
    """A TCP server on 127.0.0.1 that accepts connections and never says anything: its tcp:// address."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.1)
    accepted, stop = [], threading.Event()

    def accept():
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:  # the timeout: look at `stop` again
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"tcp://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for connection in accepted:
        connection.close()  # the abandoned client's read ends, and its thread with it
    server.close()


def test_scheduler_address_that_never_answers_is_one_line_in_bounded_time(capsys, monkeypatch, silent_server,
                                                                          small_pool, tmp_path):
    pytest.importorskip("distributed")
    monkeypatch.setattr(mmc.store, "DASK_CONNECT_SECONDS", 1)
    start = time.monotonic()
    code, err = run_cli(capsys, "oracle", "--pool", small_pool / "pool.zarr", "--out", tmp_path / "out",
                        "--scheduler", silent_server)
    assert time.monotonic() - start < 20  # 1 s and the import of distributed, not forever
    assert_one_line(code, err, "oracle", f"dask scheduler at '{silent_server}'", "no dask handshake within 1 s")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option, value, needle", [
    ("--ngram-features", "0", "--ngram-features must be an integer in [1, "),
    ("--ngram-features", "-5", "--ngram-features must be an integer in [1, "),
    ("--test-fraction", "0", "--test-fraction must be a finite number in (0, 1)"),
    ("--test-fraction", "1", "--test-fraction must be a finite number in (0, 1)"),
    ("--test-fraction", "nan", "--test-fraction must be a finite number in (0, 1)"),
    ("--bootstrap", "-1", "--bootstrap must be an integer in [0, inf]"),
    ("--seed", "-1", "--seed must be an integer in [0, inf]"),
    ("--ridge-alpha", "-1", "--ridge-alpha must be a finite number in [0, inf]"),
    ("--ridge-alpha", "inf", "--ridge-alpha must be a finite number in [0, inf]"),
    ("--ridge-alpha", "nan", "--ridge-alpha must be a finite number in [0, inf]"),
])
def test_route_settings_out_of_range_are_one_line(capsys, small_pool, tmp_path, option, value, needle):
    code, err = run_cli(capsys, "route", "--pool", small_pool / "pool.zarr", "--oracle", small_pool / "oracle",
                        "--data", tmp_path / "eval", "--out", tmp_path / "routing", "--metrics", tmp_path / "m.json",
                        option, value)
    assert_one_line(code, err, "route", needle)
    assert not (tmp_path / "routing").exists() and not (tmp_path / "m.json").exists()


@pytest.mark.parametrize("setting, value", [("ngram_features", 0), ("ngram_features", 2.5), ("test_fraction", 0.0),
                                            ("test_fraction", float("nan")), ("bootstrap", -1), ("seed", -2),
                                            ("ridge_alpha", -0.5), ("ridge_alpha", float("inf"))])
def test_routing_params_out_of_range_are_refused_before_any_work(small_pool, tmp_path, setting, value):
    options = {"test_fraction": 0.5, "seed": 0, "bootstrap": 10, "ngram_features": 64, "ridge_alpha": 1.0,
               setting: value}  # as the routing stage passes params.yaml's `routing`
    with pytest.raises(MMCError, match=f"routing.{setting} must be"):
        routing_study(small_pool / "pool.zarr", small_pool / "oracle", tmp_path / "eval", tmp_path / "routing",
                      tmp_path / "m.json", **options)
    assert not (tmp_path / "routing").exists()


def _shard_store(path: Path) -> Path:
    write_store(xr.Dataset({"window_nll": ("window", [1.0, 2.0]), "window_doc": ("window", [0, 1]),
                            "n_tokens": ("sample", [3, 4]), "n_bytes": ("sample", [5, 6])},
                           coords={"window": [0, 1], "sample": ["a", "b"]}, attrs={"shard": "{}"}),
                path, "loss shard")
    return path


@pytest.mark.parametrize("kind", ["loss store", "shard"])
def test_loss_or_shard_store_given_as_the_pool_is_one_line(capsys, small_pool, tmp_path, kind):
    if kind == "loss store":
        store, needle = loss_store(tmp_path / "one.zarr", [1.0, 2.0, 3.0, 4.0], "f", 100), "the loss store of one model"
    else:
        store, needle = _shard_store(tmp_path / "shard.zarr"), "one shard of a scoring run"
    before = digest(store)
    out, laws = tmp_path / "out", tmp_path / "laws.json"
    for command, argv in [
        ("oracle", ["--out", out]),
        ("fit", ["--oracle", small_pool / "oracle", "--out", laws, "--plots", tmp_path / "plots"]),
        ("route", ["--oracle", small_pool / "oracle", "--data", tmp_path / "eval", "--out", out, "--metrics", laws]),
    ]:
        code, err = run_cli(capsys, command, "--pool", store, *argv)
        assert_one_line(code, err, command, f"'{store}' is {needle}", "not a pool", "`mmc assemble`")
    assert digest(store) == before
    assert not out.exists() and not laws.exists()


def test_one_very_long_line_is_cut_in_linear_time():
    text = "0123456789abcdef" * 1_250_000 + "\nend\n"  # one 20 MB line, then a short one
    start = time.perf_counter()
    pieces = split_text(text, 500)
    elapsed = time.perf_counter() - start
    assert [len(piece) for piece in pieces] == [500] * 40_000 + [5]  # the line cut hard, its end packed with "end"
    assert pieces[-1] == "\nend\n" and "".join(pieces) == text
    assert elapsed < 10, f"cutting a 20 MB line took {elapsed:.1f} s"  # linear: well under a second


def test_deeply_nested_json_line_is_one_line(capsys, tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.jsonl").write_text('{"text": "fine"}\n' + "[" * 200_000 + "]" * 200_000 + "\n")
    code, err = run_cli(capsys, "corpus", "--source", "files", "--path", folder / "*.jsonl", "--out",
                        tmp_path / "corpus")
    assert_one_line(code, err, "corpus", f"'{folder / 'a.jsonl'}' line 2", "nested too deeply")
    assert not (tmp_path / "corpus").exists()
