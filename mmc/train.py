"""The one training loop of the project: zoo members from scratch (`mmc.zoo`) and domain experts from a base.

`fit_model` trains any causal LM on random windows of a token stream; `train_expert` fine-tunes a base on one
domain (fully, or with LoRA adapters merged back) and saves it beside the base's tokenizer.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import transformers
from tqdm.auto import tqdm

import mmc
from mmc import MMCError
from mmc.corpus import load_samples
from mmc.losses import context_length, load_model, prefix_token, prefixed_tokens, save_model
from mmc.store import atomic_path, check_outputs


def token_stream(tokenizer, texts: list[str]) -> np.ndarray:
    """All texts as one token array, each preceded by the prefix token (as they are scored)."""
    token_lists = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    return prefixed_tokens(token_lists, prefix_token(tokenizer))[0]


def learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up to `peak`, then cosine decay to a tenth of it."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


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


def write_log(log: list[dict], path: str | Path) -> None:
    """A training log as a CSV (step, tokens, loss, lr) for `dvc plots`, written atomically."""
    with atomic_path(path, "training log") as tmp:
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
    check_outputs([(out, "expert"), *([(log_csv, "training log")] if log_csv else [])], [base, corpus_train])
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
    with atomic_path(out, "expert") as tmp:
        save_model(model, loaded.tokenizer, tmp)
        (tmp / "mmc_expert.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if log_csv is not None:
        write_log(log, log_csv)
    return summary
