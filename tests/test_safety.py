"""Nothing lost, nothing silently wrong: outputs never destroy what mmc did not write, every number is checked at
the boundary, stores are checksummed, names cannot escape the project, and bad input ends in one line."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr
import yaml
from safetensors.torch import load_file, save_file

from conftest import (EVAL_TEXTS, TRAIN_TEXTS, build_tiny_model, flip_byte, loss_store, make_experts, pool_entry,
                      save_eval_set, stage_project, synthetic_pool)
from mmc import MMCError
from mmc.cli import main
from mmc.corpus import fingerprint
from mmc.report import _md, figure_attribution
from mmc.store import MARKER, atomic_path, open_store, write_store
from test_merge_law import law_following_store


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` with its content (None for folders): what must stay as it was."""
    return {str(path.relative_to(root)): None if path.is_dir() else path.read_bytes()
            for path in sorted(root.rglob("*"))}


def one_line(capsys, where: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"mmc {where}: error: "), err
    return err


def losses_cli(model, data, out, *extra) -> int:
    return main(["losses", "--model", str(model), "--data", str(data), "--out", str(out), "--device", "cpu", *extra])


@pytest.fixture(scope="module")
def experts(gpt2_dir, tmp_path_factory) -> list[Path]:
    return make_experts(gpt2_dir, tmp_path_factory.mktemp("experts"))


# ---- outputs never destroy what mmc did not write


def test_an_output_option_never_replaces_a_folder_mmc_did_not_write(capsys, gpt2_dir, eval_dir, tmp_path):
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "chapter1.tex").write_text("years of work")
    before = snapshot(tmp_path)
    assert losses_cli(gpt2_dir, eval_dir, thesis) == 2
    assert "'" + str(thesis) + "' exists and was not written by mmc" in one_line(capsys, "losses")
    assert snapshot(tmp_path) == before
    # its own output of the same kind is replaced; another kind of mmc output is not
    store = tmp_path / "gpt2.zarr"
    assert losses_cli(gpt2_dir, eval_dir, store) == 0 and (store / MARKER).read_text() == "loss store\n"
    assert losses_cli(gpt2_dir, eval_dir, store, "--limit", "2") == 0
    assert xr.open_zarr(store).sizes["sample"] == 2
    capsys.readouterr()
    assert main(["oracle", "--pool", str(tmp_path / "pool.zarr"), "--out", str(store)]) == 2
    assert "holds an mmc loss store, not a oracle tables" in one_line(capsys, "oracle")


def test_the_mergekit_config_cannot_replace_an_input_or_the_output(capsys, gpt2_dir, experts, tmp_path):
    before = snapshot(gpt2_dir)
    out = tmp_path / "merged"
    for target, config, message in ((out, gpt2_dir, "is the input"), (out, out, "two outputs share one path"),
                                     (experts[0].parent, tmp_path / "c.yaml", "is a folder holding the input")):
        assert main(["merge", "--base", str(gpt2_dir), "--experts", *map(str, experts), "--method", "average",
                     "--out", str(target), "--emit-mergekit-config", str(config)]) == 2
        assert message in one_line(capsys, "merge")
    assert snapshot(gpt2_dir) == before and not out.exists()


@pytest.mark.parametrize("where", ["current folder", "under a file", "the input"])
def test_output_paths_are_checked_before_any_work(capsys, gpt2_dir, eval_dir, tmp_path, monkeypatch, where):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    out = {"current folder": ".", "under a file": "afile/losses.zarr", "the input": str(eval_dir)}[where]
    before = snapshot(tmp_path)
    assert losses_cli(gpt2_dir, eval_dir, out) == 2
    assert one_line(capsys, "losses")
    assert snapshot(tmp_path) == before


# ---- numbers checked at the boundary


def test_a_model_with_nan_weights_writes_no_store(capsys, eval_dir, tmp_path):
    model = build_tiny_model(tmp_path / "nan", "gpt2", "byte_bpe")
    weights = load_file(model / "model.safetensors")
    weights["transformer.h.0.mlp.c_fc.weight"][0, 0] = float("nan")
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    assert losses_cli(model, eval_dir, tmp_path / "nan.zarr") == 2
    assert f"model '{model}' has" in one_line(capsys, "losses") and not (tmp_path / "nan.zarr").exists()


@pytest.mark.parametrize("bad", [float("nan"), -1.0, float("inf")])
def test_every_reader_refuses_nan_or_negative_losses(capsys, tmp_path, bad):
    good = loss_store(tmp_path / "a.zarr", [1.0, 2.0, 3.0, 4.0], "alpha", 100)
    broken = loss_store(tmp_path / "b.zarr", [1.0, bad, 3.0, 4.0], "beta", 200)
    assert main(["assemble", "--out", str(tmp_path / "pool.zarr"), str(good), str(broken)]) == 2
    assert f"store '{broken}' has 1 NaN, infinite or negative losses" in one_line(capsys, "assemble")
    pool = xr.open_zarr(synthetic_pool(tmp_path / "ok.zarr")).load()
    pool["nll"][3, 7] = bad
    write_store(pool, tmp_path / "badpool.zarr", "pool")
    assert main(["oracle", "--pool", str(tmp_path / "badpool.zarr"), "--out", str(tmp_path / "oracle")]) == 2
    assert "NaN, infinite or negative" in one_line(capsys, "oracle")


def test_a_nan_sample_in_a_merge_store_is_an_error_not_a_dropped_merge(capsys, tmp_path):
    paths = []
    for n_params in (1e4, 4e4, 1.6e5, 6.4e5):
        store = law_following_store(int(n_params), {"average": 1.0})
        if n_params == 4e4:
            store["nll"][5, 2] = np.nan
        write_store(store, tmp_path / f"{int(n_params)}.zarr", "merge sweep")
        paths.append(str(tmp_path / f"{int(n_params)}.zarr"))
    assert main(["fit-merge", "--out", str(tmp_path / "law.json"), "--plots", str(tmp_path / "plots"),
                 "--bootstrap", "0", *paths]) == 2
    assert "40000.zarr' has 1 NaN" in one_line(capsys, "fit-merge")
    assert not (tmp_path / "law.json").exists()


def chunk_files(store: Path) -> list[Path]:
    return sorted(path for path in store.rglob("*") if path.is_file() and "c" in path.relative_to(store).parts)


def test_a_flipped_byte_in_any_chunk_of_a_loss_store_is_refused_by_every_reader(capsys, tmp_path):
    other = loss_store(tmp_path / "other.zarr", [1.0, 2.0, 3.0, 4.0], "alpha", 100)
    original = loss_store(tmp_path / "orig" / "m.zarr", [1.5, 2.5, 0.5, 4.5], "beta", 200)
    chunks = chunk_files(original)
    assert {path.relative_to(original).parts[0] for path in chunks} == {"nll", "n_tokens", "n_bytes", "sample", "domain"}
    for chunk in chunks:
        copy = tmp_path / "copy" / "-".join(chunk.relative_to(original).parts) / "m.zarr"
        shutil.copytree(original, copy)
        flip_byte(copy / chunk.relative_to(original))
        assert main(["assemble", "--out", str(tmp_path / "pool.zarr"), str(other), str(copy)]) == 2
        assert f"store '{copy}' cannot be read, it is corrupt" in one_line(capsys, "assemble"), chunk
    # the pool's readers (oracle, fit) and the merge law's refuse a corrupt chunk too, naming the store
    pool = synthetic_pool(tmp_path / "pool2.zarr")
    assert main(["oracle", "--pool", str(pool), "--out", str(tmp_path / "oracle")]) == 0
    flip_byte(chunk_files(pool / "nll")[0])
    assert main(["oracle", "--pool", str(pool), "--out", str(tmp_path / "oracle2")]) == 2
    assert f"store '{pool}' cannot be read" in one_line(capsys, "oracle")
    assert main(["fit", "--pool", str(pool), "--oracle", str(tmp_path / "oracle"), "--out", str(tmp_path / "l.json"),
                 "--plots", str(tmp_path / "plots"), "--bootstrap", "3"]) == 2
    assert f"store '{pool}' cannot be read" in one_line(capsys, "fit")
    truncated = tmp_path / "truncated.zarr"
    shutil.copytree(original, truncated)
    nll_chunk = [path for path in chunk_files(truncated) if path.relative_to(truncated).parts[0] == "nll"][0]
    nll_chunk.write_bytes(nll_chunk.read_bytes()[:5])
    assert main(["assemble", "--out", str(tmp_path / "pool3.zarr"), str(other), str(truncated)]) == 2
    assert "corrupt or truncated" in one_line(capsys, "assemble")


def test_the_pool_is_read_one_block_at_a_time_and_a_corrupt_block_is_named(capsys, tmp_path):
    """Without a scheduler, oracle and fit read the pool region by region as they stream it (no whole read on
    opening): a flipped byte in the last chunk of samples is found there, after the blocks before it."""
    pool = open_store(synthetic_pool(tmp_path / "one-chunk.zarr", n_samples=400))
    chunked = tmp_path / "pool.zarr"
    write_store(pool.chunk({"sample": 100}), chunked, "pool")
    assert main(["oracle", "--pool", str(chunked), "--out", str(tmp_path / "oracle")]) == 0
    flip_byte(chunked / "nll" / "c" / "0" / "3")
    for command in (["oracle", "--out", str(tmp_path / "oracle2")],
                    ["fit", "--oracle", str(tmp_path / "oracle"), "--out", str(tmp_path / "laws.json"),
                     "--plots", str(tmp_path / "plots"), "--bootstrap", "3"]):
        assert main([command[0], "--pool", str(chunked), *command[1:]]) == 2
        assert f"store '{chunked}' cannot be read at samples 300..399, it is corrupt" in one_line(capsys, command[0])


def test_the_fingerprint_cannot_be_shared_by_two_eval_sets():
    assert fingerprint(["a", "b"], ["f\x1fg", "h"]) != fingerprint(["a", "b"], ["f", "g\x1fh"])
    assert fingerprint(["a"], ["bc"]) != fingerprint(["ab"], ["c"])
    assert fingerprint(["a", "b"], ["x", "y"]) != fingerprint(["a"], ["b"])
    assert fingerprint(["a", "b"], ["x", "y"]) == fingerprint(["a", "b"], ["x", "y"])


def test_an_expert_of_another_base_is_refused(capsys, gpt2_dir, experts, tmp_path):
    twin = build_tiny_model(tmp_path / "twin", "gpt2", "byte_bpe", seed=9)  # same shapes, other weights
    foreign = tmp_path / "foreign"
    shutil.copytree(experts[0], foreign)
    (foreign / "mmc_expert.json").write_text(json.dumps({"base": str(twin), "domain": "code"}))
    assert main(["merge", "--base", str(gpt2_dir), "--experts", str(foreign), str(experts[1]), "--method", "average",
                 "--out", str(tmp_path / "out")]) == 2
    assert f"was fine-tuned from '{twin}', not from the base '{gpt2_dir}'" in one_line(capsys, "merge")


# ---- bad input: one line, exit 2, every pre-existing file as it was


def strange_eval_set(path: Path, kind: str) -> Path:
    if kind == "integer ids":
        datasets.Dataset.from_dict({"sample_id": [1, 2], "text": ["a", "b"]}).save_to_disk(str(path))
    elif kind == "null texts":
        datasets.Dataset.from_dict({"sample_id": ["a", "b"], "text": ["x", None]}).save_to_disk(str(path))
    else:  # empty texts
        save_eval_set(path, ["", "text"])
    return path


@pytest.mark.parametrize(("case", "message"), [
    ("limit 0", "--limit must be an integer in [1, inf]"), ("device tpu", "unknown device 'tpu'"),
    ("integer ids", "every sample_id must be a string (found int)"),
    ("null texts", "every text must be a string (found NoneType)"), ("empty texts", "has 1 empty text(s)"),
])
def test_bad_scoring_input_is_one_line_before_any_scoring(capsys, gpt2_dir, eval_dir, tmp_path, case, message):
    data = eval_dir if case in ("limit 0", "device tpu") else strange_eval_set(tmp_path / "eval", case)
    extra = {"limit 0": ["--limit", "0"], "device tpu": ["--device", "tpu"]}.get(case, [])
    before = snapshot(tmp_path)
    assert losses_cli(gpt2_dir, data, tmp_path / "out.zarr", *extra) == 2
    assert message in one_line(capsys, "losses")
    assert snapshot(tmp_path) == before


def test_a_lone_surrogate_in_a_jsonl_source_is_one_line(capsys, tmp_path):
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.jsonl").write_text('{"text": "fine"}\n{"text": "bad \\ud800 surrogate"}\n')
    assert main(["corpus", "--source", "files", "--path", str(tmp_path / "texts" / "*.jsonl"),
                 "--out", str(tmp_path / "corpus")]) == 2
    assert "is not valid Unicode" in one_line(capsys, "corpus") and not (tmp_path / "corpus").exists()


@pytest.mark.parametrize("label", ["a b", "x;touch F", "$(touch F)", "..", "a/b"])
def test_unsafe_domain_labels_are_refused_where_they_enter(capsys, tmp_path, label):
    rows = [{"text": f"document {i} " * 5, "topic": label if i % 2 else "fine"} for i in range(20)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert main(["corpus", "--source", "files", "--path", str(tmp_path / "a.jsonl"), "--domain-field", "topic",
                 "--out", str(tmp_path / "corpus")]) == 2
    assert "is not a safe name" in one_line(capsys, "corpus") and not (tmp_path / "corpus").exists()


def test_assemble_of_a_folder_that_is_not_a_store_is_one_line(capsys, tmp_path):
    (tmp_path / "notastore.zarr").mkdir()
    good = loss_store(tmp_path / "a.zarr", [1.0, 2.0], "alpha", 100)
    assert main(["assemble", "--out", str(tmp_path / "pool.zarr"), str(good), str(tmp_path / "notastore.zarr")]) == 2
    assert "is not a Zarr store written by mmc" in one_line(capsys, "assemble")


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--epsilon", "nan", "--epsilon must be a finite number in (0, inf]"),
    ("--epsilon", "0", "--epsilon must be a finite number in (0, inf]"),
    ("--budget-multiple", "0", "--budget-multiple must be a finite number in (0, inf]"),
    ("--budget-multiple", "-2", "--budget-multiple must be a finite number in (0, inf]"),
    ("--target", "nan", "--target must be a finite number"),
])
def test_plan_settings_are_checked(capsys, tmp_path, option, value, message):
    law = {"fits": {"joint": {"in_domain": {"params": {"L_star": 1.0, "B": 5.0, "beta": 0.3, "A0": 2.0, "gamma": 0.1,
                                                       "b": 0.5}}}}, "bases": {"n_params": [1e4, 4e4]}}
    (tmp_path / "law.json").write_text(json.dumps(law))
    before = snapshot(tmp_path)
    assert main(["plan", "--law", str(tmp_path / "law.json"), option, value, "--out", str(tmp_path / "p.json")]) == 2
    assert message in one_line(capsys, "plan")
    assert snapshot(tmp_path) == before


def test_merge_sweep_docs_per_domain_zero_says_so(capsys, gpt2_dir, experts, tmp_path):
    data = save_eval_set(tmp_path / "eval", EVAL_TEXTS[:4], ["expert0", "expert1", "expert2", "other"])
    assert main(["merge-sweep", "--base", str(gpt2_dir), "--experts-dir", str(experts[0].parent), "--domains",
                 "expert0,expert1", "--data", str(data), "--out", str(tmp_path / "s.zarr"), "--docs-per-domain", "0",
                 "--device", "cpu"]) == 2
    assert "--docs-per-domain must be an integer in [1, inf]" in one_line(capsys, "merge-sweep")


def test_a_pickle_only_expert_merges_with_allow_pickle(capsys, gpt2_dir, experts, tmp_path):
    pickled = tmp_path / "pickled"
    shutil.copytree(experts[0], pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    argv = ["merge", "--base", str(gpt2_dir), "--experts", str(pickled), str(experts[1]), "--method", "average",
            "--out", str(tmp_path / "out")]
    assert main(argv) == 2 and "--allow-pickle" in one_line(capsys, "merge")
    assert main([*argv, "--allow-pickle"]) == 0


def test_report_text_is_escaped_for_markdown_and_figures(tmp_path):
    assert _md("a|b<script>") == r"a\|b&lt;script&gt;"
    table = pd.DataFrame({"model": ["$\\frac$ odd", "fine|name"], "family": ["$x", "y"], "n_params": [1, 2],
                          "n_params_nonembedding": [1, 2], "mean_nll": [1.0, 2.0], "win_share": [0.5, 0.5],
                          "shapley": [1.0, 1.0]})
    figure_attribution(table, tmp_path / "a.png")
    assert (tmp_path / "a.png").read_bytes().startswith(b"\x89PNG")


# ---- no leftovers; concurrent writers


def test_leftovers_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    target = tmp_path / "x.zarr"
    dead = tmp_path / ".x.zarr.tmp-999999999-0123abcd"
    legacy = tmp_path / ".x.zarr.old-89abcdef"
    sleeper = subprocess.Popen(["sleep", "30"])
    live = tmp_path / f".x.zarr.tmp-{sleeper.pid}-fedcba98"
    try:
        for path in (dead, legacy, live):
            path.mkdir()
        with atomic_path(target, "loss store") as tmp:
            tmp.mkdir()
        assert sorted(path.name for path in tmp_path.iterdir()) == [live.name, "x.zarr"]
    finally:
        sleeper.kill()


def _write_many(target: str, writer: int) -> None:
    for round_ in range(20):
        with atomic_path(target, "tables") as tmp:
            tmp.mkdir()
            for part in range(5):
                (tmp / f"part{part}.csv").write_text(f"{writer},{round_}\n")


def test_concurrent_writers_of_one_path_end_with_one_complete_output(tmp_path):
    target = tmp_path / "out"
    context = multiprocessing.get_context("fork")
    writers = [context.Process(target=_write_many, args=(str(target), i)) for i in range(6)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    assert [writer.exitcode for writer in writers] == [0] * 6
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]
    contents = {(target / f"part{part}.csv").read_text() for part in range(5)}
    assert len(contents) == 1  # every part from one writer's round: one complete output


# ---- no escape from the project through params (DVC)


def run(repo: Path, *command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=repo, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.mark.slow
@pytest.mark.parametrize("name", ["x;touch PWNED;", "a b", "$(touch PWNED)", "../../../escaped"])
def test_unsafe_slugs_and_domains_never_reach_a_shell_or_a_path(tmp_path, gpt2_dir, llama_dir, name):
    repo = tmp_path / "repo"
    stage_project(repo, gpt2_dir, llama_dir, ["losses", "experts"], {
        "merging": {"base_dir": "models", "bases": ["gpt2"], "domains": [name], "expert_tokens": 2000,
                    "expert_batch_size": 2, "expert_lr": 0.001, "expert_warmup_steps": 1, "expert_lora_rank": None, "expert_context": None,
                    "seed": 0},
        "zoo": {"device": "cpu"}})
    save_eval_set(repo / "data" / "corpus" / "train", TRAIN_TEXTS, ["code"] * len(TRAIN_TEXTS))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["pool"] = {name: pool_entry("gpt2", "gpt2")}
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    before = snapshot(tmp_path)
    result = run(repo, "dvc", "repro")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "is not a safe name" in output or "outside of the repo" in output.replace("\n", " ").lower() \
        or "is outside" in output, output
    assert not any(path.name == "PWNED" for path in tmp_path.parent.rglob("PWNED"))
    assert not (tmp_path / "escaped").exists() and not (tmp_path.parent / "escaped").exists()
    new = set(snapshot(tmp_path)) - set(before)
    assert not [path for path in new if "/data/" in f"/{path}" and ("losses/" in path or "experts/" in path)
                and not path.endswith((".tmp", ".lock"))], new


@pytest.mark.slow
def test_dvc_ignores_the_leftovers_of_atomic_writes(tmp_path, gpt2_dir, llama_dir):
    repo = tmp_path / "repo"
    stage_project(repo, gpt2_dir, llama_dir, ["losses"], {})
    (repo / ".dvcignore").write_text((Path(__file__).resolve().parents[1] / ".dvcignore").read_text())
    result = run(repo, "dvc", "check-ignore", "data/losses/.gpt2.zarr.tmp-12-0123abcd", "data/.pool.zarr.old-12-0123abcd")
    assert result.returncode == 0 and result.stdout.split() == ["data/losses/.gpt2.zarr.tmp-12-0123abcd",
                                                                "data/.pool.zarr.old-12-0123abcd"]


def test_safe_names_are_the_ones_documented():
    from mmc import check_name
    for good in ("gpt2-s", "pythia_160m", "qwen2.5-0.5b", "net_email", "a+b"):
        assert check_name("slug", good) == good
    for bad in ("", "a b", "x;y", "$(x)", "../x", "a/b", "..", ".hidden", "-dash", "a'b"):
        with pytest.raises(MMCError, match="is not a safe name"):
            check_name("slug", bad)
