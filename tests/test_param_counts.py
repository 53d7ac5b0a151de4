"""Parameter counts follow the model: an output head tied to the input embedding counts once, whether the weights
share one Parameter (a `tie_word_embeddings` model directory) or a GGUF file stores the head again beside the
embedding (as Qwen2.5-Coder-0.5B-Instruct's file does: `output.weight` in Q8_0 beside `token_embd.weight` in
Q5_0); a distinct head counts beside the embedding. Counts are checked exactly against the config."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

from conftest import TRAIN_TEXTS
from mmc import losses, zoo

VOCAB, HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS = 320, 32, 64, 2, 2, 1


@pytest.fixture(scope="module")
def tokenizer():
    return zoo.train_tokenizer("byte_bpe", TRAIN_TEXTS, vocab_size=VOCAB)


def qwen2(tokenizer, tied: bool, seed: int = 0) -> transformers.Qwen2ForCausalLM:
    config = transformers.Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=64,
        tie_word_embeddings=tied, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    return transformers.Qwen2ForCausalLM(config).eval()


def expected_counts(vocab: int, heads_stored: int) -> tuple[int, int]:
    """(total, non-embedding) of the Qwen2 above, from its config: `heads_stored` vocabulary matrices (1 tied, 2 not)."""
    kv = KV_HEADS * HIDDEN // HEADS
    attention = (HIDDEN * HIDDEN + HIDDEN) + 2 * (HIDDEN * kv + kv) + HIDDEN * HIDDEN  # q, k, v with biases; o
    layer = attention + 3 * HIDDEN * INTERMEDIATE + 2 * HIDDEN  # gate, up, down; two RMSNorms
    nonembedding = LAYERS * layer + HIDDEN  # and the final norm
    return nonembedding + heads_stored * vocab * HIDDEN, nonembedding


def write_gguf(model: transformers.Qwen2ForCausalLM, tokenizer, path, *, head: bool) -> None:
    """The model as llama.cpp's converter writes a Qwen2 GGUF file: byte-level BPE vocabulary and merges, the
    embedding in Q5_0 and, with `head`, `output.weight` in Q8_0 (the head's weights quantised apart, even when they
    are the embedding's), the rest in F32."""
    import gguf
    from gguf.quants import quantize

    writer = gguf.GGUFWriter(path, arch="qwen2")
    config = model.config
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(INTERMEDIATE)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = backend["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t == tokenizer.eos_token else gguf.TokenType.NORMAL
                            for t in tokens])
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in backend["model"]["merges"]])
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_bos_token_id(tokenizer.eos_token_id)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, LAYERS)
    state = model.state_dict()
    if head:
        state["lm_head.weight"] = model.get_output_embeddings().weight  # a tied model's state dict may lack it
    else:
        state.pop("lm_head.weight", None)
    quantized = {"model.embed_tokens.weight": gguf.GGMLQuantizationType.Q5_0,
                 "lm_head.weight": gguf.GGMLQuantizationType.Q8_0}
    for name, tensor in state.items():
        array = tensor.detach().float().numpy()
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if name in quantized:
            kind = quantized[name]
            writer.add_tensor(gguf_name, quantize(array, kind), raw_dtype=kind)
        else:
            writer.add_tensor(gguf_name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def dequantized(path, name: str) -> torch.Tensor:
    import gguf
    from gguf.quants import dequantize

    tensor = next(t for t in gguf.GGUFReader(path).tensors if t.name == name)
    return torch.from_numpy(np.ascontiguousarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32))


def test_shared_embedding_counts_once_in_memory_and_from_a_directory(tokenizer, tmp_path):
    model = qwen2(tokenizer, tied=True)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    expected = expected_counts(len(tokenizer), heads_stored=1)
    assert losses.count_parameters(model) == expected
    assert losses.head_distance(model) == 0.0 and losses.tied_embeddings(model)
    losses.save_model(model, tokenizer, tmp_path / "tied")
    loaded = losses.load_model(str(tmp_path / "tied"), device="cpu", dtype="float32")
    assert loaded.model.get_output_embeddings().weight is loaded.model.get_input_embeddings().weight
    assert losses.count_parameters(loaded.model) == expected


def test_distinct_head_counts_beside_the_embedding(tokenizer, tmp_path):
    model = qwen2(tokenizer, tied=False)
    expected = expected_counts(len(tokenizer), heads_stored=2)
    assert losses.count_parameters(model) == expected
    assert losses.head_distance(model) > 1.0 and not losses.tied_embeddings(model)
    losses.save_model(model, tokenizer, tmp_path / "untied")
    loaded = losses.load_model(str(tmp_path / "untied"), device="cpu", dtype="float32")
    assert losses.count_parameters(loaded.model) == expected


def test_a_bit_identical_copy_of_the_embedding_counts_once(tokenizer):
    model = qwen2(tokenizer, tied=False)
    model.get_output_embeddings().weight.data.copy_(model.get_input_embeddings().weight.data)
    assert losses.count_parameters(model) == expected_counts(len(tokenizer), heads_stored=1)
    assert losses.count_parameters(model, tied=False) == expected_counts(len(tokenizer), heads_stored=2)


gguf = pytest.importorskip("gguf", reason='the real extra is not installed: pip install -e ".[real]"')


def test_gguf_storing_a_tied_head_apart_counts_it_once_and_scores_it_as_stored(tokenizer, tmp_path):
    """The Qwen2.5-Coder-0.5B case: a tied model whose file holds `output.weight` (Q8_0) beside `token_embd.weight`
    (Q5_0); transformers builds an untied head from it."""
    path = tmp_path / "tied-head-stored.gguf"
    write_gguf(qwen2(tokenizer, tied=True), tokenizer, path, head=True)
    loaded = losses.load_model(str(path), device="cpu", dtype="float32")
    embedding, head = loaded.model.get_input_embeddings().weight, loaded.model.get_output_embeddings().weight
    assert head is not embedding and not loaded.model.config.tie_word_embeddings
    assert 0.0 < losses.head_distance(loaded.model) < losses.TIED_HEAD_TOLERANCE  # quantisation noise only
    assert losses.tied_embeddings(loaded.model)
    assert losses.count_parameters(loaded.model) == expected_counts(len(tokenizer), heads_stored=1)
    # scoring uses the weights the file stores: the Q8_0 head, not the Q5_0 embedding
    torch.testing.assert_close(head, dequantized(path, "output.weight"), rtol=0, atol=0)
    torch.testing.assert_close(embedding, dequantized(path, "token_embd.weight"), rtol=0, atol=0)


def test_gguf_without_a_head_ties_it(tokenizer, tmp_path):
    path = tmp_path / "tied.gguf"
    write_gguf(qwen2(tokenizer, tied=True), tokenizer, path, head=False)
    loaded = losses.load_model(str(path), device="cpu", dtype="float32")
    assert loaded.model.get_output_embeddings().weight is loaded.model.get_input_embeddings().weight
    assert losses.count_parameters(loaded.model) == expected_counts(len(tokenizer), heads_stored=1)


def test_gguf_with_a_distinct_head_counts_both(tokenizer, tmp_path):
    path = tmp_path / "untied.gguf"
    write_gguf(qwen2(tokenizer, tied=False), tokenizer, path, head=True)
    loaded = losses.load_model(str(path), device="cpu", dtype="float32")
    assert not losses.tied_embeddings(loaded.model)
    assert losses.count_parameters(loaded.model) == expected_counts(len(tokenizer), heads_stored=2)


def test_loss_store_records_the_tied_count(tokenizer, eval_dir, tmp_path):
    tied, untied = tmp_path / "tied-head-stored.gguf", tmp_path / "untied.gguf"
    write_gguf(qwen2(tokenizer, tied=True), tokenizer, tied, head=True)
    write_gguf(qwen2(tokenizer, tied=False), tokenizer, untied, head=True)
    for path, stored, flag in ((tied, 1, "true"), (untied, 2, "false")):
        store = losses.compute_losses(str(path), eval_dir, device="cpu", dtype="float32", limit=2)
        total, nonembedding = expected_counts(len(tokenizer), heads_stored=stored)
        assert store.attrs["n_params"] == total and store.attrs["n_params_nonembedding"] == nonembedding
        assert store.attrs["tied_embeddings"] == flag
