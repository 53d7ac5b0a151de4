"""params.yaml is checked against mmc's schema before any stage runs: a name that would become a path outside its
folder never reaches DVC's removal of outputs, a misspelt key is named with the closest valid one, and every stage
and `mmc preset` check the whole file before any work."""

from __future__ import annotations

import copy
import os
import subprocess

import pytest
import yaml

from conftest import ROOT, make_project, sh, stage_order
from mmc import MMCError
from mmc.cli import main
from mmc.merge_methods import merge_specs
from mmc.params import check_params, params_reference

DEFAULTS = yaml.safe_load((ROOT / "params.yaml").read_text())


def with_change(path: list[str], value=None, rename: str | None = None) -> dict:
    """The default params with the key at `path` set to `value` (or renamed to `rename`, keeping its value)."""
    tree = copy.deepcopy(DEFAULTS)
    node = tree
    for part in path[:-1]:
        node = node[part]
    if rename is not None:
        node[rename] = node.pop(path[-1])
    else:
        node[path[-1]] = value
    return tree


def test_the_default_study_and_its_presets_match_the_schema(tmp_path):
    check_params(DEFAULTS)
    merge_specs(DEFAULTS["merging"]["methods"])
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    for preset in ("tiny", "real", "real-study"):
        assert main(["preset", str(ROOT / "presets" / f"{preset}.yaml"), "--params", str(params)]) == 0


@pytest.mark.parametrize("path, rename, message", [
    (["losses", "batch_tokens"], "batch_token", "unknown key 'losses.batch_token' (did you mean 'losses.batch_tokens'?)"),
    (["fit", "holdout_fraction"], "holdout_fractoin",
     "unknown key 'fit.holdout_fractoin' (did you mean 'fit.holdout_fraction'?)"),
    (["zoo", "members", "gpt2-s", "d_model"], "dmodel",
     "unknown key 'zoo.members.gpt2-s.dmodel' (did you mean 'zoo.members.gpt2-s.d_model'?)"),
    (["pool", "gpt2-s", "family"], "famly", "unknown key 'pool.gpt2-s.famly' (did you mean 'pool.gpt2-s.family'?)"),
    (["routing"], "routeing", "unknown key 'routeing' (did you mean 'routing'?)"),
])
def test_a_misspelt_key_is_named_with_the_closest_valid_one(path, rename, message):
    with pytest.raises(MMCError) as error:
        check_params(with_change(path, rename=rename))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_misspelt_merge_method_or_setting_is_named_with_the_closest_valid_one():
    with pytest.raises(MMCError, match=r"merging.methods.tie: unknown merge method 'tie' \(did you mean 'ties'\?\)"):
        merge_specs({"tie": {}})
    with pytest.raises(MMCError, match=r"merging.methods.ties: --densty does not apply to method 'ties' \(did you "
                                       r"mean 'density'\?\)"):
        merge_specs({"ties": {"densty": 0.2}})
    with pytest.raises(MMCError, match=r"merging.methods.dare: .*drop"):
        merge_specs({"dare": {"drop": 1.5}})


@pytest.mark.parametrize("path, value, message", [
    (["losses", "max_length"], 1.5, "'losses.max_length': Input should be a valid integer, got 1.5"),
    (["losses", "stride"], "x", "'losses.stride': Input should be a valid integer, got 'x'"),
    (["routing", "ngram_features"], 0, "'routing.ngram_features': Input should be greater than or equal to 1"),
    (["routing", "seed"], -1, "'routing.seed': Input should be greater than or equal to 0"),
    (["routing", "ridge_alpha"], float("nan"), "'routing.ridge_alpha': Input should be a finite number"),
    (["fit", "bootstrap"], True, "'fit.bootstrap': Input should be a valid integer"),
    (["losses"], [1, 2], "'losses': Input should be a valid dictionary"),
    (["zoo", "device"], "tpu", "'zoo.device': String should match pattern"),
    (["merging", "domains"], ["core", "a-b"], "'merging.domains.1': domain 'a-b' holds '-'"),
    (["zoo", "members", "gpt2-s", "family"], "mamba", "'zoo.members.gpt2-s.family': Input should be 'gpt2'"),
])
def test_a_value_of_the_wrong_type_or_range_is_one_line_naming_its_key(path, value, message):
    with pytest.raises(MMCError) as error:
        check_params(with_change(path, value))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_mmc_preset_refuses_what_the_schema_refuses_and_writes_nothing(capsys, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    before = params.read_bytes()
    for name, text in [("typo", "losses:\n  batch_token: 5\n"), ("range", "routing:\n  ngram_features: 0\n"),
                       ("yaml", "x: ["), ("list", "losses: !replace {}\n")]:
        preset = tmp_path / f"{name}.yaml"
        preset.write_text(text)
        assert main(["preset", str(preset), "--params", str(params)]) == 2, name
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
    preset.write_bytes(b"corpus:\n  path: \xff\n")
    assert main(["preset", str(preset), "--params", str(params)]) == 2
    assert "is not UTF-8 text" in capsys.readouterr().err
    assert params.read_bytes() == before


def test_the_params_reference_in_the_docs_is_the_schema():
    page = ROOT / "docs" / "reference" / "params.md"
    assert page.read_text(encoding="utf-8") == params_reference(), \
        "docs/reference/params.md is out of date: run `mmc params --reference > docs/reference/params.md`"
    for section, settings in DEFAULTS.items():  # every key of params.yaml has its row
        assert f"## `{section}`" in page.read_text() or f"## `{section}.<name>`" in page.read_text()
        keys = settings if section != "pool" else next(iter(settings.values()))
        for key in keys if section not in ("zoo",) else [key for key in keys if key != "members"]:
            assert f"| `{key}` |" in page.read_text(), f"{section}.{key}"


# ---- through `dvc repro`: nothing is removed, nothing runs, before params are checked

def run_repro(repo):
    return subprocess.run(["dvc", "repro"], cwd=repo, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def commit_all(repo) -> None:
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "the project")


@pytest.mark.slow
@pytest.mark.parametrize("where, name, target, tracked", [
    ("zoo member", "../../presets", "presets", True),
    ("zoo member", "../../thesis", "thesis", False),
    ("domain", "../../../thesis", "thesis", False),
    ("domain", "../../../presets", "presets", True),
    ("base", "../../thesis", "thesis.zarr", False),
    ("pool slug", "../../notes", "notes.zarr", False),
    ("pool slug", "../../presets/tiny.yaml", "presets/tiny.yaml.zarr", True),
])
def test_a_name_that_would_become_a_path_elsewhere_stops_dvc_repro_before_anything_is_removed(
        tmp_path, where, name, target, tracked):
    repo = make_project(tmp_path / "repo", ROOT / "presets" / "tiny.yaml")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    if where == "zoo member":
        params["zoo"]["members"][name] = params["zoo"]["members"]["gpt2-xs"]
    elif where == "domain":  # one base: with two, DVC itself refuses the two stages' one output path
        params["merging"]["bases"] = ["neox-xs"]
        params["merging"]["domains"].append(name)
    elif where == "base":
        params["merging"]["bases"].append(name)
    else:
        params["pool"][name] = params["pool"]["gpt2-xs"]
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    (repo / target).mkdir(parents=True, exist_ok=True)
    (repo / target / "chapter1.md").write_text("years of work")
    if tracked:
        commit_all(repo)
    result = run_repro(repo)
    assert result.returncode != 0
    if stage_order(result.stdout):  # stopped by the check
        assert stage_order(result.stdout) == ["check_params"]
        assert f"{where} '{name}' is not a safe name" in result.stderr
    else:  # some names DVC refuses itself when it reads dvc.yaml (a stage whose output is its dependency)
        assert "ERROR:" in result.stderr and name in result.stderr
    assert (repo / target / "chapter1.md").read_text() == "years of work"
    if tracked:
        assert sh(repo, "git", "status", "--porcelain", "--", target) == ""


@pytest.mark.slow
def test_a_misspelt_key_stops_dvc_repro_before_any_stage_runs(tmp_path):
    repo = make_project(tmp_path / "repo", ROOT / "presets" / "tiny.yaml")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["losses"]["batch_token"] = params["losses"].pop("batch_tokens")
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    result = run_repro(repo)
    assert result.returncode != 0 and stage_order(result.stdout) == ["check_params"]
    errors = [line for line in result.stderr.splitlines() if line.startswith("mmc ")]
    assert errors == ["mmc check_params: error: params.yaml: unknown key 'losses.batch_token' (did you mean "
                      "'losses.batch_tokens'?) (and 1 more)"]
    assert not (repo / "data" / "corpus").exists()


def test_a_pool_slug_or_zoo_member_with_a_dot_is_refused_as_dvc_would_split_its_params_key():
    """losses@<slug> reads the params key pool.<slug>: DVC would look for pool -> qwen2 -> 5-coder ('missing from
    params.yaml') after every stage before it ran; the check names the slug instead."""
    params = copy.deepcopy(DEFAULTS)
    params["pool"]["qwen2.5-coder"] = params["pool"].pop("gpt2-xs")
    with pytest.raises(MMCError, match=r"pool slug 'qwen2.5-coder' holds '\.'"):
        check_params(params)
    params = copy.deepcopy(DEFAULTS)
    params["zoo"]["members"]["gpt2.xs"] = params["zoo"]["members"].pop("gpt2-xs")
    with pytest.raises(MMCError, match=r"zoo member 'gpt2.xs' holds '\.'"):
        check_params(params)
