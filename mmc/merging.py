"""Model merging in weight space: experts fine-tuned from one base combined into one model.

Conventions (those of the merging papers, and of arXiv 2509.24244: every expert has the same weight).
With base weights θ0, experts θ1..θk and task vectors τi = θi − θ0, per tensor:

- `average`: θ = (1/k) Σ θi.
- `task_arithmetic`: θ = θ0 + λ Σ τi (Ilharco et al.; a sum, not a mean).
- `ties`: each τi keeps its `density` share of entries of largest magnitude (per tensor, at least one),
  the sign of every entry is elected as the sign of the sum of the trimmed τi (a zero sum elects +), and
  the entries that agree with it are averaged (the disjoint mean): θ = θ0 + λ · disjoint_mean.
- `dare`: each entry of each τi is dropped with probability `drop` and the survivors are divided by
  1 − drop, so the sparse task vector equals τi in expectation: θ = θ0 + λ Σ τ̃i (DARE + task arithmetic).
- `dare_ties`: the same random drop and rescale, then TIES's sign election and disjoint mean (no magnitude
  trim: the random drop replaces it).

Only floating-point tensors are merged; other tensors (integer or boolean buffers) are the base's.
Tensors that share storage in the base's state dict (tied weights, e.g. GPT-2's `lm_head` and `wte`) are
merged once and stay one tensor.

DARE masks are reproducible and order-independent: the mask of expert E on tensor T is drawn from a CPU
`torch.Generator` seeded with the first 8 bytes of sha256("{seed}/{E}/{T}") (tied tensors use the first
name of their group), so an expert gets the same mask in every subset and order, on CPU and GPU alike.

Arithmetic runs in float64 and is rounded once to the base's dtype, so merging one expert (λ = 1, density 1,
drop 0) or averaging identical experts gives back the expert bit for bit.

For many merges of one base (the merge stage): `stack_experts` once, then `merge` any subset, and
`copy_into` one model loaded with `mmc.losses.load_model` to score it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import xarray as xr
import yaml
from tqdm.auto import tqdm

import mmc
from mmc import MMCError

METHODS = ("average", "task_arithmetic", "ties", "dare", "dare_ties")
# the settings each method reads; the others must be left unset
METHOD_SETTINGS = {
    "average": (),
    "task_arithmetic": ("lambda_",),
    "ties": ("density", "lambda_"),
    "dare": ("drop", "lambda_", "seed"),
    "dare_ties": ("drop", "lambda_", "seed"),
}
DEFAULTS = {"density": 0.2, "lambda_": 1.0, "drop": 0.9, "seed": 0}  # TIES paper's top 20%, DARE paper's p = 0.9
WORK_DTYPE = torch.float64


@dataclass(frozen=True)
class MergeSpec:
    """A merge method and its settings; settings the method does not read must stay None.

    Unset settings of the method take the papers' defaults: density 0.2 (TIES keeps the top 20%),
    lambda 1.0, drop 0.9 (DARE), seed 0.
    """

    method: str
    density: float | None = None
    lambda_: float | None = None
    drop: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise MMCError(f"unknown merge method '{self.method}'; choose one of {', '.join(METHODS)}")
        used = METHOD_SETTINGS[self.method]
        for name in DEFAULTS:
            value = getattr(self, name)
            if name not in used and value is not None:
                raise MMCError(f"--{name.rstrip('_')} does not apply to method '{self.method}' "
                               f"(it reads: {', '.join(s.rstrip('_') for s in used) or 'nothing'})")
            if name in used and value is None:
                object.__setattr__(self, name, DEFAULTS[name])
        if self.density is not None and not 0 < self.density <= 1:
            raise MMCError(f"--density must be in (0, 1], got {self.density}")
        if self.drop is not None and not 0 <= self.drop < 1:
            raise MMCError(f"--drop must be in [0, 1), got {self.drop}")

    def settings(self) -> dict:
        """The settings the method reads, by their public names (lambda, not lambda_)."""
        return {name.rstrip("_"): getattr(self, name) for name in METHOD_SETTINGS[self.method]}


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


def _dare(tau: torch.Tensor, experts: Sequence[str], tensor: str, drop: float, seed: int) -> torch.Tensor:
    """Drop each entry of each task vector with probability `drop`; rescale the survivors by 1/(1 − drop)."""
    if drop == 0:
        return tau
    keep = torch.stack([
        torch.rand(tau.shape[1:], dtype=torch.float32,
                   generator=torch.Generator().manual_seed(mask_seed(seed, expert, tensor))) >= drop
        for expert in experts])
    return tau * keep.to(tau.device) / (1 - drop)


def _trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Keep each task vector's `density` share of entries of largest magnitude (at least one), as TIES."""
    if density >= 1:
        return tau
    flat = tau.reshape(len(tau), -1)
    keep = max(1, int(density * flat.shape[1]))  # mergekit's count, so parity holds entry for entry
    mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, flat.abs().topk(keep, dim=1).indices, True)
    return (flat * mask).reshape(tau.shape)


def _disjoint_mean(tau: torch.Tensor) -> torch.Tensor:
    """TIES: elect each entry's sign (sign of the sum, + on zero), average the entries that agree with it."""
    elected = torch.where(tau.sum(0) >= 0, 1.0, -1.0).to(tau.dtype)
    agrees = torch.sign(tau) == elected
    return (tau * agrees).sum(0) / agrees.sum(0).clamp(min=1)


def _merge_tensor(base: torch.Tensor, experts: torch.Tensor, names: Sequence[str], tensor: str,
                  spec: MergeSpec) -> torch.Tensor:
    if spec.method == "average":
        return experts.to(WORK_DTYPE).mean(0)
    base = base.to(WORK_DTYPE)
    tau = experts.to(WORK_DTYPE) - base
    if spec.method == "task_arithmetic":
        delta = tau.sum(0)
    elif spec.method == "ties":
        delta = _disjoint_mean(_trim(tau, spec.density))
    elif spec.method == "dare":
        delta = _dare(tau, names, tensor, spec.drop, spec.seed).sum(0)
    else:  # dare_ties
        delta = _disjoint_mean(_dare(tau, names, tensor, spec.drop, spec.seed))
    return base + spec.lambda_ * delta


def merge(stack: ExpertStack, spec: MergeSpec, experts: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Merge a subset of the stacked experts (all by default; order does not matter) into a new state dict.

    Floating-point tensors are merged (in float64, then cast to the base's dtype, on the stack's device);
    other tensors are the base's own; tied names share one merged tensor.
    """
    chosen = list(stack.names) if experts is None else list(experts)
    if not chosen or len(set(chosen)) != len(chosen) or not set(chosen) <= set(stack.names):
        raise MMCError(f"cannot merge experts {chosen}: give distinct names among {', '.join(stack.names)}")
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


MERGEKIT_METHODS = {"average": "linear", "task_arithmetic": "task_arithmetic", "ties": "ties",
                    "dare": "dare_linear", "dare_ties": "dare_ties"}
MERGEKIT_NOTE = """\
# mergekit configuration equivalent to `mmc merge --method {method}`; run: mergekit-yaml THIS_FILE OUT_DIR
# (paths as given to mmc merge). average, task_arithmetic and ties give mmc's merge to float rounding with
# these settings (weight 1 per expert, normalize as written). DARE differs in two conventions: mergekit
# draws its masks from torch's global generator (mergekit-yaml --random-seed S), and its `rescale` restores
# each task vector's L1 norm per tensor where mmc divides by 1 - drop (unbiased entry by entry).
"""


def mergekit_config(base: str, experts: Sequence[str], spec: MergeSpec, dtype: str = "float32") -> dict:
    """The mergekit configuration (a dict for YAML) that performs the same merge as `spec`."""
    parameters = {"weight": 1.0}
    if spec.method == "ties":
        parameters["density"] = spec.density
    elif spec.method in ("dare", "dare_ties"):
        parameters["density"] = 1 - spec.drop
    config = {"merge_method": MERGEKIT_METHODS[spec.method]}
    if spec.method != "average":  # mergekit's linear would add a base model to the average
        config["base_model"] = base
    config["models"] = [{"model": expert, "parameters": dict(parameters)} for expert in experts]
    shared = {"normalize": spec.method in ("average", "ties", "dare_ties")}
    if spec.method in ("dare", "dare_ties"):
        shared["rescale"] = True
    if spec.method != "average":
        shared["lambda"] = spec.lambda_
    config["parameters"] = shared
    config["dtype"] = "float32"
    config["out_dtype"] = dtype
    return config


def expert_names(paths: Sequence[str]) -> list[str]:
    """Experts are named by their directory (the domain, for data/experts/<base>/<domain>), else by path."""
    names = [Path(path).name or str(path) for path in paths]
    return names if len(set(names)) == len(names) else [str(path) for path in paths]


def merge_models(base: str, experts: Sequence[str], spec: MergeSpec, out: str | Path, *, dtype: str = "float32",
                 mergekit_yaml: str | Path | None = None) -> dict:
    """What `mmc merge` does: merge expert directories into `base` and save the result, atomically.

    `out` becomes a Hugging Face model directory with the base's tokenizer plus `mmc_merge.json` (method,
    settings, inputs); `mergekit_yaml`, when given, gets the equivalent mergekit configuration.
    Returns the content of `mmc_merge.json`.
    """
    from mmc.losses import load_model, resolve_dtype
    from mmc.store import atomic_path
    from mmc.zoo import save_model

    if len(set(experts)) != len(experts):
        raise MMCError("an expert is given twice in --experts")
    out_dtype = resolve_dtype(dtype, torch.device("cpu"))
    loaded = load_model(base, device="cpu", dtype="float32")  # merged in float64 from exact float32 copies
    base_state = loaded.model.state_dict()
    expert_states = {}
    for name, path in zip(expert_names(experts), experts):
        expert = load_model(path, device="cpu", dtype="float32").model
        if expert.config.model_type != loaded.model.config.model_type:
            raise MMCError(f"expert '{path}' is a {expert.config.model_type} model, the base "
                           f"'{base}' a {loaded.model.config.model_type} model; experts must be fine-tunes of it")
        check_expert(path, base_state, expert.state_dict())
        expert_states[name] = expert.state_dict()
    copy_into(loaded.model, merge_state_dicts(base_state, expert_states, spec))
    summary = {"base": base, "experts": list(experts), "expert_names": list(expert_states), "method": spec.method,
               "settings": spec.settings(), "dtype": str(out_dtype).removeprefix("torch."),
               "mmc_version": mmc.__version__}
    with atomic_path(out) as tmp:
        save_model(loaded.model.to(out_dtype), loaded.tokenizer, tmp)
        (tmp / "mmc_merge.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if mergekit_yaml is not None:
        config = mergekit_config(base, experts, spec, summary["dtype"])
        with atomic_path(mergekit_yaml) as tmp:
            tmp.write_text(MERGEKIT_NOTE.format(method=spec.method) + yaml.safe_dump(config, sort_keys=False),
                           encoding="utf-8")
    return summary


# ---------------------------------------------------------------------------------------------
# Sweeps: every subset size k of a base's experts, every method, scored per sample (the merge stage)


def expert_subsets(n_experts: int, max_subsets_per_k: int, seed: int) -> list[tuple[int, ...]]:
    """Every subset of the experts for each size k = 1..n, or `max_subsets_per_k` seeded draws where C(n, k) is
    larger (without replacement, from a generator seeded with (seed, k): one k's draws do not move another's)."""
    if max_subsets_per_k < 1:
        raise MMCError(f"--max-subsets-per-k must be at least 1 (got {max_subsets_per_k})")
    subsets = []
    for k in range(1, n_experts + 1):
        every = list(itertools.combinations(range(n_experts), k))
        if len(every) > max_subsets_per_k:
            chosen = np.random.default_rng([seed, k]).choice(len(every), size=max_subsets_per_k, replace=False)
            every = [every[i] for i in np.sort(chosen)]
        subsets.extend(every)
    return subsets


def first_per_domain(samples, docs_per_domain: int | None):
    """The first `docs_per_domain` samples of each domain (all for None), in the split's order."""
    if docs_per_domain is None:
        return samples
    domains = pd.Series(samples["domain"])
    return samples.select(np.flatnonzero(domains.groupby(domains).cumcount().to_numpy() < docs_per_domain))


def merge_sweep(base: str, experts: Mapping[str, str | Path], data_dir: str | Path, specs: Sequence[MergeSpec], *,
                max_subsets_per_k: int, seed: int, docs_per_domain: int | None = None, batch_tokens: int = 16384,
                device: str = "auto", progress: bool | None = None) -> xr.Dataset:
    """Merge chosen subsets of a base's `experts` (domain -> model directory) with every spec; score each merge.

    The base is loaded once; each merge is copied into it and the eval samples (`docs_per_domain` of every
    domain, expert domains and held-out ones alike) are scored with the loss engine. The first row is the base
    itself (method `base`, k = 0). Returns per-sample losses over (merge, sample) with merge coords method, k
    and experts (comma-joined domains), sample coords domain and n_bytes; attrs name the base, its parameter
    counts and the expert domains.
    """
    from mmc.corpus import fingerprint, load_samples
    from mmc.losses import count_parameters, load_model, sample_bytes, score_texts

    samples = first_per_domain(load_samples(data_dir), docs_per_domain)
    if "domain" not in samples.column_names:
        raise MMCError(f"dataset '{data_dir}' has no 'domain' column: merges are scored per domain")
    missing = sorted(set(experts) - set(samples["domain"]))
    if missing:
        raise MMCError(f"the eval split has no samples of expert domain(s) {', '.join(missing)}")
    loaded = load_model(base, device=device, dtype="float32")
    states = {domain: load_model(str(path), device=device, dtype="float32").model.state_dict()
              for domain, path in experts.items()}
    stack = stack_experts(loaded.model.state_dict(), states)
    domains = list(experts)
    runs = [("base", ())] + [(spec, subset) for spec in specs
                             for subset in expert_subsets(len(domains), max_subsets_per_k, seed)]
    texts = list(samples["text"])
    nll = np.empty((len(runs), len(texts)))
    n_tokens = np.empty((len(runs), len(texts)), dtype=np.int64)
    bar = tqdm(runs, desc=f"merge {Path(base).name}", unit="merge", disable=None if progress is None else not progress)
    for row, (spec, subset) in enumerate(bar):
        copy_into(loaded.model, stack.base if spec == "base" else merge(stack, spec, [domains[i] for i in subset]))
        nll[row], n_tokens[row] = score_texts(loaded, texts, batch_tokens=batch_tokens, progress=False)
    n_params, n_params_nonembedding = count_parameters(loaded.model)
    return xr.Dataset(
        {"nll": (("merge", "sample"), nll, {"units": "nats"}), "n_tokens": (("merge", "sample"), n_tokens)},
        coords={
            "merge": np.arange(len(runs)),
            "method": ("merge", np.array(["base" if spec == "base" else spec.method for spec, _ in runs], dtype=object)),
            "k": ("merge", np.array([len(subset) for _, subset in runs])),
            "experts": ("merge", np.array([",".join(domains[i] for i in subset) for _, subset in runs], dtype=object)),
            "sample": np.asarray(samples["sample_id"], dtype=object),
            "domain": ("sample", np.asarray(samples["domain"], dtype=object)),
            "n_bytes": ("sample", sample_bytes(samples)),
        },
        attrs={"base": base, "n_params": int(n_params), "n_params_nonembedding": int(n_params_nonembedding),
               "expert_domains": ",".join(domains),
               "methods": json.dumps({spec.method: spec.settings() for spec in specs}, sort_keys=True),
               "max_subsets_per_k": max_subsets_per_k, "seed": seed,
               "dataset_fingerprint": fingerprint(list(samples["sample_id"]), texts), "mmc_version": mmc.__version__},
    )


def _strings(array: xr.DataArray) -> np.ndarray:
    """A string coordinate as a plain numpy unicode array, whatever string dtype Zarr gave it."""
    return np.array(array.values.tolist(), dtype=str)


def merge_points(store: xr.Dataset, weights: np.ndarray | None = None) -> pd.DataFrame:
    """One row per merge of one base: method, k, experts, and its in-domain and cross-domain bits per byte.

    In-domain is the macro-average over the domains that have experts (all of them, whichever k were merged):
    it measures how much of the experts' skills one merged model holds, and falls as k grows, which is what
    the merging law describes. Cross-domain is the macro-average over the eval domains without an expert
    (transfer to held-out domains; NaN when there are none). `merged_domains_bpb`, the macro-average over the
    merged experts' own domains alone, shows the other side of merging (interference: it rises with k) and is
    reported, not fitted. `weights` (samples,) weight
    the samples (a bootstrap resample).
    """
    expert_domains = store.attrs["expert_domains"].split(",")
    domains, codes = np.unique(_strings(store.domain), return_inverse=True)
    one_hot = np.eye(len(domains))[codes] * (1.0 if weights is None else weights[:, None])
    held_in = np.isin(domains, expert_domains)
    experts = _strings(store.experts)
    merged = pd.Series(experts).str.get_dummies(sep=",").reindex(columns=domains, fill_value=0).to_numpy(bool)
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample can leave a domain without samples: NaN
        per_domain = (store.nll.values @ one_hot) / ((store.n_bytes.values.astype(np.float64) @ one_hot) * math.log(2))
        return pd.DataFrame({
            "base": store.attrs["base"], "n_params": store.attrs["n_params"],
            "method": _strings(store.method), "k": store.k.values, "experts": experts,
            "in_domain_bpb": np.nanmean(per_domain[:, held_in], axis=1),
            "cross_domain_bpb": np.nanmean(per_domain[:, ~held_in], axis=1) if (~held_in).any() else np.nan,
            "merged_domains_bpb": np.nanmean(np.where(merged, per_domain, np.nan), axis=1),
        })


def merge_curves(points: pd.DataFrame) -> pd.DataFrame:
    """Mean, spread and count over expert subsets of each loss (in-domain, cross-domain, merged domains), per base,
    method and k."""
    merges = points[points.method != "base"]
    losses = ["in_domain_bpb", "cross_domain_bpb", "merged_domains_bpb"]
    curves = merges.groupby(["base", "n_params", "method", "k"], sort=True)[losses] \
        .agg(["mean", "std", "count"])
    curves.columns = [f"{name}_{stat}" for name, stat in curves.columns]
    return curves.reset_index()



def fit_merge_laws(paths: Sequence[str | Path], *, bootstrap: int, seed: int, holdout_k: int = 2
                   ) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    """The merge-law stage: points and curves of every base's sweep, and the law fitted per method and jointly.

    Bootstrap resamples give every eval sample a Poisson(1) weight (the same for every base: the sweeps score
    the same samples) and recompute the curves, so the intervals carry the eval set's sampling noise.
    Returns the metrics (fits per method and `joint` over methods, for in-domain and cross-domain loss; the
    spread over subsets by k), the points (one row per merge) and the curves (one row per base, method, k).
    """
    from mmc.laws import fit_merging_law
    from mmc.store import open_store

    stores = [open_store(path) for path in paths]
    for path, store in zip(paths, stores):
        if not np.array_equal(store.sample.values, stores[0].sample.values):
            raise MMCError(f"merge store '{path}' scored other samples than '{paths[0]}'; rerun its merge stage")
    points = pd.concat([merge_points(store) for store in stores], ignore_index=True)
    curves = merge_curves(points)
    n_samples = stores[0].sizes["sample"]
    rng = np.random.default_rng(seed)
    replicate_curves = []
    for _ in tqdm(range(bootstrap), desc="bootstrap merge curves", unit="resample", disable=None):
        weights = rng.poisson(1.0, n_samples).astype(np.float64)
        replicate_curves.append(merge_curves(pd.concat([merge_points(s, weights) for s in stores], ignore_index=True)))
    fits: dict = {}
    for method in [*dict.fromkeys(curves.method), "joint"]:
        def rows(frame, method=method):
            return frame if method == "joint" else frame[frame.method == method]
        fits[method] = {}
        for target, column in (("in_domain", "in_domain_bpb_mean"), ("cross_domain", "cross_domain_bpb_mean")):
            if rows(curves)[column].isna().all():
                continue
            try:
                fits[method][target] = fit_merging_law(rows(curves), column, [rows(c) for c in replicate_curves],
                                                       seed=seed, holdout_k=holdout_k)
            except MMCError as error:
                fits[method][target] = {"error": str(error)}
    spread = curves.groupby("k")[["in_domain_bpb_std", "cross_domain_bpb_std"]].mean()
    metrics = {
        "loss": "bits per byte, macro-averaged over domains: in_domain over the expert domains, cross_domain over "
                "the eval domains without an expert; the loss at (N, k) is the mean over the k-subsets merged",
        "law": "merging: L = L_star + B * N^(-beta) + A0 * N^(-gamma) / (k + b), N = base parameters",
        "bootstrap": {"resamples": bootstrap, "over": "eval samples (Poisson weights)"},
        "bases": {"names": [s.attrs["base"] for s in stores], "n_params": [int(s.attrs["n_params"]) for s in stores]},
        "expert_domains": stores[0].attrs["expert_domains"].split(","),
        "fits": fits,
        "spread_over_subsets_by_k": {int(k): {name.removesuffix("_bpb_std"): (None if np.isnan(v) else float(v))
                                              for name, v in row.items()} for k, row in spread.iterrows()},
    }
    return metrics, points, curves
