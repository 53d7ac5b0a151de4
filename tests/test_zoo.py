"""The embedded model zoo: every family trains, saves, reloads through the Auto classes, and is scored."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file

from conftest import EVAL_TEXTS, TRAIN_TEXTS, save_eval_set
from mmc import MMCError, train, zoo
from mmc.cli import main
from mmc.losses import compute_losses

FAMILIES = {"gpt2": "byte_bpe", "llama": "metaspace_bpe", "gpt_neox": "byte_bpe_bos"}
SMALL = ["--vocab-size", "300", "--d-model", "16", "--n-layers", "1", "--n-heads", "2", "--context", "32",
         "--train-tokens", "2048", "--batch-size", "4", "--lr", "0.01", "--warmup-steps", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def train_split(tmp_path_factory):
    return save_eval_set(tmp_path_factory.mktemp("corpus") / "train", TRAIN_TEXTS)


def train_cli(train_split, out, family, *extra):
    argv = ["zoo", "train", "--corpus", str(train_split), "--family", family, "--tokenizer", FAMILIES[family],
            *SMALL, "--out", str(out), *extra]
    assert main(argv) == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_member_reloads_through_auto_classes_and_is_scored(tmp_path, train_split, eval_dir, family):
    out = tmp_path / family
    train_cli(train_split, out, family, "--log", str(tmp_path / "log.csv"))
    assert (out / "model.safetensors").exists() and not list(out.glob("*.bin"))
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert model.config.model_type == family
    text = EVAL_TEXTS[2]  # multi-byte Unicode: every tokenizer kind must give it back exactly
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text

    summary = json.loads((out / "mmc_zoo.json").read_text())
    assert summary["n_params"] == sum(p.numel() for p in model.parameters())  # tied weights counted once
    log = (tmp_path / "log.csv").read_text().splitlines()
    assert log[0] == "step,tokens,loss,lr" and len(log) > 2

    losses = compute_losses(str(out), eval_dir, family=family, device="cpu", dtype="float32")
    assert losses.attrs["n_params"] == summary["n_params"]
    assert np.all(np.isfinite(losses.nll.values)) and np.all(losses.nll.values > 0)


def test_training_is_deterministic_for_a_seed(tmp_path, train_split):
    for name in ("a", "b"):
        train_cli(train_split, tmp_path / name, "llama", "--seed", "3")
    train_cli(train_split, tmp_path / "c", "llama", "--seed", "4")
    weights = {name: load_file(tmp_path / name / "model.safetensors") for name in "abc"}
    assert all(torch.equal(weights["a"][key], weights["b"][key]) for key in weights["a"])
    assert not all(torch.equal(weights["a"][key], weights["c"][key]) for key in weights["a"])


def test_training_lowers_the_loss(train_split):
    _, _, log = zoo.train_member(TRAIN_TEXTS, family="gpt2", tokenizer_kind="byte_bpe", vocab_size=300, d_model=32,
                                 n_layers=1, n_heads=2, context=32, train_tokens=20_000, batch_size=8, lr=0.01,
                                 warmup_steps=5, seed=0, device="cpu", progress=False)
    assert log[-1]["loss"] < 0.5 * log[0]["loss"]


def test_learning_rate_schedule():
    assert train.learning_rate(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert train.learning_rate(9, 100, 1.0, 10) == pytest.approx(1.0)
    assert train.learning_rate(10, 100, 1.0, 10) == pytest.approx(1.0)
    assert train.learning_rate(55, 100, 1.0, 10) == pytest.approx(0.55)
    assert train.learning_rate(100, 100, 1.0, 10) == pytest.approx(0.1)


def test_unigram_nll_is_add_one_smoothed_token_frequency():
    tokenizer = zoo.train_tokenizer("byte_bpe", ["ab ab ab cd"], vocab_size=300)
    train = ["ab ab", "ab"]
    ids = tokenizer(train, add_special_tokens=False)["input_ids"]
    counts = np.bincount(np.concatenate(ids), minlength=len(tokenizer)) + 1.0
    evaluation = ["ab", "cd ab"]
    eval_ids = tokenizer(evaluation, add_special_tokens=False)["input_ids"]
    expected = [-sum(math.log(counts[t] / counts.sum()) for t in tokens) for tokens in eval_ids]
    np.testing.assert_allclose(zoo.unigram_nll(tokenizer, train, evaluation), expected, rtol=1e-12)


def test_bad_sizes_end_in_one_line(tmp_path, train_split, capsys):
    argv = ["zoo", "train", "--corpus", str(train_split), "--family", "gpt2", "--tokenizer", "byte_bpe", *SMALL,
            "--out", str(tmp_path / "m"), "--stage", "zoo@gpt2-bad"]
    argv[argv.index("--n-heads") + 1] = "3"
    assert main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert error == "mmc zoo@gpt2-bad: error: --n-heads 3 must divide --d-model 16"
    assert not (tmp_path / "m").exists()


def test_unknown_family_is_refused():
    with pytest.raises(MMCError, match="unknown model family 'rwkv9'"):
        zoo.model_config("rwkv9", zoo.train_tokenizer("byte_bpe", TRAIN_TEXTS, 300), d_model=16, n_layers=1,
                         n_heads=1, context=32)
