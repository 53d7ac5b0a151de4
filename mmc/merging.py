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
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

import mmc
from mmc import MMCError, check_number, did_you_mean
from mmc.losses import load_model, resolve_dtype, save_model
from mmc.store import atomic_path, check_outputs

WORK_DTYPE = torch.float64


@dataclass(frozen=True)
class Setting:
    """A merge setting: its public name (CLI flag `--NAME`, params key, `name=value` in a method spec), default
    and allowed range (open or closed at each end; every value must be finite)."""

    name: str
    default: float
    low: float
    high: float
    help: str
    low_open: bool = False
    high_open: bool = False
    integer: bool = False

    def check(self, value: float) -> float | int:
        return check_number(f"--{self.name}", value, self.low, self.high, low_open=self.low_open,
                            high_open=self.high_open, integer=self.integer)


SETTINGS: dict[str, Setting] = {setting.name: setting for setting in (
    Setting("density", 0.2, 0.0, 1.0, "share of each task vector's entries kept, per tensor (TIES: top 20%%)",
            low_open=True),
    Setting("gamma", 0.01, 0.0, 1.0, "share of each task vector's largest entries removed as outliers", high_open=True),
    Setting("drop", 0.9, 0.0, 1.0, "probability of dropping a task vector entry (DARE: 0.9)", high_open=True),
    Setting("lambda", 1.0, -math.inf, math.inf, "scale of the merged task vector"),
    Setting("seed", 0, 0, 2**63 - 1, "seed of the random drop masks", integer=True),
)}


@dataclass(frozen=True)
class Method:
    """A merge method as mergekit's generalised task arithmetic sees it: a sparsifier of each expert's task vector
    (SPARSIFIERS), a consensus rule (`sign`: TIES's sign election keeps the entries that agree with it, or none),
    and a normalisation (`mean`: divide by the number of experts contributing to each entry, `sum`: none), scaled
    by lambda and added to the base. `on_task_vectors=False` merges the weights themselves (mergekit's linear)."""

    name: str
    sparsifier: str
    consensus: str | None
    normalise: str
    settings: tuple[str, ...]
    mergekit: str
    summary: str
    on_task_vectors: bool = True

    def __post_init__(self) -> None:
        unknown = [name for name in self.settings if name not in SETTINGS]
        if self.sparsifier not in SPARSIFIERS or self.consensus not in (None, "sign") or \
                self.normalise not in ("mean", "sum") or unknown:
            raise ValueError(f"merge method {self.name}: bad definition")


# One row per merge method (arXiv 2509.24244 merges every expert with the same weight).
METHODS: dict[str, Method] = {}  # filled below, once the sparsifiers exist


@dataclass(frozen=True, init=False)
class MergeSpec:
    """A merge method and its settings: `MergeSpec("ties", density=0.3, lambda_=0.8)` (lambda_ or "lambda").

    Settings the method does not read are refused; those it reads and are not given take their defaults.
    """

    method: str
    values: tuple[tuple[str, float], ...]

    def __init__(self, method: str, **settings: float | None) -> None:
        if method not in METHODS:
            raise MMCError(f"unknown merge method '{method}'{did_you_mean(method, METHODS)}; choose one of "
                           f"{', '.join(METHODS)}")
        reads = METHODS[method].settings
        given = {name.rstrip("_"): value for name, value in settings.items() if value is not None}
        for name in given:
            if name not in reads:
                raise MMCError(f"--{name} does not apply to method '{method}'{did_you_mean(name, reads)} (it reads: "
                               f"{', '.join(reads) or 'nothing'})")
        values = tuple((name, SETTINGS[name].check(given.get(name, SETTINGS[name].default))) for name in reads)
        object.__setattr__(self, "method", method)
        object.__setattr__(self, "values", values)

    @classmethod
    def parse(cls, text: str, **defaults: float) -> MergeSpec:
        """`ties:density=0.2,lambda=1` (or a bare method name); `defaults` fill settings the text leaves out and the
        method reads (the sweep's seed)."""
        name, _, rest = text.partition(":")
        name = name.strip()
        reads = METHODS[name].settings if name in METHODS else ()
        settings = {key: value for key, value in defaults.items() if key in reads}
        for item in filter(None, (part.strip() for part in rest.split(","))):
            key, sep, value = item.partition("=")
            try:
                settings[key.strip()] = float(value)
            except ValueError:
                raise MMCError(f"merge method '{text}': give settings as name=number, e.g. ties:density=0.2") from None
            if not sep:
                raise MMCError(f"merge method '{text}': give settings as name=number, e.g. ties:density=0.2")
        return cls(name.strip(), **settings)

    def __getattr__(self, name: str) -> float:
        for key, value in object.__getattribute__(self, "values"):
            if key == name.rstrip("_"):
                return value
        raise AttributeError(name)

    def __getitem__(self, name: str) -> float:
        return dict(self.values)[name]

    def settings(self) -> dict:
        """The settings the method reads, by their public names."""
        return dict(self.values)

    def __str__(self) -> str:
        return self.method + (":" + ",".join(f"{k}={v:g}" for k, v in self.values) if self.values else "")


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


def merge_specs(methods: Mapping[str, Mapping[str, float] | None]) -> list[MergeSpec]:
    """The specs of params `merging.methods` (method -> its settings, null for the defaults), each checked: an
    unknown method or setting, or a value out of range, is an MMCError naming its key."""
    specs = []
    for name, settings in methods.items():
        try:
            specs.append(MergeSpec(name, **(settings or {})))
        except (MMCError, TypeError) as error:
            raise MMCError(f"merging.methods.{name}: {error}") from None
    return specs


def _random_drop(tau: torch.Tensor, spec: MergeSpec, experts: Sequence[str], tensor: str) -> torch.Tensor:
    """DARE: drop each entry of each task vector with probability `drop`; rescale the survivors by 1/(1 − drop)."""
    if spec.drop == 0:
        return tau
    keep = torch.stack([
        torch.rand(tau.shape[1:], dtype=torch.float32,
                   generator=torch.Generator().manual_seed(mask_seed(spec.seed, expert, tensor))) >= spec.drop
        for expert in experts])
    return tau * keep.to(tau.device) / (1 - spec.drop)


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
}

METHODS.update((method.name, method) for method in (
    Method("average", "none", None, "mean", (), "linear", "the mean of the experts' weights",
           on_task_vectors=False),
    Method("task_arithmetic", "none", None, "sum", ("lambda",), "task_arithmetic",
           "base + lambda * the sum of the task vectors (Ilharco et al.)"),
    Method("ties", "magnitude", "sign", "mean", ("density", "lambda"), "ties",
           "trim each task vector to its top --density by magnitude, elect signs, disjoint mean, times lambda"),
    Method("dare", "random", None, "sum", ("drop", "lambda", "seed"), "dare_linear",
           "drop task vector entries with probability --drop, rescale by 1/(1-drop), sum, times lambda"),
    Method("dare_ties", "random", "sign", "mean", ("drop", "lambda", "seed"), "dare_ties",
           "DARE's drop, then TIES's sign election and disjoint mean, times lambda"),
    Method("breadcrumbs", "magnitude_outliers", None, "sum", ("density", "gamma", "lambda"), "breadcrumbs",
           "drop each task vector's top --gamma outliers, keep the next --density by magnitude, sum, times lambda"),
))


def _merge_tensor(base: torch.Tensor, experts: torch.Tensor, names: Sequence[str], tensor: str,
                  spec: MergeSpec) -> torch.Tensor:
    method = METHODS[spec.method]
    if not method.on_task_vectors:
        return experts.to(WORK_DTYPE).mean(0)
    base = base.to(WORK_DTYPE)
    tau = SPARSIFIERS[method.sparsifier](experts.to(WORK_DTYPE) - base, spec, names, tensor)
    if method.consensus == "sign":  # elect each entry's sign (that of the sum, + on zero); keep the agreeing
        agrees = torch.sign(tau) == torch.where(tau.sum(0) >= 0, 1.0, -1.0).to(tau.dtype)
        tau = tau * agrees
        count = agrees.sum(0).clamp(min=1)
    else:
        count = torch.tensor(float(len(tau)), dtype=WORK_DTYPE)
    delta = tau.sum(0) / count if method.normalise == "mean" else tau.sum(0)
    return base + spec["lambda"] * delta if "lambda" in method.settings else base + delta


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


MERGEKIT_NOTE = """\
# mergekit configuration equivalent to `mmc merge --method {method}`; run: mergekit-yaml THIS_FILE OUT_DIR
# (paths as given to mmc merge). average, task_arithmetic, ties and breadcrumbs give mmc's merge to float
# rounding with these settings (weight 1 per expert, normalize as written). DARE differs in two conventions:
# mergekit draws its masks from torch's global generator (mergekit-yaml --random-seed S), and its `rescale`
# restores each task vector's L1 norm per tensor where mmc divides by 1 - drop (unbiased entry by entry).
"""


def mergekit_config(base: str, experts: Sequence[str], spec: MergeSpec, dtype: str = "float32") -> dict:
    """The mergekit configuration (a dict for YAML) that performs the same merge as `spec`, read off its Method."""
    method, settings = METHODS[spec.method], spec.settings()
    parameters: dict = {"weight": 1.0}
    if "density" in settings:
        parameters["density"] = settings["density"]
    if "drop" in settings:
        parameters["density"] = 1 - settings["drop"]
    if "gamma" in settings:
        parameters["gamma"] = settings["gamma"]
    config: dict = {"merge_method": method.mergekit}
    if method.on_task_vectors:  # mergekit's linear would add a base model to the average
        config["base_model"] = base
    config["models"] = [{"model": expert, "parameters": dict(parameters)} for expert in experts]
    shared: dict = {"normalize": method.normalise == "mean"}
    if method.sparsifier == "random":
        shared["rescale"] = True
    if "lambda" in settings:
        shared["lambda"] = settings["lambda"]
    config["parameters"] = shared
    config["dtype"] = "float32"
    config["out_dtype"] = dtype
    return config


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
