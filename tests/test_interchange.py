"""`mmc import` and `mmc export`: losses computed elsewhere (lm-eval `--log_samples`, plain tables) become loss stores
that `assemble` takes beside `mmc losses` stores; stores and pools become tidy tables.

The fake lm-eval files follow the format lm-eval 0.4.13 writes (checked by the slow test, which runs lm-eval's own
command line on SmolLM2-135M): one JSON object a line with `doc_id`, `doc`, `target`, `arguments`
({"gen_args_0": {"arg_0": TEXT}}), `resps` ([[LL]]) and `filtered_resps` ([LL]), LL a repr string; the results JSON
beside it (results_<date>.json) has `configs[task].output_type`, `lm_eval_version` and `config.model_args`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from conftest import save_eval_set
from mmc.cli import main
from mmc.corpus import fingerprint
from mmc.store import assemble_pool, open_store, output_kind, write_store

TEXTS = ["The cat sat on the mat.", "def f(x):\n    return x + 1\n", "Ünïcödé text: café 🙂",
         "  leading spaces and a trailing newline\n", "[1, 2, 3]"]
DOMAINS = ["prose", "code", "prose", "prose", "code"]
IDS = [f"s{i:03d}" for i in range(len(TEXTS))]
NLL = np.array([42.53763198852539, 32.971649169921875, 107.42525482177734, 63.12470626831055, 20.352811813354492])
DATE = "2026-01-02T03-04-05.678901"
PARAMS = ["--n-params", "1000", "--n-params-nonembedding", "800"]


@pytest.fixture()
def eval_set(tmp_path) -> Path:
    return save_eval_set(tmp_path / "eval", TEXTS, DOMAINS)


def lm_eval_samples(folder: Path, texts=TEXTS, ids=IDS, nll=NLL, *, task="mytask", output_type="loglikelihood_rolling",
                    results=True, doc_texts=None) -> Path:
    """A samples file as lm-eval's --log_samples writes it (and its results JSON beside it, unless told not)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for index, text in enumerate(texts):
        doc = {"text": text if doc_texts is None else doc_texts[index]}
        if ids is not None:
            doc = {"sample_id": ids[index], **doc}
        value = str(-float(nll[index]))
        lines.append({"doc_id": index, "doc": doc, "target": text, "arguments": {"gen_args_0": {"arg_0": text}},
                      "resps": [[value]], "filtered_resps": [value], "filter": "none",
                      "metrics": ["word_perplexity", "byte_perplexity", "bits_per_byte"], "doc_hash": "0" * 64,
                      "prompt_hash": "1" * 64, "target_hash": "1" * 64,
                      "byte_perplexity": [-float(nll[index]), len(text.encode())]})
    path = folder / f"samples_{task}_{DATE}.jsonl"
    path.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines), encoding="utf-8")
    if results:
        (folder / f"results_{DATE}.json").write_text(json.dumps({
            "results": {task: {}}, "configs": {task: {"task": task, "output_type": output_type,
                                                      "doc_to_target": "text"}},
            "config": {"model": "hf", "model_args": {"pretrained": "/models/dir", "gguf_file": "m.gguf",
                                                     "dtype": "float32"}, "model_num_parameters": 1234,
                       "model_dtype": "torch.float32"},
            "lm_eval_version": "0.4.13", "transformers_version": "5.0", "max_length": 8192}), encoding="utf-8")
    return path


def table(ids=IDS, nll=NLL, **columns) -> pd.DataFrame:
    return pd.DataFrame({"sample_id": ids, "nll": nll, **columns})


def write_table(frame: pd.DataFrame, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        frame.to_parquet(path, index=False)
    elif path.suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in frame.to_dict("records")), encoding="utf-8")
    return path


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()


def import_args(source, eval_set, out, *extra):
    return ("import", source, "--data", eval_set, "--out", out, *extra)


# ---- import


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".jsonl"])
def test_table_round_trip(suffix, eval_set, tmp_path, capsys):
    order = [3, 0, 4, 1, 2]  # any order in: the store holds the eval set's order
    source = write_table(table(np.array(IDS)[order], NLL[order], n_tokens=[8, 7, 9, 12, 12]), tmp_path / f"t{suffix}")
    out = tmp_path / "imported.zarr"
    code, printed, err = run(capsys, *import_args(source, eval_set, out, "--model", "org/model", "--family", "fam",
                                                  *PARAMS))
    assert code == 0, err
    assert "5 samples" in printed
    store = open_store(out)
    assert list(store["sample"].values) == IDS
    np.testing.assert_array_equal(store.nll.values, NLL)
    np.testing.assert_array_equal(store.n_tokens.values, np.array([8, 7, 9, 12, 12])[np.argsort(order)])
    np.testing.assert_array_equal(store.n_bytes.values, [len(text.encode()) for text in TEXTS])
    assert list(store.domain.values) == DOMAINS
    # the variables, dtypes and coords of a store written by `mmc losses`
    assert set(store.data_vars) == {"nll", "n_tokens", "n_bytes"} and set(store.coords) == {"sample", "domain"}
    assert store.nll.dtype == np.float64 and store.n_tokens.dtype == np.int64 and store.n_bytes.dtype == np.int64
    assert store.nll.attrs["units"] == "nats"
    attrs = store.attrs
    assert attrs["dataset_fingerprint"] == fingerprint(IDS, TEXTS)
    assert attrs["source"] == "table" and attrs["source_file"] == str(source.resolve())
    assert len(attrs["source_sha256"]) == 64 and attrs["model"] == "org/model" and attrs["family"] == "fam"
    assert (attrs["n_params"], attrs["n_params_nonembedding"], attrs["n_tokens_known"]) == (1000, 800, "true")
    for exported in ("out.csv", "out.parquet"):
        assert run(capsys, "export", out, "--out", tmp_path / exported)[0] == 0
        read = pd.read_csv(tmp_path / exported, dtype={"sample_id": str}) if exported.endswith(".csv") else \
            pd.read_parquet(tmp_path / exported)
        assert list(read.columns) == ["model", "sample_id", "domain", "nll", "n_tokens", "n_bytes"]
        assert list(read.model) == ["imported"] * 5 and list(read.sample_id) == IDS and list(read.domain) == DOMAINS
        np.testing.assert_array_equal(read.nll.to_numpy(), NLL)  # exactly: CSV floats round-trip
        np.testing.assert_array_equal(read.n_tokens.to_numpy(), store.n_tokens.values)
        np.testing.assert_array_equal(read.n_bytes.to_numpy(), store.n_bytes.values)
        assert output_kind(tmp_path / exported) == "losses table"
        # and back: the exported table imports to the same store
        again = tmp_path / f"again-{exported}.zarr"
        assert run(capsys, *import_args(tmp_path / exported, eval_set, again, *PARAMS))[0] == 0
        back = open_store(again)
        np.testing.assert_array_equal(back.nll.values, store.nll.values)
        np.testing.assert_array_equal(back.n_tokens.values, store.n_tokens.values)
        assert back.attrs["model"] == "imported"  # the table's model column names it


def test_match_by_text_and_store_without_token_counts(eval_set, tmp_path, capsys):
    order = [4, 2, 0, 1, 3]
    source = write_table(pd.DataFrame({"text": np.array(TEXTS, dtype=object)[order], "nll": NLL[order]}),
                         tmp_path / "by_text.parquet")
    out = tmp_path / "by_text.zarr"
    assert run(capsys, *import_args(source, eval_set, out, "--model", "m", *PARAMS))[0] == 0
    store = open_store(out)
    np.testing.assert_array_equal(store.nll.values, NLL)
    np.testing.assert_array_equal(store.n_tokens.values, 0)  # unknown
    assert store.attrs["n_tokens_known"] == "false"


@pytest.mark.parametrize("ids", [IDS, None], ids=["by_id", "by_text"])
def test_lm_eval_samples(ids, eval_set, tmp_path, capsys):
    order = [2, 4, 0, 3, 1]
    source = lm_eval_samples(tmp_path / "lm", [TEXTS[i] for i in order], None if ids is None else
                             [IDS[i] for i in order], NLL[order])
    out = tmp_path / "lm.zarr"
    code, _, err = run(capsys, *import_args(source, eval_set, out, "--family", "smol", *PARAMS))
    assert code == 0, err
    store = open_store(out)
    np.testing.assert_array_equal(store.nll.values, NLL)  # -loglikelihood, exactly
    attrs = store.attrs
    assert (attrs["source"], attrs["tool"], attrs["tool_version"]) == ("lm-eval", "lm-eval", "0.4.13")
    assert attrs["model"] == "/models/dir/m.gguf" and attrs["lm_eval_task"] == "mytask"
    assert attrs["window"] == "rolling" and attrs["n_tokens_known"] == "false"
    assert attrs["dataset_fingerprint"] == fingerprint(IDS, TEXTS)
    # beside a table import of the same eval set, in one pool
    other = write_table(table(), tmp_path / "other.csv")
    assert run(capsys, *import_args(other, eval_set, tmp_path / "other.zarr", "--model", "x", *PARAMS))[0] == 0
    pool = assemble_pool([out, tmp_path / "other.zarr"])
    assert list(pool.model.values) == ["lm", "other"] and list(pool.source.values) == ["/models/dir/m.gguf", "x"]
    np.testing.assert_array_equal(pool.nll.values, [NLL, NLL])


def test_lm_eval_without_results_file_needs_the_model(eval_set, tmp_path, capsys):
    source = lm_eval_samples(tmp_path / "lm", results=False)
    code, _, err = run(capsys, *import_args(source, eval_set, tmp_path / "a.zarr", *PARAMS))
    assert code == 2 and "--model" in err
    assert run(capsys, *import_args(source, eval_set, tmp_path / "a.zarr", "--model", "m", *PARAMS))[0] == 0
    assert "tool_version" not in open_store(tmp_path / "a.zarr").attrs


def test_table_of_several_models_needs_one_chosen(eval_set, tmp_path, capsys):
    frame = pd.concat([table().assign(model="a"), table(nll=NLL + 1).assign(model="b")])
    source = write_table(frame, tmp_path / "pool.parquet")
    code, _, err = run(capsys, *import_args(source, eval_set, tmp_path / "b.zarr", *PARAMS))
    assert code == 2 and "holds 2 models" in err
    assert run(capsys, *import_args(source, eval_set, tmp_path / "b.zarr", "--model", "b", *PARAMS))[0] == 0
    np.testing.assert_array_equal(open_store(tmp_path / "b.zarr").nll.values, NLL + 1)


# ---- refusals: exit status 2, exactly one line, nothing written


def _loglikelihood_task(folder: Path) -> Path:
    """A samples file of a `loglikelihood` task: two arguments, (LL, is_greedy) responses."""
    path = lm_eval_samples(folder, results=False)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    for line in lines:
        line["arguments"] = {"gen_args_0": {"arg_0": "Question:", "arg_1": " " + line["target"]}}
        line["resps"], line["filtered_resps"] = [["(-3.5, False)"]], ["(-3.5, False)"]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _multiple_choice(folder: Path) -> Path:
    path = lm_eval_samples(folder, results=False)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    for line in lines:
        line["arguments"] = {f"gen_args_{i}": {"arg_0": "Q:", "arg_1": f" {i}"} for i in range(3)}
        line["resps"], line["filtered_resps"] = [["(-1.0, False)"]] * 3, ["(-1.0, False)"] * 3
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _file(path: Path, content: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def _bad_json_line(folder: Path) -> Path:
    path = lm_eval_samples(folder, results=False)
    path.write_text(path.read_text() + "{not json\n")
    return path


REFUSALS = {
    "missing documents": (lambda d: write_table(table(IDS[:4], NLL[:4]), d / "t.csv"),
                          ["misses 1 of the eval set's 5 documents", "'s004'"]),
    "added documents": (lambda d: write_table(table([*IDS, "zzz"], [*NLL, 1.0]), d / "t.csv"),
                        ["adds 1 documents not in it", "'zzz'"]),
    "missing and added": (lambda d: write_table(table([*IDS[:3], "x", "y"], NLL), d / "t.parquet"),
                          ["misses 2", "adds 2"]),
    "duplicated documents": (lambda d: write_table(table([*IDS, IDS[1]], [*NLL, 3.0]), d / "t.csv"),
                             ["1 duplicated documents", "'s001'"]),
    "duplicated texts": (lambda d: write_table(pd.DataFrame({"text": [*TEXTS, TEXTS[0]], "nll": [*NLL, 1.0]}),
                                               d / "t.jsonl"), ["duplicated documents (by text"]),
    "NaN loss": (lambda d: write_table(table(nll=[1.0, float("nan"), 2.0, 3.0, 4.0]), d / "t.csv"),
                 ["NaN, infinite or negative", "'s001'"]),
    "infinite loss": (lambda d: write_table(table(nll=[1.0, 2.0, float("inf"), 3.0, 4.0]), d / "t.parquet"),
                      ["NaN, infinite or negative", "'s002'"]),
    "negative loss": (lambda d: write_table(table(nll=[1.0, 2.0, 3.0, -0.5, 4.0]), d / "t.jsonl"),
                      ["NaN, infinite or negative", "'s003'"]),
    "positive log-likelihood": (lambda d: lm_eval_samples(d, nll=[1.0, 2.0, -3.0, 4.0, 5.0]),
                                ["NaN, infinite or negative", "'s002'"]),
    "non-numeric loss": (lambda d: write_table(table(nll=["1.0", "x", "2", "3", "4"]), d / "t.csv"),
                         ["nll values are not numbers"]),
    "loglikelihood task": (_loglikelihood_task, ["not loglikelihood_rolling", "other than one text"]),
    "multiple-choice task": (_multiple_choice, ["not loglikelihood_rolling"]),
    "another output type": (lambda d: lm_eval_samples(d, output_type="multiple_choice"),
                            ["a multiple_choice task, not a loglikelihood_rolling one"]),
    "transformed text, by id": (lambda d: lm_eval_samples(d, [text.upper() for text in TEXTS]),
                                ["scored on other text than the eval set's", "doc_to_target: text"]),
    "transformed text, no ids": (lambda d: lm_eval_samples(d, [text.strip() for text in TEXTS], None,
                                                           doc_texts=TEXTS), ["transforms the text"]),
    "docs of another task": (lambda d: lm_eval_samples(d, ["other", "docs", "entirely", "here", "x"], None),
                             ["does not match eval set", "(by text)", "misses 5", "adds 5"]),
    "unknown format": (lambda d: _file(d / "losses.txt", b"1.0\n"), ["unknown format", "--format"]),
    "unreadable JSON": (_bad_json_line, ["cannot be read", "line 6 is not valid JSON"]),
    "corrupt parquet": (lambda d: _file(d / "t.parquet", b"PAR1 not really parquet PAR1"),
                        ["cannot be read as parquet"]),
    "missing file": (lambda d: d / "absent.csv", ["does not exist"]),
    "not lm-eval": (lambda d: write_table(table(), d / "t.csv"),
                    ["cannot be read as lm-eval's --log_samples output", "line 1"]),
    "no id or text": (lambda d: write_table(pd.DataFrame({"id": IDS, "nll": NLL}), d / "t.csv"),
                      ["needs columns nll and sample_id or text"]),
    "other n_bytes": (lambda d: write_table(table(n_bytes=[1, 2, 3, 4, 5]), d / "t.csv"),
                      ["n_bytes values differ"]),
    "other domains": (lambda d: write_table(table(domain=["code"] * 5), d / "t.csv"), ["another domain"]),
    "negative n_tokens": (lambda d: write_table(table(n_tokens=[1, 2, -3, 4, 5]), d / "t.csv"),
                          ["n_tokens values are not non-negative integers"]),
    "no n_params": (lambda d: lm_eval_samples(d), ["--n-params and --n-params-nonembedding",
                                                   "results count 1234 parameters"]),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_are_one_line_and_write_nothing(case, eval_set, tmp_path, capsys):
    make, needles = REFUSALS[case]
    source = make(tmp_path / "src")
    out = tmp_path / "out" / "store.zarr"
    extra = ["--model", "m"]
    if case != "no n_params":
        extra += PARAMS
    if case == "not lm-eval":
        extra += ["--format", "lm-eval"]
    code, printed, err = run(capsys, *import_args(source, eval_set, out, *extra))
    assert code == 2, (printed, err)
    assert len(err.splitlines()) == 1 and err.startswith("mmc import: error: "), err
    for needle in needles:
        assert needle in err, err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_import_refuses_to_replace_what_mmc_did_not_write(eval_set, tmp_path, capsys):
    source = write_table(table(), tmp_path / "t.csv")
    out = tmp_path / "taken.zarr"
    out.mkdir()
    (out / "precious").write_text("mine")
    code, _, err = run(capsys, *import_args(source, eval_set, out, "--model", "m", *PARAMS))
    assert code == 2 and "not written by mmc" in err and (out / "precious").read_text() == "mine"


# ---- export


def test_export_pool(eval_set, tmp_path, capsys):
    for name, shift in (("a", 0.0), ("b", 1.5)):
        source = write_table(table(nll=NLL + shift, n_tokens=[3, 4, 5, 6, 7]), tmp_path / f"{name}.csv")
        assert run(capsys, *import_args(source, eval_set, tmp_path / f"{name}.zarr", "--model", name, *PARAMS))[0] == 0
    assert run(capsys, "assemble", "--out", tmp_path / "pool.zarr", tmp_path / "a.zarr", tmp_path / "b.zarr")[0] == 0
    code, printed, err = run(capsys, "export", tmp_path / "pool.zarr", "--out", tmp_path / "pool.parquet")
    assert code == 0, err
    assert "10 rows (2 models)" in printed
    read = pd.read_parquet(tmp_path / "pool.parquet")
    assert list(read.model) == ["a"] * 5 + ["b"] * 5 and list(read.sample_id) == IDS * 2
    np.testing.assert_array_equal(read.nll.to_numpy(), np.concatenate([NLL, NLL + 1.5]))
    np.testing.assert_array_equal(read.n_tokens.to_numpy(), [3, 4, 5, 6, 7] * 2)
    assert list(read.domain) == DOMAINS * 2
    # rewritten in place: mmc recognises its own table
    assert run(capsys, "export", tmp_path / "pool.zarr", "--out", tmp_path / "pool.parquet")[0] == 0


def test_export_store_without_domain(tmp_path, capsys):
    store = xr.Dataset({"nll": ("sample", NLL), "n_tokens": ("sample", np.arange(5)),
                        "n_bytes": ("sample", np.arange(5) + 10)}, coords={"sample": np.asarray(IDS, dtype=object)},
                       attrs={"n_params": 1, "n_params_nonembedding": 1})
    write_store(store, tmp_path / "m.zarr", "loss store")
    assert run(capsys, "export", tmp_path / "m.zarr", "--out", tmp_path / "m.csv")[0] == 0
    read = pd.read_csv(tmp_path / "m.csv")
    assert read.domain.isna().all() and list(read.n_bytes) == [10, 11, 12, 13, 14]


@pytest.mark.parametrize("case", ["suffix", "foreign csv", "foreign parquet", "shard store", "missing store"])
def test_export_refusals(case, tmp_path, capsys):
    store = xr.Dataset({"nll": ("sample", NLL), "n_tokens": ("sample", np.arange(5)),
                        "n_bytes": ("sample", np.arange(5))}, coords={"sample": np.asarray(IDS, dtype=object)})
    write_store(store, tmp_path / "m.zarr", "loss store")
    out, needle = tmp_path / "t.csv", "not written by mmc"
    if case == "suffix":
        out, needle = tmp_path / "t.xlsx", "use .parquet or .csv"
    elif case == "foreign csv":
        out.write_text("a,b\n1,2\n")
    elif case == "foreign parquet":
        out = tmp_path / "t.parquet"
        pd.DataFrame({"a": [1]}).to_parquet(out)
    elif case == "shard store":
        shard = xr.Dataset({"window_nll": ("window", NLL), "n_tokens": ("sample", np.arange(5))},
                           attrs={"shard": "{}"})
        write_store(shard, tmp_path / "m.zarr", "loss store")
        needle = "one shard of a scoring run"
    else:
        needle = "does not exist"
    before = out.read_bytes() if out.exists() else None
    store_path = tmp_path / ("absent.zarr" if case == "missing store" else "m.zarr")
    code, _, err = run(capsys, "export", store_path, "--out", out)
    assert code == 2 and len(err.splitlines()) == 1 and needle in err, err
    assert (out.read_bytes() if out.exists() else None) == before


# ---- the real tool: lm-eval's command line on SmolLM2-135M, against `mmc losses`

REAL_TEXTS = ["The cat sat on the mat, and the dog slept by the door.", "def add(a, b):\n    return a + b\n",
              "Ünïcödé: naïve café 🙂", "[1, 2, 3]", "  Two leading spaces, one trailing newline.\n"]

TASK_YAML = """task: mmc_import_check
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: text
metric_list:
  - metric: bits_per_byte
metadata:
  version: 1.0
"""


@pytest.mark.slow
def test_lm_eval_cli_samples_import_exactly_and_match_mmc_losses(tmp_path, capsys):
    try:
        from mmc.losses import smollm2_gguf

        gguf = smollm2_gguf()
    except Exception as error:  # noqa: BLE001 - the wheel is optional
        pytest.skip(f"SmolLM2 GGUF not installed: {error}")
    lm_eval = Path(sys.executable).with_name("lm_eval")
    if not lm_eval.exists():
        pytest.skip("lm-eval is not installed in this environment")
    from mmc.losses import write_losses

    started = time.monotonic()
    eval_set = save_eval_set(tmp_path / "eval", REAL_TEXTS)
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"sample_id": f"s{i:03d}", "text": text}, ensure_ascii=False) + "\n"
                            for i, text in enumerate(REAL_TEXTS)), encoding="utf-8")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "mmc_import_check.yaml").write_text(TASK_YAML.format(data=docs))
    command = [str(lm_eval), "run", "--model", "hf", "--model_args",
               f"pretrained={gguf.parent},gguf_file={gguf.name},dtype=float32,add_bos_token=False",
               "--tasks", "mmc_import_check", "--include_path", str(tmp_path / "tasks"), "--device", "cpu",
               "--batch_size", "1", "--output_path", str(tmp_path / "lm_eval_out"), "--log_samples"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "hf_datasets"), "TOKENIZERS_PARALLELISM": "false"}
    # lm-eval in a subprocess while `mmc losses` scores the same texts here: both dequantize the GGUF file
    with (tmp_path / "lm_eval.log").open("w") as log, subprocess.Popen(command, env=env, stdout=log,
                                                                       stderr=subprocess.STDOUT) as harness:
        try:
            ours = write_losses(str(gguf), eval_set, tmp_path / "mmc.zarr", device="cpu", dtype="float32")
            harness.wait(timeout=600)
        except BaseException:
            harness.kill()  # the harness we started, and nothing else
            raise
    assert harness.returncode == 0, (tmp_path / "lm_eval.log").read_text()[-3000:]
    (samples,) = (tmp_path / "lm_eval_out").rglob("samples_mmc_import_check_*.jsonl")
    expected = {json.loads(line)["doc"]["sample_id"]: -float(json.loads(line)["filtered_resps"][0])
                for line in samples.read_text(encoding="utf-8").splitlines()}
    n_params = [str(ours.attrs["n_params"]), str(ours.attrs["n_params_nonembedding"])]
    out = tmp_path / "lm_eval.zarr"
    code = main(["import", str(samples), "--data", str(eval_set), "--out", str(out), "--family", "smollm2",
                 "--n-params", n_params[0], "--n-params-nonembedding", n_params[1]])
    assert code == 0, capsys.readouterr().err
    imported = open_store(out)
    np.testing.assert_array_equal(imported.nll.values, [expected[i] for i in imported["sample"].values])
    assert imported.attrs["model"] == str(gguf) == ours.attrs["model"] and imported.attrs["tool"] == "lm-eval"
    assert imported.attrs["window"] == "rolling" and imported.attrs["tool_version"]
    per_token = np.abs(imported.nll.values - ours.nll.values) / ours.n_tokens.values
    print(f"max |import - mmc losses| = {per_token.max():.2e} nats per token; "
          f"{time.monotonic() - started:.0f} s in all")
    assert per_token.max() < 1e-4
    pool = assemble_pool([out, tmp_path / "mmc.zarr"])
    assert list(pool.model.values) == ["lm_eval", "mmc"]
