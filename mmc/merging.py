"""Model merging in weight space: experts fine-tuned from one base combined into one model.

Conventions (those of the merging papers, and of arXiv 2509.24244: every expert has the same weight).
With base weights θ0, experts θ1..θk and task vectors τi = θi − θ0, per tensor (k: the experts it merges):

- `average` (any k): θ = (1/k) Σ θi.
- `task_arithmetic` (any k): θ = θ0 + λ Σ τi (Ilharco et al.; a sum, not a mean).
- `ties` (any k): each τi keeps its `density` share of entries of largest magnitude (per tensor, at least one),
  the sign of every entry is elected as the sign of the sum of the trimmed τi (a zero sum elects +), and
  the entries that agree with it are averaged (the disjoint mean): θ = θ0 + λ · disjoint_mean.
- `dare` (any k): each entry of each τi is dropped with probability `drop` and the survivors are divided by
  1 − drop, so the sparse task vector equals τi in expectation: θ = θ0 + λ Σ τ̃i (DARE + task arithmetic).
- `dare_ties` (any k): the same random drop and rescale, then TIES's sign election and disjoint mean.
- `breadcrumbs`, `breadcrumbs_ties` (any k): each τi loses its top `gamma` share by magnitude (outliers) and
  keeps the next `density` share; then λ Σ, or TIES's sign election and disjoint mean times λ.
- `della`, `della_linear` (any k): DELLA's MAGPRUNE keeps each entry with a probability rising with its
  magnitude rank in its row, from density − ε to density + ε, and divides the survivors by it (unbiased,
  as DARE); then TIES's sign election and disjoint mean times λ, or λ Σ.
- `slerp` (k = 2): spherical interpolation from the first expert's weights to the second's by `t`.
- `nuslerp` (k = 2): θ0 + the spherical midpoint of τ1 and τ2.
- `multislerp` (any k): θ0 + the spherical barycentre of the τi, scaled to their mean norm.
- `karcher` (any k): the Karcher mean of the θi on the sphere, scaled to their mean norm.
- `model_stock` (k ≥ 2): θ0 + t · mean τi, t = k·cos / (1 + (k − 1)·cos), cos the mean pairwise cosine of the τi.
- `sce` (any k): keep the `select_topk` share of entries where the τi vary most, weight each τi by its mean
  square, and take the weighted mean of the entries that agree with the elected sign.
- `nearswap` (k = 2): from θ1, each entry moves towards θ2 by min(1, threshold / |θ1 − θ2|) of the way.
- `ram` (any k): entries with |τi| > min_change count as changes; an entry changed by one expert keeps its
  change, one changed by several takes their mean. `ramplus_tl` scales each expert's unique changes by
  1 + boost_rate · min(its shared/unique count ratio, boost_cap) (Reinforced Agent Merging, tensor-local).

One expert (k = 1) gives the expert itself for the averages and spherical means and, for the sparsifying
methods, its own sparsified task vector (times λ); SCE with select_topk < 1 gives the base (one expert does
not vary). Each method is declared once in `mmc.merge_methods.METHODS`: its combiner, settings (SETTINGS), k
range and mergekit equivalent, from which the CLI, the validation and `mergekit_config` read. mergekit's passthrough (layer
stacking) does not merge experts of one base; arcee_fusion (one fine-tune filtered into its own base) is left
out: its importance, a KL divergence of nearly equal softmaxes, decides which entries survive and is computed by
mergekit in the merge dtype (float32), where it is too ill-conditioned to match.

Only floating-point tensors are merged; other tensors (integer or boolean buffers) are the base's.
Tensors that share storage in the base's state dict (tied weights, e.g. GPT-2's `lm_head` and `wte`) are
merged once and stay one tensor.

Random masks (DARE, DELLA) are reproducible and order-independent: the mask of expert E on tensor T is drawn
from a CPU `torch.Generator` seeded with the first 8 bytes of sha256("{seed}/{E}/{T}") (tied tensors use the
first name of their group), so an expert gets the same mask in every subset and order, on CPU and GPU alike.

Arithmetic runs in float64 and is rounded once to the base's dtype, so merging one expert (λ = 1, density 1,
drop 0) or averaging identical experts gives back the expert bit for bit.

For many merges of one base (the merge stage): `stack_experts` once, then `merge` any subset, and
`copy_into` one model loaded with `mmc.losses.load_model` to score it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

import mmc
from mmc import MMCError
from mmc.losses import load_model, resolve_dtype, save_model
from mmc.merge_methods import MERGEKIT_NOTE, METHODS, MergeSpec, mergekit_config
from mmc.store import atomic_path, check_outputs

WORK_DTYPE = torch.float64


@dataclass
class ExpertStack:
    """A base's state dict and its experts' weights stacked per tensor, built once to merge many subsets.

    `base` is a private copy (a model the merges are copied into may share storage with the caller's dict);
    `stacked[name]` has shape (n_experts, *shape) for every floating-point tensor that owns its storage;
    `aliases` maps each tied name to the name it shares storage with in the base.
    """

    names: tuple[str, ...]
    base: dict[str, torch.Tensor]
    stacked: dict[str, torch.Tensor]
    aliases: dict[str, str] = field(default_factory=dict)


def _describe(tensor: torch.Tensor) -> str:
    return f"{str(tensor.dtype).removeprefix('torch.')} {tuple(tensor.shape)}"


def _storage_key(tensor: torch.Tensor) -> tuple:
    return (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
            tuple(tensor.stride()))


def tied_names(state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Names whose tensor shares storage with an earlier name of `state` (tied weights), mapped to that name."""
    first: dict[tuple, str] = {}
    aliases = {}
    for name, tensor in state.items():
        owner = first.setdefault(_storage_key(tensor), name)
        if owner != name:
            aliases[name] = owner
    return aliases


def check_expert(name: str, base: Mapping[str, torch.Tensor], expert: Mapping[str, torch.Tensor]) -> None:
    """Refuse, naming the expert, a state dict without the base's tensor names, shapes and kinds."""
    missing = [key for key in base if key not in expert]
    extra = [key for key in expert if key not in base]
    if missing or extra:
        what = (f"lacks {len(missing)} of the base's tensors (first: '{missing[0]}')" if missing else
                f"has {len(extra)} tensors the base lacks (first: '{extra[0]}')")
        raise MMCError(f"expert '{name}' does not match the base: it {what}; experts must be fine-tunes of the base")
    for key, tensor in base.items():
        other = expert[key]
        if other.shape != tensor.shape or other.is_floating_point() != tensor.is_floating_point():
            raise MMCError(f"expert '{name}' does not match the base: tensor '{key}' is {_describe(other)}, "
                           f"the base's is {_describe(tensor)}; experts must be fine-tunes of the base")


def stack_experts(base: Mapping[str, torch.Tensor], experts: Mapping[str, Mapping[str, torch.Tensor]]) -> ExpertStack:
    """Check every expert against the base and stack their floating-point weights, per tensor.

    `experts` maps expert names (used in error messages and to seed DARE masks) to state dicts.
    """
    if not experts:
        raise MMCError("no experts to merge")
    for name, state in experts.items():
        check_expert(name, base, state)
    aliases = tied_names(base)
    own = {key: tensor.detach().clone() for key, tensor in base.items() if key not in aliases}
    stacked = {key: torch.stack([state[key].detach() for state in experts.values()])
               for key, tensor in own.items() if tensor.is_floating_point()}
    return ExpertStack(tuple(experts), {key: own[aliases.get(key, key)] for key in base}, stacked, aliases)


def mask_seed(seed: int, expert: str, tensor: str) -> int:
    """The generator seed of DARE's mask for one expert and tensor: independent of subset and order."""
    digest = hashlib.sha256(f"{seed}/{expert}/{tensor}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _seeded(spec: MergeSpec, expert: str, tensor: str) -> torch.Generator:
    return torch.Generator().manual_seed(mask_seed(spec.seed, expert, tensor))


def _random_drop(tau: torch.Tensor, spec: MergeSpec, experts: Sequence[str], tensor: str) -> torch.Tensor:
    """DARE: drop each entry of each task vector with probability `drop`; rescale the survivors by 1/(1 − drop)."""
    if spec.drop == 0:
        return tau
    keep = torch.stack([torch.rand(tau.shape[1:], dtype=torch.float32, generator=_seeded(spec, expert, tensor))
                        >= spec.drop for expert in experts])
    return tau * keep.to(tau.device) / (1 - spec.drop)


def della_keep_probability(tau: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's MAGPRUNE keep probabilities of stacked task vectors (experts, *shape), in float32 as mergekit's:
    within each row (the tensor's second axis; a vector is one row) the entries are ranked by magnitude and
    kept with a probability rising linearly with rank, from density − ε (smallest) to density + ε (largest)."""
    axis = 2 if tau.dim() > 2 else 1
    ranks = tau.abs().float().argsort(dim=axis).argsort(dim=axis).float() + 1  # ranks of the float32 magnitudes
    n = tau.shape[axis]
    rank_norm = ((ranks - 1) / (n - 1) if n > 1 else torch.zeros_like(ranks)).clamp(0, 1)
    return (density - epsilon) + rank_norm * 2 * epsilon


def _magnitude_prune(tau: torch.Tensor, spec: MergeSpec, experts: Sequence[str], tensor: str) -> torch.Tensor:
    """DELLA's MAGPRUNE: keep each entry with its `della_keep_probability` (larger entries more often) and divide
    the survivors by that probability, so the sparse task vector equals τi in expectation (as DARE's)."""
    if spec.density >= 1:
        return tau
    probability = della_keep_probability(tau, spec.density, spec.epsilon).cpu()
    keep = torch.stack([torch.bernoulli(p, generator=_seeded(spec, expert, tensor))
                        for p, expert in zip(probability, experts)])
    return tau * keep.to(tau) / probability.to(tau)


def _magnitude(tau: torch.Tensor, spec: MergeSpec, experts: Sequence[str], tensor: str) -> torch.Tensor:
    """TIES: keep each task vector's `density` share of entries of largest magnitude (at least one)."""
    if spec.density >= 1:
        return tau
    flat = tau.reshape(len(tau), -1)
    keep = max(1, int(spec.density * flat.shape[1]))  # mergekit's count, so parity holds entry for entry
    mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, flat.abs().topk(keep, dim=1).indices, True)
    return (flat * mask).reshape(tau.shape)


def _magnitude_outliers(tau: torch.Tensor, spec: MergeSpec, experts: Sequence[str], tensor: str) -> torch.Tensor:
    """Model Breadcrumbs: drop each task vector's `gamma` share of largest-magnitude entries (outliers) and keep
    the `density` share below them; where too few entries remain the outlier cut shrinks. Ranks as mergekit's
    (an ascending sort of the float32 magnitudes), so parity holds entry for entry."""
    if spec.density >= 1:
        return tau
    flat = tau.reshape(len(tau), -1)
    n_entries = flat.shape[1]
    n_kept, n_outliers = int(spec.density * n_entries), int(spec.gamma * n_entries)
    n_below = max(0, n_entries - n_kept - n_outliers)
    ascending = torch.sort(flat.abs().float(), dim=1).indices[:, n_below:n_below + n_kept]
    mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, ascending, True)
    return (flat * mask).reshape(tau.shape)


SPARSIFIERS: dict[str, Callable[[torch.Tensor, MergeSpec, Sequence[str], str], torch.Tensor]] = {
    "none": lambda tau, spec, experts, tensor: tau,
    "magnitude": _magnitude,
    "random": _random_drop,
    "magnitude_outliers": _magnitude_outliers,
    "magnitude_prune": _magnitude_prune,
}


def _elect_signs(tau: torch.Tensor) -> torch.Tensor:
    """TIES's consensus: each entry's sign is that of the sum over experts (+ on zero); True where τi agrees."""
    return torch.sign(tau) == torch.where(tau.sum(0) >= 0, 1.0, -1.0).to(tau.dtype)


# Combiners: (base, experts (k, *shape), spec, expert names, tensor name) -> merged tensor, all float64.


def _task_arithmetic(base: torch.Tensor, experts: torch.Tensor, spec: MergeSpec, names: Sequence[str],
                     tensor: str) -> torch.Tensor:
    method = METHODS[spec.method]
    tau = SPARSIFIERS[method.sparsifier](experts - base, spec, names, tensor)
    if method.consensus == "sign":
        agrees = _elect_signs(tau)
        tau = tau * agrees
        count = agrees.sum(0).clamp(min=1)
    else:
        count = torch.tensor(float(len(tau)), dtype=WORK_DTYPE)
    delta = tau.sum(0) / count if method.normalise == "mean" else tau.sum(0)
    return base + spec["lambda"] * delta if "lambda" in method.settings else base + delta


def _linear(base: torch.Tensor, experts: torch.Tensor, spec: MergeSpec, names: Sequence[str],
            tensor: str) -> torch.Tensor:
    return experts.mean(0)


def _slerp(base: torch.Tensor, experts: torch.Tensor, spec: MergeSpec, names: Sequence[str],
           tensor: str) -> torch.Tensor:
    """Spherical interpolation from the first expert's weights to the second's by `t`, each tensor flattened
    (as mergekit-yaml runs its slerp); nearly parallel tensors (|cos| > 0.9995) are interpolated linearly, and
    a zero tensor counts as orthogonal to the other."""
    first, second = experts.reshape(2, -1)
    t = spec.t
    cos = ((first / _nonzero(first.norm())) * (second / _nonzero(second.norm()))).sum().clamp(-1, 1)
    if cos.abs() > 0.9995:
        return ((1 - t) * first + t * second).reshape(base.shape)
    theta = torch.acos(cos)
    return ((torch.sin((1 - t) * theta) * first + torch.sin(t * theta) * second) / torch.sin(theta)).reshape(base.shape)


def _nonzero(norm: torch.Tensor) -> torch.Tensor:
    return torch.where(norm > 1e-8, norm, 1.0)


def _nuslerp(base: torch.Tensor, experts: torch.Tensor, spec: MergeSpec, names: Sequence[str],
             tensor: str) -> torch.Tensor:
    """The base plus the spherical midpoint of the two task vectors, each flattened (mergekit's nuslerp with a
    base, equal weights: t = 1/2); the result keeps their norms' scale. Parallel task vectors are averaged."""
    first, second = (experts - base).reshape(2, -1)
    cos = ((first / first.norm().clamp(min=1e-7)) * (second / second.norm().clamp(min=1e-7))).sum().clamp(-1, 1)
    if 1 - cos**2 <= 1e-16:
        return base + (first + second).reshape(base.shape) / 2
    theta = torch.acos(cos)
    return base + ((torch.sin(theta / 2) * (first + second)) / torch.sin(theta)).reshape(base.shape)


def _multislerp(base: torch.Tensor, experts: torch.Tensor, spec: MergeSpec, names: Sequence[str],
                tensor: str) -> torch.Tensor:
    """Barycentric interpolation of the task vectors on the sphere (mergekit's multislerp, equal weights): their
    unit vectors' mean direction, moved along the tangent mean of the unit vectors by its length, scaled to
    their mean norm. One expert is itself; where the unit vectors cancel (all task vectors zero) the task
    vectors are averaged (mergekit does so for two experts and refuses more)."""
    if len(experts) == 1:
        return experts[0]
    tau = (experts - base).reshape(len(experts), -1)
    norms = tau.norm(dim=1, keepdim=True)
    units = tau / (norms + 1e-8)
    mean = units.mean(0)
    if mean.norm() < 1e-8:
        return base + tau.mean(0).reshape(base.shape)
    mean = mean / mean.norm()
    tangent = (units - (units @ mean)[:, None] * mean).mean(0)
    length = tangent.norm() + 1e-8
    merged = (mean * torch.cos(length) + tangent * (torch.sin(length) / length)) * norms.mean()
    return base + merged.reshape(base.shape)


KARCHER_ITERATIONS, KARCHER_TOLERANCE = 10, 1e-5  # mergekit's defaults


def _karcher(base: torch.Tensor, experts: torch.Tensor, spec: MergeSpec, names: Sequence[str],
             tensor: str) -> torch.Tensor:
    """The Karcher (Riemannian) mean of the experts' weights on the unit sphere, found by at most 10 gradient
    steps (mergekit's karcher, equal weights), scaled to their mean norm. Weights of norm ≤ 1e-5 join the
    scale but not the direction; one expert is itself."""
    if len(experts) == 1:
        return experts[0]
    flat = experts.reshape(len(experts), -1)
    norms = flat.norm(dim=1)
    valid = norms > KARCHER_TOLERANCE
    if not valid.any():
        return torch.zeros_like(base)
    units = flat[valid] / norms[valid, None]
    mean = units.mean(0)
    mean = units[0] if mean.norm() < KARCHER_TOLERANCE else mean / mean.norm()
    for _ in range(KARCHER_ITERATIONS):
        cos = (units @ mean).clamp(-1, 1)
        theta = torch.arccos(cos)
        step = torch.where(theta < KARCHER_TOLERANCE, 0.0, theta / torch.sin(theta)) / len(units)
        tangent = (step[:, None] * (units - cos[:, None] * mean)).sum(0)
        length = tangent.norm()
        if length < KARCHER_TOLERANCE:
            break
        mean = torch.cos(length) * mean + torch.sin(length) * (tangent / length)
        if mean.norm() > KARCHER_TOLERANCE:
            mean = mean / mean.norm()
    return (norms.mean() * mean).reshape(base.shape)


def _model_stock(base: torch.Tensor, experts: torch.Tensor, spec: MergeSpec, names: Sequence[str],
                 tensor: str) -> torch.Tensor:
    """Model Stock (Jang et al.): the base moved towards the experts' mean by t = k·cos / (1 + (k − 1)·cos), where
    cos is the mean cosine between pairs of task vectors (each tensor flattened); t = 0 (the base) where the
    denominator vanishes."""
    k = len(experts)
    tau = (experts - base).reshape(k, -1)
    norms = tau.norm(dim=1)
    pairs = torch.triu_indices(k, k, offset=1)
    cos = ((tau @ tau.T) / (norms[:, None] * norms).clamp(min=1e-6)).clamp(-1, 1)[pairs[0], pairs[1]].mean()
    denominator = 1 + (k - 1) * cos
    t = 0.0 if denominator.abs() < 1e-6 else k * cos / denominator
    return base + t * tau.mean(0).reshape(base.shape)


def _sce(base: torch.Tensor, experts: torch.Tensor, spec: MergeSpec, names: Sequence[str],
         tensor: str) -> torch.Tensor:
    """SCE (Wan et al., FuseChat): Select the `select_topk` share of entries where the task vectors vary most
    across experts (population variance; a share of the entries that vary at all), Calculate each expert's
    weight as its task vector's mean square over the sum of them (equal weights where that sum is below 1e-6,
    as mergekit), Erase the entries against TIES's elected sign, and take the weighted mean of the rest."""
    tau = experts - base
    if spec.select_topk < 1:
        variance = tau.var(0, unbiased=False).flatten()
        keep = int(variance.count_nonzero() * spec.select_topk)  # mergekit's count (a float32 product)
        mask = torch.zeros_like(variance).scatter_(0, variance.abs().topk(keep).indices, 1.0)
        tau = tau * mask.reshape(base.shape)
    weights = tau.square().reshape(len(tau), -1).mean(1)
    total = weights.sum()
    weights = torch.full_like(weights, 1 / len(tau)) if total.abs() < 1e-6 else weights / total
    erased = weights.reshape(-1, *[1] * base.dim()) * _elect_signs(tau)
    return base + (tau * erased).sum(0) / erased.sum(0).clamp(min=1e-6)


def _nearswap(base: torch.Tensor, experts: torch.Tensor, spec: MergeSpec, names: Sequence[str],
              tensor: str) -> torch.Tensor:
    """NearSwap: from the first expert, each entry moves towards the second by threshold/distance of the way
    (all of it where they are within `threshold`), so the experts' near agreements take the second's value."""
    first, second = experts
    weight = (spec.threshold / (first - second).abs().clamp(min=1e-6)).clamp(0, 1)
    return weight * second + (1 - weight) * first


def _ram(base: torch.Tensor, experts: torch.Tensor, spec: MergeSpec, names: Sequence[str],
         tensor: str) -> torch.Tensor:
    """Reinforced Agent Merging: entries with |τi| > min_change are changes; an entry changed by one expert keeps
    it (RAM+: times that expert's boost 1 + boost_rate · min(shared/unique, boost_cap), its counts of entries
    it shares with others and changes alone; the ratio is shared/min_change where it changes none alone), an
    entry changed by several takes the mean of their changes."""
    tau = (experts - base).reshape(len(experts), -1)
    changed = tau.abs() > spec.min_change
    count = changed.sum(0)
    unique, shared = changed & (count == 1), changed & (count > 1)
    boost = torch.ones(len(tau), dtype=tau.dtype)
    if "boost_rate" in METHODS[spec.method].settings:
        ratio = shared.sum(1) / unique.sum(1).clamp(min=spec.min_change)  # float32, as mergekit's
        boost = (1 + spec.boost_rate * ratio.clamp(0, spec.boost_cap)).to(tau.dtype)
    merged = (tau * (unique * boost[:, None] + shared.to(tau.dtype) / count.clamp(min=1))).sum(0)
    return base + merged.reshape(base.shape)


COMBINERS: dict[str, Callable[[torch.Tensor, torch.Tensor, MergeSpec, Sequence[str], str], torch.Tensor]] = {
    "linear": _linear, "task_arithmetic": _task_arithmetic, "slerp": _slerp, "nuslerp": _nuslerp,
    "multislerp": _multislerp, "karcher": _karcher, "model_stock": _model_stock, "sce": _sce, "nearswap": _nearswap,
    "ram": _ram,
}


def _merge_tensor(base: torch.Tensor, experts: torch.Tensor, names: Sequence[str], tensor: str,
                  spec: MergeSpec) -> torch.Tensor:
    combine = COMBINERS[METHODS[spec.method].combine]
    return combine(base.to(WORK_DTYPE), experts.to(WORK_DTYPE), spec, names, tensor)


def merge(stack: ExpertStack, spec: MergeSpec, experts: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Merge a subset of the stacked experts (all by default) into a new state dict; the method must accept
    that many experts. The experts are taken in the stack's order, whatever the order given (two-expert methods
    interpolate from the first to the second).

    Floating-point tensors are merged (in float64, then cast to the base's dtype, on the stack's device);
    other tensors are the base's own; tied names share one merged tensor.
    """
    chosen = list(stack.names) if experts is None else list(experts)
    if not chosen or len(set(chosen)) != len(chosen) or not set(chosen) <= set(stack.names):
        raise MMCError(f"cannot merge experts {chosen}: give distinct names among {', '.join(stack.names)}")
    method = METHODS[spec.method]
    if not method.accepts(len(chosen)):
        raise MMCError(f"method '{method.name}' merges {method.k_text()} experts, not {len(chosen)}")
    positions = sorted(stack.names.index(name) for name in chosen)
    names = [stack.names[p] for p in positions]
    index = torch.tensor(positions)
    merged = {}
    for key, tensor in stack.base.items():
        if key in stack.aliases:
            merged[key] = merged[stack.aliases[key]]
        elif key in stack.stacked:
            chosen_weights = stack.stacked[key].index_select(0, index.to(stack.stacked[key].device))
            merged[key] = _merge_tensor(tensor, chosen_weights, names, key, spec).to(tensor.dtype)
        else:
            merged[key] = tensor
    return merged


def merge_state_dicts(base: Mapping[str, torch.Tensor], experts: Mapping[str, Mapping[str, torch.Tensor]],
                      spec: MergeSpec) -> dict[str, torch.Tensor]:
    """Merge all `experts` (name -> state dict) into `base` in one call; see `stack_experts` and `merge`."""
    return merge(stack_experts(base, experts), spec)


@torch.no_grad()
def copy_into(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy a merged state dict into a loaded model's own tensors, in place (its dtype and device kept).

    One model loaded with `mmc.losses.load_model` can so be scored for many merges without reloading;
    tied weights stay tied because the model's own storage is written, never replaced.
    """
    model.load_state_dict(state, strict=True)


# ---------------------------------------------------------------------------------------------
# Models on disk: what `mmc merge` does


def expert_names(paths: Sequence[str]) -> list[str]:
    """Experts are named by their directory (the domain, for data/experts/<base>/<domain>), else by path."""
    names = [Path(path).name or str(path) for path in paths]
    return names if len(set(names)) == len(names) else [str(path) for path in paths]


def check_expert_base(expert: str | Path, base: str) -> None:
    """Refuse an expert whose `mmc_expert.json` records another base than `base` (same shapes merge silently)."""
    record = Path(expert) / "mmc_expert.json"
    if not record.is_file():
        return  # not trained by mmc: its tensors are still checked against the base's
    recorded = str(json.loads(record.read_text(encoding="utf-8")).get("base", ""))
    same = Path(recorded).resolve() == Path(base).resolve() if Path(base).exists() else recorded == base
    if not same:
        raise MMCError(f"expert '{expert}' was fine-tuned from '{recorded}', not from the base '{base}'")


def merge_models(base: str, experts: Sequence[str], spec: MergeSpec, out: str | Path, *, dtype: str = "float32",
                 mergekit_yaml: str | Path | None = None, allow_pickle: bool = False) -> dict:
    """What `mmc merge` does: merge expert directories into `base` and save the result, atomically.

    `out` becomes a Hugging Face model directory with the base's tokenizer plus `mmc_merge.json` (method,
    settings, inputs); `mergekit_yaml`, when given, gets the equivalent mergekit configuration.
    Returns the content of `mmc_merge.json`.
    """
    check_outputs([(out, "merged model"), *([(mergekit_yaml, "mergekit config")] if mergekit_yaml else [])],
                  [base, *experts])
    if len(set(experts)) != len(experts):
        raise MMCError("an expert is given twice in --experts")
    out_dtype = resolve_dtype(dtype, torch.device("cpu"))
    for path in experts:
        check_expert_base(path, base)
    # merged in float64 from exact float32 copies
    loaded = load_model(base, device="cpu", dtype="float32", allow_pickle=allow_pickle)
    base_state = loaded.model.state_dict()
    expert_states = {}
    for name, path in zip(expert_names(experts), experts):
        expert = load_model(path, device="cpu", dtype="float32", allow_pickle=allow_pickle).model
        if expert.config.model_type != loaded.model.config.model_type:
            raise MMCError(f"expert '{path}' is a {expert.config.model_type} model, the base "
                           f"'{base}' a {loaded.model.config.model_type} model; experts must be fine-tunes of it")
        check_expert(path, base_state, expert.state_dict())
        expert_states[name] = expert.state_dict()
    copy_into(loaded.model, merge_state_dicts(base_state, expert_states, spec))
    summary = {"base": base, "experts": list(experts), "expert_names": list(expert_states), "method": spec.method,
               "settings": spec.settings(), "dtype": str(out_dtype).removeprefix("torch."),
               "mmc_version": mmc.__version__}
    with atomic_path(out, "merged model") as tmp:
        save_model(loaded.model.to(out_dtype), loaded.tokenizer, tmp)
        (tmp / "mmc_merge.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if mergekit_yaml is not None:
        config = mergekit_config(base, experts, spec, summary["dtype"])
        with atomic_path(mergekit_yaml, "mergekit config") as tmp:
            tmp.write_text(MERGEKIT_NOTE.format(method=spec.method) + yaml.safe_dump(config, sort_keys=False),
                           encoding="utf-8")
    return summary
