"""Benchmark of the loss engine against the bare model: how much of the forward pass's speed scoring keeps.

A ~5M-parameter GPT-2-style model scores documents of mixed lengths (many span several windows). The two
benchmarks run the same length-sorted token-budget batches; `score_texts` adds tokenising, windowing, the
chunked fp32 head and cross-entropy, and accumulation. Target: scoring at >= 0.85 of the bare forward's speed.
    python -m pytest tests/test_bench_losses.py --benchmark-enable -s
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TRAIN_TEXTS
from mmc import zoo
from mmc.losses import save_model, batches, load_model, make_windows, prefix_token, score_texts

CONTEXT = 256
BATCH_TOKENS = 8192


@pytest.fixture(scope="module")
def bench_setup(tmp_path_factory):
    tokenizer = zoo.train_tokenizer("byte_bpe", TRAIN_TEXTS, vocab_size=1024)
    config = zoo.model_config("gpt2", tokenizer, d_model=256, n_layers=6, n_heads=4, context=CONTEXT)
    path = tmp_path_factory.mktemp("bench") / "gpt2-5m"
    save_model(zoo.init_model(config, seed=0), tokenizer, path)
    loaded = load_model(str(path), device="cpu", dtype="float32")
    rng = np.random.default_rng(0)
    texts = ["".join(rng.choice(TRAIN_TEXTS, size=n)) for n in rng.integers(1, 12, size=48)]
    token_lists = loaded.tokenizer(texts, add_special_tokens=False)["input_ids"]
    windows = make_windows(token_lists, prefix_token(loaded.tokenizer), CONTEXT)
    return loaded, texts, windows


def test_bench_score_texts(benchmark, bench_setup):
    loaded, texts, windows = bench_setup
    nll, n_tokens = benchmark(score_texts, loaded, texts, batch_tokens=BATCH_TOKENS, progress=False)
    assert n_tokens.sum() == windows.n_pred.sum() and np.isfinite(nll).all()
    benchmark.extra_info["tokens_per_s"] = int(windows.n_pred.sum()) / benchmark.stats["mean"] \
        if benchmark.stats else None


def test_bench_bare_forward(benchmark, bench_setup):
    loaded, _, windows = bench_setup

    @torch.inference_mode()
    def forward_all() -> int:
        for batch in batches(windows, BATCH_TOKENS):
            width = int(windows.length[batch].max())
            gather = np.minimum(windows.start[batch, None] + np.arange(width), windows.flat.size - 1)
            loaded.model(input_ids=torch.from_numpy(windows.flat[gather]), use_cache=False)
        return len(batch)

    assert benchmark(forward_all) > 0
    benchmark.extra_info["tokens_per_s"] = int(windows.n_pred.sum()) / benchmark.stats["mean"] \
        if benchmark.stats else None
