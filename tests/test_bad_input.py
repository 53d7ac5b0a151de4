"""Bad input ends with a non-zero exit and one clear line, and leaves nothing at the output path."""

from __future__ import annotations

import shutil
import subprocess
import sys

import datasets
import pytest
import torch
from safetensors.torch import load_file

from conftest import save_eval_set
from mmc.cli import main
from mmc.store import MARKER, atomic_path


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
