"""The loss engine against plain references: one document at a time, and lm-eval-harness."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
import torch
import transformers

from conftest import CONTEXT, EVAL_TEXTS
from mmc import losses
from mmc.store import open_store, write_store


def reference_nll(model_dir, text: str, max_length: int, stride: int | None = None) -> float:
    """Plain, unbatched computation of the loss contract for one document."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    sequence = [prefix] + tokenizer.encode(text, add_special_tokens=False)
    n_tokens = len(sequence) - 1
    stride = stride or max_length
    total, block_start = 0.0, 0
    while block_start < n_tokens:
        block_end = min(block_start + (max_length if block_start == 0 else stride), n_tokens)
        window = sequence[max(0, block_end - max_length) : block_end + 1]
        with torch.no_grad():
            logits = model(torch.tensor([window[:-1]])).logits[0].double()
        logprobs = torch.log_softmax(logits, dim=-1)
        for position in range(len(window) - 1 - (block_end - block_start), len(window) - 1):
            total -= float(logprobs[position, window[position + 1]])
        block_start = block_end
    return total


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model_dir(request):
    return request.getfixturevalue(f"{request.param}_dir")


def test_prefix_is_bos_else_eos(gpt2_dir, llama_dir):
    gpt2 = transformers.AutoTokenizer.from_pretrained(gpt2_dir)
    llama = transformers.AutoTokenizer.from_pretrained(llama_dir)
    assert gpt2.bos_token_id is None and losses.prefix_token(gpt2) == gpt2.eos_token_id
    assert llama.bos_token_id is not None and losses.prefix_token(llama) == llama.bos_token_id != llama.eos_token_id


@pytest.mark.parametrize("stride", [None, 8])
def test_engine_matches_one_document_reference(model_dir, eval_dir, stride):
    store = losses.compute_losses(str(model_dir), eval_dir, device="cpu", dtype="float32", batch_tokens=96, stride=stride)
    expected = [reference_nll(model_dir, text, CONTEXT, stride) for text in EVAL_TEXTS]
    np.testing.assert_allclose(store.nll.values, expected, rtol=1e-5)
    # documents longer than the context really were split into several windows
    assert store.n_tokens.values.max() > 4 * CONTEXT


def test_multibyte_text_counts_bytes_not_characters(gpt2_dir, eval_dir):
    store = losses.compute_losses(str(gpt2_dir), eval_dir, device="cpu", dtype="float32")
    unicode_text = EVAL_TEXTS[2]
    assert int(store.n_bytes.values[2]) == len(unicode_text.encode("utf-8")) > len(unicode_text)


def test_results_do_not_depend_on_batch_budget(model_dir, eval_dir):
    small = losses.compute_losses(str(model_dir), eval_dir, device="cpu", dtype="float32", batch_tokens=64)
    large = losses.compute_losses(str(model_dir), eval_dir, device="cpu", dtype="float32", batch_tokens=512)
    np.testing.assert_allclose(small.nll.values, large.nll.values, rtol=1e-6)
    np.testing.assert_array_equal(small.n_tokens.values, large.n_tokens.values)


def test_chunked_head_equals_plain_logits(model_dir):
    loaded = losses.load_model(str(model_dir), device="cpu", dtype="float32")
    assert loaded.split_head
    token_lists = loaded.tokenizer(EVAL_TEXTS, add_special_tokens=False)["input_ids"]
    windows = losses.make_windows(token_lists, losses.prefix_token(loaded.tokenizer), CONTEXT)
    batch = np.arange(windows.doc.size)
    original = losses.HEAD_CHUNK_ELEMENTS
    try:
        losses.HEAD_CHUNK_ELEMENTS = 7 * loaded.model.get_output_embeddings().out_features  # 7-row chunks
        chunked = losses.window_nll(loaded, windows, batch, split_head=True)
    finally:
        losses.HEAD_CHUNK_ELEMENTS = original
    plain = losses.window_nll(loaded, windows, batch, split_head=False)
    np.testing.assert_allclose(chunked, plain, rtol=1e-6)


def test_rolling_windows_predict_every_token_once():
    token_lists = [list(range(1, 11)), [], [5]]
    windows = losses.make_windows(token_lists, prefix=0, max_length=4)
    # flat: [0,1..10] [0] [0,5]; document 0 has blocks (0,4] (4,8] (8,10]
    np.testing.assert_array_equal(windows.doc, [0, 0, 0, 2])
    np.testing.assert_array_equal(windows.start, [0, 4, 6, 12])
    np.testing.assert_array_equal(windows.length, [4, 4, 4, 1])
    np.testing.assert_array_equal(windows.n_pred, [4, 4, 2, 1])
    overlapping = losses.make_windows(token_lists, prefix=0, max_length=4, stride=3)
    np.testing.assert_array_equal(overlapping.n_pred, [4, 3, 3, 1])
    np.testing.assert_array_equal(overlapping.start, [0, 3, 6, 12])


def test_batches_respect_token_budget():
    windows = losses.make_windows([[1] * 50, [1] * 7, [1] * 3, [1] * 20], prefix=0, max_length=16)
    groups = losses.batches(windows, batch_tokens=40)
    assert sorted(np.concatenate(groups).tolist()) == list(range(windows.doc.size))
    for group in groups:
        assert len(group) == 1 or len(group) * windows.length[group].max() <= 40


def padding_share(windows: losses.Windows, groups: list[np.ndarray]) -> float:
    computed = sum(len(group) * int(windows.length[group].max()) for group in groups)
    return 1 - int(windows.length.sum()) / computed


def test_skewed_lengths_are_batched_apart():
    # one document of 1,090 tokens (5 windows of 256 input tokens) and 17 of 45: in one batch, padded to 256,
    # 3,587 of its 5,632 positions (64%) would be padding
    windows = losses.make_windows([[1] * 1090] + [[1] * 45] * 17, prefix=0, max_length=256)
    groups = losses.batches(windows, batch_tokens=16384)
    assert [group.tolist() for group in groups] == [list(range(5)), list(range(5, 22))]
    assert padding_share(windows, groups) == 0


def test_padding_is_at_most_a_tenth_of_every_batch():
    rng = np.random.default_rng(0)
    token_lists = [[1] * n for n in np.concatenate([rng.integers(1, 60, 300), rng.integers(200, 3000, 20)])]
    windows = losses.make_windows(token_lists, prefix=0, max_length=512)
    groups = losses.batches(windows, batch_tokens=4096)
    order = np.concatenate(groups)
    assert sorted(order.tolist()) == list(range(windows.doc.size))
    assert (np.diff(windows.length[order]) <= 0).all()

    def within_limits(group: np.ndarray) -> bool:
        width = int(windows.length[group].max())
        padding = len(group) * width - int(windows.length[group].sum())
        return len(group) * width <= 4096 and padding <= losses.MAX_PADDING * len(group) * width

    assert all(within_limits(group) for group in groups)
    # each batch stops only where taking the next window would break a limit
    assert not any(within_limits(np.append(group, following[0])) for group, following in pairwise(groups))
    assert padding_share(windows, groups) <= losses.MAX_PADDING


def test_store_round_trip_and_attrs(gpt2_dir, eval_dir, tmp_path):
    store = losses.compute_losses(str(gpt2_dir), eval_dir, device="cpu", dtype="float32", family="gpt2")
    write_store(store, tmp_path / "gpt2.zarr", "loss store")
    reopened = open_store(tmp_path / "gpt2.zarr")
    np.testing.assert_array_equal(reopened.nll.values, store.nll.values)
    assert reopened.nll.dtype == np.float64
    assert list(reopened.sample.values) == [f"s{i:03d}" for i in range(len(EVAL_TEXTS))]
    assert list(reopened.domain.values) == list(store.domain.values)
    for key in ("model", "revision", "family", "n_params", "n_params_nonembedding", "tokenizer", "max_length",
                "window", "prefix_token", "dtype", "dataset_fingerprint", "mmc_version"):
        assert key in reopened.attrs
    assert reopened.attrs["n_params"] > reopened.attrs["n_params_nonembedding"] > 0
    assert reopened.attrs["max_length"] == CONTEXT and reopened.attrs["window"] == "rolling"


def test_head_dtype_auto_is_fp32_on_gpu_and_the_weights_dtype_elsewhere():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert losses.resolve_head_dtype("auto", torch.bfloat16, cuda) == torch.float32
    assert losses.resolve_head_dtype("auto", torch.bfloat16, cpu) == torch.bfloat16
    assert losses.resolve_head_dtype("float32", torch.bfloat16, cpu) == torch.float32


def test_fp32_head_on_bf16_weights(gpt2_dir, eval_dir):
    store = losses.compute_losses(str(gpt2_dir), eval_dir, device="cpu", dtype="bfloat16", head_dtype="float32")
    assert store.attrs["dtype"] == "bfloat16" and store.attrs["head_dtype"] == "float32"
    assert store.attrs["head"] == "chunked" and "gguf_sha256" not in store.attrs
    loaded = losses.load_model(str(gpt2_dir), device="cpu", dtype="bfloat16")  # auto on the CPU: a bf16 head
    assert loaded.head_dtype == torch.bfloat16
    nll, _ = losses.score_texts(loaded, EVAL_TEXTS)
    assert not np.array_equal(nll, store.nll.values)  # the fp32 head is the one that scored
    fp32, _ = losses.score_texts(losses.load_model(str(gpt2_dir), device="cpu", dtype="float32"), EVAL_TEXTS)
    np.testing.assert_allclose(store.nll.values, fp32, rtol=1e-4)
