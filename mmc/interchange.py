"""Losses computed elsewhere, in and out: `import_losses` turns lm-evaluation-harness `--log_samples` output or a
plain table into a loss store; `export_losses` writes a loss store or a pool as a tidy table.

An imported store has the variables and coords of a store written by `mmc losses` (`nll` float64 nats, `n_tokens`,
`n_bytes`, the eval set's sample ids in its order, its `domain` coord) and the eval set's `dataset_fingerprint`, so
`mmc assemble` combines it with the engine's stores. Its attrs say where the numbers came from: `source` ("lm-eval"
or "table"), `source_file`, `source_sha256`, `tool` and `tool_version` where known, `model`, `family`, `data`,
`n_params`, `n_params_nonembedding` (given: nothing in a samples file or a table says them), `mmc_version`.

`n_tokens` is 0 where the source does not say it (lm-eval never does): every scored document has at least one token,
so 0 cannot be a real count; the attr `n_tokens_known` says "true", "partial" or "false". Token counts enter only
per-token means and the routing study's inference FLOPs, which estimate such a model's tokens from the other
members' (`mmc.routing.realised`).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import xarray as xr

import mmc
from mmc import MMCError, check_number
from mmc.corpus import fingerprint, load_samples, sample_bytes
from mmc.store import (PARQUET_KIND_KEY, atomic_path, check_outputs, check_pool, loss_dataset, open_store,
                       write_store)

FORMATS = ("auto", "lm-eval", "table")
TABLE_SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
EXPORT_SUFFIXES = (".parquet", ".csv")
EXPORT_COLUMNS = ("model", "sample_id", "domain", "nll", "n_tokens", "n_bytes")
TABLE_KIND = "losses table"  # the kind `export_losses` writes: mmc.store knows its CSV header, its parquet metadata
ROLLING = "loglikelihood_rolling"
LM_EVAL_KEYS = {"doc_id", "arguments"}  # what every line of lm-eval's samples file holds, beside its responses
# samples_<task>_<date id>.jsonl, where the date id is datetime.isoformat() with ':' replaced by '-'
LM_EVAL_SAMPLES_NAME = re.compile(
    r"samples_(?P<task>.+)_(?P<date>\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}(?:\.\d+)?)\.jsonl")
NAN_WORDS = {"nan", "+nan", "-nan"}


# ---------------------------------------------------------------------------------------------
# Reading sources


def detect_format(path: Path) -> str:
    """"lm-eval" for a samples file of lm-eval's `--log_samples` (JSONL whose first record has `doc_id`,
    `arguments` and responses), "table" for a .parquet, .csv or other .jsonl file; an MMCError otherwise."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        first = _first_json_line(path)
        if isinstance(first, dict) and LM_EVAL_KEYS <= first.keys() and ("filtered_resps" in first or
                                                                          "resps" in first):
            return "lm-eval"
        return "table"
    if suffix in TABLE_SUFFIXES:
        return "table"
    raise MMCError(f"unknown format of '{path}': give lm-eval's samples_<task>_<date>.jsonl or a table (.parquet, "
                   f".csv, .jsonl), or say --format lm-eval|table")


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise MMCError(f"'{path}' does not exist")
    if not path.is_file():
        raise MMCError(f"'{path}' is not a file")
    try:
        path.open("rb").close()
    except OSError as error:
        raise MMCError(f"'{path}' cannot be read: {error.strerror}") from None


def _first_json_line(path: Path) -> Any:
    try:
        with path.open("rb") as file:
            for line in file:
                if line.strip():
                    return json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    return None


def _read_jsonl(path: Path, what: str = "JSONL") -> list[dict]:
    """The JSON objects of a JSONL file (`what` it should be, for errors), one a line (blank lines skipped)."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise MMCError(f"'{path}' cannot be read as {what}: not UTF-8 ({error.reason} at byte {error.start})") from None
    records = []
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as error:
            raise MMCError(f"'{path}' cannot be read as {what}: line {number} is not valid JSON ({error})") from None
        if not isinstance(record, dict):
            raise MMCError(f"'{path}' cannot be read as {what}: line {number} is a JSON {type(record).__name__}, not "
                           f"an object")
        records.append(record)
    if not records:
        raise MMCError(f"'{path}' holds no documents")
    return records


def _numbers(values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Floats of numbers or number strings, and a mask of the entries that are neither (NaN in the floats)."""
    if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        return values.to_numpy(dtype=np.float64, na_value=np.nan), np.zeros(len(values), dtype=bool)
    text = values.astype(str).str.strip()
    parsed = pd.to_numeric(text, errors="coerce").to_numpy(dtype=np.float64)
    unparsed = np.isnan(parsed) & ~text.str.lower().isin(NAN_WORDS).to_numpy() & values.notna().to_numpy()
    return parsed, unparsed


def read_lm_eval_samples(path: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The documents of lm-eval's `--log_samples` file of a `loglikelihood_rolling` task: a frame with `text` (the
    string the model scored: the request's only argument), `nll` (-loglikelihood, nats) and `sample_id` where every
    document (lm-eval's `doc`) has one; and what lm-eval's results JSON beside it says (`{}` where there is none).

    A line of the file: `doc_id`, `doc` (the dataset record), `target`, `arguments` ({"gen_args_0": {"arg_0": TEXT}}
    for a rolling request; older versions: [[TEXT]]), `resps` ([[LL]]), `filtered_resps` ([LL]), with LL the
    log-likelihood as a number or its repr string. A file of another request type (loglikelihood: two arguments and
    a (LL, is_greedy) response; multiple choice: several requests; generation: text responses) is refused.
    """
    records = _read_jsonl(path, "lm-eval's --log_samples output")
    frame = pd.json_normalize(records)
    fields = {column.split(".")[0] for column in frame.columns}
    lacking = sorted(LM_EVAL_KEYS - fields) + ([] if {"filtered_resps", "resps"} & fields else ["filtered_resps"])
    if lacking:
        raise MMCError(f"'{path}' is not lm-eval's --log_samples output: its records lack {', '.join(lacking)}")
    results = lm_eval_results(path)
    task = results.get("task", "this task")
    output_type = results.get("output_type")
    if output_type is not None and output_type != ROLLING:
        raise MMCError(f"'{path}' holds lm-eval samples of {task}, a {output_type} task, not a {ROLLING} one: "
                       f"import a rolling log-likelihood (perplexity) task")
    not_rolling = f"'{path}' holds lm-eval samples of a task whose requests are not {ROLLING}"
    argument_columns = [column for column in frame.columns if column.startswith("arguments.")]
    if "arguments" in frame.columns:  # older lm-eval: a list of requests, each a list of arguments
        arguments = frame["arguments"]
        shaped = arguments.map(lambda value: isinstance(value, list) and len(value) == 1
                               and isinstance(value[0], list) and len(value[0]) == 1).to_numpy(dtype=bool)
        texts = arguments.str[0].str[0].where(shaped)
    elif "arguments.gen_args_0.arg_0" in argument_columns:
        others = [column for column in argument_columns if column != "arguments.gen_args_0.arg_0"]
        shaped = ~frame[others].notna().any(axis=1).to_numpy() if others else np.ones(len(frame), dtype=bool)
        texts = frame["arguments.gen_args_0.arg_0"]
    else:
        raise MMCError(f"{not_rolling}: its arguments are not one text per document")
    shaped &= texts.map(lambda value: isinstance(value, str)).to_numpy(dtype=bool)
    if not shaped.all():
        raise MMCError(f"{not_rolling}: {int((~shaped).sum())} of its {len(frame)} documents have requests other "
                       f"than one text to score (first: doc_id {frame['doc_id'].iloc[int(np.argmin(shaped))]})")
    responses = frame["filtered_resps"] if "filtered_resps" in frame.columns else frame["resps"].str[0]
    single = responses.map(lambda value: isinstance(value, list) and len(value) == 1).to_numpy(dtype=bool)
    loglikelihood, unparsed = _numbers(responses.str[0].where(single))
    unparsed |= ~single
    if unparsed.any():
        first = int(np.argmax(unparsed))
        raise MMCError(f"{not_rolling}: {int(unparsed.sum())} of its {len(frame)} responses are not one "
                       f"log-likelihood (first: doc_id {frame['doc_id'].iloc[first]}, "
                       f"{str(responses.iloc[first])[:60]!r})")
    table = pd.DataFrame({"text": texts.to_numpy(dtype=object), "nll": -loglikelihood})
    if "doc.sample_id" in frame.columns and frame["doc.sample_id"].map(lambda value: isinstance(value, str)).all():
        table["sample_id"] = frame["doc.sample_id"].to_numpy(dtype=object)
    elif "doc.text" in frame.columns:  # matched by text: the text the task scored must be the document's own
        changed = (frame["doc.text"].to_numpy(dtype=object) != table["text"].to_numpy(dtype=object))
        if changed.any():
            first = frame["doc_id"].iloc[int(np.argmax(changed))]
            raise MMCError(f"'{path}': the task scored other text than its documents' `text` in {int(changed.sum())} "
                           f"of {len(frame)} documents (first: doc_id {first}): "
                           f"it transforms the text (as wikitext's detokenizer does); import a task that scores the "
                           f"text unchanged (doc_to_target: text)")
    return table, results


def lm_eval_results(samples: Path) -> dict[str, Any]:
    """What lm-eval's results JSON written beside a samples file (same date id) says about the run: `task`,
    `output_type`, `tool_version`, `model`, `model_args`, `model_num_parameters`, `max_length`, `dtype`,
    `transformers_version`; only `task` (from the file's name) where no results JSON is found, `{}` where the file is
    not named as lm-eval names samples files."""
    match = LM_EVAL_SAMPLES_NAME.fullmatch(samples.name)
    if match is None:
        return {}
    task = match["task"]
    for candidate in sorted(samples.parent.glob(f"*_{match['date']}.json")):
        try:
            results = json.loads(candidate.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(results, dict) or not isinstance(results.get("configs"), dict):
            continue
        config = results.get("config") if isinstance(results.get("config"), dict) else {}
        task_config = results["configs"].get(task) if isinstance(results["configs"].get(task), dict) else {}
        model_args = _model_args(config.get("model_args"))
        found = {"task": task, "results_file": str(candidate), "output_type": task_config.get("output_type"),
                 "tool_version": results.get("lm_eval_version"), "model_args": model_args,
                 "model_num_parameters": config.get("model_num_parameters"), "max_length": results.get("max_length"),
                 "dtype": str(config.get("model_dtype") or "").removeprefix("torch.") or None,
                 "transformers_version": results.get("transformers_version"), "doc_to_target":
                 task_config.get("doc_to_target")}
        pretrained = model_args.get("pretrained") or results.get("model_name")
        if pretrained:
            gguf = model_args.get("gguf_file")
            found["model"] = str(Path(str(pretrained)) / str(gguf)) if gguf else str(pretrained)
        return {key: value for key, value in found.items() if value not in (None, "", {})}
    return {"task": task}


def _model_args(value: Any) -> dict[str, Any]:
    """lm-eval's model_args: a dict (0.4.5 on) or a "key=value,key=value" string (before)."""
    if isinstance(value, dict):
        return value
    if isinstance(value, str):
        pairs = (item.split("=", 1) for item in value.split(",") if "=" in item)
        return {key.strip(): text.strip() for key, text in pairs}
    return {}


def read_table(path: Path, model: str | None = None) -> pd.DataFrame:
    """A table of per-document losses (.parquet, .csv, .jsonl): `nll` (nats, total per document), `sample_id` or
    `text`, and optionally `n_tokens`, `n_bytes`, `domain`, `model`. A `model` column with several models (a pool's
    export) needs `model` to choose one; its rows are kept."""
    kind = TABLE_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise MMCError(f"unknown table format of '{path}': use .parquet, .csv or .jsonl")
    strings = ("sample_id", "text", "domain", "model")
    try:
        if kind == "parquet":

            frame = pq.read_table(path).to_pandas()
        elif kind == "csv":
            frame = pd.read_csv(path, dtype={name: str for name in strings}, keep_default_na=False,
                                na_values={name: [""] for name in ("nll", "n_tokens", "n_bytes")})
        else:
            frame = pd.DataFrame.from_records(_read_jsonl(path, "a JSONL table"))
    except MMCError:
        raise
    except (OSError, ValueError, UnicodeDecodeError, pd.errors.ParserError) as error:
        lines = str(error).strip().splitlines()
        raise MMCError(f"'{path}' cannot be read as {kind}: {lines[0] if lines else type(error).__name__}") from None
    if frame.empty:
        raise MMCError(f"'{path}' holds no documents")
    if "nll" not in frame.columns or not {"sample_id", "text"} & set(frame.columns):
        raise MMCError(f"table '{path}' needs columns nll and sample_id or text (it has: "
                       f"{', '.join(map(str, frame.columns))})")
    if "model" in frame.columns:
        models = pd.unique(frame["model"].astype(str))
        if model is not None and len(models) > 1:
            frame = frame[frame["model"].astype(str) == model]
            if frame.empty:
                raise MMCError(f"table '{path}' has no rows of model '{model}' (it has: {', '.join(models[:10])})")
        elif len(models) > 1:
            raise MMCError(f"table '{path}' holds {len(models)} models ({', '.join(models[:5])}): choose one with "
                           f"--model")
        frame.attrs["model"] = str(frame["model"].iloc[0])
    for name in ("sample_id", "text", "domain"):
        if name in frame.columns:
            values = frame[name]
            nulls_allowed = name == "domain"
            if pd.api.types.infer_dtype(values, skipna=nulls_allowed) in ("string", "empty"):
                continue
            bad = ~values.map(lambda value: isinstance(value, str)).to_numpy(dtype=bool)
            if nulls_allowed:
                bad &= values.notna().to_numpy()
            if bad.any():
                raise MMCError(f"table '{path}': {int(bad.sum())} {name} values are not strings (first: row "
                               f"{int(np.argmax(bad))}, {values.iloc[int(np.argmax(bad))]!r})")
    nll, unparsed = _numbers(frame["nll"])
    if unparsed.any():
        raise MMCError(f"table '{path}': {int(unparsed.sum())} nll values are not numbers (first: row "
                       f"{int(np.argmax(unparsed))}, {frame['nll'].iloc[int(np.argmax(unparsed))]!r})")
    table = pd.DataFrame({"nll": nll}, index=frame.index)
    for name in ("sample_id", "text", "domain"):
        if name in frame.columns:
            table[name] = frame[name].to_numpy(dtype=object)
    for name in ("n_tokens", "n_bytes"):
        if name in frame.columns:
            counts, unparsed = _numbers(frame[name])
            known = ~np.isnan(counts)
            with np.errstate(invalid="ignore"):
                bad = unparsed | (known & ((counts < 0) | (counts != np.round(counts)) | ~np.isfinite(counts)))
            if bad.any():
                raise MMCError(f"table '{path}': {int(bad.sum())} {name} values are not non-negative integers "
                               f"(first: row {int(np.argmax(bad))}, {frame[name].iloc[int(np.argmax(bad))]!r})")
            table[name] = counts  # NaN where the table leaves it empty
    table.attrs = dict(frame.attrs)
    return table.reset_index(drop=True)


# ---------------------------------------------------------------------------------------------
# Matching to the eval set


def match_documents(table: pd.DataFrame, eval_ids: np.ndarray, eval_texts: np.ndarray, where: str,
                    eval_where: str) -> np.ndarray:
    """For each row of `table`, its position in the eval set: by `sample_id` where the table has ids, else by the
    text itself (a hash of the text, then exact equality). Refused in one line: duplicated documents, documents
    missing from the table or not in the eval set (how many of each), and texts that differ under one id."""
    by_id = "sample_id" in table.columns
    keys = table["sample_id"].to_numpy(dtype=object) if by_id else _text_hash(table["text"].to_numpy(dtype=object))
    eval_keys = eval_ids if by_id else _text_hash(eval_texts)
    what = "sample_id" if by_id else "text"

    def name(row: int) -> str:
        return repr(table["sample_id"].iloc[row]) if by_id else repr(_snippet(table["text"].iloc[row]))

    duplicated = pd.Index(keys).duplicated()
    if duplicated.any():
        raise MMCError(f"{where} holds {int(duplicated.sum())} duplicated documents (by {what}; first: "
                       f"{name(int(np.argmax(duplicated)))}): each document of the eval set must appear once")
    eval_index = pd.Index(eval_keys)
    if not eval_index.is_unique:
        raise MMCError(f"eval set {eval_where} holds {int(eval_index.duplicated().sum())} repeated texts, so "
                       f"{where} cannot be matched to it by text: give the documents' sample_id")
    positions = eval_index.get_indexer(keys)
    if not by_id:  # a hash collision is not a match
        found = positions >= 0
        found[found] = eval_texts[positions[found]] == table["text"].to_numpy(dtype=object)[found]
        positions = np.where(found, positions, -1)
    added = positions < 0
    missing = np.ones(len(eval_keys), dtype=bool)
    missing[positions[~added]] = False
    if added.any() or missing.any():
        parts = []
        if missing.any():
            first = repr(eval_ids[int(np.argmax(missing))])
            parts.append(f"misses {int(missing.sum())} of the eval set's {len(eval_keys)} documents (first: {first})")
        if added.any():
            parts.append(f"adds {int(added.sum())} documents not in it (first: {name(int(np.argmax(added)))})")
        raise MMCError(f"{where} does not match eval set {eval_where} (by {what}): it {' and '.join(parts)}; it must "
                       f"hold every document of the eval set once, scored on the same text")
    if by_id and "text" in table.columns:
        changed = eval_texts[positions] != table["text"].to_numpy(dtype=object)
        if changed.any():
            raise MMCError(f"{where}: {int(changed.sum())} documents were scored on other text than the eval set's "
                           f"under the same sample_id (first: {name(int(np.argmax(changed)))}); the text must be "
                           f"scored unchanged (an lm-eval task with doc_to_target: text, not one that transforms it "
                           f"as wikitext's detokenizer does)")
    return positions


def _text_hash(texts: np.ndarray) -> np.ndarray:
    return pd.util.hash_array(np.asarray(texts, dtype=object), categorize=False)


def _snippet(text: str, length: int = 40) -> str:
    return text if len(text) <= length else text[:length] + "…"


def check_nll(nll: np.ndarray, table: pd.DataFrame, where: str) -> None:
    """Losses must be finite and non-negative (nats: -loglikelihood); a bad one ends in one line naming it."""
    bad = ~np.isfinite(nll) | (nll < 0)
    if bad.any():
        row = int(np.argmax(bad))
        name = table["sample_id"].iloc[row] if "sample_id" in table.columns else _snippet(table["text"].iloc[row])
        raise MMCError(f"{where} has {int(bad.sum())} NaN, infinite or negative losses (first: {name!r}, "
                       f"nll {nll[row]!r} nats); every document's NLL must be a finite number >= 0")


# ---------------------------------------------------------------------------------------------
# Import


def import_losses(
    source: str | Path,
    data_dir: str | Path,
    out: str | Path,
    *,
    format: str = "auto",
    split: str = "eval",
    model: str | None = None,
    family: str = "",
    data: str = "",
    n_params: int | None = None,
    n_params_nonembedding: int | None = None,
) -> xr.Dataset:
    """What `mmc import` does: the per-document losses of `source` written as a loss store at `out`, in the order
    of the eval set `data_dir` (`split`), which must hold exactly its documents. Returns the store's dataset.

    `source` is (a) lm-evaluation-harness `--log_samples` output (samples_<task>_<date>.jsonl) of a
    `loglikelihood_rolling` task: `nll` = -loglikelihood, exactly; documents are matched by their `doc`'s
    `sample_id`, else by the scored text. lm-eval scores the text that the task's `doc_to_target` makes of a
    document: the task must score the eval set's text unchanged (`doc_to_target: text`, the field's name: lm-eval
    parses the rendering of `"{{text}}"` as a Python list when it looks like one; `doc_to_text: ""`), not
    transform it (wikitext's `wikitext_detokenizer` does; such a file is refused), and the model should run with
    `add_bos_token=False` so that, as in `mmc losses`, the text is conditioned on one prefix token only. The results
    JSON lm-eval writes beside it gives the task's request type, lm-eval's version and the model. Or (b) a table
    (.parquet, .csv, .jsonl) with `nll` (nats, total per document) and `sample_id` or `text`; optional `n_tokens`,
    `n_bytes` (checked against the eval set's), `domain` (checked against the eval set's, used where it has none),
    `model` (one model, or choose with `model`).

    `n_params` and `n_params_nonembedding` are needed (the pool's budgets); `model` names the model where the
    source does not. Refused in one line, writing nothing: an unknown format, an unreadable file, documents missing
    or added or duplicated, NaN/infinite/negative losses, a file of another task (not rolling log-likelihoods, or
    other texts).
    """
    if format not in FORMATS:
        raise MMCError(f"unknown format '{format}': use one of {', '.join(FORMATS)}")
    path = Path(source)
    check_outputs([(out, "loss store")], [source, data_dir])
    for given, flag in ((n_params, "--n-params"), (n_params_nonembedding, "--n-params-nonembedding")):
        if given is not None:
            check_number(flag, given, 1, integer=True)
    _check_readable(path)
    kind = detect_format(path) if format == "auto" else format
    if kind == "lm-eval":
        table, results = read_lm_eval_samples(path)
        attrs = {"source": "lm-eval", "tool": "lm-eval"}
        attrs.update({key: results[key] for key in ("tool_version", "transformers_version", "max_length", "dtype")
                      if key in results})
        attrs.update({f"lm_eval_{key}": (json.dumps(results[key], sort_keys=True, default=str)
                                         if isinstance(results[key], dict) else results[key])
                      for key in ("task", "model_args", "doc_to_target") if key in results})
        if results.get("output_type") == ROLLING:
            attrs["window"] = "rolling"
        model = model or results.get("model")
        counted = results.get("model_num_parameters")
    else:
        table = read_table(path, model)
        attrs = {"source": "table"}
        model = model or table.attrs.get("model")
        counted = None
    where = f"'{path}'"
    check_nll(table["nll"].to_numpy(), table, where)
    missing = [flag for given, flag in ((n_params, "--n-params"), (n_params_nonembedding, "--n-params-nonembedding"))
               if given is None]
    if missing:
        hint = f" (lm-eval's results count {counted} parameters)" if counted else ""
        raise MMCError(f"the pool needs the model's parameter counts: pass {' and '.join(missing)}{hint}")
    if int(n_params_nonembedding) > int(n_params):
        raise MMCError(f"--n-params-nonembedding {n_params_nonembedding} exceeds --n-params {n_params}")
    if not model:
        raise MMCError(f"{where} does not name its model: pass --model NAME (a hub id or path: where the numbers "
                       f"came from)")
    samples = load_samples(data_dir, split)
    columns = ["sample_id", "text"] + [name for name in ("domain",) if name in samples.column_names]
    eval_frame = samples.select_columns(columns).to_pandas()
    eval_ids = eval_frame["sample_id"].to_numpy(dtype=object)
    eval_texts = eval_frame["text"].to_numpy(dtype=object)
    positions = match_documents(table, eval_ids, eval_texts, where, f"'{data_dir}'")
    order = np.empty(len(positions), dtype=np.int64)
    order[positions] = np.arange(len(positions))  # the table's row of every eval-set document
    n_bytes = sample_bytes(samples)
    if "n_bytes" in table.columns:
        given = table["n_bytes"].to_numpy(dtype=np.float64)[order]
        differ = ~np.isnan(given) & (given != n_bytes)
        if differ.any():
            raise MMCError(f"{where}: {int(differ.sum())} n_bytes values differ from the UTF-8 lengths of the eval "
                           f"set's texts (first: {eval_ids[int(np.argmax(differ))]!r}): it scored other "
                           f"texts")
    nll = table["nll"].to_numpy(dtype=np.float64)[order]
    if "n_tokens" in table.columns:
        counts = table["n_tokens"].to_numpy(dtype=np.float64)[order]
        known = ~np.isnan(counts)
        n_tokens = np.where(known, counts, 0).astype(np.int64)
    else:
        known, n_tokens = np.zeros(len(order), dtype=bool), np.zeros(len(order), dtype=np.int64)
    coords: dict[str, Any] = {"sample": eval_ids}
    domain = _domains(table, order, eval_frame, where)
    if domain is not None:
        coords["domain"] = ("sample", domain)
    attrs.update({
        "source_file": str(source),  # as given: no machine-specific absolute path in the store
        "source_sha256": _sha256(path),
        "model": str(model),
        "family": family,
        "data": data,
        "n_params": int(n_params),
        "n_params_nonembedding": int(n_params_nonembedding),
        "n_tokens_known": "true" if known.all() else "partial" if known.any() else "false",
        "dataset_fingerprint": fingerprint(list(eval_ids), list(eval_texts)),
        "n_samples": len(eval_ids),
        "mmc_version": mmc.__version__,
    })
    dataset = loss_dataset(nll, n_tokens, n_bytes, coords, attrs)
    write_store(dataset, out, "loss store")
    return dataset


def _domains(table: pd.DataFrame, order: np.ndarray, eval_frame: pd.DataFrame, where: str) -> np.ndarray | None:
    """The domain coord: the eval set's (a table's own `domain` column must agree with it), else the table's."""
    given = None
    if "domain" in table.columns:
        values = table["domain"].to_numpy(dtype=object)[order]
        stated = pd.notna(values) & (values != "")
        given = values if stated.any() else None
    if "domain" in eval_frame.columns:
        domain = eval_frame["domain"].to_numpy(dtype=object)
        if given is not None:
            differ = stated & (given != domain)
            if differ.any():
                raise MMCError(f"{where}: {int(differ.sum())} documents have another domain than in the eval set "
                               f"(first: {eval_frame['sample_id'].iloc[int(np.argmax(differ))]!r}, "
                               f"{given[int(np.argmax(differ))]!r} vs {domain[int(np.argmax(differ))]!r})")
        return domain
    if given is not None and not stated.all():
        raise MMCError(f"{where}: {int((~stated).sum())} documents have no domain while others have one, and the "
                       f"eval set has none: give every document's domain or none")
    return given


def _sha256(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


# ---------------------------------------------------------------------------------------------
# Export


def losses_table(dataset: xr.Dataset, name: str, where: str | Path = "") -> pd.DataFrame:
    """A loss store's or a pool's losses as a tidy table, one row per (model, sample): model, sample_id, domain
    (null where the store has none), nll (nats), n_tokens (0: unknown), n_bytes. `name` names the model of a loss
    store (`mmc assemble` names it by its file name without .zarr); `where` names the store in errors."""
    nll = dataset.variables.get("nll")
    if nll is not None and nll.dims == ("sample",) and "window_nll" not in dataset.variables:
        models = np.array([name], dtype=object)
        values = nll.values[None, :]
        tokens = dataset["n_tokens"].values[None, :]
    else:
        nll = check_pool(dataset, where or name)["nll"]
        models = dataset["model"].values.astype(object)
        values = nll.transpose("model", "sample").values
        tokens = dataset["n_tokens"].transpose("model", "sample").values
    samples = dataset["sample"].values.astype(object)
    n_models, n_samples = values.shape
    domain = dataset["domain"].values.astype(object) if "domain" in dataset.variables else \
        np.full(n_samples, None, dtype=object)
    n_bytes = np.asarray(dataset["n_bytes"].values, dtype=np.int64)
    return pd.DataFrame({
        "model": np.repeat(models, n_samples),
        "sample_id": np.tile(samples, n_models),
        "domain": np.tile(domain, n_models),
        "nll": values.astype(np.float64).ravel(),
        "n_tokens": tokens.astype(np.int64).ravel(),
        "n_bytes": np.tile(n_bytes, n_models),
    }, columns=list(EXPORT_COLUMNS))


def export_losses(store_or_pool: str | Path, out: str | Path) -> pd.DataFrame:
    """What `mmc export` does: a loss store or a pool store written as a tidy table (`losses_table`) at `out`,
    parquet or CSV by its suffix, atomically. Returns the table."""
    suffix = Path(str(out)).suffix.lower()
    if suffix not in EXPORT_SUFFIXES:
        raise MMCError(f"'{out}': the table's format comes from its suffix: use .parquet or .csv")
    check_outputs([(out, TABLE_KIND)], [store_or_pool])
    dataset = open_store(store_or_pool)
    table = losses_table(dataset, Path(str(store_or_pool).rstrip("/")).name.removesuffix(".zarr"), store_or_pool)
    with atomic_path(out, TABLE_KIND) as tmp:
        if suffix == ".csv":
            table.to_csv(tmp, index=False, lineterminator="\n")
        else:

            arrow = pa.Table.from_pandas(table, preserve_index=False)
            arrow = arrow.replace_schema_metadata({**(arrow.schema.metadata or {}),
                                                   PARQUET_KIND_KEY: TABLE_KIND.encode()})
            pq.write_table(arrow, tmp)
    return table
