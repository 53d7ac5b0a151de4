"""The merging study: merge sweeps → points and curves over (base, method, k) → the merging law → planning.

The loss at (N, k) is the mean over the k-subsets merged (arXiv 2509.24244's practice), in-domain loss the
macro-average over the expert domains, cross-domain over the others. The law L(N, k) = L* + B·N^-β +
A0·N^-γ/(k + b) is fitted with `mmc.laws` per method and jointly; `plan_merging` answers the paper's
planning questions from a fitted law.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr
from tqdm.auto import tqdm

from mmc import MMCError, check_number, one_library_thread
from mmc.laws import LAWS, fit_law, get_law, holdout_check, json_ready, predict_held_out
from mmc.store import check_outputs, open_store, string_values, write_json, write_tables

MERGING_LAW = "merging"
ONE_BASE_LAW = "merging_one_base"  # what the law reduces to when every merge shares one base size
FORECAST_FROM_K = (1, 2, 4)  # the paper forecasts the whole curve from merges at these k
GAIN_FRACTIONS = (0.8, 0.9)  # the paper's "k reaching 80% / 90% of the total gain"
LOSSES = ("in_domain", "cross_domain")
AT_BOUND_TOLERANCE = 1e-3  # a parameter this close to a bound (relative to the bounds' range) sits at it


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
    domains, codes = np.unique(string_values(store.domain), return_inverse=True)
    one_hot = np.eye(len(domains))[codes] * (1.0 if weights is None else weights[:, None])
    held_in = np.isin(domains, expert_domains)
    experts = string_values(store.experts)
    merged = pd.Series(experts).str.get_dummies(sep=",").reindex(columns=domains, fill_value=0).to_numpy(bool)
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample can leave a domain without samples: NaN
        per_domain = (store.nll.values @ one_hot) / ((store.n_bytes.values.astype(np.float64) @ one_hot) * math.log(2))
        return pd.DataFrame({
            "base": store.attrs["base"], "n_params": store.attrs["n_params"],
            "method": string_values(store.method), "k": store.k.values, "experts": experts,
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
    single_k = {method: int(ks.iloc[0]) for method, ks in curves.groupby("method").k if ks.nunique() == 1}
    for method in [*dict.fromkeys(curves.method), "joint"]:
        def rows(frame, method=method):  # the joint fit leaves out methods merged at one k (slerp: k = 2 only)
            return frame[~frame.method.isin(single_k)] if method == "joint" else frame[frame.method == method]
        if method in single_k:
            fits[method] = {loss: {"skipped": f"merged at k = {single_k[method]} only (the method is defined for "
                                              f"that k alone): a law in k needs several k"} for loss in LOSSES}
            continue
        fits[method] = {}
        for target, column in ((loss, f"{loss}_bpb_mean") for loss in LOSSES):
            if rows(curves)[column].isna().all():
                continue
            try:
                replicated = np.array([rows(c)[column].to_numpy(np.float64) for c in replicate_curves])
                fits[method][target] = fit_merging_law(rows(curves), column, replicated,
                                                       seed=seed, holdout_k=holdout_k)
            except MMCError as error:
                fits[method][target] = {"skipped": str(error)}
    spread = curves.groupby("k")[["in_domain_bpb_std", "cross_domain_bpb_std"]].mean()
    metrics = {
        "loss": "bits per byte, macro-averaged over domains: in_domain over the expert domains, cross_domain over "
                "the eval domains without an expert; the loss at (N, k) is the mean over the k-subsets merged",
        "law": (f"{ONE_BASE_LAW}: {LAWS[ONE_BASE_LAW].formula} (the merging law at one base size)"
                if len({int(s.attrs["n_params"]) for s in stores}) == 1
                else f"{MERGING_LAW}: {LAWS[MERGING_LAW].formula}, N = base parameters"),
        "bootstrap": {"resamples": bootstrap, "over": "eval samples (Poisson weights)"},
        "bases": {"names": [s.attrs["base"] for s in stores], "n_params": [int(s.attrs["n_params"]) for s in stores]},
        "expert_domains": stores[0].attrs["expert_domains"].split(","),
        "fits": fits,
        "spread_over_subsets_by_k": {int(k): {name.removesuffix("_bpb_std"): (None if np.isnan(v) else float(v))
                                              for name, v in row.items()} for k, row in spread.iterrows()},
    }
    return json_ready(metrics), points, curves


def fit_merge_study(stores: Sequence[str | Path], out: str | Path, plots: str | Path, *, bootstrap: int, seed: int,
                    holdout_k: int = 2) -> dict:
    """The fit_merge stage: `fit_merge_laws` on the sweeps' stores; writes the metrics JSON to `out` and
    points.csv and curves.csv into `plots`, atomically. Returns the metrics."""
    check_number("--bootstrap", bootstrap, 0, integer=True)
    check_outputs([(out, "merging law"), (plots, "tables")], list(stores))
    metrics, points, curves = fit_merge_laws(stores, bootstrap=bootstrap, seed=seed, holdout_k=holdout_k)
    errors = [fit["skipped"] for by_loss in metrics["fits"].values() for fit in by_loss.values() if "skipped" in fit]
    if not any("params" in fit for by_loss in metrics["fits"].values() for fit in by_loss.values()):
        raise MMCError(f"no merging law could be fitted: {errors[0] if errors else 'no merges with a loss'}")
    write_json(metrics, out, "merging law")
    write_tables({"points": points, "curves": curves}, plots)
    return metrics


@one_library_thread
def fit_merging_law(curves: pd.DataFrame, target: str, replicates: np.ndarray | None = None, *, seed: int = 0,
                    holdout_k: int = 2, forecast_from: Sequence[int] = FORECAST_FROM_K) -> dict:
    """The merging law L(N, k) fitted to the `target` column of merge curves (one row per base size N and k).

    `replicates` (resamples, rows of `curves`) are the `target` column recomputed on bootstrap resamples of the
    eval samples (they give the 95% intervals). Two held-out checks: `holdout` fits on k <= K - holdout_k and predicts the rest; `forecast`
    fits on the merges at k in `forecast_from` alone (the paper's {1, 2, 4}) and predicts every other k.
    The law is judged against what needs none: R² within bases (`within_base_r2`), the held-out error beside two
    baselines' (`baselines`), and `amplitude_grows_with_n` only where the data determine it (`amplitude_growth`).
    """
    present = curves[target].notna().to_numpy()
    curves = curves[present]
    inputs = {"N": curves.n_params.to_numpy(np.float64), "k": curves.k.to_numpy(np.float64)}
    one_base = len(np.unique(inputs["N"])) == 1
    law = ONE_BASE_LAW if one_base else MERGING_LAW
    if one_base:  # N is constant: the law reduces to c + a/(k + b), and N's terms are not identifiable
        inputs = {"k": inputs["k"]}
    loss = curves[target].to_numpy()
    matrix = None if replicates is None or not len(replicates) else np.asarray(replicates)[:, present]
    fit = fit_law(law, inputs, loss, seed=seed, replicates=matrix)
    result = fit.to_dict()
    if fit.bootstrap_params is not None:  # the plan's intervals: each answer computed for every resample's law
        result["bootstrap_params"] = fit.bootstrap_params.tolist()
    sizes, k = curves.n_params.to_numpy(np.float64), curves.k.to_numpy(np.float64)
    residual = np.log(fit.predict(**inputs)) - np.log(loss)
    result.update(within_base_r2(sizes, np.log(loss), residual))
    if not one_base:
        _, amplitudes = per_base_c_plus_a_over_k(sizes, k, loss, np.ones(len(loss), dtype=bool))
        result["per_base_amplitude"] = _by_base(sizes, amplitudes)
        grows, reason = amplitude_growth(result, amplitudes)
        result["amplitude_grows_with_n"] = grows
        if reason:
            result["amplitude_grows_with_n_reason"] = reason
    checks = {"holdout": lambda: holdout_check(law, inputs, loss, "k", n_holdout=holdout_k),
              "forecast": lambda: predict_held_out(law, inputs, loss, ~np.isin(inputs["k"], forecast_from), "k")}
    if not one_base and len(np.unique(inputs["N"])) >= 4:  # a base size held out: fit on the others, predict it
        checks["held_out_base"] = lambda: _held_out_base(inputs, loss)
    for name, check in checks.items():
        try:
            result[name] = check().to_dict()
        except MMCError as error:
            result[name] = {"skipped": str(error).removeprefix("skipped: ")}
    if "skipped" in result["holdout"]:
        result["baselines"] = {"skipped": "no held-out check to compare with"}
    else:
        result["baselines"] = baselines(k, sizes, loss, k >= np.unique(k)[-holdout_k], result["holdout"])
    return result


def _base_index(sizes: np.ndarray) -> tuple[np.ndarray, int]:
    """Each point's base (an index into the sorted distinct sizes) and the number of bases."""
    distinct, index = np.unique(sizes, return_inverse=True)
    return index, len(distinct)


def _by_base(sizes: np.ndarray, values: np.ndarray) -> dict[str, float | None]:
    """One value per base (sorted by size) keyed by its parameter count, NaN as None."""
    return {str(int(size)): (None if np.isnan(value) else float(value)) for size, value in zip(np.unique(sizes), values)}


def within_base_r2(sizes: np.ndarray, log_loss: np.ndarray, residual: np.ndarray) -> dict:
    """How much of the variation the law explains beyond what one mean per base already explains, in log space.

    The floor term alone fits the differences between base sizes, so the overall R² is high whatever the law
    says about k. `within_base_r2_log` (the headline) is 1 − SS(residuals) / SS(deviations from each base's own
    mean), pooled over bases; `within_base_r2_log_by_base` the same per base (None where a base's losses do not
    vary); `base_means_r2_log` the R² that one mean per base, with no k dependence, already gets.
    """
    base, n_bases = _base_index(sizes)
    counts = np.bincount(base, minlength=n_bases)
    deviation = log_loss - (np.bincount(base, log_loss, n_bases) / counts)[base]
    spread_by_base = np.bincount(base, deviation**2, n_bases)
    residual_by_base = np.bincount(base, residual**2, n_bases)
    total = float(((log_loss - log_loss.mean()) ** 2).sum())
    spread = float(spread_by_base.sum())
    with np.errstate(divide="ignore", invalid="ignore"):
        by_base = np.where(spread_by_base > 0, 1.0 - residual_by_base / spread_by_base, np.nan)
    return {
        "within_base_r2_log": 1.0 - float(residual_by_base.sum()) / spread if spread > 0 else None,
        "within_base_r2_log_by_base": _by_base(sizes, by_base),
        "base_means_r2_log": 1.0 - spread / total if total > 0 else None,
    }


def per_base_c_plus_a_over_k(sizes: np.ndarray, k: np.ndarray, loss: np.ndarray, train: np.ndarray
                             ) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares c and a of loss = c + a/k for each base (sorted by size) on its `train` points; NaN for a
    base whose training points hold fewer than two distinct k."""
    base, n_bases = _base_index(sizes)
    base, x, y = base[train], 1.0 / k[train], loss[train]
    distinct_k = np.bincount(np.unique(np.column_stack([base, k[train]]), axis=0)[:, 0].astype(np.intp),
                             minlength=n_bases)
    with np.errstate(divide="ignore", invalid="ignore"):
        counts = np.bincount(base, minlength=n_bases)
        mean_x, mean_y = np.bincount(base, x, n_bases) / counts, np.bincount(base, y, n_bases) / counts
        dx = x - mean_x[base]
        slope = np.where(distinct_k >= 2, np.bincount(base, dx * (y - mean_y[base]), n_bases)
                         / np.bincount(base, dx**2, n_bases), np.nan)
    return mean_y - slope * mean_x, slope


def _carry_forward(sizes: np.ndarray, k: np.ndarray, loss: np.ndarray, train: np.ndarray) -> np.ndarray:
    """Each point predicted by its base's mean loss at the largest training k (NaN for a base with none)."""
    base, n_bases = _base_index(sizes)
    last = np.full(n_bases, -np.inf)
    np.maximum.at(last, base[train], k[train])
    at_last = train & (k == last[base])
    with np.errstate(divide="ignore", invalid="ignore"):
        return (np.bincount(base[at_last], loss[at_last], n_bases) / np.bincount(base[at_last], minlength=n_bases))[base]


def baselines(k: np.ndarray, sizes: np.ndarray, loss: np.ndarray, held: np.ndarray, law_check: dict) -> dict:
    """The law's held-out errors beside two simple baselines' on the same held-out points: per base c + a/k
    (least squares on the base's training k) and carrying each base's loss at its last training k forward.
    `lowest_max_error` names which of the three has the lowest maximum error (a baseline that cannot predict
    every held-out point, a base with fewer than two training k, takes no part)."""
    c, a = per_base_c_plus_a_over_k(sizes, k, loss, ~held)
    base, _ = _base_index(sizes)
    predictions = {"per_base_c_plus_a_over_k": c[base] + a[base] / k, "carry_last_k_forward":
                   _carry_forward(sizes, k, loss, ~held)}
    errors = {"law": {name: law_check[name] for name in ("max_abs_relative_error", "mean_abs_relative_error")}}
    for name, predicted in predictions.items():
        relative = np.abs(predicted[held] / loss[held] - 1.0)
        errors[name] = ({"max_abs_relative_error": float(relative.max()), "mean_abs_relative_error": float(relative.mean())}
                        if np.isfinite(relative).all() else {"skipped": "a base has too few training k to predict from"})
    scored = {name: error["max_abs_relative_error"] for name, error in errors.items() if "skipped" not in error}
    return {"held_out_k": np.unique(k[held]).tolist(), **errors, "lowest_max_error": min(scored, key=scored.get)}


def at_bound(law: str, name: str, value: float) -> bool:
    """Whether a fitted parameter sits at one of its law's bounds (within 0.1% of the bounds' range, or of
    the value for an unbounded side)."""
    low, high = LAWS[law].bounds[name]
    width = high - low if math.isfinite(high - low) else abs(value)
    return bool(abs(value - low) <= AT_BOUND_TOLERANCE * width or abs(value - high) <= AT_BOUND_TOLERANCE * width)


def amplitude_growth(fit: dict, per_base_amplitudes: np.ndarray) -> tuple[bool | None, str | None]:
    """Whether the merging amplitude A0·N^-γ grows with N (γ < 0), or None and why the data do not say: γ at a
    bound, A0 or γ not identified, γ's profile interval holding 0, or the per-base amplitudes (a of c + a/k per
    base) of both signs, so that the loss falls with k at some bases and rises at others."""
    gamma = fit["params"]["gamma"]
    reasons = []
    if at_bound(fit["law"], "gamma", gamma):
        reasons.append(f"gamma at its bound ({gamma:.4g})")
    reasons += [f"{name} not identified" for name in ("A0", "gamma") if not fit["identified"][name]]
    low, high = fit["profile_ci95"].get("gamma", (None, None))
    if low is not None and high is not None and low <= 0 <= high:
        reasons.append(f"gamma's profile interval [{low:.3g}, {high:.3g}] holds 0")
    signs = np.sign(per_base_amplitudes[np.isfinite(per_base_amplitudes)])
    if len(np.unique(signs)) > 1 or (signs == 0).any():
        reasons.append("the per-base amplitudes (a of c + a/k per base) are not all of one sign")
    return (None, "; ".join(reasons)) if reasons else (bool(gamma < 0), None)


def _held_out_base(inputs: dict[str, np.ndarray], loss: np.ndarray):
    """Fit on every base size but the largest and predict it: the forecast in N that planning relies on."""
    return predict_held_out(MERGING_LAW, inputs, loss, inputs["N"] == inputs["N"].max(), "N")


def plan_merging(params: Mapping[str, float], n_params: float, *, target: float | None = None,
                 epsilon: float = 0.01, budget: float | None = None, sizes: Sequence[float] = (),
                 gain_fractions: Sequence[float] = GAIN_FRACTIONS) -> dict:
    """Planning answers from a fitted merging law at base size `n_params` (the paper's planning formulas).

    With floor(N) = L* + B·N^-β and A(N) = A0·N^-γ, so that L(N, k) = floor + A / (k + b) (the one-base law
    c + a/(k + b) gives floor = c and A = a, at its base's size only):
    (a) the smallest k with L(N, k) <= target, or why there is none (the floor is not below the target);
    (b) the stop rule: the first k at which one more expert gains less than `epsilon` (the marginal gain
        L(k) - L(k+1) = A / ((k+b)(k+1+b))), and k_ε = A/ε − b, the experts needed to come within ε of the floor;
    (c) for a budget of `budget` expert-parameters (k experts of size N cost k·N), the predicted loss of each base
        size in `sizes` with as many experts as the budget buys, and the best;
    and, for each fraction f in `gain_fractions`, the smallest k that reaches f of the gain merging can still
    give beyond one expert, L(1) − L(∞) = A / (1 + b): k ≥ (1 + b) / (1 − f) − b.
    """
    law = get_law(ONE_BASE_LAW if "c" in params else MERGING_LAW)
    check_number("--epsilon", epsilon, 0, low_open=True)
    check_number("--n-params", n_params, 0, low_open=True)
    if target is not None:
        check_number("--target", target, 0, low_open=True)
    if budget is not None:
        check_number("--budget", budget, 0, low_open=True)
    for size in sizes:
        check_number("--sizes", size, 0, low_open=True)
    if "c" in params:  # the one-base law: its constant and amplitude hold at the base's size only
        floor, amplitude = params["c"], params["a"]
    else:
        floor = params["L_star"] + params["B"] * n_params ** -params["beta"]
        amplitude = params["A0"] * n_params ** -params["gamma"]
    b = params["b"]
    answer: dict = {"n_params": n_params, "floor": floor, "amplitude": amplitude,
                    "predicted_at_k1": floor + amplitude / (1 + b)}
    if target is not None:
        if target <= floor:
            answer["target"] = {"target": target, "k": None,
                                "reason": f"the floor at this size ({floor:.6g}) is not below the target"}
        else:
            k = max(1, math.ceil(amplitude / (target - floor) - b - 1e-12))
            answer["target"] = {"target": target, "k": k, "predicted": float(law.predict(params, N=n_params, k=k))}
    # (k+b)(k+1+b) > A/ε beyond the positive root of the quadratic
    root = (-(2 * b + 1) + math.sqrt(1 + 4 * amplitude / epsilon)) / 2
    stop = max(1, math.floor(root) + 1)
    answer["stop"] = {"epsilon": epsilon, "k": stop, "marginal_gain_at_k": amplitude / ((stop + b) * (stop + 1 + b)),
                      "k_within_epsilon_of_floor": amplitude / epsilon - b}
    answer["gain_fractions"] = [{"fraction": f, "k": max(1, math.ceil((1 + b) / (1 - f) - b - 1e-12))}
                                for f in gain_fractions]
    if budget is not None:
        options = [{"n_params": float(size), "k": math.floor(budget / size),
                    "predicted": float(law.predict(params, N=float(size), k=math.floor(budget / size)))}
                   for size in sizes if budget >= size]
        answer["budget"] = {"budget": budget, "options": options,
                            "best": min(options, key=lambda option: option["predicted"]) if options else None}
    return answer


def plan_from_law(law_path: str | Path, *, method: str = "joint", loss: str = "in_domain",
                  n_params: float | None = None, target: float | None = None, epsilon: float = 0.005,
                  budget: float | None = None, budget_multiple: float | None = None,
                  sizes: Sequence[float] | None = None, out: str | Path | None = None) -> dict:
    """The plan stage: `plan_merging` with the `method`'s fit of the `loss` law in a `fit-merge` metrics file, at
    base size `n_params` (default: the largest base); the budget is given in expert-parameters or as a multiple of
    the largest base size. Writes the answers as JSON to `out` when given. Returns them."""
    path = Path(law_path)
    if not path.is_file():
        raise MMCError(f"'{path}' does not exist: fit the merging law first (`mmc fit-merge`, or "
                       f"dvc repro fit_merge@law)")
    law = json.loads(path.read_text(encoding="utf-8"))
    fit = law["fits"].get(method, {}).get(loss, {})
    if "params" not in fit:
        raise MMCError(f"'{path}' has no fitted {loss} law for method '{method}' "
                       f"({fit.get('skipped') or 'it has: ' + ', '.join(law['fits'])})")
    sizes = sizes or law["bases"]["n_params"]
    n_params = n_params or max(sizes)
    if fit.get("law") == ONE_BASE_LAW and {n_params, *sizes} != set(law["bases"]["n_params"]):
        raise MMCError(f"'{path}' holds the merging law at one base size ({law['bases']['n_params'][0]:,} parameters): "
                       f"it cannot answer for another size; merge experts of more bases to plan across sizes")
    if budget is not None and budget_multiple is not None:
        raise MMCError("give --budget or --budget-multiple, not both")
    if budget_multiple is not None:
        check_number("--budget-multiple", budget_multiple, 0, low_open=True)
    budget = budget if budget_multiple is None else budget_multiple * max(sizes)
    budget = None if budget is None else float(budget)
    plan = plan_merging(fit["params"], n_params, target=target, epsilon=epsilon, budget=budget, sizes=sizes)
    draws = [plan_merging(dict(zip(LAWS[fit.get("law", MERGING_LAW)].params, row)), n_params, target=target, epsilon=epsilon,
                          budget=budget, sizes=sizes) for row in fit.get("bootstrap_params", [])]
    _mark_extrapolation(plan, draws, max_k=len(law.get("expert_domains", [])) or None,
                        max_n=max(law["bases"]["n_params"]))
    _mark_resting_on_b(plan, fit)
    plan.update(method=method, loss=loss, law=str(path))
    if out:
        write_json(plan, out, "merge plan")
    return plan


def _mark_extrapolation(plan: dict, draws: list[dict], *, max_k: int | None, max_n: float) -> None:
    """Mark every answer beyond the observed range (k above the experts merged, N above the largest base) as
    extrapolation, and give each answer (each k, the floor, A(N), the loss of one expert) its 95% interval over
    the bootstrap resamples' laws (None: unreachable)."""
    def interval(pick) -> list | None:
        values = np.array([np.inf if pick(draw) is None else pick(draw) for draw in draws], dtype=float)
        if not len(values):
            return None
        low, high = np.percentile(values, [2.5, 97.5])
        return [float(low), None if not np.isfinite(high) else float(high)]

    def mark(answer: dict, k_key: str, pick) -> None:
        k = answer.get(k_key)
        answer["extrapolation"] = bool(plan["n_params"] > max_n or (k is not None and max_k is not None and k > max_k))
        answer["ci95"] = interval(pick)

    plan["observed"] = {"max_k": max_k, "max_n_params": max_n, "n_params_extrapolated": bool(plan["n_params"] > max_n)}
    for key in ("floor", "amplitude", "predicted_at_k1"):
        plan[f"{key}_ci95"] = interval(lambda draw, key=key: draw[key])
    plan["stop"]["k_within_epsilon_of_floor_ci95"] = interval(lambda draw: draw["stop"]["k_within_epsilon_of_floor"])
    if "target" in plan:
        mark(plan["target"], "k", lambda draw: draw["target"]["k"])
    mark(plan["stop"], "k", lambda draw: draw["stop"]["k"])
    for i, row in enumerate(plan["gain_fractions"]):
        mark(row, "k", lambda draw, i=i: draw["gain_fractions"][i]["k"])
    for i, option in enumerate(plan.get("budget", {}).get("options", [])):
        mark(option, "k", lambda draw, i=i: draw["budget"]["options"][i]["predicted"])
        option["extrapolation"] = bool(option["extrapolation"] or option["n_params"] > max_n)


def b_determination(fit: dict) -> dict:
    """What the data say about the offset b of a fitted merging law: its estimate, profile interval (None on an
    open side), whether it is identified or sits at a bound, the share of bootstrap refits at a bound, and
    `determined` (identified and not at a bound; a fit that does not record identification determines nothing)."""
    law = fit.get("law", MERGING_LAW)
    estimate = fit["params"]["b"]
    identified = fit.get("identified", {}).get("b")
    draws = np.array(fit.get("bootstrap_params", []), dtype=float).reshape(-1, len(LAWS[law].params))
    at_bounds = [at_bound(law, "b", value) for value in draws[:, LAWS[law].params.index("b")]]
    return {"estimate": estimate, "profile_ci95": fit.get("profile_ci95", {}).get("b"), "identified": identified,
            "at_bound": at_bound(law, "b", estimate),
            "share_of_resamples_at_bound": float(np.mean(at_bounds)) if at_bounds else None,
            "determined": bool(identified) and not at_bound(law, "b", estimate)}


def _mark_resting_on_b(plan: dict, fit: dict) -> None:
    """Record what the data say about b (`plan["b"]`) and mark every answer computed through b: the k for a
    target, the stop rule, the k reaching a fraction of the gain (a function of b alone) and the budget's options;
    `rests_on_undetermined_b` is true where b is not determined. An unreachable target rests on the floor alone."""
    plan["b"] = b_determination(fit)
    undetermined = not plan["b"]["determined"]
    answers = [plan["stop"], *plan["gain_fractions"], *plan.get("budget", {}).get("options", [])]
    if plan.get("target", {}).get("k") is not None:
        answers.append(plan["target"])
    for answer in answers:
        answer["rests_on_undetermined_b"] = undetermined


def plan_text(plan: dict) -> str:
    """The planning answers as lines for a terminal."""
    lines = [f"plan for {plan['method']} ({plan['loss']} loss, bits per byte) at N = {plan['n_params']:,.0f}: "
             + ", ".join(f"{label} {plan[key]:.4f}{interval_text(plan.get(f'{key}_ci95'))}" for label, key in
                         (("floor", "floor"), ("A(N)", "amplitude"), ("one expert", "predicted_at_k1")))]
    lines += [f"  {b_text(plan)}"] if b_text(plan) else []
    if "target" in plan:
        answer = plan["target"]
        lines.append(f"  (a) target {answer['target']}: " + (f"k = {answer['k']} (predicted {answer['predicted']:.4f})"
                                                             if answer["k"] else f"unreachable: {answer['reason']}")
                     + beyond_text(answer))
    stop = plan["stop"]
    lines.append(f"  (b) stop at k = {stop['k']}{beyond_text(stop)}: the next expert gains {stop['marginal_gain_at_k']:.5f} < "
                 f"{stop['epsilon']}; within epsilon of the floor from k = {stop['k_within_epsilon_of_floor']:.1f}"
                 + interval_text(stop.get("k_within_epsilon_of_floor_ci95")))
    lines.append("      " + ", ".join(f"{row['fraction']:.0%} of the gain beyond one expert at k = {row['k']}{beyond_text(row)}"
                                      for row in plan["gain_fractions"]))
    if "budget" in plan:
        lines.append(f"  (c) budget {plan['budget']['budget']:,.0f} expert-parameters (k experts of size N cost k*N):")
        for option in plan["budget"]["options"]:
            best = " <- best" if option == plan["budget"]["best"] else ""
            lines.append(f"      N = {option['n_params']:>12,.0f}  k = {option['k']:>3}  "
                         f"predicted {option['predicted']:.4f}{beyond_text(option)}{best}")
    return "\n".join(lines)


def interval_text(interval: list | None) -> str:
    """' [a, b]' for a 95% interval (b None: unreachable), '' without one."""
    if not interval:
        return ""
    return f" [{interval[0]:.4g}, " + ("unreachable" if interval[1] is None else f"{interval[1]:.4g}") + "]"


def beyond_text(answer: dict) -> str:
    """' (extrapolated; rests on b, not determined; 95% interval [a, b])': what qualifies an answer."""
    interval = interval_text(answer.get("ci95"))
    parts = (["extrapolated"] if answer.get("extrapolation") else []) \
        + (["rests on b, not determined"] if answer.get("rests_on_undetermined_b") else []) \
        + ([f"95% interval{interval}"] if interval else [])
    return f" ({'; '.join(parts)})" if parts else ""


def b_text(plan: dict) -> str:
    """A sentence on what the data say about b where they do not determine it ('' where they do, or without a
    record of it)."""
    b = plan.get("b")
    if not b or b["determined"]:
        return ""
    low, high = b["profile_ci95"] or (None, None)
    details = [f"profile interval [{'open' if low is None else f'{low:.3g}'}, {'open' if high is None else f'{high:.3g}'}]"
               if b["profile_ci95"] else "no profile interval recorded"]
    details += ["at its bound"] if b["at_bound"] else []
    if b["share_of_resamples_at_bound"] is not None:
        details.append(f"{b['share_of_resamples_at_bound']:.0%} of the bootstrap refits at a bound")
    return (f"b = {b['estimate']:.4g} is not determined by the data ({'; '.join(details)}): every answer marked "
            "'rests on b' depends on it, and the k reaching a fraction of the gain is a function of b alone.")
