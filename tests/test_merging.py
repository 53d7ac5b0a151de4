"""Model merging: parity with mergekit, exact identities, reproducible DARE, tied weights, bad input, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from safetensors.torch import load_file

from conftest import build_tiny_model
from mmc import MMCError, zoo
from mmc.cli import build_parser, main
from mmc.merging import (DEFAULTS, METHODS, MergeSpec, copy_into, mask_seed, merge, merge_state_dicts,
                         stack_experts)

N_EXPERTS = 3
# merges that must give back a single expert exactly
IDENTITY_SPECS = [MergeSpec("average"), MergeSpec("task_arithmetic", lambda_=1.0), MergeSpec("ties", density=1.0),
                  MergeSpec("dare", drop=0.0), MergeSpec("dare_ties", drop=0.0)]


def load(path: Path) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def make_experts(base_dir: Path, root: Path) -> list[Path]:
    """Experts as deterministic perturbations of the base (no training needed); expert 0 leaves the final norm
    untouched, so some task vectors are exactly zero."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(base_dir)
    paths = []
    for index in range(N_EXPERTS):
        model = load(base_dir)
        generator = torch.Generator().manual_seed(100 + index)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if not (index == 0 and ("ln_f" in name or name == "model.norm.weight")):
                    parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
        paths.append(root / f"expert{index}")
        zoo.save_model(model, tokenizer, paths[-1])
    return paths


@pytest.fixture(scope="module")
def families(gpt2_dir, llama_dir, tmp_path_factory) -> dict[str, tuple[Path, list[Path]]]:
    root = tmp_path_factory.mktemp("merging")
    return {name: (base, make_experts(base, root / name)) for name, base in (("gpt2", gpt2_dir), ("llama", llama_dir))}


@pytest.fixture(scope="module")
def gpt2_states(families):
    """The GPT-2 base's state dict (lm_head tied to wte) and its experts', by name."""
    base, experts = families["gpt2"]
    return load(base).state_dict(), {path.name: load(path).state_dict() for path in experts}


def merge_cli(base: Path, experts: list[Path], method: str, out: Path, *settings: str) -> int:
    return main(["merge", "--stage", "merge@tiny", "--base", str(base), "--experts", *map(str, experts),
                 "--method", method, *settings, "--out", str(out), "--emit-mergekit-config", str(out) + ".yaml"])


def run_mergekit(config_path: Path, out: Path) -> dict[str, torch.Tensor]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    config = MergeConfiguration.model_validate(yaml.safe_load(config_path.read_text()))
    run_merge(config, str(out), options=MergeOptions(quiet=True, write_model_card=False))
    return load_file(out / "model.safetensors")


# The mergekit settings that make each method agree with mmc (weight 1 per expert everywhere): `linear` must
# normalise (its default) to be a mean; `task_arithmetic` must not (its default) to be λ·sum; `ties` must
# normalise (its default) to take the disjoint mean. mmc's emitted configuration spells each one out.
PARITY = [
    ("average", [], "linear", {"normalize": True}),
    ("task_arithmetic", ["--lambda", "0.7"], "task_arithmetic", {"normalize": False, "lambda": 0.7}),
    ("ties", ["--density", "0.3", "--lambda", "0.8"], "ties", {"normalize": True, "lambda": 0.8}),
]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize(("method", "settings", "mergekit_method", "mergekit_settings"), PARITY,
                         ids=[row[0] for row in PARITY])
def test_parity_with_mergekit(families, tmp_path, family, method, settings, mergekit_method, mergekit_settings):
    pytest.importorskip("mergekit", reason="mergekit is a test dependency: pip install -e '.[test]'")
    base, experts = families[family]
    out = tmp_path / "mmc"
    assert merge_cli(base, experts, method, out, *settings) == 0
    config = yaml.safe_load(Path(str(out) + ".yaml").read_text())
    assert config["merge_method"] == mergekit_method
    assert config["parameters"].items() >= mergekit_settings.items()
    assert all(model["parameters"]["weight"] == 1.0 for model in config["models"])
    ours, theirs = load_file(out / "model.safetensors"), run_mergekit(Path(str(out) + ".yaml"), tmp_path / "mergekit")
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("spec", IDENTITY_SPECS, ids=lambda spec: spec.method)
def test_one_expert_is_reproduced_exactly(gpt2_states, spec):
    base, experts = gpt2_states
    merged = merge_state_dicts(base, {"expert0": experts["expert0"]}, spec)
    assert merged.keys() == base.keys()
    assert all(torch.equal(merged[name], experts["expert0"][name]) for name in base)


@pytest.mark.parametrize("spec", [MergeSpec("average"), MergeSpec("ties", density=1.0)], ids=lambda spec: spec.method)
def test_identical_experts_merge_to_the_expert(gpt2_states, spec):
    base, experts = gpt2_states
    merged = merge_state_dicts(base, {name: experts["expert1"] for name in "abc"}, spec)
    assert all(torch.equal(merged[name], experts["expert1"][name]) for name in base)


def test_average_of_a_subset_is_the_mean_of_its_experts(gpt2_states):
    base, experts = gpt2_states
    stack = stack_experts(base, experts)
    merged = merge(stack, MergeSpec("average"), ["expert2", "expert0"])
    for name in base:
        torch.testing.assert_close(merged[name], (experts["expert0"][name] + experts["expert2"][name]) / 2)


def test_one_model_is_reused_for_many_merges(families, gpt2_states):
    """The merge stage's pattern: stack once from a loaded model, copy each merge into that same model."""
    _, experts = gpt2_states
    model = load(families["gpt2"][0])
    stack = stack_experts(model.state_dict(), experts)
    first = merge(stack, MergeSpec("ties"))
    copy_into(model, merge(stack, MergeSpec("task_arithmetic")))  # overwrites the model the stack came from
    again = merge(stack, MergeSpec("ties"))
    assert all(torch.equal(first[name], again[name]) for name in first)
    copy_into(model, again)
    assert all(torch.equal(model.state_dict()[name], again[name]) for name in again)


def test_dare_is_reproducible_and_order_independent(gpt2_states):
    base, experts = gpt2_states
    spec = MergeSpec("dare_ties", drop=0.5, seed=7)
    merged = merge_state_dicts(base, experts, spec)
    reversed_order = merge_state_dicts(base, dict(reversed(list(experts.items()))), spec)
    other_seed = merge_state_dicts(base, experts, MergeSpec("dare_ties", drop=0.5, seed=8))
    assert all(torch.equal(merged[name], reversed_order[name]) for name in base)
    assert not torch.equal(merged["transformer.h.0.mlp.c_fc.weight"], other_seed["transformer.h.0.mlp.c_fc.weight"])
    assert mask_seed(7, "expert0", "lm_head.weight") != mask_seed(7, "expert1", "lm_head.weight")


def test_dare_drops_the_given_share_and_rescales_the_rest(gpt2_states):
    base, experts = gpt2_states
    name = "transformer.h.0.mlp.c_fc.weight"
    merged = merge_state_dicts(base, {"expert1": experts["expert1"]}, MergeSpec("dare", drop=0.75, seed=3))
    tau, sparse = experts["expert1"][name] - base[name], merged[name] - base[name]
    kept = sparse != 0
    assert abs(kept.float().mean().item() - 0.25) < 0.02
    torch.testing.assert_close(sparse[kept], tau[kept] / 0.25, rtol=1e-4, atol=1e-6)


def test_dare_equals_task_arithmetic_in_expectation():
    generator = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(64, 64, generator=generator), "b": torch.randn(64, generator=generator)}
    experts = {f"e{i}": {key: value + 0.1 * torch.randn(value.shape, generator=generator) for key, value in base.items()}
               for i in range(3)}
    stack = stack_experts(base, experts)
    drop, n_seeds = 0.6, 300
    expected = merge(stack, MergeSpec("task_arithmetic", lambda_=0.5))
    draws = {key: torch.stack([merge(stack, MergeSpec("dare", drop=drop, lambda_=0.5, seed=seed))[key]
                               for seed in range(n_seeds)]).double() for key in base}
    z = []
    for key in base:
        taus = torch.stack([experts[name][key] - base[key] for name in experts]).double()
        # each entry is λ·Σ τ·keep/(1-p): variance λ² Σ τ² p/(1-p); its mean over the seeds has that / n_seeds
        sigma = (0.25 * (taus**2).sum(0) * drop / (1 - drop) / n_seeds).sqrt()
        z.append(((draws[key].mean(0) - expected[key].double()) / sigma).flatten())
    z = torch.cat(z)  # 4160 standardised errors: mean square 1 ± 0.02, none far out
    assert 0.9 < (z**2).mean().item() < 1.1 and z.abs().max().item() < 5.5


def test_tied_weights_stay_tied(families, gpt2_states, tmp_path):
    base, experts = gpt2_states
    merged = merge_state_dicts(base, experts, MergeSpec("dare", drop=0.5))
    assert merged["lm_head.weight"] is merged["transformer.wte.weight"]
    model = load(families["gpt2"][0])
    copy_into(model, merged)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert torch.equal(model.lm_head.weight, merged["transformer.wte.weight"])
    base_dir, expert_dirs = families["gpt2"]
    assert merge_cli(base_dir, expert_dirs, "dare", tmp_path / "out", "--drop", "0.5") == 0
    reloaded = load(tmp_path / "out")
    assert reloaded.lm_head.weight.data_ptr() == reloaded.transformer.wte.weight.data_ptr()
    assert torch.equal(reloaded.transformer.wte.weight, merged["transformer.wte.weight"])  # experts named alike


def test_non_float_tensors_are_the_base_s(gpt2_states):
    base, experts = gpt2_states
    base = dict(base, step=torch.tensor([3, 1, 4]), mask=torch.tensor([True, False]))
    experts = {name: dict(state, step=torch.tensor([9, 9, 9]), mask=torch.tensor([False, True]))
               for name, state in experts.items()}
    for method in ("average", "ties", "dare"):
        merged = merge_state_dicts(base, experts, MergeSpec(method))
        assert merged["step"].dtype == torch.int64 and torch.equal(merged["step"], base["step"])
        assert torch.equal(merged["mask"], base["mask"])


def test_mismatched_experts_are_named(gpt2_states, tmp_path):
    base, experts = gpt2_states
    wide = load(build_tiny_model(tmp_path / "wide", "gpt2", "byte_bpe", d_model=64)).state_dict()
    with pytest.raises(MMCError, match=r"expert 'wide' does not match the base: tensor 'transformer\.wte\.weight' "
                                       r"is float32 \(320, 64\), the base's is float32 \(320, 32\)"):
        stack_experts(base, dict(experts, wide=wide))
    short = {key: value for key, value in experts["expert0"].items() if key != "transformer.ln_f.bias"}
    with pytest.raises(MMCError, match="expert 'short' does not match the base: it lacks 1 of the base's tensors"):
        stack_experts(base, {"short": short})


def test_bad_settings_and_names():
    with pytest.raises(MMCError, match="unknown merge method 'soup'"):
        MergeSpec("soup")
    with pytest.raises(MMCError, match="--density does not apply to method 'average'"):
        MergeSpec("average", density=0.5)
    with pytest.raises(MMCError, match=r"--drop must be in \[0, 1\)"):
        MergeSpec("dare", drop=1.0)
    with pytest.raises(MMCError, match=r"--density must be in \(0, 1\]"):
        MergeSpec("ties", density=0.0)
    stack = stack_experts({"w": torch.zeros(2)}, {"a": {"w": torch.ones(2)}})
    with pytest.raises(MMCError, match="cannot merge experts"):
        merge(stack, MergeSpec("average"), ["b"])


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("mmc merge@tiny: error: ")
    return err


def test_cli_errors_are_one_line(families, capsys, tmp_path):
    gpt2, experts = families["gpt2"]
    llama_base, _ = families["llama"]
    assert merge_cli(gpt2, [experts[0], llama_base], "average", tmp_path / "out") == 2
    assert f"expert '{llama_base}' is a llama model" in one_line_error(capsys)
    wide = build_tiny_model(tmp_path / "wide", "gpt2", "byte_bpe", d_model=64)
    assert merge_cli(gpt2, [experts[0], wide], "ties", tmp_path / "out") == 2
    assert f"expert '{wide}' does not match the base" in one_line_error(capsys)
    assert merge_cli(gpt2, experts, "average", tmp_path / "out", "--lambda", "0.5") == 2
    assert "--lambda does not apply to method 'average'" in one_line_error(capsys)
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as exit_info:
        merge_cli(gpt2, experts, "soup", tmp_path / "out")
    assert exit_info.value.code == 2 and "invalid choice: 'soup'" in capsys.readouterr().err


def test_cli_writes_a_loadable_model_and_a_config_mergekit_runs(families, tmp_path):
    base, experts = families["llama"]
    out = tmp_path / "dare"
    assert merge_cli(base, experts, "dare_ties", out, "--drop", "0.3", "--seed", "5", "--lambda", "0.9") == 0
    merged = load(out)
    assert merged.config.model_type == "llama"
    assert (out / "tokenizer.json").read_text() == (base / "tokenizer.json").read_text()
    summary = json.loads((out / "mmc_merge.json").read_text())
    assert summary["settings"] == {"drop": 0.3, "lambda": 0.9, "seed": 5}
    assert summary["expert_names"] == ["expert0", "expert1", "expert2"]
    in_memory = merge_state_dicts(load(base).state_dict(), {path.name: load(path).state_dict() for path in experts},
                                  MergeSpec("dare_ties", drop=0.3, lambda_=0.9, seed=5))
    assert all(torch.equal(merged.state_dict()[name], in_memory[name]) for name in in_memory)
    config = yaml.safe_load(Path(str(out) + ".yaml").read_text())
    assert config["merge_method"] == "dare_ties" and config["models"][0]["parameters"]["density"] == pytest.approx(0.7)
    pytest.importorskip("mergekit", reason="mergekit is a test dependency: pip install -e '.[test]'")
    theirs = run_mergekit(Path(str(out) + ".yaml"), tmp_path / "mergekit")
    assert theirs.keys() == load_file(out / "model.safetensors").keys()


def test_cli_choices_and_defaults_match_the_library():
    merge_parser = build_parser()._subparsers._group_actions[0].choices["merge"]
    options = {action.dest: action for action in merge_parser._actions}
    assert tuple(options["method"].choices) == METHODS
    for name, default in DEFAULTS.items():
        assert f"(default {default})" in options[name].help
