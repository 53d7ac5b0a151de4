"""Every merge method against mergekit's own per-tensor function, fed the configuration mmc emits; the k each
method is defined for; what one expert gives; DELLA's seeded masks; the sweep's skipping of a method's bad k.

Random methods. DELLA's mask is reproduced exactly: mmc draws it with `torch.bernoulli` from a generator seeded
with `mask_seed`, the very call mergekit makes on torch's global generator, so seeding that generator alike
gives mergekit's own draws; the tests then change only the rescale (mergekit restores the L1 norm, mmc divides
each survivor by its keep probability, which the tests read off mergekit's own call). DARE's mask (`torch.rand`
>= drop) is not mergekit's draw (`torch.bernoulli(1 - drop)`), so its whole merge is compared with masks forced
equal (mergekit's sparsifier replaced by mmc's documented mask) and its sparsifier statistically: the share
dropped and the rescale agree with mergekit's within a binomial tolerance.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from mmc import MMCError
from mmc.merge_methods import METHODS, MergeSpec, mergekit_config
from mmc.merging import SPARSIFIERS, mask_seed, merge, merge_state_dicts, stack_experts

mergekit_registry = pytest.importorskip("mergekit.merge_methods.registry",
                                        reason="mergekit is a test dependency: pip install -e '.[test]'")
from mergekit.merge_methods.base import ParameterScope, PerInputValues, TensorBatch, TensorGroup  # noqa: E402
import mergekit.sparsify as mergekit_sparsify  # noqa: E402

NAMES = ("alpha", "beta", "gamma", "delta")


def tensors(shape: tuple[int, ...], k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A base and k experts (float64 holding float32 values, so mergekit's float32 rankings see the same order)."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator)
    experts = base + 0.1 * torch.randn(k, *shape, generator=generator)
    return base.double(), experts.double()


def ours(spec: MergeSpec, base: torch.Tensor, experts: torch.Tensor, names=NAMES) -> torch.Tensor:
    return merge_state_dicts({"w": base}, {name: {"w": x} for name, x in zip(names, experts)}, spec)["w"]


def theirs(spec: MergeSpec, base: torch.Tensor, experts: torch.Tensor, names=NAMES) -> torch.Tensor:
    """mergekit's own merge of one tensor, with the parameters (and base model) of mmc's emitted configuration;
    parameters it leaves out take mergekit's defaults."""
    config = mergekit_config("base", list(names[:len(experts)]), spec)
    method = mergekit_registry.get(config["merge_method"])
    inputs = {"base": base} if config.get("base_model") == "base" else {}
    inputs.update(zip(names, experts))
    base_id = config.get("base_model")
    non_base = [name for name in inputs if name != base_id]
    per_model = {model["model"]: model.get("parameters", {}) for model in config["models"]}
    batched = not hasattr(method, "merge_group")  # linear and slerp run on batches of rows
    parameters = {}
    for parameter in method.spec.parameters:
        if parameter.scope == ParameterScope.SHARED:
            value = config.get("parameters", {}).get(parameter.name, parameter.default)
        else:
            ids = list(inputs) if parameter.scope == ParameterScope.INPUT else non_base
            value = [(name, per_model[name].get(parameter.name, parameter.default)) for name in ids]
            value = [v for _, v in value] if batched else PerInputValues(value)
        if batched and parameter.batch_tensor:  # one value per output row (and input)
            value = torch.tensor(value, dtype=base.dtype)[None]
        parameters[parameter.name] = value
    base_index = list(inputs).index(base_id) if base_id else None
    if batched:  # mergekit-yaml gives each tensor whole, as one row of a batch
        batch = TensorBatch(tuple(x[None] for x in inputs.values()), base_index=base_index)
        return method.merge_batch(batch, **parameters)[0]
    group = TensorGroup.from_tensors(list(inputs.values()), ids=list(inputs), base_index=base_index)
    return method.merge_group(group, **parameters)


# Every deterministic method, with settings away from their defaults where that tests more.
DETERMINISTIC = [
    MergeSpec("average"), MergeSpec("task_arithmetic", lambda_=0.7), MergeSpec("ties", density=0.3, lambda_=0.8),
    MergeSpec("breadcrumbs", density=0.5, gamma=0.05, lambda_=0.9),
    MergeSpec("breadcrumbs_ties", density=0.4, gamma=0.1, lambda_=1.2),
    MergeSpec("slerp", t=0.3), MergeSpec("nuslerp"), MergeSpec("multislerp"), MergeSpec("karcher"),
    MergeSpec("model_stock"), MergeSpec("sce"), MergeSpec("sce", select_topk=0.45), MergeSpec("sce", select_topk=1.0),
    MergeSpec("nearswap", threshold=0.05), MergeSpec("ram"), MergeSpec("ram", min_change=0.05),
    MergeSpec("ramplus_tl"), MergeSpec("ramplus_tl", min_change=0.05, boost_rate=0.5, boost_cap=0.6),
]


def test_every_method_of_mergekit_that_merges_experts_of_one_base_is_declared():
    """mergekit's registry, less passthrough (layer stacking) and arcee_fusion (one model filtered into its base,
    by a float32-ill-conditioned importance); dare and average are mmc's names for dare_linear and linear."""
    declared = {method.mergekit for method in METHODS.values()}
    left_out = {"passthrough", "arcee_fusion"}
    assert {method.spec.name for method in mergekit_registry.registered_methods()} == declared | left_out


@pytest.mark.parametrize("shape", [(7,), (33, 20), (4, 5, 6)], ids=str)
@pytest.mark.parametrize("spec", DETERMINISTIC, ids=str)
def test_each_method_equals_mergekit_tensor_for_tensor(spec, shape):
    method = METHODS[spec.method]
    for k in range(method.k_min, min(method.k_max or 4, 4) + 1):
        base, experts = tensors(shape, k, seed=k)
        torch.testing.assert_close(ours(spec, base, experts), theirs(spec, base, experts).double(), rtol=1e-9,
                                   atol=1e-12, msg=lambda text: f"{spec} k={k}: {text}")


@pytest.mark.parametrize("spec", DETERMINISTIC, ids=str)
def test_methods_take_the_experts_in_the_stack_s_order(spec):
    method = METHODS[spec.method]
    base, experts = tensors((9, 4), method.k_min + 1 if method.k_max is None else method.k_min)
    stack = stack_experts({"w": base}, {name: {"w": x} for name, x in zip(NAMES, experts)})
    names = list(stack.names)
    assert torch.equal(merge(stack, spec, names)["w"], merge(stack, spec, names[::-1])["w"])


def test_geometric_methods_on_exact_cases():
    """Values derived by hand, so the parity above cannot hide a shared mistake."""
    base = torch.zeros(2, dtype=torch.float64)
    e1, e2 = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)
    stack = torch.stack([e1, e2])
    half = math.sqrt(0.5)
    # two orthogonal unit task vectors: the spherical midpoint is on the unit circle at 45 degrees
    for name in ("nuslerp", "multislerp", "karcher"):
        torch.testing.assert_close(ours(MergeSpec(name), base, stack), torch.tensor([half, half], dtype=torch.float64))
    # slerp of the weights (the base plays no part): a third of the way along the quarter circle, 30 degrees;
    # its norm follows the experts' (2 here), and parallel weights are interpolated linearly
    slerped = ours(MergeSpec("slerp", t=1 / 3), base + 5, 2 * stack)
    torch.testing.assert_close(slerped, 2 * torch.tensor([math.cos(math.pi / 6), math.sin(math.pi / 6)]).double())
    torch.testing.assert_close(ours(MergeSpec("slerp", t=0.25), base, torch.stack([e1, 3 * e1])), 1.5 * e1)
    # model stock: orthogonal task vectors (cos 0) keep the base; parallel ones (cos 1) give their mean
    torch.testing.assert_close(ours(MergeSpec("model_stock"), base, stack), base)
    torch.testing.assert_close(ours(MergeSpec("model_stock"), base, torch.stack([e1, 3 * e1])), 2 * e1)
    # nearswap: entries within the threshold take the second expert's value, others move threshold/distance
    first, second = torch.tensor([0.0, 0.0, 0.0]).double(), torch.tensor([0.05, 0.2, -0.4]).double()
    swapped = ours(MergeSpec("nearswap", threshold=0.1), torch.zeros(3).double(), torch.stack([first, second]))
    torch.testing.assert_close(swapped, torch.tensor([0.05, 0.1, -0.1]).double())
    # SCE: weights are the task vectors' mean squares over their sum (1 and 4 here), against the elected sign
    sce = ours(MergeSpec("sce", select_topk=1.0), base, torch.stack([torch.tensor([0.5, -0.5]).double(),
                                                                    torch.tensor([1.0, 1.0]).double()]))
    torch.testing.assert_close(sce, torch.tensor([0.2 * 0.5 + 0.8 * 1.0, 1.0]).double())
    # RAM: the first entry changed by both (their mean), the second by neither, the third by the first alone (its
    # change; RAM+ boosts it by 1 + 0.1 * min(1 shared / 1 unique, 0.2) = 1.02)
    tau = torch.tensor([[1.0, 0.0, 2.0], [3.0, 0.0, 0.0]]).double()
    torch.testing.assert_close(ours(MergeSpec("ram"), torch.zeros(3).double(), tau), torch.tensor([2.0, 0, 2]).double())
    torch.testing.assert_close(ours(MergeSpec("ramplus_tl"), torch.zeros(3).double(), tau),
                               torch.tensor([2.0, 0, 2.04]).double())


@pytest.mark.parametrize("name", list(METHODS))
def test_one_expert_gives_the_method_s_transform_of_its_task_vector(name):
    """k = 1: the expert itself for the averages, geometric means and RAM (λ = 1, density 1, drop 0), DELLA's and the
    trims' sparse task vector; SCE with select_topk < 1 keeps no entry (one expert does not vary), so the base;
    methods defined for two or more experts refuse one in a single line."""
    method = METHODS[name]
    base, experts = tensors((6, 5), 1)
    identity = {"density": 1.0, "drop": 0.0, "select_topk": 1.0}
    spec = MergeSpec(name, **{key: value for key, value in identity.items() if key in method.settings})
    if not method.accepts(1):
        with pytest.raises(MMCError, match=rf"^method '{name}' merges (exactly|at least) 2 experts, not 1$"):
            ours(spec, base, experts)
        return
    assert torch.equal(ours(spec, base, experts), experts[0])
    if name == "sce":
        assert torch.equal(ours(MergeSpec("sce", select_topk=0.5), base, experts), base)
    if name in ("ties", "breadcrumbs_ties", "della"):  # the sign election of one vector keeps it whole
        sparse = ours(MergeSpec(name), base, experts) - base
        tau = experts[0] - base
        assert torch.equal(sparse != 0, ours(MergeSpec(name), base, experts) != base)
        assert 0 < int((sparse != 0).sum()) < tau.numel()


@pytest.mark.parametrize("name", [name for name, method in METHODS.items() if method.k_max == 2])
def test_two_expert_methods_refuse_three(name):
    base, experts = tensors((3,), 3)
    with pytest.raises(MMCError, match=rf"^method '{name}' merges exactly 2 experts, not 3$"):
        ours(MergeSpec(name), base, experts)


def test_della_settings_must_give_probabilities():
    with pytest.raises(MMCError, match=r"method 'della': --density 0.1 ± --epsilon 0.15 must lie in \(0, 1\)"):
        MergeSpec("della", density=0.1)
    with pytest.raises(MMCError, match="must lie in"):
        MergeSpec.parse("della_linear:density=0.9,epsilon=0.1")
    assert MergeSpec("della", density=1.0, epsilon=0.5).density == 1.0  # keeps everything: no probabilities


# ------------------------------------------------------------------------------------------------ random methods


class TaskVectorNames:
    """Which (expert, tensor) a task vector mergekit sparsifies belongs to, found by its exact values (mergekit's
    sparsifiers see neither name). The first name of tied tensors wins, as in mmc's masks."""

    def __init__(self, base: dict, experts: dict):
        self.by_bytes: dict[bytes, tuple[str, str]] = {}
        for expert, state in experts.items():
            for tensor, value in base.items():
                if value.is_floating_point():
                    self.by_bytes.setdefault(self.key(state[tensor] - value), (expert, tensor))

    @staticmethod
    def key(tau: torch.Tensor) -> bytes:
        return str(tau.dtype).encode() + tau.detach().contiguous().cpu().numpy().tobytes()

    def __call__(self, tau: torch.Tensor) -> tuple[str, str]:
        return self.by_bytes[self.key(tau)]


def force_mmc_masks(monkeypatch, names: TaskVectorNames, spec: MergeSpec) -> None:
    """Make mergekit draw mmc's masks and rescale as mmc does, leaving the rest of its merge its own.

    DELLA: seed torch's global generator with mmc's `mask_seed` before mergekit's own `della_magprune` (its
    `torch.bernoulli` then draws mmc's mask) and divide its survivors by the keep probabilities it drew with.
    DARE: replace mergekit's `bernoulli` by mmc's documented mask (`torch.rand` from the seeded generator >= drop)."""
    della, real_bernoulli = mergekit_sparsify.della_magprune, torch.bernoulli

    def seeded_della(tensor, density, epsilon, rescale_norm=None):
        drawn = []

        def recording_bernoulli(probability, *args, **kwargs):
            drawn.append(probability)
            return real_bernoulli(probability, *args, **kwargs)

        torch.manual_seed(mask_seed(spec.seed, *names(tensor)))
        with monkeypatch.context() as patch:
            patch.setattr(torch, "bernoulli", recording_bernoulli)
            sparse = della(tensor, density, epsilon, rescale_norm=None)
        return sparse / drawn[0].reshape(sparse.shape).to(sparse.dtype)

    def mmc_dare(tensor, density, rescale_norm=None):
        generator = torch.Generator().manual_seed(mask_seed(spec.seed, *names(tensor)))
        return tensor * (torch.rand(tensor.shape, generator=generator) >= spec.drop) / (1 - spec.drop)

    monkeypatch.setattr(mergekit_sparsify, "della_magprune", seeded_della)
    monkeypatch.setattr(mergekit_sparsify, "bernoulli", mmc_dare)


RANDOM = [MergeSpec("della", density=0.4, epsilon=0.2, lambda_=0.9, seed=3),
          MergeSpec("della_linear", density=0.3, epsilon=0.1, lambda_=0.5, seed=4),
          MergeSpec("dare", drop=0.6, lambda_=0.8, seed=5), MergeSpec("dare_ties", drop=0.3, lambda_=1.1, seed=6)]


@pytest.mark.parametrize("shape", [(7,), (33, 20)], ids=str)
@pytest.mark.parametrize("spec", RANDOM, ids=str)
def test_random_methods_equal_mergekit_with_mmc_s_masks(monkeypatch, spec, shape):
    base, experts = tensors(shape, 3)
    force_mmc_masks(monkeypatch, TaskVectorNames({"w": base}, {n: {"w": x} for n, x in zip(NAMES, experts)}), spec)
    torch.testing.assert_close(ours(spec, base, experts), theirs(spec, base, experts).double(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape", [(500,), (40, 50)], ids=str)
def test_della_mask_is_mergekit_s_own_draw(shape):
    """mmc's DELLA mask is exactly what mergekit's `della_magprune` draws from a generator seeded alike, and
    its survivors are divided by the keep probability: density − ε for a row's smallest entry rising linearly
    to density + ε for its largest."""
    density, epsilon = 0.3, 0.2
    spec = MergeSpec("della", density=density, epsilon=epsilon, seed=11)
    _, experts = tensors(shape, 2, seed=5)
    tau = experts - experts.mean(0)
    sparse = SPARSIFIERS["magnitude_prune"](tau, spec, NAMES[:2], "layer.weight")
    rows = tau.reshape(2, -1, shape[-1])
    rank = rows.abs().float().argsort(-1).argsort(-1).double()
    probability = ((density - epsilon) + 2 * epsilon * rank / (shape[-1] - 1)).reshape(tau.shape)
    for i, name in enumerate(NAMES[:2]):
        torch.manual_seed(mask_seed(11, name, "layer.weight"))
        kept = mergekit_sparsify.della_magprune(tau[i].float(), density, epsilon) != 0
        assert torch.equal(sparse[i] != 0, kept)
        torch.testing.assert_close(sparse[i][kept], (tau[i] / probability[i])[kept], rtol=1e-6, atol=0)
        share = kept.double().mean().item()  # the mean keep probability is the density
        assert abs(share - density) < 5 * math.sqrt(density * (1 - density) / tau[i].numel())


def test_dare_drop_and_rescale_agree_with_mergekit_statistically():
    """Over 20 seeds of a 100,000-entry task vector: both drop each entry with probability `drop` (binomial, 5σ),
    and mergekit's L1 rescale is mmc's 1/(1 − drop) to within its relative spread (5σ of the kept L1 mass)."""
    drop, n, seeds = 0.7, 100_000, 20
    tau = torch.randn(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    spec = MergeSpec("dare", drop=drop)
    for seed in range(seeds):
        ours_sparse = SPARSIFIERS["random"](tau[None], MergeSpec("dare", drop=drop, seed=seed), ["e"], "w")[0]
        torch.manual_seed(seed)
        theirs_sparse = mergekit_sparsify.bernoulli(tau, 1 - drop, mergekit_sparsify.RescaleNorm.l1)
        tolerance = 5 * math.sqrt(drop * (1 - drop) / n)
        for sparse in (ours_sparse, theirs_sparse):
            assert abs((sparse == 0).double().mean().item() - drop) < tolerance
        kept = theirs_sparse != 0
        scale = (theirs_sparse[kept] / tau[kept]).mean().item()
        torch.testing.assert_close(ours_sparse[ours_sparse != 0] / tau[ours_sparse != 0],
                                   torch.full((int((ours_sparse != 0).sum()),), 1 / (1 - spec.drop),
                                              dtype=torch.float64))
        # the kept share of |τ|'s L1 mass has relative sd ≈ sqrt(drop/((1-drop) n)) · (E|τ|²/E|τ|)^(1/2)-ish: 2x
        assert abs(scale * (1 - drop) - 1) < 5 * 2 * math.sqrt(drop / ((1 - drop) * n))


# ------------------------------------------------------------------------------------------------ the merge sweep


def test_the_sweep_merges_each_method_at_the_k_it_is_defined_for(gpt2_dir, eval_dir, tmp_path):
    """slerp merges the pair only, model_stock every subset of two or more; the store says which k each method
    was merged at, and the law fit skips a method merged at one k with that reason (and leaves it out of the
    joint fit)."""
    from conftest import make_experts
    from mmc.merge_law import fit_merge_laws
    from mmc.store import write_store
    from mmc.sweep import merge_sweep

    expert_dirs = make_experts(gpt2_dir, tmp_path)
    experts = {"code": expert_dirs[0], "prose": expert_dirs[1]}
    specs = [MergeSpec("average"), MergeSpec("slerp"), MergeSpec("model_stock")]
    store = merge_sweep(str(gpt2_dir), experts, eval_dir, specs, max_subsets_per_k=10, seed=0, device="cpu",
                        progress=False)
    assert list(store.method.values) == ["base"] + ["average"] * 3 + ["slerp", "model_stock"]
    assert list(store.k.values) == [0, 1, 1, 2, 2, 2]
    assert json.loads(store.attrs["methods_k"]) == {"average": [1, 2], "model_stock": [2], "slerp": [2]}
    write_store(store, tmp_path / "sweep.zarr", "merge sweep")
    metrics, _, _ = fit_merge_laws([tmp_path / "sweep.zarr"], bootstrap=0, seed=0)
    assert metrics["fits"]["slerp"]["in_domain"] == {
        "skipped": "merged at k = 2 only (the method is defined for that k alone): a law in k needs several k"}
