"""The embedded model zoo: small causal LMs of several families, each with a tokenizer of its own.

Every tokenizer is lossless (byte-level, or byte fallback), so each family scores exactly the same
text and total NLLs in nats are comparable across tokenizers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import mmc
from mmc import FAMILIES, TOKENIZER_KINDS, MMCError
from mmc.corpus import load_samples
from mmc.losses import count_parameters, save_model
from mmc.store import atomic_path, check_outputs
from mmc.train import domain_texts, fit_model, token_stream, write_log

# Tokenizer kinds (TOKENIZER_KINDS): how text becomes tokens, and which special tokens frame it.


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
    """A transformers config for one zoo member; the feed-forward width is 4·d_model, no dropout (as for
    the other families: runs far shorter than an epoch do not need it)."""
    common = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id or tokenizer.eos_token_id,
              "eos_token_id": tokenizer.eos_token_id}
    if family == "gpt2":
        return transformers.GPT2Config(n_embd=d_model, n_layer=n_layers, n_head=n_heads, n_positions=context,
                                       n_inner=4 * d_model, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                       **common)
    if family == "llama":
        return transformers.LlamaConfig(hidden_size=d_model, num_hidden_layers=n_layers, num_attention_heads=n_heads,
                                        num_key_value_heads=n_heads, intermediate_size=4 * d_model,
                                        max_position_embeddings=context, tie_word_embeddings=False, **common)
    if family == "gpt_neox":
        return transformers.GPTNeoXConfig(hidden_size=d_model, num_hidden_layers=n_layers,
                                          num_attention_heads=n_heads, intermediate_size=4 * d_model,
                                          max_position_embeddings=context, rotary_pct=0.25,
                                          tie_word_embeddings=False, **common)
    raise MMCError(f"unknown model family '{family}'; choose one of {', '.join(FAMILIES)}")


def init_model(config, seed: int) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def unigram_nll(tokenizer, train_texts: list[str], eval_texts: list[str]) -> np.ndarray:
    """Per-text NLL (nats) of `eval_texts` under the tokenizer's unigram distribution on `train_texts`.

    The baseline a language model must beat: token frequencies of the training split, add-one smoothed over
    the vocabulary, scored on the same tokens (text without special tokens) the loss engine scores.
    """
    counts = np.bincount(np.concatenate(tokenizer(train_texts, add_special_tokens=False, verbose=False)["input_ids"]),
                         minlength=len(tokenizer)).astype(np.float64) + 1.0
    log_prob = np.log(counts / counts.sum())
    token_lists = tokenizer(eval_texts, add_special_tokens=False, verbose=False)["input_ids"]
    lengths = np.fromiter(map(len, token_lists), dtype=np.int64, count=len(token_lists))
    token_nll = -log_prob[np.concatenate(token_lists).astype(np.int64)]
    return np.bincount(np.repeat(np.arange(len(token_lists)), lengths), weights=token_nll, minlength=len(token_lists))


def train_member(
    train_texts: list[str],
    *,
    family: str,
    tokenizer_kind: str,
    vocab_size: int,
    d_model: int,
    n_layers: int,
    n_heads: int,
    context: int,
    train_tokens: int,
    batch_size: int,
    lr: float,
    warmup_steps: int,
    seed: int,
    device: str = "auto",
    log_every: int = 10,
    progress: bool | None = None,
) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerFast, list[dict]]:
    """Train one zoo member from scratch on a token budget: its own tokenizer, then the model (`fit_model`)."""
    if d_model % n_heads:
        raise MMCError(f"--n-heads {n_heads} must divide --d-model {d_model}")
    tokenizer = train_tokenizer(tokenizer_kind, train_texts, vocab_size)
    config = model_config(family, tokenizer, d_model=d_model, n_layers=n_layers, n_heads=n_heads, context=context)
    model = init_model(config, seed)
    log = fit_model(model, token_stream(tokenizer, train_texts), context=context, train_tokens=train_tokens,
                    batch_size=batch_size, lr=lr, warmup_steps=warmup_steps, weight_decay=0.1, seed=seed,
                    device=device, log_every=log_every, progress=progress,
                    description=f"train {family} d={d_model} L={n_layers}")
    return model, tokenizer, log


def train_zoo_member(corpus_train: str | Path, out: str | Path, log_csv: str | Path | None = None,
                     domains: list[str] | None = None, **hyperparameters) -> dict:
    """What `mmc zoo train` does: train one member on a corpus's train split and save it, atomically.

    `domains` restricts training (tokenizer and model) to those domains of the split: members of different
    families can be given different data mixes, as real model families are.

    `out` becomes a Hugging Face model directory (config, safetensors weights, tokenizer) plus `mmc_zoo.json`
    (the hyperparameters, parameter counts and final training loss); `log_csv` gets the training curve
    (step, tokens, loss, lr) for `dvc plots`. Returns the content of `mmc_zoo.json`.
    """
    check_outputs([(out, "zoo model"), *([(log_csv, "training log")] if log_csv else [])], [corpus_train])
    texts = domain_texts(load_samples(corpus_train, split="train"), domains)
    model, tokenizer, log = train_member(texts, **hyperparameters)
    n_params, n_params_nonembedding = count_parameters(model)
    summary = {"hyperparameters": hyperparameters, "domains": domains, "n_params": n_params,
               "n_params_nonembedding": n_params_nonembedding, "vocab_size": len(tokenizer),
               "final_train_loss": log[-1]["loss"], "train_tokens_seen": log[-1]["tokens"],
               "mmc_version": mmc.__version__}
    with atomic_path(out, "zoo model") as tmp:
        save_model(model, tokenizer, tmp)
        (tmp / "mmc_zoo.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if log_csv is not None:
        write_log(log, log_csv)
    return summary


