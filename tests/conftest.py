"""Shared fixtures: tiny models and evaluation sets built locally (nothing comes from a hub)."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub is imported: it reads this once
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import datasets  # noqa: E402
import pytest  # noqa: E402

from mmc import zoo  # noqa: E402

datasets.disable_progress_bars()

CONTEXT = 32

TRAIN_TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "import os\nimport sys\nprint(os.getcwd(), sys.argv)\n",
    "Ünïcödé tëxt: naïve café, 漢字かな, emoji 🙂 and math ∑∫√.",
    "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n",
] * 20

EVAL_TEXTS = [
    "x",  # a single character
    "def mul(a, b):\n    return a * b\n",
    "Ünïcödé: 日本語のテキスト, Ελληνικά, русский, עברית 🙂🙃 — ∑∫√∞.",
    # documents several contexts long, so they span many rolling windows
    "\n".join(f"value_{i} = compute({i}, name='item{i}')  # step {i}" for i in range(40)),
    "The lazy dog sleeps while the quick brown fox jumps. " * 25,
    "class Vector:\n    def norm(self):\n        return (self.x ** 2 + self.y ** 2) ** 0.5\n" * 6,
]


def build_tiny_model(path: Path, family: str, tokenizer_kind: str, seed: int = 0, d_model: int = 32) -> Path:
    tokenizer = zoo.train_tokenizer(tokenizer_kind, TRAIN_TEXTS, vocab_size=320)
    config = zoo.model_config(family, tokenizer, d_model=d_model, n_layers=2, n_heads=2, context=CONTEXT)
    zoo.save_model(zoo.init_model(config, seed), tokenizer, path)
    return path


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory) -> Path:
    """GPT-2 style: byte-level BPE with no BOS, so EOS is the prefix token."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "gpt2", "gpt2", "byte_bpe")


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    """Llama style: metaspace BPE with byte fallback and a BOS token."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "llama", "llama", "metaspace_bpe", seed=1)


def save_eval_set(path: Path, texts: list[str], domains: list[str] | None = None) -> Path:
    columns = {"sample_id": [f"s{i:03d}" for i in range(len(texts))], "text": texts}
    if domains is not None:
        columns["domain"] = domains
    features = datasets.Features({name: datasets.Value("string") for name in columns})
    datasets.Dataset.from_dict(columns, features=features).save_to_disk(str(path))
    return path


@pytest.fixture(scope="session")
def eval_dir(tmp_path_factory) -> Path:
    domains = ["code" if "def" in t or "=" in t else "prose" for t in EVAL_TEXTS]
    return save_eval_set(tmp_path_factory.mktemp("data") / "eval", EVAL_TEXTS, domains)
