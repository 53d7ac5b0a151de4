"""`mmc pool add` / `mmc pool remove`: one command to add a model to params.yaml's pool (validated against the
schema, comments and order kept, written atomically), one to take it out again; refusals are one line and leave
the file as it was."""

from __future__ import annotations

import shutil

import pytest

from conftest import ROOT
from mmc import MMCError
from mmc.cli import main
from mmc.params import read_params
from mmc.presets import pool_entry_for


@pytest.fixture()
def params(tmp_path):
    """A copy of the project's params.yaml in a project folder of its own."""
    path = tmp_path / "project" / "params.yaml"
    path.parent.mkdir()
    shutil.copyfile(ROOT / "params.yaml", path)
    return path


def comment_lines(text: str) -> list[str]:
    return [line.split("#", 1)[1] for line in text.splitlines() if line.lstrip().startswith("#")]


def refused(capsys, args: list[str], path, *needles: str) -> None:
    """`mmc ARGS` ends with exit status 2, one line on stderr holding the needles, and `path` (with its folder)
    unchanged."""
    before = path.read_bytes() if path.exists() else None
    listing = sorted(item.name for item in path.parent.iterdir())
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("mmc pool: error: "), err
    for needle in needles:
        assert needle in err, err
    assert (path.read_bytes() if path.exists() else None) == before
    assert sorted(item.name for item in path.parent.iterdir()) == listing  # no temporary left behind


def test_add_then_remove_round_trips_the_file_byte_for_byte(params, capsys):
    original = params.read_bytes()
    assert main(["pool", "add", "EleutherAI/pythia-160m", "--family", "pythia", "--revision", "step143000",
                 "--params", str(params)]) == 0
    assert "pythia-160m" in capsys.readouterr().out
    text = params.read_text()
    entry = {"model": "EleutherAI/pythia-160m", "family": "pythia", "data": None, "revision": "step143000",
             "dep": "stages/losses.py"}
    pool = read_params(params)["pool"]
    assert pool["pythia-160m"] == entry and list(pool)[-1] == "pythia-160m"  # at the end of the pool
    assert ("\n  pythia-160m: {model: EleutherAI/pythia-160m, family: pythia, data: null, revision: step143000, "
            "dep: stages/losses.py}\n") in text  # one line, like the entries before it
    assert comment_lines(text) == comment_lines(original.decode())  # every comment kept, in its place
    assert [line for line in text.splitlines() if "pythia-160m" not in line] == original.decode().splitlines()
    assert main(["pool", "remove", "pythia-160m", "--params", str(params)]) == 0
    assert params.read_bytes() == original


def test_local_models_depend_on_their_path_and_name_their_slug(params, capsys):
    original = params.read_bytes()
    (params.parent / "models" / "Tiny Model").mkdir(parents=True)
    assert main(["pool", "add", "models/Tiny Model", "--family", "tiny", "--data", "own",
                 "--params", str(params)]) == 0
    assert main(["pool", "add", "models/SmolLM2-135M-Instruct.Q4_1.gguf", "--family", "smollm2",
                 "--params", str(params)]) == 0
    pool = read_params(params)["pool"]
    assert pool["tiny-model"] == {"model": "models/Tiny Model", "family": "tiny", "data": "own", "revision": None,
                                  "dep": "models/Tiny Model"}
    assert pool["smollm2-135m-instruct-q4_1"] == {
        "model": "models/SmolLM2-135M-Instruct.Q4_1.gguf", "family": "smollm2", "data": None, "revision": None,
        "dep": "models/SmolLM2-135M-Instruct.Q4_1.gguf"}
    assert list(pool)[-2:] == ["tiny-model", "smollm2-135m-instruct-q4_1"]
    for name in ("tiny-model", "smollm2-135m-instruct-q4_1"):
        assert main(["pool", "remove", name, "--params", str(params)]) == 0
    assert params.read_bytes() == original


def test_pool_entry_for_slugs_deps_and_settings(tmp_path):
    assert pool_entry_for("HuggingFaceTB/SmolLM2-135M", "smollm2", root=tmp_path) == (
        "smollm2-135m", {"model": "HuggingFaceTB/SmolLM2-135M", "family": "smollm2", "data": None, "revision": None,
                         "dep": "stages/losses.py"})
    assert pool_entry_for("gpt2", "gpt2", root=tmp_path)[1]["dep"] == "stages/losses.py"  # a hub id, no org
    assert pool_entry_for("data/zoo/gpt2-xl", "gpt2", root=tmp_path)[1]["dep"] == "data/zoo/gpt2-xl"  # 2 slashes
    assert pool_entry_for("./My@Model/", "f", root=tmp_path)[0] == "my-model"
    slug, entry = pool_entry_for("org/m", "f", "mix", "main", root=tmp_path, max_length=512, device=None,
                                 trust_remote_code=True)
    assert slug == "m" and entry == {"model": "org/m", "family": "f", "data": "mix", "revision": "main",
                                     "dep": "stages/losses.py", "max_length": 512, "trust_remote_code": True}
    with pytest.raises(MMCError, match="revision pins a hub model"):
        pool_entry_for("model.gguf", "f", revision="main", root=tmp_path)


def test_settings_flags_land_in_the_entry_with_their_types(params, capsys):
    assert main(["pool", "add", "org/Big-Model", "--family", "big", "--max-length", "512", "--stride", "256",
                 "--batch-tokens", "65536", "--device", "cuda:1", "--dtype", "bfloat16", "--head-dtype", "float32",
                 "--device-map", "auto", "--trust-remote-code", "--allow-pickle", "--shards", "2",
                 "--params", str(params)]) == 0
    entry = read_params(params)["pool"]["big-model"]
    assert entry == {"model": "org/Big-Model", "family": "big", "data": None, "revision": None,
                     "dep": "stages/losses.py", "max_length": 512, "stride": 256, "batch_tokens": 65536,
                     "device": "cuda:1", "dtype": "bfloat16", "head_dtype": "float32", "device_map": "auto",
                     "trust_remote_code": True, "allow_pickle": True, "shards": 2}
    assert all(type(entry[key]) is int for key in ("max_length", "stride", "batch_tokens", "shards"))
    assert main(["pool", "add", "org/small", "--family", "s", "--device", "cpu", "--params", str(params)]) == 0
    assert set(read_params(params)["pool"]["small"]) == {"model", "family", "data", "revision", "dep", "device"}


def test_refusals_are_one_line_and_leave_the_file_unchanged(params, capsys, tmp_path):
    path = str(params)
    refused(capsys, ["pool", "add", "data/zoo/gpt2-s", "--family", "gpt2", "--params", path], params,
            "already holds 'gpt2-s'", "mmc pool remove gpt2-s")
    refused(capsys, ["pool", "add", "org/m", "--name", "../m", "--family", "f", "--params", path], params,
            "'../m' is not a safe name")
    refused(capsys, ["pool", "add", "org/m", "--name", "a;b", "--family", "f", "--params", path], params,
            "'a;b' is not a safe name")
    refused(capsys, ["pool", "remove", "gpt2-ss", "--params", path], params,
            "no entry 'gpt2-ss'", "did you mean 'gpt2-s'?")
    refused(capsys, ["pool", "add", "org/m", "--family", "f", "--max-length", "0", "--params", path], params,
            "pool entry 'm'", "pool.m.max_length")  # the schema's judgement names the entry
    refused(capsys, ["pool", "add", "org/m", "--family", "f", "--params",
                     str(params.parent / "missing.yaml")], params.parent / "missing.yaml", "does not exist")
    broken = tmp_path / "broken.yaml"
    broken.write_text("pool: {a: [\n")
    refused(capsys, ["pool", "add", "org/m", "--family", "f", "--params", str(broken)], broken, "not valid YAML")
    refused(capsys, ["pool", "remove", "m", "--params", str(broken)], broken, "not valid YAML")


def test_comments_around_removed_entries_are_kept(params, capsys):
    for name in ("a", "b", "c"):
        assert main(["pool", "add", f"org/{name}", "--family", "f", "--params", str(params)]) == 0
    lines = params.read_text().splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if line.startswith("  a: {"))
    lines[at] = lines[at].rstrip("\n") + "  # a's own comment\n"
    lines.insert(at + 1, "  # a group of two\n")
    params.write_text("".join(lines))
    assert main(["pool", "remove", "a", "--params", str(params)]) == 0
    after = params.read_text()
    assert "# a's own comment" not in after and "  # a group of two\n  b: {" in after
    assert main(["pool", "remove", "b", "--params", str(params)]) == 0
    assert "  # a group of two\n  c: {" in params.read_text()
    assert main(["pool", "remove", "c", "--params", str(params)]) == 0  # the pool's last: before the next section
    after = params.read_text()
    assert "  # a group of two\n" in after and after.replace("  # a group of two\n", "") == \
        (ROOT / "params.yaml").read_text()
