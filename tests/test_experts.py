"""Domain experts: a base fine-tuned on one domain keeps its architecture and tokenizer and gets better there."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import TRAIN_TEXTS, save_eval_set
from mmc import train
from mmc.cli import main
from mmc.losses import load_model, score_texts

CODE = [text for text in TRAIN_TEXTS if "def " in text or "import" in text]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("experts")
    domains = ["code" if text in CODE else "prose" for text in TRAIN_TEXTS]
    split = save_eval_set(root / "train", TRAIN_TEXTS, domains)
    base = root / "base"
    assert main(["zoo", "train", "--corpus", str(split), "--family", "gpt2", "--tokenizer", "byte_bpe",
                 "--vocab-size", "300", "--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--context", "32",
                 "--train-tokens", "4096", "--batch-size", "8", "--lr", "0.01", "--device", "cpu",
                 "--out", str(base)]) == 0
    return root, split, base


def train_expert(setup, name: str, domain: str = "code", seed: int = 0, *options: str) -> int:
    root, split, base = setup
    return main(["experts", "train", "--base", str(base), "--corpus", str(split), "--domain", domain,
                 "--train-tokens", "4096", "--batch-size", "8", "--lr", "0.003", "--warmup-steps", "2",
                 "--seed", str(seed), "--device", "cpu", "--out", str(root / name), "--stage", f"experts@{name}",
                 *options])


def test_expert_specialises_and_stays_mergeable(setup):
    root, _, base = setup
    assert train_expert(setup, "code") == 0
    base_weights, expert_weights = load_file(base / "model.safetensors"), load_file(root / "code" / "model.safetensors")
    assert base_weights.keys() == expert_weights.keys()
    assert all(base_weights[k].shape == expert_weights[k].shape for k in base_weights)
    assert not all(torch.equal(base_weights[k], expert_weights[k]) for k in base_weights)
    assert (root / "code" / "tokenizer.json").read_text() == (base / "tokenizer.json").read_text()
    summary = json.loads((root / "code" / "mmc_expert.json").read_text())
    assert summary["domain"] == "code" and summary["context"] == 32

    base_nll, _ = score_texts(load_model(str(base), device="cpu", dtype="float32"), CODE[:5], progress=False)
    expert_nll, _ = score_texts(load_model(str(root / "code"), device="cpu", dtype="float32"), CODE[:5], progress=False)
    assert expert_nll.sum() < base_nll.sum()


def test_expert_training_is_deterministic(setup):
    root, _, _ = setup
    assert train_expert(setup, "a", seed=5) == 0 and train_expert(setup, "b", seed=5) == 0
    first, second = load_file(root / "a" / "model.safetensors"), load_file(root / "b" / "model.safetensors")
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_unknown_domain_ends_in_one_line(setup, capsys):
    assert train_expert(setup, "bad", domain="poetry") == 2
    assert capsys.readouterr().err.strip() == (
        "mmc experts@bad: error: --domains names poetry, which the training split lacks (it has: code, prose)")
    assert not (setup[0] / "bad").exists()


def test_domain_texts_selects_exactly_the_domains(setup):
    _, split, _ = setup
    from mmc.corpus import load_samples

    samples = load_samples(split, split="train")
    assert train.domain_texts(samples, ["code"]) == CODE
    assert train.domain_texts(samples, None) == TRAIN_TEXTS
    assert np.all(np.isin(train.domain_texts(samples, ["prose"]), [t for t in TRAIN_TEXTS if t not in CODE]))


def test_lora_expert_is_a_plain_mergeable_model_that_specialises(setup):
    """--lora-rank trains low-rank adapters only and merges them in: the saved expert has the base's tensors,
    every change to a linear weight has rank at most r, and it is better on its domain."""
    root, _, base = setup
    assert train_expert(setup, "lora", "code", 0, "--lr", "0.01", "--lora-rank", "2") == 0
    base_weights, expert_weights = load_file(base / "model.safetensors"), load_file(root / "lora" / "model.safetensors")
    assert base_weights.keys() == expert_weights.keys()
    changed = [k for k in base_weights if not torch.equal(base_weights[k], expert_weights[k])]
    assert changed and all(base_weights[k].ndim == 2 for k in changed)  # embeddings, norms and biases stay the base's
    for name in changed:
        assert torch.linalg.matrix_rank(expert_weights[name] - base_weights[name], atol=1e-6) <= 2, name
    assert json.loads((root / "lora" / "mmc_expert.json").read_text())["lora_rank"] == 2
    base_nll, _ = score_texts(load_model(str(base), device="cpu", dtype="float32"), CODE[:5], progress=False)
    expert_nll, _ = score_texts(load_model(str(root / "lora"), device="cpu", dtype="float32"), CODE[:5], progress=False)
    assert expert_nll.sum() < base_nll.sum()
