"""The progress file of `mmc losses` (`.NAME.partial`): its path is checked like an output's, and its content
verifies itself, so that a tampered, truncated or foreign file is discarded, never trusted."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from mmc import losses
from mmc.cli import main
from mmc.store import PROGRESS_SIGNATURE, open_store, partial_path

SETTINGS = {"device": "cpu", "dtype": "float32", "batch_tokens": 64}


@pytest.fixture(scope="module")
def uninterrupted(gpt2_dir, eval_dir, tmp_path_factory) -> xr.Dataset:
    out = tmp_path_factory.mktemp("whole") / "gpt2.zarr"
    losses.write_losses(str(gpt2_dir), eval_dir, out, **SETTINGS)
    return open_store(out)


def finished_progress(gpt2_dir, eval_dir, out: Path) -> Path:
    """The progress file of a run that scored every batch but did not write its store (as if killed then)."""
    progress = partial_path(out)
    losses.compute_losses(str(gpt2_dir), eval_dir, progress_file=progress, flush_every=0, **SETTINGS)
    assert progress.read_bytes().startswith(PROGRESS_SIGNATURE)
    return progress


def rewrite(progress: Path, change) -> None:
    """Rewrite a progress file's arrays with `change(arrays)`, with a checksum that matches (a crafted file)."""
    signature, header_line, payload = progress.read_bytes().split(b"\n", 2)
    header = json.loads(header_line)
    header.pop("sha256")
    arrays, offset = {}, 0
    for name, entry in header["arrays"].items():
        count = int(np.prod(entry["shape"]))
        arrays[name] = np.frombuffer(payload, entry["dtype"], count, offset).copy()
        offset += arrays[name].nbytes
    arrays = change(arrays)
    header["arrays"] = {name: {"dtype": array.dtype.str, "shape": list(array.shape)} for name, array in arrays.items()}
    payload = b"".join(array.tobytes() for array in arrays.values())
    checksum = hashlib.sha256(json.dumps(header, sort_keys=True).encode() + payload).hexdigest()
    progress.write_bytes(signature + b"\n" + json.dumps({**header, "sha256": checksum}, sort_keys=True).encode()
                         + b"\n" + payload)


def test_an_intact_progress_file_is_resumed_from(gpt2_dir, eval_dir, tmp_path, uninterrupted, count_batches):
    out = tmp_path / "gpt2.zarr"
    progress = finished_progress(gpt2_dir, eval_dir, out)
    count_batches.clear()
    resumed = losses.write_losses(str(gpt2_dir), eval_dir, out, **SETTINGS)
    assert count_batches == []  # every batch came from the progress file
    xr.testing.assert_identical(open_store(out), uninterrupted)
    assert resumed.attrs == uninterrupted.attrs and not progress.exists()


def edit_one_loss(progress: Path) -> None:
    data = bytearray(progress.read_bytes())
    data[-3] ^= 0x40  # a byte of the last window's NLL, the checksum left as it was
    progress.write_bytes(bytes(data))


def nan_everywhere(arrays):
    return {**arrays, "nll": np.full_like(arrays["nll"], np.nan)}


def negative_loss(arrays):
    nll = arrays["nll"].copy()
    nll[0] = -1.0
    return {**arrays, "nll": nll}


def shorter(arrays):
    return {**arrays, "nll": arrays["nll"][:-1]}


def float32_losses(arrays):
    return {**arrays, "nll": arrays["nll"].astype(np.float32)}


@pytest.mark.parametrize("damage, reason", [
    (edit_one_loss, "checksum does not match"),
    (lambda progress: progress.write_bytes(progress.read_bytes()[:-100]), "checksum does not match"),
    (lambda progress: progress.write_bytes(progress.read_bytes()[:40]), "header is damaged"),
    (lambda progress: rewrite(progress, nan_everywhere), "NaN or negative losses"),
    (lambda progress: rewrite(progress, negative_loss), "NaN or negative losses"),
    (lambda progress: rewrite(progress, shorter), "other dtypes or lengths"),
    (lambda progress: rewrite(progress, float32_losses), "other dtypes or lengths"),
], ids=["edited", "truncated", "cut-in-header", "nan", "negative", "wrong-length", "wrong-dtype"])
def test_a_damaged_progress_file_is_discarded_and_the_result_is_the_uninterrupted_run(
        gpt2_dir, eval_dir, tmp_path, uninterrupted, count_batches, damage, reason):
    out = tmp_path / "gpt2.zarr"
    progress = finished_progress(gpt2_dir, eval_dir, out)
    n_batches = len(count_batches)
    damage(progress)
    count_batches.clear()
    with pytest.warns(UserWarning, match=f"progress file '.*' is discarded, .*{reason}.*: starting over"):
        losses.write_losses(str(gpt2_dir), eval_dir, out, **SETTINGS)
    assert len(count_batches) == n_batches  # scored from scratch
    xr.testing.assert_identical(open_store(out), uninterrupted)
    assert not progress.exists()


@pytest.mark.parametrize("kind", ["folder", "file"])
def test_something_of_the_users_at_the_progress_path_is_refused_and_survives(capsys, gpt2_dir, eval_dir, tmp_path,
                                                                              kind):
    out = tmp_path / "gpt2.zarr"
    progress = partial_path(out)
    if kind == "folder":
        progress.mkdir()
        (progress / "notes.txt").write_text("mine")
    else:
        progress.write_text("my own notes")
    status = main(["losses", "--model", str(gpt2_dir), "--data", str(eval_dir), "--out", str(out), "--device", "cpu",
                   "--flush-every", "0"])
    error = capsys.readouterr().err
    assert status == 2 and len(error.strip().splitlines()) == 1
    assert f"'{progress}' exists and was not written by mmc" in error
    assert not out.exists()
    if kind == "folder":
        assert (progress / "notes.txt").read_text() == "mine"
    else:
        assert progress.read_text() == "my own notes"
