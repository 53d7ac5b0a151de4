"""Scaling laws: named formulas fitted by robust least squares on log loss, with bootstrap intervals.

Every law here is a sum of positive terms, scale · Π input^(−exponent) [/ (input + offset)], so log L is a
log-sum-exp of terms that are linear in the log-scales and exponents. Fits minimise Σ Huber_δ(log L_pred −
log L_obs) (δ = 1e-3) with L-BFGS-B and analytic gradients from a grid of starts. Internally the losses and
inputs are centred on their geometric means, which keeps the problem well conditioned whatever the units;
reported parameters are in the caller's units, unrounded.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import OptimizeResult, minimize

from mmc import MMCError

HUBER_DELTA = 1e-3
# fitted log-scales stay within e^±40 of the data's typical loss at its typical inputs
LOG_SCALE_BOUND = 40.0
# converged starts "agree" when their objectives differ by at most this, relative (absolute below δ²)
SAME_OPTIMUM_RTOL = 1e-6
# default starts: scales as fractions of the typical loss, exponents and offsets as themselves
DEFAULT_STARTS = {"scale": (0.1, 0.5), "exponent": (0.1, 0.4, 1.0), "offset": (0.0, 2.0)}
# L-BFGS-B's default tolerances suit the objective scaled to units of δ² (see _Problem.scaled_objective);
# tighter ones only trade convergence for line-search failures at the kinks of the Huber loss
OPTIMIZER_OPTIONS = {"maxiter": 2000}


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
        {"L_star": POSITIVE, "B": POSITIVE, "beta": EXPONENT_BOUNDS, "A0": POSITIVE, "gamma": EXPONENT_BOUNDS,
         "b": (-0.99, 50.0)},
        (Term("L_star"), Term("B", (("N", "beta"),)), Term("A0", (("N", "gamma"),), shift=("k", "b")))),
)}


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
    objective: float  # Σ Huber_δ of the log residuals at the optimum
    r2_log: float
    rmse_log: float
    n_points: int
    start_objectives: np.ndarray = field(repr=False)  # (starts,) Σ Huber_δ where each start ended
    start_params: np.ndarray = field(repr=False)  # (starts, params) where each start ended
    start_converged: np.ndarray = field(repr=False)  # (starts,) L-BFGS-B reported success
    ci95: dict[str, tuple[float, float]] | None = None
    n_bootstrap: int = 0
    n_bootstrap_converged: int = 0
    bootstrap_params: np.ndarray | None = field(default=None, repr=False)  # (converged resamples, params)

    @property
    def n_starts(self) -> int:
        return len(self.start_objectives)

    @property
    def n_converged(self) -> int:
        return int(self.start_converged.sum())

    @property
    def n_at_optimum(self) -> int:
        """Converged starts whose objective matches the best one's (relative tolerance SAME_OPTIMUM_RTOL)."""
        tolerance = SAME_OPTIMUM_RTOL * max(self.objective, HUBER_DELTA**2)
        return int((self.start_converged & (self.start_objectives <= self.objective + tolerance)).sum())

    @property
    def same_optimum(self) -> bool:
        """Every converged start reached the best objective: the optimum does not depend on where we began."""
        return self.n_converged > 0 and self.n_at_optimum == self.n_converged

    def predict(self, **inputs: np.ndarray | float) -> np.ndarray:
        return self.law.predict(self.params, **inputs)

    def to_dict(self) -> dict:
        return {
            "law": self.law.name,
            "formula": self.law.formula,
            "params": dict(self.params),
            "ci95": None if self.ci95 is None else {name: list(bounds) for name, bounds in self.ci95.items()},
            "objective": self.objective,
            "r2_log": self.r2_log,
            "rmse_log": self.rmse_log,
            "n_points": self.n_points,
            "n_starts": self.n_starts,
            "n_converged": self.n_converged,
            "n_at_optimum": self.n_at_optimum,
            "same_optimum": self.same_optimum,
            "n_bootstrap": self.n_bootstrap,
            "n_bootstrap_converged": self.n_bootstrap_converged,
        }


@dataclass(frozen=True)
class _Centre:
    log_loss: float
    log_inputs: dict[str, float]


class _Problem:
    """A law on one data set in the fitting parameterisation: θ holds the centred log of each scale,
    log S − log L̄ + Σ exponent · log x̄ (bars: geometric means), and the exponents and offsets as they are."""

    def __init__(self, law: Law, inputs: Mapping[str, np.ndarray], loss: np.ndarray,
                 centre: _Centre | None = None) -> None:
        self.law = law
        log_loss = np.log(loss)
        power_inputs = {name for term in law.terms for name, _ in term.powers}
        self.centre = centre or _Centre(float(log_loss.mean()),
                                        {name: float(np.log(inputs[name]).mean()) for name in power_inputs})
        self.target = log_loss - self.centre.log_loss
        self.centred_logs = {name: np.log(inputs[name]) - self.centre.log_inputs[name] for name in power_inputs}
        self.shift_inputs = {term.shift[0]: np.asarray(inputs[term.shift[0]], dtype=np.float64)
                             for term in law.terms if term.shift}
        self.index = {name: i for i, name in enumerate(law.params)}
        self.bounds = [(-LOG_SCALE_BOUND, LOG_SCALE_BOUND) if law.kind(name) == "scale" else law.bounds[name]
                       for name in law.params]

    def log_predict(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Centred log L_pred (points,) and its Jacobian (points, params): a softmax-weighted sum over terms."""
        n_points = len(self.target)
        exponents = np.empty((n_points, len(self.law.terms)))
        shifted = {}  # term index -> shift input + offset
        for t, term in enumerate(self.law.terms):
            exponents[:, t] = theta[self.index[term.scale]]
            for name, exponent in term.powers:
                exponents[:, t] -= theta[self.index[exponent]] * self.centred_logs[name]
            if term.shift:
                name, offset = term.shift
                shifted[t] = self.shift_inputs[name] + theta[self.index[offset]]
                exponents[:, t] -= np.log(shifted[t])
        peak = exponents.max(axis=1, keepdims=True)
        weights = np.exp(exponents - peak)
        total = weights.sum(axis=1)
        weights /= total[:, None]
        jacobian = np.zeros((n_points, len(theta)))
        for t, term in enumerate(self.law.terms):
            jacobian[:, self.index[term.scale]] = weights[:, t]
            for name, exponent in term.powers:
                jacobian[:, self.index[exponent]] = -weights[:, t] * self.centred_logs[name]
            if term.shift:
                jacobian[:, self.index[term.shift[1]]] = -weights[:, t] / shifted[t]
        return peak[:, 0] + np.log(total), jacobian

    def scaled_objective(self, theta: np.ndarray, weights: np.ndarray | None = None) -> tuple[float, np.ndarray]:
        """Σ w · Huber_δ(r) / δ² and its gradient: Huber in units of δ, so L-BFGS-B's tolerances fit its size."""
        prediction, jacobian = self.log_predict(theta)
        z = (prediction - self.target) / HUBER_DELTA
        small = np.abs(z) <= 1.0
        losses = np.where(small, 0.5 * z * z, np.abs(z) - 0.5)
        slopes = np.clip(z, -1.0, 1.0)
        if weights is not None:
            losses, slopes = losses * weights, slopes * weights
        return float(losses.sum()), jacobian.T @ slopes / HUBER_DELTA

    def minimise(self, theta0: np.ndarray, weights: np.ndarray | None = None) -> OptimizeResult:
        return minimize(self.scaled_objective, theta0, args=(weights,), jac=True, method="L-BFGS-B",
                        bounds=self.bounds, options=OPTIMIZER_OPTIONS)

    def to_natural(self, theta: np.ndarray) -> np.ndarray:
        natural = np.array(theta, dtype=np.float64)
        for term in self.law.terms:
            i = self.index[term.scale]
            shift = self.centre.log_loss + sum(theta[self.index[exponent]] * self.centre.log_inputs[name]
                                               for name, exponent in term.powers)
            natural[i] = math.exp(theta[i] + shift)
        return natural

    def start_grid(self, starts: Mapping[str, Sequence[float]] | None) -> np.ndarray:
        """Product grid of starting θ: scales from fractions of the typical loss, the rest as given, clipped."""
        axes = []
        for name, (low, high) in zip(self.law.params, self.bounds):
            kind = self.law.kind(name)
            values = np.asarray((starts or {}).get(name, DEFAULT_STARTS[kind]), dtype=np.float64)
            if kind == "scale":
                if (values <= 0).any():
                    raise MMCError(f"starts for scale {name} must be positive fractions of the typical loss")
                values = np.log(values)
            axes.append(np.clip(values, low, high))
        return np.array(list(itertools.product(*axes)))


def fit_law(law: str | Law, inputs: Mapping[str, np.ndarray], loss: np.ndarray, *,
            starts: Mapping[str, Sequence[float]] | None = None, bootstrap: int = 0, seed: int = 0,
            resample: Callable[[np.random.Generator], tuple[Mapping[str, np.ndarray], np.ndarray]] | None = None,
            ) -> Fit:
    """Fit `law` to (inputs, loss) from a grid of starts; optionally bootstrap 95% percentile intervals.

    `starts` maps a parameter to its start values (scales as fractions of the data's typical loss; default
    DEFAULT_STARTS). The default bootstrap resamples the points with replacement (as multiplicity weights);
    `resample(rng) -> (inputs, loss)` supplies other resampled data sets instead. Bootstrap fits start from the
    point estimate; resamples whose fit does not converge, or whose data cannot determine the law, are left out
    of the intervals (`n_bootstrap_converged` counts the others).
    """
    law = get_law(law)
    inputs, loss = _check_data(law, inputs, loss)
    problem = _Problem(law, inputs, loss)
    results = [problem.minimise(theta0) for theta0 in problem.start_grid(starts)]
    converged = np.array([result.success for result in results])
    best = min(itertools.compress(results, converged) if converged.any() else results,
               key=lambda result: result.fun)
    residuals = problem.log_predict(best.x)[0] - problem.target
    total_variance = float(((problem.target - problem.target.mean()) ** 2).sum())
    fit = Fit(
        law=law,
        params=dict(zip(law.params, problem.to_natural(best.x).tolist())),
        objective=best.fun * HUBER_DELTA**2,
        r2_log=1.0 - float((residuals**2).sum()) / total_variance if total_variance > 0 else math.nan,
        rmse_log=float(np.sqrt((residuals**2).mean())),
        n_points=len(loss),
        start_objectives=np.array([result.fun for result in results]) * HUBER_DELTA**2,
        start_params=np.array([problem.to_natural(result.x) for result in results]),
        start_converged=converged,
    )
    if bootstrap > 0:
        _bootstrap(fit, problem, best.x, bootstrap, np.random.default_rng(seed), resample)
    return fit


def _bootstrap(fit: Fit, problem: _Problem, theta_hat: np.ndarray, n_resamples: int, rng: np.random.Generator,
               resample: Callable | None) -> None:
    estimates = []
    for _ in range(n_resamples):
        if resample is None:
            counts = np.bincount(rng.integers(0, fit.n_points, fit.n_points), minlength=fit.n_points)
            result = problem.minimise(theta_hat, counts.astype(np.float64))
        else:
            try:
                inputs, loss = _check_data(fit.law, *resample(rng))
            except MMCError:  # a resample that cannot determine the law (too few points, NaN) counts as failed
                continue
            result = _Problem(fit.law, inputs, loss, centre=problem.centre).minimise(theta_hat)
        if result.success:
            estimates.append(problem.to_natural(result.x))
    fit.n_bootstrap = n_resamples
    fit.n_bootstrap_converged = len(estimates)
    if estimates:
        fit.bootstrap_params = np.array(estimates)
        low, high = np.percentile(fit.bootstrap_params, [2.5, 97.5], axis=0)
        fit.ci95 = {name: (float(lo), float(hi)) for name, lo, hi in zip(fit.law.params, low, high)}


def _check_data(law: Law, inputs: Mapping[str, np.ndarray], loss: np.ndarray
                ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    loss = np.asarray(loss, dtype=np.float64)
    if loss.ndim != 1 or not np.isfinite(loss).all() or (loss <= 0).any():
        raise MMCError(f"law {law.name}: losses must be a 1-D array of positive finite values")
    if len(loss) < len(law.params):
        raise MMCError(f"law {law.name}: {len(loss)} points cannot determine {len(law.params)} parameters")
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
                  n_holdout: int = 1, *, starts: Mapping[str, Sequence[float]] | None = None) -> HoldoutCheck:
    """Fit on the points with the smaller values of `split_on`; predict those at its `n_holdout` largest values."""
    law = get_law(law)
    inputs, loss = _check_data(law, inputs, loss)
    if split_on not in law.inputs:
        raise MMCError(f"law {law.name}: cannot split on '{split_on}' (inputs: {', '.join(law.inputs)})")
    distinct = np.unique(inputs[split_on])
    if not 1 <= n_holdout < len(distinct):
        raise MMCError(f"law {law.name}: cannot hold out {n_holdout} of {len(distinct)} distinct {split_on} values")
    return predict_held_out(law, inputs, loss, inputs[split_on] >= distinct[-n_holdout], split_on, starts=starts)


def predict_held_out(law: str | Law, inputs: Mapping[str, np.ndarray], loss: np.ndarray, held: np.ndarray,
                     split_on: str, *, starts: Mapping[str, Sequence[float]] | None = None) -> HoldoutCheck:
    """Fit on the points where `held` is False and predict those where it is True (`split_on` names the input
    whose held-out values are reported)."""
    law = get_law(law)
    inputs, loss = _check_data(law, inputs, loss)
    held = np.asarray(held, dtype=bool)
    if not held.any() or held.all():
        raise MMCError(f"law {law.name}: a held-out check needs points on both sides of the split")
    fit = fit_law(law, {name: values[~held] for name, values in inputs.items()}, loss[~held], starts=starts)
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
