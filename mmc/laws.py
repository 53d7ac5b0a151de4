"""The fitting engine: scaling laws as named formulas, fitted robustly on log loss, with what the data determine.

Every law here is a sum of positive terms, scale · Π input^(−exponent) [/ (input + offset)], so log L is a
log-sum-exp of terms that are linear in the log-scales and exponents. A fit minimises Σ w·ρ(log L_pred −
log L_obs), ρ Huber's loss with threshold δ (default: 1.345 × the MAD scale of a least-squares fit's residuals,
95% Gaussian efficiency) or squares:

1. grid (variable projection): given the exponents and offsets, the scales enter the loss linearly, so for
   every candidate of a dense grid over the nonlinear parameters they are solved inside (non-negative least
   squares of the relative residuals, active sets enumerated), vectorised over candidates and data sets;
2. polish: the best candidates are refined on the exact objective by a batched Levenberg–Marquardt with IRLS
   weights, the best of them by L-BFGS-B and then Gauss–Newton steps until the step vanishes (the optimum to
   rounding: data that differ in the tenth digit give parameters that agree to about the ninth);
3. what is determined: a profile interval per parameter (the others re-optimised along it; threshold from
   the robust drop-in-dispersion test) flags each parameter identified or not; each bootstrap refit starts from
   the grid's best candidate and from the estimate, the better kept (never from the estimate alone), so a flat
   direction shows as a wide interval, not a zero-width one.

Internally losses and inputs are centred on their geometric means (well conditioned whatever the units);
reported parameters are in the caller's units, unrounded. Points that are one measurement by construction (an
ensemble whose added members win no sample has its best member's loss, bit for bit) are passed as a group: a
group counts as one point, in the objective, the noise scale, the profile's degrees of freedom and the point
bootstrap, so copies can neither pull the curve nor shrink its intervals. Only the caller knows a construction:
equal losses alone are never merged (rounded data hold many equal losses that are separate measurements). A fit
needs at least parameters + 2 measurements.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from mmc import THREADS, MMCError, check_number, in_threads

# fitted log-scales stay within e^±40 of the data's typical loss at its typical inputs
LOG_SCALE_BOUND = 40.0
# polished candidates "agree" when their objectives differ by at most this, relative, or the absolute below
SAME_OPTIMUM_RTOL = 1e-6
SAME_OPTIMUM_ATOL = 1e-12  # an objective this small is a perfect fit (log residuals ~1e-6)
GRID_DENSITY = 41  # grid values per exponent for a fit (offsets: about half as many, denser near 0)
POLISH_KEEP = 5  # best grid candidates polished for a fit
BOOTSTRAP_GRID_DENSITY = 9  # a coarser grid for each bootstrap refit, then LM from its best candidate
BOOTSTRAP_POLISH = {"iterations": 60, "tolerance": 1e-9}  # a percentile needs no 13th digit
# a batch of rows (LM, Gauss–Newton) runs in THREADS parts when each part keeps this many rows and values (× points)
SPLIT_ROWS, SPLIT_VALUES = 8, 200_000
BOOTSTRAP_BLOCK = 250  # resamples refitted together (memory: block × candidates × terms²)
PROFILE_TOLERANCE = 1e-10  # a profile compares objective rises with a threshold: ten digits are plenty
PROFILE_POINTS = 60  # values per parameter along its profile (half each side, denser near the estimate)
REFINE_ITERATIONS = 1000  # Gauss–Newton steps at most after the polish: a few dozen mostly; hundreds where the
# Huber threshold is at its floor (noise-free data: IRLS in the L1 regime converges linearly, slowly)
REFINE_STEP = 1e-13  # a step this small in θ (log-scales, exponents, offsets) is the optimum to rounding
REFINE_ROUNDING = 1e-13  # a rise of the objective this small, relative, is rounding, not a worse point
REFINE_HALVINGS = 30  # a step halved this often without lowering the objective: the optimum, to rounding
HALVING_VALUES = 2**16  # a refused step's halvings are tried this many values (trials × points) at a time
# a term under this share of every point's prediction whose scale a Gauss–Newton step lowers is also tried dropped
DROP_SHARE = 0.05


@dataclass(frozen=True)
class Term:
    """One additive term: scale · Π input^(−exponent), divided by (input + offset) when `shift` is set."""

    scale: str
    powers: tuple[tuple[str, str], ...] = ()  # (input, exponent parameter)
    shift: tuple[str, str] | None = None  # (input, offset parameter)


@dataclass(frozen=True)
class Law:
    name: str
    formula: str
    inputs: tuple[str, ...]
    params: tuple[str, ...]
    bounds: Mapping[str, tuple[float, float]]  # scales are positive, (0, inf)
    terms: tuple[Term, ...]

    def __post_init__(self) -> None:
        used = [p for term in self.terms for p in (term.scale, *(e for _, e in term.powers),
                                                    *(term.shift[1:] if term.shift else ()))]
        if sorted(used) != sorted(self.params) or set(self.bounds) != set(self.params):
            raise ValueError(f"law {self.name}: every parameter must appear in exactly one term and have bounds")

    def kind(self, param: str) -> str:
        """'scale' (fitted as a log), 'exponent' or 'offset'."""
        for term in self.terms:
            if param == term.scale:
                return "scale"
            if term.shift and param == term.shift[1]:
                return "offset"
        return "exponent"

    def to_fitted_scale(self, name: str, values: np.ndarray | float) -> np.ndarray:
        """`values` of parameter `name` on the scale it is fitted on: the log of a (positive) scale, exponents and
        offsets as they are. Intervals built there map back inside the parameter's bounds."""
        values = np.asarray(values, dtype=np.float64)
        return np.log(values) if self.kind(name) == "scale" else values

    def from_fitted_scale(self, name: str, values: np.ndarray | float) -> np.ndarray:
        """The inverse of `to_fitted_scale`."""
        values = np.asarray(values, dtype=np.float64)
        return np.exp(values) if self.kind(name) == "scale" else values

    def predict(self, params: Mapping[str, float], **inputs: np.ndarray | float) -> np.ndarray:
        """The law's loss at `inputs` (arrays broadcast together), in the units the parameters were fitted in."""
        missing = [name for name in (*self.inputs, *self.params) if name not in {**inputs, **params}]
        if missing:
            raise MMCError(f"law {self.name}: missing {', '.join(missing)}")
        total: np.ndarray | float = 0.0
        for term in self.terms:
            value = np.float64(params[term.scale])
            for name, exponent in term.powers:
                value = value * np.asarray(inputs[name], dtype=np.float64) ** -params[exponent]
            if term.shift:
                name, offset = term.shift
                value = value / (np.asarray(inputs[name], dtype=np.float64) + params[offset])
            total = total + value
        return np.asarray(total, dtype=np.float64)


EXPONENT_BOUNDS = (0.0, 3.0)
# the merging amplitude A0·N^-γ may grow with N (γ < 0): the law's shape is tested, not imposed
SIGNED_EXPONENT_BOUNDS = (-3.0, 3.0)
POSITIVE = (0.0, math.inf)

LAWS: dict[str, Law] = {law.name: law for law in (
    Law("power", "L = E + A * x^(-alpha)", ("x",), ("E", "A", "alpha"),
        {"E": POSITIVE, "A": POSITIVE, "alpha": EXPONENT_BOUNDS},
        (Term("E"), Term("A", (("x", "alpha"),)))),
    Law("chinchilla", "L = E + A * N^(-alpha) + B * D^(-beta)", ("N", "D"), ("E", "A", "alpha", "B", "beta"),
        {"E": POSITIVE, "A": POSITIVE, "alpha": EXPONENT_BOUNDS, "B": POSITIVE, "beta": EXPONENT_BOUNDS},
        (Term("E"), Term("A", (("N", "alpha"),)), Term("B", (("D", "beta"),)))),
    Law("merging", "L = L_star + B * N^(-beta) + A0 * N^(-gamma) / (k + b)", ("N", "k"),
        ("L_star", "B", "beta", "A0", "gamma", "b"),
        {"L_star": POSITIVE, "B": POSITIVE, "beta": EXPONENT_BOUNDS, "A0": POSITIVE, "gamma": SIGNED_EXPONENT_BOUNDS,
         "b": (-0.99, 50.0)},
        (Term("L_star"), Term("B", (("N", "beta"),)), Term("A0", (("N", "gamma"),), shift=("k", "b")))),
    # the merging law at one base size: L* + B·N^-β is one constant c and A0·N^-γ one amplitude a
    Law("merging_one_base", "L = c + a / (k + b)", ("k",), ("c", "a", "b"),
        {"c": POSITIVE, "a": POSITIVE, "b": (-0.99, 50.0)},
        (Term("c"), Term("a", shift=("k", "b")))),
)}


def too_few_members(law: str | Law, n_models: int, n_ensembles: int) -> str | None:
    """Why a law of ensembles cannot be fitted to a pool of `n_models` models, or None: its ensembles are subsets of
    those models, not independent points, so the pool needs as many models as a fit needs points (parameters + 2)."""
    needed = len(get_law(law).params) + 2
    if n_models >= needed:
        return None
    return (f"a pool of {n_models} models: its {n_ensembles} ensembles are subsets of those {n_models}, not independent "
            f"points, and a law with {needed - 2} parameters needs at least {needed} models")


def get_law(law: str | Law) -> Law:
    if isinstance(law, Law):
        return law
    if law not in LAWS:
        raise MMCError(f"unknown law '{law}' (known: {', '.join(LAWS)})")
    return LAWS[law]


@dataclass
class Fit:
    law: Law
    params: dict[str, float]
    # Σ w·ρ(log L_pred − log L_obs) at the optimum (ρ: Huber_δ, or r²/2 for least squares), w the caller's weights
    # (1 per point by default) divided by the size of the point's group: without groups, unit weight per point
    objective: float
    r2_log: float
    rmse_log: float
    n_points: int
    n_measurements: int  # points with positive weight, a group counted once (see the module docstring)
    huber_delta: float | None  # None: least squares in log space
    n_candidates: int  # grid candidates the scales were solved for
    polished_objectives: np.ndarray = field(repr=False)  # objectives the best candidates were polished to
    profile: dict[str, dict] = field(default_factory=dict)  # per parameter: interval, identified, one-sided bound
    ci95: dict[str, tuple[float, float] | None] | None = None  # bootstrap percentile intervals
    ci95_note: str | None = None  # why `ci95` (or one parameter's interval) is None despite a bootstrap
    n_bootstrap: int = 0
    n_bootstrap_converged: int = 0
    bootstrap_params: np.ndarray | None = field(default=None, repr=False)  # (converged resamples, params)

    @property
    def same_optimum(self) -> bool:
        """The best polished candidates agree on the objective: the optimum does not depend on where we began."""
        return bool((self.polished_objectives <= self.objective * (1 + SAME_OPTIMUM_RTOL) + SAME_OPTIMUM_ATOL).all())

    @property
    def identified(self) -> dict[str, bool]:
        return {name: bool(self.profile.get(name, {}).get("identified", False)) for name in self.law.params}

    def predict(self, **inputs: np.ndarray | float) -> np.ndarray:
        return self.law.predict(self.params, **inputs)

    def band(self, **inputs: np.ndarray | float) -> tuple[np.ndarray, np.ndarray] | None:
        """The 95% percentile band of the bootstrap refits' predictions at `inputs` (None without a bootstrap)."""
        if self.bootstrap_params is None:
            return None
        params = {name: column[:, None] for name, column in zip(self.law.params, self.bootstrap_params.T)}
        draws = self.law.predict(params, **{name: np.asarray(value, dtype=np.float64)[None]
                                            for name, value in inputs.items()})
        low, high = np.percentile(draws, [2.5, 97.5], axis=0)
        return low, high

    def to_dict(self) -> dict:
        """JSON-ready: a parameter whose profile interval is open (reaches a bound or never closes) is marked not
        identified, its interval shows only the side the data determine (the other is None), and its bootstrap
        interval is left out: a flat direction is no certainty."""
        identified = self.identified
        return {
            "law": self.law.name,
            "formula": self.law.formula,
            "params": dict(self.params),
            "identified": identified,
            "profile_ci95": {name: list(self.profile[name]["ci95"]) for name in self.law.params if name in self.profile},
            "ci95": None if self.ci95 is None else {name: (list(bounds) if identified[name] and bounds else None)
                                                     for name, bounds in self.ci95.items()},
            "ci95_note": self.ci95_note,
            "objective": self.objective,
            "loss": "least squares" if self.huber_delta is None else f"huber(delta={self.huber_delta:.6g})",
            "r2_log": self.r2_log,
            "rmse_log": self.rmse_log,
            "n_points": self.n_points,
            "n_measurements": self.n_measurements,
            "n_candidates": self.n_candidates,
            "same_optimum": self.same_optimum,
            "n_bootstrap": self.n_bootstrap,
            "n_bootstrap_converged": self.n_bootstrap_converged,
        }


@dataclass(frozen=True)
class _Groups:
    """Points that are one measurement, numbered in order of first appearance (no labels: group i is point i)."""
    group: np.ndarray  # (points,) the group of each point
    size: np.ndarray  # (groups,) points in each group

    @classmethod
    def of(cls, labels: np.ndarray | None, n_points: int) -> _Groups:
        if labels is None:
            return cls(np.arange(n_points), np.ones(n_points, dtype=np.intp))
        _, first, inverse, counts = np.unique(labels, return_index=True, return_inverse=True, return_counts=True)
        order = np.argsort(first)
        rank = np.empty(len(first), dtype=np.intp)
        rank[order] = np.arange(len(first))
        return cls(rank[inverse], counts[order])

    def used(self, weights: np.ndarray) -> np.ndarray:
        """(…, groups): whether any point of each group has positive weight, for weights (…, points)."""
        order = np.argsort(self.group, kind="stable")
        starts = np.concatenate([[0], np.cumsum(self.size)[:-1]])
        return np.maximum.reduceat((weights[..., order] > 0).astype(np.int8), starts, axis=-1) > 0


@dataclass(frozen=True)
class _Centre:
    log_loss: float
    log_inputs: dict[str, float]


class _Design:
    """A law at fixed inputs in the fitting parameterisation, for many data sets and parameter vectors at once.

    θ holds the centred log of each scale, log S − log L̄ − Σ exponent · log x̄ (bars: geometric means), then the
    exponents and offsets as they are; predictions are centred log losses, a log-sum-exp over the terms.
    """

    def __init__(self, law: Law, inputs: Mapping[str, np.ndarray], centre: _Centre) -> None:
        self.law = law
        self.centre = centre
        power_inputs = {name for term in law.terms for name, _ in term.powers}
        self.logs = {name: np.log(inputs[name]) - centre.log_inputs[name] for name in power_inputs}
        self.shifts = {term.shift[0]: np.asarray(inputs[term.shift[0]], dtype=np.float64)
                       for term in law.terms if term.shift}
        self.index = {name: i for i, name in enumerate(law.params)}
        self.scales = [self.index[term.scale] for term in law.terms]
        self.owned = np.zeros((len(law.terms), len(law.params)), dtype=bool)  # (terms, P): each term's parameters
        for t, term in enumerate(law.terms):
            self.owned[t, [self.index[name] for name in (term.scale, *(exponent for _, exponent in term.powers),
                                                         *(term.shift or ())[1:])]] = True
        self.nonlinear = [i for i, name in enumerate(law.params) if law.kind(name) != "scale"]
        self.lower = np.array([-LOG_SCALE_BOUND if law.kind(n) == "scale" else law.bounds[n][0] for n in law.params])
        self.upper = np.array([LOG_SCALE_BOUND if law.kind(n) == "scale" else law.bounds[n][1] for n in law.params])
        self.n_points = len(next(iter(inputs.values())))

    def log_terms(self, theta: np.ndarray) -> tuple[list[np.ndarray], dict[int, np.ndarray]]:
        """The centred log of every term, (M, n), or (M, 1) for a term without inputs (one number per row), and the
        shifted inputs (M, n) of the terms that have one."""
        logs, shifted = [], {}
        for t, term in enumerate(self.law.terms):
            log_term = theta[:, self.index[term.scale], None]
            for name, exponent in term.powers:
                log_term = log_term - theta[:, self.index[exponent], None] * self.logs[name]
            if term.shift:
                name, offset = term.shift
                shifted[t] = self.shifts[name] + theta[:, self.index[offset], None]
                log_term = log_term - np.log(shifted[t])
            logs.append(log_term)
        return logs, shifted

    def log_predict(self, theta: np.ndarray, jacobian: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """Centred log L_pred (M, n) and its Jacobian (M, P, n): a softmax-weighted sum over the terms. Points
        are the last axis of both, so the normal equations are batched (P, n) @ (n, P) products.

        The fit's innermost loop, and its cost is the exponentials and logarithms (scalar libm calls on a machine
        without AVX-512): one exp per term that has inputs and one log per point, each row shifted by its largest
        term (a sum of terms ≤ 1 cannot overflow), a term without inputs one exp per row."""
        log_terms, shifted = self.log_terms(theta)
        peak = np.max([log_term.max(axis=1) for log_term in log_terms], axis=0)[:, None]
        values = [np.exp(log_term - peak) for log_term in log_terms]
        total = np.zeros((len(theta), self.n_points))
        for value in values:
            total += value
        with np.errstate(divide="ignore"):  # a row whose terms span more than float64 holds: -inf, never accepted
            prediction = np.log(total)
        prediction += peak
        if not jacobian:
            return prediction, None
        jac = np.empty((len(theta), len(self.law.params), self.n_points))  # every parameter is in one term
        for t, term in enumerate(self.law.terms):
            weight = np.divide(values[t], total, out=jac[:, self.index[term.scale]])
            for name, exponent in term.powers:
                np.negative(np.multiply(weight, self.logs[name], out=jac[:, self.index[exponent]]),
                            out=jac[:, self.index[exponent]])
            if term.shift:
                np.negative(np.divide(weight, shifted[t], out=jac[:, self.index[term.shift[1]]]),
                            out=jac[:, self.index[term.shift[1]]])
        return prediction, jac

    def candidates(self, density: int) -> np.ndarray:
        """A product grid over the nonlinear parameters (exponents evenly over their bounds; offsets denser near
        small values), `density` values per exponent."""
        axes = []
        for i in self.nonlinear:
            low, high = self.lower[i], self.upper[i]
            if self.law.kind(self.law.params[i]) == "offset":
                ladder = np.concatenate([[low, 0.5 * low], np.geomspace(0.05, max(high, 0.1), max(density // 2, 4))])
                axes.append(np.unique(np.clip(np.concatenate([[0.0], ladder]), low, high)))
            else:
                axes.append(np.linspace(low, high, density))
        return np.array(list(itertools.product(*axes))) if axes else np.zeros((1, 0))

    def solve_scales(self, nonlinear: np.ndarray, target: np.ndarray, weights: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
        """For every grid candidate (G, q) and data set (B, n): the non-negative scales minimising the weighted
        squared relative error Σ w (L̂/L − 1)² (a linearisation of the log residuals), by enumerating the active
        sets of the ≤ 3 terms. Returns θ (B, G, P) and that error (B, G)."""
        theta = np.zeros((len(nonlinear), len(self.law.params)))
        theta[:, self.nonlinear] = nonlinear
        log_terms, _ = self.log_terms(theta)
        features = [np.broadcast_to(np.exp(log_term), (len(theta), self.n_points)) for log_term in log_terms]
        # (G, n) per term: each term with scale 1
        loss = np.exp(target)  # (B, n) centred losses
        n_terms = len(features)
        by_term = [np.ascontiguousarray(feature.T) for feature in features]  # (n, G) each
        a = np.empty((len(target), len(nonlinear), n_terms, n_terms))
        for t, u in itertools.combinations_with_replacement(range(n_terms), 2):
            a[..., t, u] = a[..., u, t] = (weights / loss**2) @ (by_term[t] * by_term[u])
        rhs = np.stack([(weights / loss) @ column for column in by_term], axis=-1)
        best = np.full(a.shape[:2], np.inf)
        scales = np.zeros((*a.shape[:2], n_terms))
        total = weights.sum(axis=1)[:, None]
        for size in range(1, n_terms + 1):
            for subset in itertools.combinations(range(n_terms), size):
                chosen = list(subset)
                solution = _solve_small(a[..., chosen, :][..., :, chosen], rhs[..., chosen])
                feasible = (solution > 0).all(axis=-1)
                error = total - np.einsum("bgt,bgt->bg", solution, rhs[..., chosen])
                better = feasible & (error < best)
                best = np.where(better, error, best)
                full_solution = np.zeros_like(scales)
                full_solution[..., chosen] = solution
                scales = np.where(better[..., None], full_solution, scales)
        full = np.broadcast_to(theta, (len(target), *theta.shape)).copy()
        with np.errstate(divide="ignore"):
            full[..., self.scales] = np.clip(np.log(scales), -LOG_SCALE_BOUND, LOG_SCALE_BOUND)
        return full, best


def _solve_small(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Solve many 1×1, 2×2 or 3×3 systems a x = b (…, k, k) by Cramer's rule, elementwise: far faster than a
    batched LU for millions of tiny systems. A singular system gives NaN (never feasible)."""
    size = a.shape[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        if size == 1:
            return b / a[..., 0]
        if size == 2:
            det = a[..., 0, 0] * a[..., 1, 1] - a[..., 0, 1] * a[..., 1, 0]
            return np.stack([(b[..., 0] * a[..., 1, 1] - a[..., 0, 1] * b[..., 1]) / det,
                             (a[..., 0, 0] * b[..., 1] - a[..., 1, 0] * b[..., 0]) / det], axis=-1)
        det = np.linalg.det(a) if size > 3 else _det3(a)
        columns = []
        for i in range(size):
            replaced = a.copy()
            replaced[..., :, i] = b
            columns.append((np.linalg.det(replaced) if size > 3 else _det3(replaced)) / det)
        return np.stack(columns, axis=-1)


def _det3(a: np.ndarray) -> np.ndarray:
    return (a[..., 0, 0] * (a[..., 1, 1] * a[..., 2, 2] - a[..., 1, 2] * a[..., 2, 1])
            - a[..., 0, 1] * (a[..., 1, 0] * a[..., 2, 2] - a[..., 1, 2] * a[..., 2, 0])
            + a[..., 0, 2] * (a[..., 1, 0] * a[..., 2, 1] - a[..., 1, 1] * a[..., 2, 0]))


def _rho(residuals: np.ndarray, delta: float | np.ndarray | None, derivatives: bool = True
         ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """The loss ρ, its derivative ψ and the IRLS weight ψ(r)/r of log residuals: Huber_δ, or squares (δ None).
    Huber's ρ is written ψ·(r − ψ/2): r²/2 inside δ and δ(|r| − δ/2) outside, the same bits as each formula."""
    if delta is None:
        return 0.5 * residuals**2, residuals, np.ones_like(residuals)
    psi = np.clip(residuals, -delta, delta)
    rho = residuals - 0.5 * psi
    rho *= psi
    if not derivatives:
        return rho, None, None
    magnitude = np.abs(residuals)
    with np.errstate(divide="ignore", invalid="ignore"):
        irls = np.where(magnitude <= delta, 1.0, delta / magnitude)
    return rho, psi, irls


def _polish(design: _Design, theta: np.ndarray, target: np.ndarray, weights: np.ndarray,
            delta: float | np.ndarray | None,
            free: np.ndarray | None = None, tie: tuple[np.ndarray, np.ndarray] | None = None, iterations: int = 200,
            tolerance: float = 1e-13) -> tuple[np.ndarray, np.ndarray]:
    """Levenberg–Marquardt with IRLS weights, batched: rows of θ (M, P) against rows of target and weights (M, n),
    within the bounds (δ: one for all rows, or (M, 1) a row's own); `free` (M, P) masks the parameters each row
    may move (a profile holds one fixed).
    `tie` = (j, c), j (M,) and c (M, P): in each row with a nonzero c, θ_j follows the others as θ_j = u + c·θ with
    u held (a natural scale held while the exponents it is centred with move). Returns θ and the objectives (M,);
    a large batch runs in parts side by side (`_rows_in_threads`)."""
    free = np.ones(theta.shape, dtype=bool) if free is None else free
    return _rows_in_threads(lambda rows: _polish_rows(
        design, theta[rows], target[rows], weights[rows], _delta_rows(delta, rows), free[rows],
        None if tie is None else (tie[0][rows], tie[1][rows]), iterations, tolerance), len(theta), design.n_points)


def _delta_rows(delta: float | np.ndarray | None, rows: slice | np.ndarray) -> float | np.ndarray | None:
    """Huber's δ for these rows of a batch: one δ for all rows (or None, least squares), or each row's own (M, 1)."""
    return delta if np.ndim(delta) == 0 else delta[rows]


def _rows_in_threads(run: Callable[[slice | np.ndarray], tuple[np.ndarray, np.ndarray]], n_rows: int, n_points: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """`run(rows)` of a batched fit whose rows never interact (its results row by row), on all rows at once, or
    for a large batch (bootstrap and jackknife refits of a series of thousands of points) in up to THREADS parts
    side by side: the same result, to the bit, as one batch."""
    parts = min(THREADS, n_rows // SPLIT_ROWS, n_rows * n_points // SPLIT_VALUES)
    if parts < 2:
        return run(slice(None))
    results = in_threads(run, np.array_split(np.arange(n_rows), parts))
    return np.concatenate([result[0] for result in results]), np.concatenate([result[1] for result in results])


def _polish_rows(design: _Design, theta: np.ndarray, target: np.ndarray, weights: np.ndarray,
                 delta: float | np.ndarray | None, free: np.ndarray, tie: tuple[np.ndarray, np.ndarray] | None,
                 iterations: int, tolerance: float) -> tuple[np.ndarray, np.ndarray]:
    """`_polish` on one batch of rows."""
    theta = np.clip(theta, design.lower, design.upper)
    if tie is not None:
        tied, coefficients = tie
        is_tied = coefficients.any(axis=1)  # rows with a tied parameter
        every = np.arange(len(theta))
        held = theta[every, tied] - np.einsum("mp,mp->m", theta, coefficients)

    all_free = bool(free.all())

    def evaluate(values: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The objectives (M,) at `values` of these rows, with the normal matrices (M, P, P) and gradients (M, P) an
        LM step from there takes: computed with the trial, so an accepted trial's step needs no second pass."""
        prediction, jac = design.log_predict(values)
        rho, psi, irls = _rho(prediction - target[rows], _delta_rows(delta, rows))
        if tie is not None:  # chain rule: moving a coefficient's parameter moves θ_j with it
            moved = is_tied[rows]
            jac[moved] += np.take_along_axis(jac[moved], tied[rows[moved], None, None], axis=1) * \
                coefficients[rows[moved], :, None]
        if not all_free:
            jac *= free[rows, :, None]
        hessian = jac @ (jac * (weights[rows] * irls)[:, None, :]).transpose(0, 2, 1)
        gradient = (jac @ (weights[rows] * psi)[:, :, None])[..., 0]
        return (weights[rows] * rho).sum(axis=1), hessian, gradient

    current, hessians, gradients = evaluate(theta, np.arange(len(theta)))
    damping = np.full(len(theta), 1e-3)
    active = np.ones(len(theta), dtype=bool)
    eye = np.eye(theta.shape[1])
    for _ in range(iterations):
        rows = np.flatnonzero(active)
        if not len(rows):
            break
        hessian, gradient = hessians[rows], gradients[rows]
        diagonal = np.einsum("mpp->mp", hessian)
        scaled = hessian + damping[rows, None, None] * (diagonal[:, :, None] * eye + 1e-12 * eye)
        scaled += np.where(free[rows], 0.0, 1.0)[:, :, None] * eye  # held parameters: a unit pivot, zero step
        finite = np.isfinite(scaled).all(axis=(1, 2)) & np.isfinite(gradient).all(axis=1)
        scaled[~finite], gradient[~finite] = eye, 0.0
        step = -_solve_rows(scaled, gradient)
        trial = np.clip(theta[rows] + step, design.lower, design.upper)
        if tie is not None:
            moved = is_tied[rows]
            trial[moved, tied[rows[moved]]] = held[rows[moved]] + np.einsum(
                "mp,mp->m", trial[moved], coefficients[rows[moved]])
        value, trial_hessian, trial_gradient = evaluate(trial, rows)
        better = value < current[rows]
        improvement = np.where(better, current[rows] - value, 0.0)
        theta[rows[better]] = trial[better]
        current[rows[better]] = value[better]
        hessians[rows[better]], gradients[rows[better]] = trial_hessian[better], trial_gradient[better]
        damping[rows] = np.where(better, damping[rows] * 0.3, damping[rows] * 10.0)
        converged = (better & (improvement <= tolerance * np.maximum(current[rows], 1e-300) + 1e-300)) | \
            (damping[rows] > 1e12)
        active[rows[converged]] = False
    return theta, current


def _solve_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """x with a x = b for each row, a (M, P, P) and b (M, P); a singular row (a vanished term) gets the
    pseudo-inverse's least-norm solution, the others their exact one, whatever rows share the batch."""
    try:
        return np.linalg.solve(a, b[..., None])[..., 0]
    except np.linalg.LinAlgError:
        singular = np.linalg.matrix_rank(a) < a.shape[-1]
        solution = np.empty_like(b)
        solution[singular] = (np.linalg.pinv(a[singular]) @ b[singular][..., None])[..., 0]
        solution[~singular] = np.linalg.solve(a[~singular], b[~singular][..., None])[..., 0]
        return solution


def _scipy_polish(design: _Design, theta: np.ndarray, target: np.ndarray, weights: np.ndarray,
                  delta: float | None) -> tuple[np.ndarray, float]:
    """A last L-BFGS-B polish of one θ on the exact objective (its kinks handled by the line search)."""
    from scipy.optimize import minimize

    def objective(values: np.ndarray) -> tuple[float, np.ndarray]:
        prediction, jac = design.log_predict(values[None])
        rho, psi, _ = _rho(prediction[0] - target, delta)
        return float((weights * rho).sum()), jac[0] @ (weights * psi)

    scale = max(objective(theta)[0], 1e-300)
    result = minimize(lambda values: tuple(np.asarray(part) / scale for part in objective(values)), theta, jac=True,
                      method="L-BFGS-B", bounds=list(zip(design.lower, design.upper)), options={"maxiter": 2000})
    value = objective(result.x)[0]
    return (result.x, value) if value < objective(theta)[0] else (theta, objective(theta)[0])


def _refine(design: _Design, theta: np.ndarray, target: np.ndarray, weights: np.ndarray,
            delta: float | np.ndarray | None, iterations: int = REFINE_ITERATIONS, drop_terms: bool = False
            ) -> tuple[np.ndarray, np.ndarray]:
    """Gauss–Newton steps with IRLS weights (Huber: ψ(r)/r) from polished θ (M, P) until the step vanishes, every
    row against its own row of target and weights (M, n) (and of δ, (M, 1), where δ is an array).

    A fixed point solves the normal equations Σ w ψ(r) ∂r/∂θ = 0 to rounding, so fits of data that differ in the
    tenth digit agree to about that digit: the quasi-Newton polish before it stops at a relative change of the
    objective, which leaves the parameters of a flat valley several digits short. A parameter at a bound that
    the gradient pushes outward stays there; a step that raises the objective beyond rounding is halved. With
    `drop_terms` a vanishing term is also tried dropped (`_term_dropped`), its scale at the bound, where that lowers
    the objective more than the step and the objective rises with the term there (the refits of `refit_subsets`; not
    a fit's estimate, from which the profiles start: at the bound, e^-40 below the data, their Levenberg–Marquardt
    cannot lift a scale again). Returns the refined θ and objectives (M,); a row that ends worse than it began keeps
    its start. A large batch runs in parts side by side (`_rows_in_threads`)."""
    return _rows_in_threads(lambda rows: _refine_rows(
        design, theta[rows], target[rows], weights[rows], _delta_rows(delta, rows), iterations, drop_terms),
        len(theta), design.n_points)


def _refine_rows(design: _Design, theta: np.ndarray, target: np.ndarray, weights: np.ndarray,
                 delta: float | np.ndarray | None, iterations: int, drop_terms: bool
                 ) -> tuple[np.ndarray, np.ndarray]:
    """`_refine` on one batch of rows."""
    def evaluate(values: np.ndarray, rows: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        prediction, jac = design.log_predict(values)
        residuals = prediction - target[rows]
        rho, psi, irls = _rho(residuals, _delta_rows(delta, rows))
        return (weights[rows] * rho).sum(axis=1), jac, weights[rows] * psi, weights[rows] * irls, residuals

    def objective(values: np.ndarray, rows: np.ndarray) -> np.ndarray:
        prediction, _ = design.log_predict(values, jacobian=False)
        return (weights[rows] * _rho(prediction - target[rows], _delta_rows(delta, rows), False)[0]).sum(axis=1)

    def acceptable(trial_value: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return trial_value <= value[rows] + REFINE_ROUNDING * np.abs(value[rows])

    every = np.arange(len(theta))
    start, jac, psi, irls, residuals = evaluate(theta, every)
    refined, value = theta.copy(), start.copy()
    active = np.ones(len(theta), dtype=bool)
    for _ in range(iterations):
        rows = np.flatnonzero(active)
        if not len(rows):
            break
        gradient = (jac @ psi[..., None])[..., 0]
        current = refined[rows]
        free = ~(((current <= design.lower) & (gradient > 0)) | ((current >= design.upper) & (gradient < 0)))
        hessian = (jac * irls[:, None, :]) @ jac.transpose(0, 2, 1) * (free[:, :, None] & free[:, None, :])
        step = -(np.linalg.pinv(hessian) @ np.where(free, gradient, 0.0)[..., None])[..., 0]
        trial = np.clip(current + step, design.lower, design.upper)
        accepted = list(evaluate(trial, rows))
        accepted.insert(0, trial)
        pending = ~acceptable(accepted[1], rows)  # rows whose full step raised the objective
        if pending.any():  # their first halving of the step that does not, objective only, many at a time
            late = np.flatnonzero(pending)
            halved, found = _first_acceptable_halving(current[late], step[late], rows[late], design, objective,
                                                      acceptable)
            for part, values in zip(accepted, (halved[found], *evaluate(halved[found], rows[late[found]]))):
                part[late[found]] = values
            pending[late[found]] = False
        dropping, dropped, scale = _term_dropped(design, current, step, jac, residuals, weights[rows],
                                                 _delta_rows(delta, rows)) if drop_terms else ((), None, None)
        if len(dropping):  # a vanishing term's scale crawls towards its bound: its fit without it, where lower
            dropped_value = objective(dropped, rows[dropping])
            lower = np.flatnonzero(
                dropped_value < np.where(pending[dropping], value[rows[dropping]], accepted[1][dropping]))
            evaluated = evaluate(dropped[lower], rows[dropping[lower]])
            # and only where the objective rises with the term at its bound (a constrained optimum in its scale):
            # where it falls, the term belongs in the fit and the step keeps it
            rising = np.einsum("mn,mn->m", evaluated[1][np.arange(len(lower)), scale[lower]], evaluated[2]) > 0
            taken = dropping[lower[rising]]
            for part, values in zip(accepted, (dropped[lower[rising]], *(part[rising] for part in evaluated))):
                part[taken] = values
            pending[taken] = False
        moved = np.abs(accepted[0] - current).max(axis=1)
        keep = ~pending  # rows whose step was never accepted stop where they are
        refined[rows[keep]], value[rows[keep]] = accepted[0][keep], accepted[1][keep]
        active[rows[pending | (moved <= REFINE_STEP)]] = False
        still = keep & (moved > REFINE_STEP)
        jac, psi, irls, residuals = accepted[2][still], accepted[3][still], accepted[4][still], accepted[5][still]
    worse = value > start + REFINE_ROUNDING * np.abs(start)
    return np.where(worse[:, None], theta, refined), np.where(worse, start, value)


def _term_dropped(design: _Design, theta: np.ndarray, step: np.ndarray, jac: np.ndarray, residuals: np.ndarray,
                  weights: np.ndarray, delta: float | np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows whose Gauss–Newton `step` lowers the scale of a term under DROP_SHARE of every point's prediction, their
    θ with that term dropped (its scale at the lower bound, its exponents and offset left) and the other parameters
    at the Gauss–Newton step of the fit without it, and the dropped scale's index.

    In the log scale a vanishing term's optimum at 0 is e^-40 away, and where it trades off with another term (a floor
    beside a slowly falling power) Gauss–Newton crawls there, hundreds of steps of a few hundredths; the fit without
    the term comes from the same evaluation: dropping a term of share w leaves the log residuals r + log(1 − w) and
    divides the other terms' derivatives by 1 − w. The caller takes it only where its objective is the lower."""
    scales = np.array(design.scales)
    share = jac[:, scales].max(axis=2)  # (M, terms): each term's largest share of a point's prediction
    candidate = (step[:, scales] < 0) & (share < DROP_SHARE) & (theta[:, scales] > design.lower[scales])
    rows = np.flatnonzero(candidate.any(axis=1))
    if not len(rows):
        return rows, theta[:0], rows
    term = np.where(candidate[rows], share[rows], np.inf).argmin(axis=1)  # the smallest such term of each row
    dropped = scales[term]
    within = np.arange(len(rows))
    remaining = 1.0 - jac[rows, dropped]
    reduced = jac[rows] / remaining[:, None, :]
    reduced *= ~design.owned[term][:, :, None]
    _, psi, irls = _rho(residuals[rows] + np.log(remaining), _delta_rows(delta, rows))
    gradient = (reduced @ (weights[rows] * psi)[..., None])[..., 0]
    hessian = (reduced * (weights[rows] * irls)[:, None, :]) @ reduced.transpose(0, 2, 1)
    moved = np.clip(theta[rows] - (np.linalg.pinv(hessian) @ gradient[..., None])[..., 0], design.lower, design.upper)
    moved[within, dropped] = design.lower[dropped]
    return rows, moved, dropped


def _first_acceptable_halving(current: np.ndarray, step: np.ndarray, rows: np.ndarray, design: _Design,
                              objective: Callable[[np.ndarray, np.ndarray], np.ndarray],
                              acceptable: Callable[[np.ndarray, np.ndarray], np.ndarray]
                              ) -> tuple[np.ndarray, np.ndarray]:
    """For rows whose full Gauss–Newton step was refused: the first trial θ of the step halved 1, 2, …,
    REFINE_HALVINGS − 1 times that `acceptable` takes, and whether there was one. The halvings are tried
    HALVING_VALUES values at a time (one call for a small series instead of one per halving); every trial is the
    same arithmetic, row by row, as one at a time, so the choice is the same."""
    chosen, found = np.empty_like(current), np.zeros(len(rows), dtype=bool)
    halved = step.copy()
    per_call = max(1, HALVING_VALUES // (len(rows) * design.n_points))
    remaining = REFINE_HALVINGS - 1
    while remaining and not found.all():
        count, open_rows = min(per_call, remaining), np.flatnonzero(~found)
        ladder = np.empty((count, len(open_rows), current.shape[1]))
        for halving in range(count):
            halved /= 2
            ladder[halving] = halved[open_rows]
        trials = np.clip(current[open_rows] + ladder, design.lower, design.upper)
        ok = acceptable(objective(trials.reshape(-1, current.shape[1]), np.tile(rows[open_rows], count)),
                        np.tile(rows[open_rows], count)).reshape(count, len(open_rows))
        hit = ok.any(axis=0)
        chosen[open_rows[hit]] = trials[ok.argmax(axis=0)[hit], np.flatnonzero(hit)]
        found[open_rows[hit]] = True
        remaining -= count
    return chosen, found


def _fit_batch(design: _Design, target: np.ndarray, weights: np.ndarray, delta: float | np.ndarray | None,
               density: int, keep: int, grid: tuple[np.ndarray, np.ndarray] | None = None, also: np.ndarray | None = None,
               **polish) -> tuple[np.ndarray, np.ndarray]:
    """Grid (scales solved inside; or `grid`, the (θ, error) of an earlier call on the same data) → the `keep` best
    candidates of each data set → LM polish. Returns the best θ (B, P) of each data set and the polished
    objectives of its `keep` candidates (B, keep)."""
    thetas, errors = grid or design.solve_scales(design.candidates(density), target, weights)
    keep = min(keep, thetas.shape[1])
    order = np.argsort(errors, axis=1)[:, :keep]
    starts = np.take_along_axis(thetas, order[..., None], axis=1)
    if also is not None:  # one more start per data set (the estimate, for resamples): the better optimum wins
        starts = np.concatenate([starts, np.broadcast_to(also, (len(target), 1, len(also)))], axis=1)
        keep += 1
    starts = starts.reshape(-1, thetas.shape[-1])
    polished, values = _polish(design, starts, np.repeat(target, keep, axis=0), np.repeat(weights, keep, axis=0),
                               delta if np.ndim(delta) == 0 else np.repeat(delta, keep, axis=0), **polish)
    polished, values = polished.reshape(len(target), keep, -1), values.reshape(len(target), keep)
    best = values.argmin(axis=1)
    return polished[np.arange(len(target)), best], values


def _natural(design: _Design, theta: np.ndarray) -> np.ndarray:
    """θ (…, P) in the caller's units: scales exponentiated and un-centred."""
    natural = np.array(theta, dtype=np.float64)
    for term in design.law.terms:
        i = design.index[term.scale]
        shift = design.centre.log_loss + sum(theta[..., design.index[exponent]] * design.centre.log_inputs[name]
                                             for name, exponent in term.powers)
        natural[..., i] = np.exp(theta[..., i] + shift)
    return natural


def _auto_delta(design: _Design, target: np.ndarray, weights: np.ndarray, groups: _Groups,
                grid: tuple[np.ndarray, np.ndarray]) -> float:
    """Huber's δ = 1.345 × a robust scale (MAD) of the log residuals of a least-squares fit: 95% of least
    squares' efficiency under Gaussian noise, bounded influence of outliers. One residual per group (their mean),
    so a cluster of copies of one measurement, fitted exactly, cannot drive the scale to 0."""
    theta, _ = _fit_batch(design, target[None], weights[None], None, GRID_DENSITY, POLISH_KEEP, grid)
    theta, _ = _refine(design, theta, target[None], weights[None], None)
    residuals = (design.log_predict(theta, jacobian=False)[0] - target)[0]
    residuals = (np.bincount(groups.group, residuals) / groups.size)[groups.used(weights)]
    scale = 1.4826 * np.median(np.abs(residuals - np.median(residuals)))
    return float(max(1.345 * scale, 1e-6))  # exact data: residuals ~0, any δ this small is least squares


def _profile(design: _Design, theta: np.ndarray, target: np.ndarray, weights: np.ndarray, delta: float | None,
             n_effective: int, n_values: int = PROFILE_POINTS) -> dict[str, dict]:
    """Profile intervals: each parameter held at values across its range while the others are re-optimised.

    The threshold is the robust drop-in-dispersion test (Hampel et al. 1986, §7.6; for least squares, the
    classic profile-likelihood interval): a value is inside while 2·Δobjective·mean(ψ′)/s² ≤ F(1, n − p; 0.95),
    s² = Σ w ψ(r)² / (n − p), n the distinct measurements (weights are relative precisions, not counts). An
    interval that reaches the end of the range on one side is open there: the parameter is not identified, and
    only the other side is reported.
    """
    from scipy import stats

    n_params = len(theta)
    prediction, _ = design.log_predict(theta[None], jacobian=False)
    residuals = prediction[0] - target
    rho, psi, _ = _rho(residuals, delta)
    best = float((weights * rho).sum())
    dof = max(n_effective - n_params, 1.0)
    dispersion = float((weights * psi**2).sum()) / dof
    slope = float((weights * (np.abs(residuals) <= delta if delta is not None else 1.0)).sum() / weights.sum())
    # Huber's small-sample correction K² (Huber 1981, §7.6): the fewer points inside δ, the wider
    correction = (1 + n_params / n_effective * (1 - slope) / max(slope, 1e-12)) ** 2
    threshold = stats.f.ppf(0.95, 1, dof) * correction * dispersion / (2 * max(slope, 1e-12)) + 1e-14 * max(best, 1e-300)
    # every parameter's two sides in one batched polish: values from next to the estimate out to each range's end
    reach = np.geomspace(1e-6, 1.0, n_values // 2)
    paths = []  # (parameter, side, end, values)
    for j, name in enumerate(design.law.params):
        high_end = min(max(theta[j] + 12.0, 5.0), design.upper[j]) if design.law.kind(name) == "scale" else design.upper[j]
        for side, end in (("low", design.lower[j]), ("high", high_end)):
            paths.append((j, side, end, theta[j] + (end - theta[j]) * reach))
    held = np.repeat([j for j, _, _, values in paths], len(reach))
    starts = np.repeat(theta[None], len(held), axis=0)
    starts[np.arange(len(held)), held] = np.concatenate([values for *_, values in paths])
    free = np.ones_like(starts, dtype=bool)
    free[np.arange(len(held)), held] = False
    coefficients = np.zeros((n_params, n_params))  # row j: a scale's natural log is θ_j − c·θ (+ a constant)
    for term in design.law.terms:
        for input_name, exponent in term.powers:
            coefficients[design.index[term.scale], design.index[exponent]] = -design.centre.log_inputs[input_name]
    rows = np.repeat(target[None], len(held), axis=0), np.repeat(weights[None], len(held), axis=0)
    path, objective = _polish(design, starts, *rows, delta, free, (held, coefficients[held]),
                              tolerance=PROFILE_TOLERANCE)
    natural_path = _natural(design, path).reshape(len(paths), len(reach), n_params)
    rises = np.maximum(objective - best, 0.0).reshape(len(paths), len(reach))
    estimate = _natural(design, theta)
    sides: dict[int, dict[str, float | None]] = {j: {} for j in range(n_params)}
    for (j, side, end, _), natural, rise in zip(paths, natural_path[:, :, :], rises):
        natural = np.concatenate([[estimate[j]], natural[:, j]])
        rise = np.concatenate([[0.0], rise])
        outside = np.flatnonzero(rise > threshold)
        if not len(outside) or end == theta[j]:
            sides[j][side] = None  # never leaves the interval before the end of the range: open on this side
            continue
        first = outside[0]  # interpolate the crossing between the last value inside and the first outside
        share = (threshold - rise[first - 1]) / (rise[first] - rise[first - 1])
        sides[j][side] = float(natural[first - 1] + share * (natural[first] - natural[first - 1]))
    profiles = {}
    for j, name in enumerate(design.law.params):
        ends = [value for value in sides[j].values() if value is not None]
        profiles[name] = {"ci95": (None if sides[j]["low"] is None else min(ends + [float(estimate[j])]),
                                   None if sides[j]["high"] is None else max(ends + [float(estimate[j])])),
                          "identified": sides[j]["low"] is not None and sides[j]["high"] is not None}
    return profiles


def fit_law(law: str | Law, inputs: Mapping[str, np.ndarray], loss: np.ndarray, *,
            weights: np.ndarray | None = None, huber_delta: float | str | None = "auto", bootstrap: int = 0,
            seed: int = 0, replicates: np.ndarray | None = None, groups: np.ndarray | None = None,
            profile: bool = True) -> Fit:
    """Fit `law` to (inputs, loss): the scales solved inside a dense grid over the exponents and offsets, the best
    candidates polished on the full objective; profile intervals and identification for every parameter;
    optionally `bootstrap` refits for percentile intervals.

    `weights` weigh the points (the merging paper weighs by k). `huber_delta`: the Huber threshold on log
    residuals; "auto" (default) takes 1.345 × the MAD scale of a least-squares fit's residuals, None fits least
    squares. The default bootstrap resamples the points (multiplicity weights); `replicates` (resamples, points)
    gives resampled losses at the same inputs instead (NaN: the point is missing from that resample). Every
    resample is refitted from the grid's best candidate and from the estimate, the better kept (never from the
    estimate alone); resamples with too few points are left out, and
    where fewer than `min_usable_resamples` remain (or a parameter's interval has zero width) `ci95` is None and
    `ci95_note` says why.

    `groups` (an integer label per point) marks points that are one measurement by construction (equal losses): a
    group weighs as one point (each of its points w / group size) and the point bootstrap
    draws it whole. None (default): every point is its own measurement, equal losses or not.
    """
    law = get_law(law)
    inputs, loss = _check_data(law, inputs, loss)
    weights = np.ones(len(loss)) if weights is None else np.asarray(weights, dtype=np.float64)
    if weights.shape != loss.shape or not np.isfinite(weights).all() or (weights < 0).any():
        raise MMCError(f"law {law.name}: weights must be one non-negative finite number per point")
    grouping = _Groups.of(_check_groups(law, groups, loss), len(loss))
    weights = weights / grouping.size[grouping.group]  # a group weighs as one point
    n_measurements = int(grouping.used(weights).sum())
    if n_measurements < len(law.params) + 2:
        raise MMCError(f"law {law.name}: {len(loss)} points hold {n_measurements} measurements (a group of points is "
                       f"one), too few for {len(law.params)} parameters (a fit needs at least "
                       f"{len(law.params) + 2}: parameters + 2)")
    log_loss = np.log(loss)
    power_inputs = {name for term in law.terms for name, _ in term.powers}
    centre = _Centre(float(log_loss.mean()), {name: float(np.log(inputs[name]).mean()) for name in power_inputs})
    design = _Design(law, inputs, centre)
    target = log_loss - centre.log_loss
    grid = design.solve_scales(design.candidates(GRID_DENSITY), target[None], weights[None])
    delta = _auto_delta(design, target, weights, grouping, grid) if huber_delta == "auto" else huber_delta
    if delta is not None:
        check_number("huber_delta", delta, 0, low_open=True)
    theta, polished = _fit_batch(design, target[None], weights[None], delta, GRID_DENSITY, POLISH_KEEP, grid)
    theta, _ = _scipy_polish(design, theta[0], target, weights, delta)
    theta, objective = _refine(design, theta[None], target[None], weights[None], delta)
    theta, objective = theta[0], float(objective[0])
    residuals = design.log_predict(theta[None], jacobian=False)[0][0] - target
    total_variance = float(((target - target.mean()) ** 2).sum())
    fit = Fit(
        law=law, params=dict(zip(law.params, _natural(design, theta).tolist())), objective=objective,
        r2_log=1.0 - float((residuals**2).sum()) / total_variance if total_variance > 0 else math.nan,
        rmse_log=float(np.sqrt((residuals**2).mean())), n_points=len(loss),
        n_measurements=n_measurements, huber_delta=delta,
        n_candidates=len(design.candidates(GRID_DENSITY)), polished_objectives=np.sort(polished[0])[:3],
    )
    if profile:
        fit.profile = _profile(design, theta, target, weights, delta, n_measurements)
    if bootstrap > 0 or replicates is not None:
        _bootstrap(fit, design, target, weights, grouping, delta, bootstrap, seed, replicates, theta)
    return fit


def refit_subsets(law: str | Law, inputs: Mapping[str, np.ndarray], loss: np.ndarray, subsets: np.ndarray,
                  start: Mapping[str, float], *, groups: np.ndarray | None = None) -> np.ndarray:
    """The parameters (subsets, params) of `fit_law(law, inputs[s], loss[s], groups=groups[s], profile=False)` for
    every boolean row s of `subsets` (subsets, points), refitted together (a jackknife's drops): each subset with
    its own Huber δ ("auto": from its own least-squares fit) and its groups weighed within it, polished by LM from
    a coarse grid's best candidate and from `start` (parameters in the caller's units, e.g. the fit on all points),
    then as fit_law finishes (L-BFGS-B, Gauss–Newton to the optimum to rounding), at a fraction of the cost of a
    fit_law per subset. Both reach the same optimum; along a direction the data do not determine (a valley flat to
    rounding) where each stops depends on its path. A subset with too few measurements gives a row of NaN."""
    law = get_law(law)
    inputs, loss = _check_data(law, inputs, loss)
    subsets = np.asarray(subsets, dtype=bool)
    if subsets.ndim != 2 or subsets.shape[1] != len(loss):
        raise MMCError(f"law {law.name}: subsets must be boolean rows of one value per point")
    grouping = _Groups.of(_check_groups(law, groups, loss), len(loss))
    n_groups = len(grouping.size)

    def per_group(values: np.ndarray) -> np.ndarray:
        """(rows, groups) sums of `values` (rows, points) over each group's points."""
        cells = (np.arange(len(values))[:, None] * n_groups + grouping.group).ravel()
        return np.bincount(cells, values.ravel(), len(values) * n_groups).reshape(len(values), n_groups)

    counts = per_group(subsets.astype(np.float64))  # each group's points within each subset
    weights = np.where(subsets, 1.0 / np.maximum(counts[:, grouping.group], 1.0), 0.0)  # a group weighs as one
    usable = (counts > 0).sum(axis=1) >= len(law.params) + 2
    result = np.full((len(subsets), len(law.params)), np.nan)
    if not usable.any():
        return result
    weights, subsets, counts = weights[usable], subsets[usable], counts[usable]
    log_loss = np.log(loss)
    power_inputs = {name for term in law.terms for name, _ in term.powers}
    centre = _Centre(float(log_loss.mean()), {name: float(np.log(inputs[name]).mean()) for name in power_inputs})
    design = _Design(law, inputs, centre)
    targets = np.broadcast_to(log_loss - centre.log_loss, subsets.shape)
    estimate = _centred(design, np.array([start[name] for name in law.params], dtype=np.float64))
    least_squares = _refit(design, targets, weights, None, estimate, refine=True)
    residuals = np.where(subsets, design.log_predict(least_squares, jacobian=False)[0] - targets, 0.0)
    with np.errstate(invalid="ignore"):  # groups outside a subset: NaN, left out of its medians
        means = np.where(counts > 0, per_group(residuals) / counts, np.nan)
    middle = np.nanmedian(means, axis=1, keepdims=True)
    scale = 1.4826 * np.nanmedian(np.abs(means - middle), axis=1, keepdims=True)  # as `_auto_delta`
    delta = np.maximum(1.345 * scale, 1e-6)
    result[usable] = _natural(design, _refit(design, targets, weights, delta, estimate, refine=True, lbfgs=True))
    return result


def _centred(design: _Design, natural: np.ndarray) -> np.ndarray:
    """The inverse of `_natural`: parameters (P,) in the caller's units as θ, scales within the fitted bounds."""
    theta = np.array(natural, dtype=np.float64)
    for term in design.law.terms:
        i = design.index[term.scale]
        shift = design.centre.log_loss + sum(theta[design.index[exponent]] * design.centre.log_inputs[name]
                                             for name, exponent in term.powers)
        with np.errstate(divide="ignore"):
            theta[i] = np.log(natural[i]) - shift
    return np.clip(theta, design.lower, design.upper)


def _refit(design: _Design, targets: np.ndarray, weights: np.ndarray, delta: float | np.ndarray | None,
           estimate: np.ndarray, refine: bool = False, lbfgs: bool = False) -> np.ndarray:
    """θ (M, P) refitted to every row of targets and weights (M, n), BOOTSTRAP_BLOCK rows at a time: LM from the
    best candidate of a coarse grid and from `estimate`, the better kept (never from the estimate alone: a flat
    direction shows); then, as `fit_law` finishes, with `lbfgs` an L-BFGS-B polish of each row and with `refine`
    Gauss–Newton steps to the optimum to rounding (`_refine`, a vanishing term tried dropped). δ: one for all rows,
    or (M, 1) a row's own. The bootstrap's resamples and `refit_subsets`' subsets both come here."""
    thetas = []
    for rows in np.array_split(np.arange(len(targets)), max(1, int(np.ceil(len(targets) / BOOTSTRAP_BLOCK)))):
        row_delta = _delta_rows(delta, rows)
        theta, _ = _fit_batch(design, targets[rows], weights[rows], row_delta, BOOTSTRAP_GRID_DENSITY, 1,
                              also=estimate, **BOOTSTRAP_POLISH)
        if lbfgs:  # one row at a time: L-BFGS-B is scipy's, not batched
            theta = np.array([_scipy_polish(design, theta[i], targets[row], weights[row],
                                            delta if np.ndim(delta) == 0 else delta[row, 0])[0]
                              for i, row in enumerate(rows)])
        if refine:
            theta, _ = _refine(design, theta, targets[rows], weights[rows], row_delta, drop_terms=True)
        thetas.append(theta)
    return np.concatenate(thetas)


def _bootstrap(fit: Fit, design: _Design, target: np.ndarray, weights: np.ndarray, groups: _Groups,
               delta: float | None, n_resamples: int, seed: int, replicates: np.ndarray | None,
               estimate: np.ndarray) -> None:
    """Percentile intervals from refits of resamples, all at once: each polished by LM from the best candidate
    of the grid and from the estimate, the better kept (never from the estimate alone: a flat direction shows).
    Point resampling draws measurements (a group is drawn whole)."""
    if replicates is None:
        rng = np.random.default_rng(seed)
        n_groups = len(groups.size)
        counts = rng.multinomial(n_groups, np.full(n_groups, 1 / n_groups), size=n_resamples)[:, groups.group]
        targets, resampled = np.repeat(target[None], n_resamples, axis=0), counts * weights
    else:
        replicates = np.asarray(replicates, dtype=np.float64)
        missing = ~np.isfinite(replicates) | (replicates <= 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            targets = np.where(missing, 0.0, np.log(np.where(missing, 1.0, replicates)) - design.centre.log_loss)
        resampled = np.where(missing, 0.0, weights)
    usable = groups.used(resampled).sum(axis=1) >= len(fit.law.params) + 2
    fit.n_bootstrap = len(resampled)
    fit.n_bootstrap_converged = int(usable.sum())
    if usable.any():
        fit.bootstrap_params = _natural(design, _refit(design, targets[usable], resampled[usable], delta, estimate))
    fit.ci95, fit.ci95_note = _percentile_intervals(fit.law, fit.bootstrap_params, fit.n_bootstrap)


def min_usable_resamples(n_resamples: int) -> int:
    """Usable refits a percentile interval needs: at least 20 (the 2.5th and 97.5th percentiles of fewer draws are
    the extremes, or copies of one another) and at least half of the resamples (when most resamples leave too few
    points, the usable ones are a selected few, not a sample of the data's variation)."""
    return max(20, math.ceil(n_resamples / 2))


def _percentile_intervals(law: Law, draws: np.ndarray | None, n_resamples: int
                          ) -> tuple[dict[str, tuple[float, float] | None] | None, str | None]:
    """95% percentile intervals of the bootstrap `draws` (usable refits, params), or None with the reason: too few
    usable refits for all, a zero-width interval for that parameter (the refits never moved it: no certainty)."""
    n_usable = 0 if draws is None else len(draws)
    needed = min_usable_resamples(n_resamples)
    if n_usable < needed:
        return None, (f"{n_usable} of {n_resamples} resamples gave a usable fit (enough points); a percentile "
                      f"interval needs at least {needed}: max(20, half of the resamples)")
    low, high = np.percentile(draws, [2.5, 97.5], axis=0)
    intervals = {name: (float(lo), float(hi)) if hi > lo else None for name, lo, hi in zip(law.params, low, high)}
    flat = [name for name, bounds in intervals.items() if bounds is None]
    return intervals, (f"zero-width bootstrap interval (every usable refit at one value) for {', '.join(flat)}"
                       if flat else None)


def _check_data(law: Law, inputs: Mapping[str, np.ndarray], loss: np.ndarray
                ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    loss = np.asarray(loss, dtype=np.float64)
    if loss.ndim != 1 or not np.isfinite(loss).all() or (loss <= 0).any():
        raise MMCError(f"law {law.name}: losses must be a 1-D array of positive finite values")
    if len(loss) < len(law.params) + 2:
        raise MMCError(f"law {law.name}: {len(loss)} points cannot determine {len(law.params)} parameters (a fit "
                       f"needs at least {len(law.params) + 2}: parameters + 2)")
    checked = {}
    for name in law.inputs:
        if name not in inputs:
            raise MMCError(f"law {law.name}: missing input '{name}'")
        values = np.asarray(inputs[name], dtype=np.float64)
        if values.shape != loss.shape or not np.isfinite(values).all():
            raise MMCError(f"law {law.name}: input '{name}' must be finite, one value per loss")
        checked[name] = values
    for term in law.terms:
        for name, _ in term.powers:
            if (checked[name] <= 0).any():
                raise MMCError(f"law {law.name}: input '{name}' must be positive")
        if term.shift and (checked[term.shift[0]] + law.bounds[term.shift[1]][0] <= 0).any():
            raise MMCError(f"law {law.name}: input '{term.shift[0]}' + {term.shift[1]} must stay positive "
                           f"(lowest {term.shift[1]} is {law.bounds[term.shift[1]][0]})")
    return checked, loss


def _check_groups(law: Law, groups: np.ndarray | None, loss: np.ndarray) -> np.ndarray | None:
    """The group labels, checked: one integer per point, the points of a group holding one loss, as a construction
    makes them (a group of different losses is a caller's mistake, not a measurement)."""
    if groups is None:
        return None
    groups = np.asarray(groups)
    if groups.shape != loss.shape or not np.issubdtype(groups.dtype, np.integer):
        raise MMCError(f"law {law.name}: groups must be one integer label per point")
    _, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    if (loss != loss[first[inverse]]).any():
        raise MMCError(f"law {law.name}: the points of a group must hold the same loss (a group is one measurement)")
    return groups


@dataclass
class HoldoutCheck:
    fit: Fit
    split_on: str
    held_out: list[float]  # the distinct values of `split_on` that were predicted
    observed: np.ndarray
    predicted: np.ndarray

    @property
    def relative_error(self) -> np.ndarray:
        return self.predicted / self.observed - 1.0

    @property
    def log_error(self) -> np.ndarray:
        return np.log(self.predicted) - np.log(self.observed)

    def to_dict(self) -> dict:
        return {
            "split_on": self.split_on,
            "held_out": self.held_out,
            "n_held_out_points": len(self.observed),
            "max_abs_relative_error": float(np.abs(self.relative_error).max()),
            "mean_abs_relative_error": float(np.abs(self.relative_error).mean()),
            "rmse_log": float(np.sqrt((self.log_error**2).mean())),
            "fit": self.fit.to_dict(),
        }


def holdout_check(law: str | Law, inputs: Mapping[str, np.ndarray], loss: np.ndarray, split_on: str,
                  n_holdout: int = 1, *, huber_delta: float | str | None = "auto",
                  groups: np.ndarray | None = None) -> HoldoutCheck:
    """Fit on the points with the smaller values of `split_on`; predict those at its `n_holdout` largest values
    (`groups` as in `fit_law`)."""
    law = get_law(law)
    inputs, loss = _check_data(law, inputs, loss)
    if split_on not in law.inputs:
        raise MMCError(f"law {law.name}: cannot split on '{split_on}' (inputs: {', '.join(law.inputs)})")
    distinct = np.unique(inputs[split_on])
    if not 1 <= n_holdout < len(distinct):
        raise MMCError(f"law {law.name}: cannot hold out {n_holdout} of {len(distinct)} distinct {split_on} values")
    return predict_held_out(law, inputs, loss, inputs[split_on] >= distinct[-n_holdout], split_on,
                            huber_delta=huber_delta, groups=groups)


def predict_held_out(law: str | Law, inputs: Mapping[str, np.ndarray], loss: np.ndarray, held: np.ndarray,
                     split_on: str, *, huber_delta: float | str | None = "auto",
                     groups: np.ndarray | None = None) -> HoldoutCheck:
    """Fit on the points where `held` is False and predict those where it is True (`split_on` names the input
    whose held-out values are reported; `groups` as in `fit_law`). Too few points left to fit is an MMCError
    (callers report it skipped)."""
    law = get_law(law)
    inputs, loss = _check_data(law, inputs, loss)
    held = np.asarray(held, dtype=bool)
    if not held.any() or held.all():
        raise MMCError(f"law {law.name}: a held-out check needs points on both sides of the split")
    if (~held).sum() < len(law.params) + 2:
        raise MMCError(f"skipped: {(~held).sum()} points left to fit {len(law.params)} parameters (at least "
                       f"{len(law.params) + 2} needed)")
    fit = fit_law(law, {name: values[~held] for name, values in inputs.items()}, loss[~held],
                  huber_delta=huber_delta, groups=None if groups is None else np.asarray(groups)[~held],
                  profile=False)
    return HoldoutCheck(fit=fit, split_on=split_on, held_out=np.unique(inputs[split_on][held]).tolist(),
                        observed=loss[held], predicted=fit.predict(**{name: values[held] for name, values in inputs.items()}))


def json_ready(value: object) -> object:
    """Plain Python values for json.dumps(allow_nan=False): numpy scalars unwrapped, NaN and infinities as None."""
    if isinstance(value, dict):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
