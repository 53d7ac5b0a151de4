"""The embedded model zoo: small causal LMs of several families, each with a tokenizer of its own.

Every tokenizer is lossless (byte-level, or byte fallback), so each family scores exactly the same
text and total NLLs in nats are comparable across tokenizers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm

import mmc
from mmc import MMCError
from mmc.store import atomic_path

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
    raise MMCError(f"unknown model family '{family}'; choose gpt2, llama or gpt_neox")


def init_model(config, seed: int) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def save_model(model: transformers.PreTrainedModel, tokenizer, path: str | Path) -> None:
    """Save weights (safetensors) and tokenizer as a directory `from_pretrained` loads."""
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def token_stream(tokenizer, texts: list[str]) -> np.ndarray:
    """All texts as one token array, each preceded by the prefix token (as they are scored)."""
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    token_lists = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    lengths = np.fromiter((len(t) + 1 for t in token_lists), dtype=np.int64, count=len(token_lists))
    stream = np.empty(int(lengths.sum()), dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    is_prefix = np.zeros(stream.size, dtype=bool)
    is_prefix[starts] = True
    stream[is_prefix] = prefix
    stream[~is_prefix] = np.fromiter((t for tokens in token_lists for t in tokens), dtype=np.int64,
                                     count=int(lengths.sum()) - len(token_lists))
    return stream


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


def learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up to `peak`, then cosine decay to a tenth of it."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


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


def fit_model(
    model: transformers.PreTrainedModel,
    stream: np.ndarray,
    *,
    context: int,
    train_tokens: int,
    batch_size: int,
    lr: float,
    warmup_steps: int,
    weight_decay: float,
    seed: int,
    device: str = "auto",
    log_every: int = 10,
    progress: bool | None = None,
    description: str = "train",
) -> list[dict]:
    """Train `model` in place on random windows of a token stream; returns the training log.

    The one training loop of the project (zoo members from scratch, experts from a base): AdamW (no decay on
    biases and norms), linear warm-up then cosine decay to a tenth of `lr`, gradient clipping at 1, batches of
    `batch_size` windows of `context + 1` tokens drawn from a generator seeded with `seed`, so a run is
    reproducible on the same machine. The model ends in eval mode on the CPU.
    """
    torch_device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                ("cpu" if device == "auto" else device))
    if train_tokens < batch_size * context:
        raise MMCError(f"--train-tokens {train_tokens} is less than one batch ({batch_size} x {context} tokens)")
    if stream.size < 2 * (context + 1):
        raise MMCError(f"the training text has only {stream.size} tokens; it needs more than one context")
    stream = torch.from_numpy(stream)
    torch.manual_seed(seed)  # dropout and other stochastic layers of a base draw from the global generator
    model.to(torch_device).train()
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))
    steps = max(1, train_tokens // (batch_size * context))
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.arange(context + 1)
    log: list[dict] = []
    bar = tqdm(range(steps), desc=description, unit="step", disable=None if progress is None else not progress)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, lr, warmup_steps)
        starts = torch.randint(0, stream.numel() - context - 1, (batch_size,), generator=generator)
        window = stream[starts[:, None] + offsets].to(torch_device)
        logits = model(input_ids=window[:, :-1], use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), window[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % log_every == 0 or step == steps - 1:
            log.append({"step": step, "tokens": (step + 1) * batch_size * context,
                        "loss": loss.item(), "lr": optimizer.param_groups[0]["lr"]})
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval().cpu()
    return log


def domain_texts(samples, domains: list[str] | None) -> list[str]:
    """The texts of `samples` (a dataset with `text` and `domain` columns) in `domains`; all of them for None."""
    if not domains:
        return list(samples["text"])
    if "domain" not in samples.column_names:
        raise MMCError("--domains needs a training split with a 'domain' column")
    frame = samples.select_columns(["domain", "text"]).to_pandas()
    unknown = sorted(set(domains) - set(frame.domain))
    if unknown:
        raise MMCError(f"--domains names {', '.join(unknown)}, which the training split lacks "
                       f"(it has: {', '.join(sorted(set(frame.domain)))})")
    return frame.text[frame.domain.isin(domains)].tolist()


def train_zoo_member(corpus_train: str | Path, out: str | Path, log_csv: str | Path | None = None,
                     domains: list[str] | None = None, **hyperparameters) -> dict:
    """What `mmc zoo train` does: train one member on a corpus's train split and save it, atomically.

    `domains` restricts training (tokenizer and model) to those domains of the split: members of different
    families can be given different data mixes, as real model families are.

    `out` becomes a Hugging Face model directory (config, safetensors weights, tokenizer) plus `mmc_zoo.json`
    (the hyperparameters, parameter counts and final training loss); `log_csv` gets the training curve
    (step, tokens, loss, lr) for `dvc plots`. Returns the content of `mmc_zoo.json`.
    """
    from mmc.corpus import load_samples
    from mmc.losses import count_parameters

    texts = domain_texts(load_samples(corpus_train, split="train"), domains)
    model, tokenizer, log = train_member(texts, **hyperparameters)
    n_params, n_params_nonembedding = count_parameters(model)
    summary = {"hyperparameters": hyperparameters, "domains": domains, "n_params": n_params,
               "n_params_nonembedding": n_params_nonembedding, "vocab_size": len(tokenizer),
               "final_train_loss": log[-1]["loss"], "train_tokens_seen": log[-1]["tokens"],
               "mmc_version": mmc.__version__}
    with atomic_path(out) as tmp:
        save_model(model, tokenizer, tmp)
        (tmp / "mmc_zoo.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if log_csv is not None:
        write_log(log, log_csv)
    return summary


def write_log(log: list[dict], path: str | Path) -> None:
    """A training log as a CSV (step, tokens, loss, lr) for `dvc plots`, written atomically."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        pd.DataFrame(log).to_csv(tmp, index=False)


def with_lora(model: transformers.PreTrainedModel, rank: int, seed: int):
    """`model` wrapped with LoRA adapters of `rank` on every linear layer but the output head (peft)."""
    try:
        import peft
    except ImportError as error:
        raise MMCError("--lora-rank needs peft: pip install 'mmc[lora]'") from error
    if rank < 1:
        raise MMCError(f"--lora-rank must be at least 1 (got {rank})")
    torch.manual_seed(seed)  # LoRA's A matrices are drawn from the global generator
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear",
                             task_type="CAUSAL_LM")
    return peft.get_peft_model(model, config)


def train_expert(base: str, corpus_train: str | Path, domain: str, out: str | Path,
                 log_csv: str | Path | None = None, *, revision: str | None = None, context: int | None = None,
                 train_tokens: int, batch_size: int, lr: float, warmup_steps: int, seed: int,
                 device: str = "auto", lora_rank: int | None = None) -> dict:
    """What `mmc experts train` does: fine-tune `base` on one domain of a train split; save atomically.

    Full fine-tuning by default; with `lora_rank`, LoRA adapters on every linear layer (for big bases), merged
    into the weights before saving. Either way the expert keeps the base's architecture and tokenizer, so
    experts of one base can be merged in weight space. `context` defaults to the base's. `out` gets the model
    directory plus `mmc_expert.json`.
    """
    from mmc.corpus import load_samples
    from mmc.losses import context_length, load_model

    loaded = load_model(base, revision=revision, device="cpu", dtype="float32")
    texts = domain_texts(load_samples(corpus_train, split="train"), [domain])
    context = context or context_length(loaded)
    model = loaded.model if lora_rank is None else with_lora(loaded.model, lora_rank, seed)
    log = fit_model(model, token_stream(loaded.tokenizer, texts), context=context, train_tokens=train_tokens,
                    batch_size=batch_size, lr=lr, warmup_steps=warmup_steps, weight_decay=0.0, seed=seed,
                    device=device, description=f"expert {domain}")
    if lora_rank is not None:
        model = model.merge_and_unload()
    summary = {"base": base, "revision": revision, "domain": domain, "context": context,
               "train_tokens": train_tokens, "batch_size": batch_size, "lr": lr, "warmup_steps": warmup_steps,
               "seed": seed, "lora_rank": lora_rank, "final_train_loss": log[-1]["loss"], "mmc_version": mmc.__version__}
    with atomic_path(out) as tmp:
        save_model(model, loaded.tokenizer, tmp)
        (tmp / "mmc_expert.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if log_csv is not None:
        write_log(log, log_csv)
    return summary
