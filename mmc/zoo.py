"""The embedded model zoo: small causal LMs of several families, each with a tokenizer of its own.

Every tokenizer is lossless (byte-level, or byte fallback), so each family scores exactly the same
text and total NLLs in nats are comparable across tokenizers.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from mmc import MMCError

# Tokenizer kinds: how text becomes tokens, and which special tokens frame it.
TOKENIZER_KINDS = ("byte_bpe", "byte_bpe_bos", "metaspace_bpe")


def train_tokenizer(kind: str, texts, vocab_size: int) -> transformers.PreTrainedTokenizerFast:
    """Train a lossless tokenizer of the given kind on an iterable of texts.

    byte_bpe: GPT-2's byte-level BPE with only an EOS token (so EOS is the prefix token);
    byte_bpe_bos: the same with `<|endoftext|>` as BOS and EOS (as GPT-NeoX/Pythia);
    metaspace_bpe: Llama/SentencePiece-style BPE on `▁`-marked words with byte fallback, BOS `<s>`.
    """
    if kind in ("byte_bpe", "byte_bpe_bos"):
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tokenizer.train_from_iterator(texts, trainer)
        specials = {"eos_token": "<|endoftext|>"}
        if kind == "byte_bpe_bos":
            specials["bos_token"] = "<|endoftext|>"
    elif kind == "metaspace_bpe":
        byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
        tokenizer = Tokenizer(models.BPE(byte_fallback=True))
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
        tokenizer.decoder = decoders.Sequence([decoders.Metaspace(replacement="▁", prepend_scheme="never"),
                                               decoders.ByteFallback(), decoders.Fuse()])
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens],
                                      show_progress=False)
        tokenizer.train_from_iterator(texts, trainer)
        specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    else:
        raise MMCError(f"unknown tokenizer kind '{kind}'; choose one of {', '.join(TOKENIZER_KINDS)}")
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, **specials)


def model_config(family: str, tokenizer, *, d_model: int, n_layers: int, n_heads: int, context: int):
    """A transformers config for one zoo member; the feed-forward width is 4·d_model."""
    common = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id or tokenizer.eos_token_id,
              "eos_token_id": tokenizer.eos_token_id}
    if family == "gpt2":
        return transformers.GPT2Config(n_embd=d_model, n_layer=n_layers, n_head=n_heads, n_positions=context,
                                       n_inner=4 * d_model, **common)
    if family == "llama":
        return transformers.LlamaConfig(hidden_size=d_model, num_hidden_layers=n_layers, num_attention_heads=n_heads,
                                        num_key_value_heads=n_heads, intermediate_size=4 * d_model,
                                        max_position_embeddings=context, tie_word_embeddings=False, **common)
    if family == "gpt_neox":
        return transformers.GPTNeoXConfig(hidden_size=d_model, num_hidden_layers=n_layers,
                                          num_attention_heads=n_heads, intermediate_size=4 * d_model,
                                          max_position_embeddings=context, rotary_pct=0.25,
                                          tie_word_embeddings=False, **common)
    raise MMCError(f"unknown model family '{family}'; choose gpt2, llama or gpt_neox")


def init_model(config, seed: int) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def save_model(model: transformers.PreTrainedModel, tokenizer, path: str | Path) -> None:
    """Save weights (safetensors) and tokenizer as a directory `from_pretrained` loads."""
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
