"""Model merging: parity with mergekit end to end, exact identities, reproducible DARE, tied weights, bad input, CLI.

The per-tensor parity of every method, DELLA's masks and the k each method is defined for: test_merge_methods.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import build_tiny_model, load, make_experts
from mmc import MMCError
from mmc.cli import main
from mmc.merge_methods import COMBINER_NAMES, METHODS, SETTINGS, SPARSIFIER_NAMES, MergeSpec, mergekit_config
from mmc.merging import COMBINERS, SPARSIFIERS, copy_into, mask_seed, merge, merge_state_dicts, stack_experts

# merges that must give back a single expert exactly
IDENTITY_SPECS = [MergeSpec("average"), MergeSpec("task_arithmetic", lambda_=1.0), MergeSpec("ties", density=1.0),
                  MergeSpec("dare", drop=0.0), MergeSpec("dare_ties", drop=0.0)]


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


# The mergekit settings that make each method agree with mmc (weight 1 per expert where mergekit reads one):
# `linear` must normalise (its default) to be a mean; `task_arithmetic` must not (its default) to be λ·sum;
# `ties` must normalise (its default) to take the disjoint mean; `breadcrumbs_ties` must normalise (not its
# default); slerp and nearswap interpolate from their base_model, the first expert. mmc's emitted configuration
# spells each one out. Two-expert methods merge the first two experts; the others all three.
PARITY = [
    ("average", [], "linear", {"normalize": True}),
    ("task_arithmetic", ["--lambda", "0.7"], "task_arithmetic", {"normalize": False, "lambda": 0.7}),
    ("ties", ["--density", "0.3", "--lambda", "0.8"], "ties", {"normalize": True, "lambda": 0.8}),
    ("breadcrumbs", ["--density", "0.5", "--gamma", "0.05", "--lambda", "0.9"], "breadcrumbs",
     {"normalize": False, "lambda": 0.9}),
    ("breadcrumbs_ties", ["--density", "0.4", "--gamma", "0.02", "--lambda", "1.1"], "breadcrumbs_ties",
     {"normalize": True, "lambda": 1.1}),
    ("slerp", ["--t", "0.3"], "slerp", {"t": 0.3}),
    ("nuslerp", [], "nuslerp", {}),
    ("multislerp", [], "multislerp", {}),
    ("karcher", [], "karcher", {}),
    ("model_stock", [], "model_stock", {}),
    ("sce", ["--select_topk", "1"], "sce", {"select_topk": 1.0}),  # the variance top-k: per tensor, in the other file
    ("nearswap", ["--threshold", "0.01"], "nearswap", {"t": 0.01}),
    ("ram", ["--min_change", "0.001"], "ram", {"epsilon": 0.001}),
    ("ramplus_tl", ["--min_change", "0.001", "--boost_rate", "0.5", "--boost_cap", "0.6"], "ramplus_tl",
     {"epsilon": 0.001, "r": 0.5, "alpha": 0.6}),
]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize(("method", "settings", "mergekit_method", "mergekit_settings"), PARITY,
                         ids=[row[0] for row in PARITY])
def test_parity_with_mergekit(families, tmp_path, family, method, settings, mergekit_method, mergekit_settings):
    pytest.importorskip("mergekit", reason="mergekit is a test dependency: pip install -e '.[test]'")
    base, experts = families[family]
    experts = experts[:METHODS[method].k_max or len(experts)]
    out = tmp_path / "mmc"
    assert merge_cli(base, experts, method, out, *settings) == 0
    config = yaml.safe_load(Path(str(out) + ".yaml").read_text())
    assert config["merge_method"] == mergekit_method
    assert config.get("parameters", {}).items() >= mergekit_settings.items()
    assert all(model["parameters"]["weight"] == 1.0 for model in config["models"] if METHODS[method].mergekit_weight)
    assert_same_weights(out, run_mergekit(Path(str(out) + ".yaml"), tmp_path / "mergekit"))


def assert_same_weights(out: Path, theirs: dict[str, torch.Tensor]) -> None:
    ours = load_file(out / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize(("method", "settings"), [
    ("dare_ties", ["--drop", "0.3", "--lambda", "0.9", "--seed", "5"]),
    ("della", ["--density", "0.4", "--epsilon", "0.2", "--lambda", "1.1", "--seed", "2"]),
    ("della_linear", ["--density", "0.5", "--epsilon", "0.1", "--lambda", "0.6", "--seed", "3"]),
], ids=["dare_ties", "della", "della_linear"])
def test_random_methods_equal_mergekit_with_mmc_s_masks(families, monkeypatch, tmp_path, family, method, settings):
    """mergekit-yaml on the emitted configuration, its random masks forced to mmc's (DELLA: mergekit's own draw
    from torch's generator seeded with mmc's mask_seed; DARE: mmc's mask) and its survivors rescaled as mmc
    rescales them (see test_merge_methods.py): everything else (sign election, normalisation, lambda, tied
    and untouched tensors) is mergekit's own."""
    pytest.importorskip("mergekit", reason="mergekit is a test dependency: pip install -e '.[test]'")
    from test_merge_methods import TaskVectorNames, force_mmc_masks

    base, experts = families[family]
    out = tmp_path / "mmc"
    assert merge_cli(base, experts, method, out, *settings) == 0
    spec = MergeSpec.parse(f"{method}:" + ",".join(f"{flag[2:]}={value}" for flag, value in zip(settings[::2],
                                                                                                 settings[1::2])))
    force_mmc_masks(monkeypatch, TaskVectorNames(load(base).state_dict(),
                                                 {path.name: load(path).state_dict() for path in experts}), spec)
    assert_same_weights(out, run_mergekit(Path(str(out) + ".yaml"), tmp_path / "mergekit"))


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
    with pytest.raises(MMCError, match=r"--drop must be a finite number in \[0, 1\)"):
        MergeSpec("dare", drop=1.0)
    with pytest.raises(MMCError, match=r"--density must be a finite number in \(0, 1\]"):
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


@pytest.mark.parametrize("shape", [(7,), (33, 20)])
@pytest.mark.parametrize(("density", "gamma"), [(0.3, 0.1), (0.9, 0.2), (0.05, 0.0)])
def test_breadcrumbs_sparsifier_equals_mergekit_tensor_for_tensor(shape, density, gamma):
    """Model Breadcrumbs' mask (drop the top gamma, keep the next density) is mergekit's, entry for entry."""
    sparsify = pytest.importorskip("mergekit.sparsify", reason="mergekit is a test dependency")
    generator = torch.Generator().manual_seed(len(shape))
    tau = torch.randn(3, *shape, generator=generator, dtype=torch.float64)
    ours = SPARSIFIERS["magnitude_outliers"](tau, MergeSpec("breadcrumbs", density=density, gamma=gamma), "abc", "w")
    for i in range(3):
        theirs = sparsify.magnitude_outliers(tau[i], density=density, gamma=gamma)
        assert torch.equal(ours[i], theirs)
        kept = int(density * tau[i].numel())
        assert int((ours[i] != 0).sum()) == kept


def test_every_method_comes_from_its_table_row(families, tmp_path, capsys):
    """The CLI's choices and flags, validation and the mergekit YAML are read off METHODS and SETTINGS."""
    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for method in METHODS.values():
        assert method.name in help_text
        spec = MergeSpec(method.name)
        assert tuple(spec.settings()) == method.settings
        assert all(value == SETTINGS[name].default for name, value in spec.settings().items())
        config = mergekit_config("base", ["e1", "e2"], spec)
        assert config["merge_method"] == method.mergekit
        assert config.get("base_model") == {"base": "base", "first expert": "e1", None: None}[method.mergekit_base]
        shared, per_model = config.get("parameters", {}), config["models"][0].get("parameters", {})
        if method.combine in ("task_arithmetic", "linear"):
            assert shared["normalize"] == (method.normalise == "mean")
        assert ("weight" in per_model) == method.mergekit_weight
        for name in method.settings:  # every setting but the seed reaches mergekit, by its mergekit name
            assert SETTINGS[name].mergekit is None or SETTINGS[name].mergekit in (per_model if SETTINGS[name].per_model
                                                                                  else shared)
        assert method.k_text() in ("any number of", "exactly 2", "at least 2")
    for setting in SETTINGS.values():
        assert f"--{setting.name}" in help_text
    assert MergeSpec.parse("ties:density=0.3,lambda=0.5", seed=4) == MergeSpec("ties", density=0.3, lambda_=0.5)
    assert MergeSpec.parse("dare", seed=4).seed == 4
    with pytest.raises(MMCError, match="name=number"):
        MergeSpec.parse("ties:density")


def test_every_named_sparsifier_and_combiner_has_its_tensor_function():
    """mmc.merge_methods declares methods by the names of mmc.merging's tensor functions: one for each name."""
    assert set(SPARSIFIERS) == set(SPARSIFIER_NAMES)
    assert set(COMBINERS) == set(COMBINER_NAMES)


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--lambda", "nan", "--lambda must be a finite number"), ("--lambda", "inf", "--lambda must be a finite number"),
    ("--density", "nan", r"--density must be a finite number in \(0, 1\]"), ("--drop", "-0.1", r"--drop must be a finite number in \[0, 1\)"),
    ("--gamma", "1", r"--gamma must be a finite number in \[0, 1\)"),
])
def test_non_finite_and_out_of_range_settings_are_refused(families, tmp_path, capsys, flag, value, message):
    base, experts = families["gpt2"]
    method = {"--lambda": "task_arithmetic", "--density": "ties", "--drop": "dare", "--gamma": "breadcrumbs"}[flag]
    assert merge_cli(base, experts, method, tmp_path / "out", flag, value) == 2
    assert re.search(message, one_line_error(capsys))
    assert not (tmp_path / "out").exists()
