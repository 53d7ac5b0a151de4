"""The merge methods, declared: their settings, what each combines and how, the numbers of experts it merges and
its mergekit equivalent; checked specs (`MergeSpec`) and the mergekit configuration of a merge.

No tensors here (they are `mmc.merging`'s): the command line and the params check read the methods without
importing torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from mmc import MMCError, check_number, did_you_mean

# The tensor functions of mmc.merging by name: its SPARSIFIERS and COMBINERS hold one for each name here.
SPARSIFIER_NAMES = ("none", "magnitude", "random", "magnitude_outliers", "magnitude_prune")
RANDOM_SPARSIFIERS = ("random", "magnitude_prune")  # seeded per expert and tensor; they read `seed`
COMBINER_NAMES = ("linear", "task_arithmetic", "slerp", "nuslerp", "multislerp", "karcher", "model_stock", "sce",
                  "nearswap", "ram")
DEFAULT_SWEEP = ("average", "task_arithmetic", "ties", "dare")  # the four methods of arXiv 2509.24244


@dataclass(frozen=True)
class Setting:
    """A merge setting: its public name (CLI flag `--NAME`, params key, `name=value` in a method spec), default
    and allowed range (open or closed at each end; every value must be finite), and how mergekit spells it:
    `mergekit` its parameter (None: mergekit has none), `per_model` whether it is given per model (else shared),
    `to_mergekit` the value mergekit takes (DARE's keep share is 1 - drop)."""

    name: str
    default: float
    low: float
    high: float
    help: str
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    mergekit: str | None = None
    per_model: bool = False
    to_mergekit: Callable[[float], float] = float

    def check(self, value: float) -> float | int:
        return check_number(f"--{self.name}", value, self.low, self.high, low_open=self.low_open,
                            high_open=self.high_open, integer=self.integer)


SETTINGS: dict[str, Setting] = {setting.name: setting for setting in (
    Setting("density", 0.2, 0.0, 1.0, "share of each task vector's entries kept, per tensor (TIES: top 20%; "
            "DELLA: the mean keep probability)", low_open=True, mergekit="density", per_model=True),
    Setting("gamma", 0.01, 0.0, 1.0, "share of each task vector's largest entries removed as outliers", high_open=True,
            mergekit="gamma", per_model=True),
    Setting("drop", 0.9, 0.0, 1.0, "probability of dropping a task vector entry (DARE: 0.9)", high_open=True,
            mergekit="density", per_model=True, to_mergekit=lambda drop: 1 - drop),
    Setting("epsilon", 0.15, 0.0, 1.0, "spread of DELLA's keep probabilities: density - epsilon for a row's smallest "
            "entry up to density + epsilon for its largest", high_open=True, mergekit="epsilon", per_model=True),
    Setting("lambda", 1.0, -math.inf, math.inf, "scale of the merged task vector", mergekit="lambda"),
    Setting("t", 0.5, 0.0, 1.0, "interpolation from the first expert (0) to the second (1)", mergekit="t"),
    Setting("select_topk", 0.1, 0.0, 1.0, "share of entries kept where the experts' task vectors vary most (SCE)",
            low_open=True, mergekit="select_topk"),
    Setting("threshold", 1e-4, 0.0, math.inf, "distance below which an entry takes the second expert's value; "
            "farther entries move by threshold/distance of the way (nearswap's t)", mergekit="t"),
    Setting("min_change", 1e-5, 0.0, math.inf, "smallest |task vector entry| that counts as a change (RAM)",
            mergekit="epsilon"),
    Setting("boost_rate", 0.1, 0.0, math.inf, "RAM+: each expert's unique changes are scaled by 1 + boost_rate * "
            "min(its shared/unique ratio, boost_cap)", mergekit="r"),
    Setting("boost_cap", 0.2, 0.0, math.inf, "RAM+: the cap of the shared/unique ratio in the boost", mergekit="alpha"),
    Setting("seed", 0, 0, 2**63 - 1, "seed of the random drop masks", integer=True),
)}


@dataclass(frozen=True)
class Method:
    """A merge method, declared once: how it combines the experts' tensors (`combine`, one of COMBINER_NAMES), the
    settings it reads, the numbers of experts k it is defined for (`k_min`..`k_max`, None: no upper bound), its
    mergekit equivalent, and a cross-setting `check` (an error message, or "").

    `task_arithmetic` methods are mergekit's generalised task arithmetic: a sparsifier of each task vector
    (SPARSIFIER_NAMES), a consensus rule (`sign`: TIES's sign election keeps the entries that agree with it, or none),
    and a normalisation (`mean`: divide by the number of experts contributing to each entry, `sum`: none), scaled
    by lambda and added to the base. Other combiners set their own coefficients or combine geometrically.
    `mergekit_base` is mergekit's base_model: the base, the first expert (two-model methods that interpolate
    from one model to the other), or none (methods of the weights alone); `mergekit_weight`: mergekit reads a
    weight per model (1 each)."""

    name: str
    combine: str
    settings: tuple[str, ...]
    mergekit: str
    summary: str
    sparsifier: str = "none"
    consensus: str | None = None
    normalise: str = "sum"
    k_min: int = 1
    k_max: int | None = None
    mergekit_base: str | None = "base"
    mergekit_weight: bool = True
    check: Callable[[Mapping[str, float]], str] = lambda settings: ""

    def __post_init__(self) -> None:
        unknown = [name for name in self.settings if name not in SETTINGS]
        arithmetic = self.combine == "task_arithmetic"
        if self.combine not in COMBINER_NAMES or self.sparsifier not in SPARSIFIER_NAMES or \
                self.consensus not in (None, "sign") or self.normalise not in ("mean", "sum") or unknown or \
                (not arithmetic and (self.sparsifier, self.consensus) != ("none", None)) or \
                self.k_min < 1 or (self.k_max is not None and self.k_max < self.k_min) or \
                self.mergekit_base not in ("base", "first expert", None):
            raise ValueError(f"merge method {self.name}: bad definition")

    def k_text(self) -> str:
        """The numbers of experts it merges, in words: `any number of`, `exactly 2`, `at least 2`."""
        if self.k_max is None:
            return "any number of" if self.k_min == 1 else f"at least {self.k_min}"
        return f"exactly {self.k_min}" if self.k_min == self.k_max else f"{self.k_min} to {self.k_max}"

    def accepts(self, k: int) -> bool:
        return self.k_min <= k and (self.k_max is None or k <= self.k_max)

    def mergekit_parameters(self, settings: Mapping[str, float]) -> dict:
        """mergekit's shared parameters for these settings: the generalised task arithmetic's (and linear's)
        `normalize` and `rescale` spelled out (mergekit's defaults differ by method), then the shared settings."""
        fixed: dict = {}
        if self.combine in ("task_arithmetic", "linear"):
            fixed["normalize"] = self.normalise == "mean"
        if self.sparsifier in RANDOM_SPARSIFIERS:
            fixed["rescale"] = True
        return fixed | {SETTINGS[name].mergekit: SETTINGS[name].to_mergekit(value) for name, value in settings.items()
                        if SETTINGS[name].mergekit and not SETTINGS[name].per_model}


def _della_check(settings: Mapping[str, float]) -> str:
    density, epsilon = settings["density"], settings["epsilon"]
    if density < 1 and not (0 < density - epsilon and density + epsilon < 1):
        return (f"--density {density:g} ± --epsilon {epsilon:g} must lie in (0, 1) (the keep probabilities; "
                f"a density of 1 keeps everything)")
    return ""


# Every merge method, declared once (arXiv 2509.24244 merges every expert with the same weight).
METHODS: dict[str, Method] = {method.name: method for method in (
    Method("average", "linear", (), "linear", "the mean of the experts' weights", normalise="mean",
           mergekit_base=None),
    Method("task_arithmetic", "task_arithmetic", ("lambda",), "task_arithmetic",
           "base + lambda * the sum of the task vectors (Ilharco et al.)"),
    Method("ties", "task_arithmetic", ("density", "lambda"), "ties",
           "trim each task vector to its top --density by magnitude, elect signs, disjoint mean, times lambda",
           sparsifier="magnitude", consensus="sign", normalise="mean"),
    Method("dare", "task_arithmetic", ("drop", "lambda", "seed"), "dare_linear",
           "drop task vector entries with probability --drop, rescale by 1/(1-drop), sum, times lambda",
           sparsifier="random"),
    Method("dare_ties", "task_arithmetic", ("drop", "lambda", "seed"), "dare_ties",
           "DARE's drop, then TIES's sign election and disjoint mean, times lambda",
           sparsifier="random", consensus="sign", normalise="mean"),
    Method("breadcrumbs", "task_arithmetic", ("density", "gamma", "lambda"), "breadcrumbs",
           "drop each task vector's top --gamma outliers, keep the next --density by magnitude, sum, times lambda",
           sparsifier="magnitude_outliers"),
    Method("breadcrumbs_ties", "task_arithmetic", ("density", "gamma", "lambda"), "breadcrumbs_ties",
           "Breadcrumbs' outlier cut and trim, then TIES's sign election and disjoint mean, times lambda",
           sparsifier="magnitude_outliers", consensus="sign", normalise="mean"),
    Method("della", "task_arithmetic", ("density", "epsilon", "lambda", "seed"), "della",
           "keep entries with probability --density +/- --epsilon by magnitude rank per row, rescale by 1/p, "
           "elect signs, disjoint mean, times lambda (DELLA)",
           sparsifier="magnitude_prune", consensus="sign", normalise="mean", check=_della_check),
    Method("della_linear", "task_arithmetic", ("density", "epsilon", "lambda", "seed"), "della_linear",
           "DELLA's magnitude-ranked random drop and 1/p rescale, sum, times lambda",
           sparsifier="magnitude_prune", check=_della_check),
    Method("slerp", "slerp", ("t",), "slerp",
           "two experts: spherical interpolation of their weights by --t, each tensor flattened",
           k_min=2, k_max=2, mergekit_base="first expert", mergekit_weight=False),
    Method("nuslerp", "nuslerp", (), "nuslerp", "two experts: base + the spherical midpoint of their task vectors",
           k_min=2, k_max=2),
    Method("multislerp", "multislerp", (), "multislerp",
           "base + the spherical barycentre of the task vectors, scaled to their mean norm"),
    Method("karcher", "karcher", (), "karcher",
           "the Karcher mean of the experts' weights on the sphere, scaled to their mean norm",
           mergekit_base=None, mergekit_weight=False),
    Method("model_stock", "model_stock", (), "model_stock",
           "two or more experts: base + t * the mean task vector, t set by the mean angle between task vectors",
           k_min=2, mergekit_weight=False),
    Method("sce", "sce", ("select_topk",), "sce",
           "keep the --select_topk entries of most variance across experts, elect signs, mean weighted by each "
           "task vector's mean square", mergekit_weight=False),
    Method("nearswap", "nearswap", ("threshold",), "nearswap",
           "two experts: the first, with entries within --threshold of the second's swapped for the second's",
           k_min=2, k_max=2, mergekit_base="first expert", mergekit_weight=False),
    Method("ram", "ram", ("min_change",), "ram",
           "entries changed (|task vector| > --min_change) by one expert keep its change, by several their mean",
           mergekit_weight=False),
    Method("ramplus_tl", "ram", ("min_change", "boost_rate", "boost_cap"), "ramplus_tl",
           "RAM, each expert's unique changes scaled by 1 + boost_rate * min(shared/unique, boost_cap)",
           mergekit_weight=False),
)}


@dataclass(frozen=True, init=False)
class MergeSpec:
    """A merge method and its settings: `MergeSpec("ties", density=0.3, lambda_=0.8)` (lambda_ or "lambda").

    Settings the method does not read are refused; those it reads and are not given take their defaults; the
    method's own check runs on the result (DELLA's keep probabilities must lie in (0, 1)).
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
        problem = METHODS[method].check(dict(values))
        if problem:
            raise MMCError(f"method '{method}': {problem}")
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


MERGEKIT_NOTE = """\
# mergekit configuration equivalent to `mmc merge --method {method}`; run: mergekit-yaml THIS_FILE OUT_DIR
# (paths as given to mmc merge). Every deterministic method gives mmc's merge to float rounding with these
# settings (weight 1 per expert where mergekit reads one, normalize as written; slerp and nearswap take the
# first expert as base_model). The random ones (dare, dare_ties, della, della_linear) differ in two
# conventions: mergekit draws its masks from torch's global generator (mergekit-yaml --random-seed S), and its
# `rescale` restores each task vector's L1 norm per tensor where mmc divides each survivor by its keep
# probability (unbiased entry by entry).
"""


def mergekit_config(base: str, experts: Sequence[str], spec: MergeSpec, dtype: str = "float32") -> dict:
    """The mergekit configuration (a dict for YAML) that performs the same merge as `spec`, read off its Method
    and its settings' declarations."""
    method, settings = METHODS[spec.method], spec.settings()
    per_model: dict = {"weight": 1.0} if method.mergekit_weight else {}
    per_model |= {SETTINGS[name].mergekit: SETTINGS[name].to_mergekit(value) for name, value in settings.items()
                  if SETTINGS[name].mergekit and SETTINGS[name].per_model}
    config: dict = {"merge_method": method.mergekit}
    if method.mergekit_base:  # mergekit's linear and karcher would merge a base model in with the experts
        config["base_model"] = base if method.mergekit_base == "base" else experts[0]
    config["models"] = [{"model": expert, **({"parameters": dict(per_model)} if per_model else {})}
                        for expert in experts]
    shared = method.mergekit_parameters(settings)
    if shared:
        config["parameters"] = shared
    config["dtype"] = "float32"
    config["out_dtype"] = dtype
    return config
