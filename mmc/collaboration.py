"""The collaboration study: single-model and multi-model (oracle) scaling laws fitted to the ensemble table.

Reads the oracle's ensemble table (`mmc.oracle`), recomputes every ensemble's oracle loss on bootstrap
resamples of the samples in one streaming pass over the pool, fits L = E + A·x^-alpha (`mmc.laws`) to each
series, and makes the paper's comparisons: multi-model vs single-model floor, heterogeneous vs homogeneous.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from mmc import MMCError, check_number
from mmc.laws import LAWS, Fit, fit_law, holdout_check, json_ready
from mmc.oracle import bootstrap_ensembles, pareto_indices, read_ensembles
from mmc.store import SAMPLE_CHUNK, check_outputs, open_store, write_json, write_tables

COLLABORATION_LAW = "power"
HOLDOUT_FRACTION = 0.2  # default share of the largest budgets (distinct x) predicted by the held-out check
POINT_COLUMNS = ["series", "total_params", "bpb"]
CURVE_COLUMNS = ["series", "total_params", "predicted_bpb", "lower_bpb", "upper_bpb"]


def _series_points(table: pd.DataFrame) -> dict[str, np.ndarray]:
    """The point sets the collaboration laws are fitted to, as boolean row masks of the ensemble table.

    single/pareto (the best single model at each size) against multi/pareto (the best ensemble at each total
    size) is the paper's comparison of floors; single/pooled mixes families and is reported for reference. The
    frontiers are chosen once, on all samples: bootstrap resamples vary the losses of those ensembles (choosing
    the frontier again on each resample would pick the ensembles that were lucky on it, biasing its floor low).
    """
    single = (table.kind == "single").to_numpy()
    params = table.total_params.to_numpy(np.float64)
    bpb = table.oracle_bpb.to_numpy(np.float64)

    def frontier(rows: np.ndarray) -> np.ndarray:
        mask = np.zeros(len(table), dtype=bool)
        mask[np.flatnonzero(rows)[pareto_indices(params[rows], bpb[rows])]] = True
        return mask

    series = {"single/pareto": frontier(single), "single/pooled": single}
    one_family = np.where(table.n_families == 1, table.families.str[0], None)
    families = sorted(set(one_family[single]))
    for family in families:
        series[f"single/{family}"] = single & (one_family == family)
    series["multi/pareto"] = frontier(np.ones(len(table), dtype=bool))
    series["multi/heterogeneous"] = (table.kind == "heterogeneous").to_numpy()
    for family in families:
        series[f"multi/homogeneous/{family}"] = (one_family == family) & (table.kind != "heterogeneous").to_numpy()
    return series


def _fit_series(x: np.ndarray, y: np.ndarray, replicates: np.ndarray | None, seed: int) -> Fit:
    """The collaboration law on one point set (x, y); `replicates` (points, resamples) give the bootstrap fits."""
    return fit_law(COLLABORATION_LAW, {"x": x}, y, seed=seed, replicates=None if replicates is None else replicates.T)


def _holdout(x: np.ndarray, y: np.ndarray, fraction: float) -> dict:
    """Fit on the smaller budgets, predict the largest `fraction` of the distinct budgets (at least one)."""
    n_holdout = max(1, round(fraction * len(np.unique(x))))
    try:
        return holdout_check(COLLABORATION_LAW, {"x": x}, y, "x", n_holdout=n_holdout).to_dict()
    except MMCError as error:
        return {"skipped": str(error).removeprefix("skipped: ")}


def _curve(name: str, fit: Fit, x: np.ndarray, grid_points: int) -> pd.DataFrame:
    """The fitted law from the smallest budget to 4x the largest, with its 95% bootstrap band."""
    grid = np.geomspace(x.min(), x.max() * 4, grid_points)
    curve = pd.DataFrame({"series": name, "total_params": grid, "predicted_bpb": fit.predict(x=grid)})
    if fit.bootstrap_params is not None:
        draws = np.array([fit.law.predict(dict(zip(fit.law.params, theta)), x=grid) for theta in fit.bootstrap_params])
        curve["lower_bpb"], curve["upper_bpb"] = np.percentile(draws, [2.5, 97.5], axis=0)
    return curve.reindex(columns=CURVE_COLUMNS)


def collaboration_laws(table: pd.DataFrame, replicates: np.ndarray | None = None, *, seed: int = 0,
                       holdout_fraction: float = HOLDOUT_FRACTION, grid_points: int = 50
                       ) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    """Fit the single-model and multi-model laws (L = E + A·x^-alpha on bits per byte, x = total parameters).

    `table` is the oracle's ensemble table; `replicates` (ensembles, resamples) its `oracle_bpb` recomputed on
    bootstrap resamples of the samples (`mmc.oracle.bootstrap_ensembles`), which give the 95% intervals
    (a resample that drew no sample, possible only on tiny pools, is NaN: left out and counted). A series with
    fewer points than the law has parameters + 2 gets {"skipped": why} instead of a fit (none fitted at all is an
    MMCError naming every series). The held-out check predicts
    the largest `holdout_fraction` of each series' distinct budgets.
    Returns the metrics (fits, held-out checks, the paper's two comparisons; JSON-ready, NaN as None), the
    fitted points and the fitted curves with bootstrap bands, both tidy for `dvc plots`.
    """
    if not 0 < holdout_fraction < 1:
        raise MMCError(f"holdout_fraction must be between 0 and 1 (got {holdout_fraction})")
    if replicates is not None and replicates.shape[0] != len(table):
        raise MMCError(f"{replicates.shape[0]} rows of bootstrap replicates for {len(table)} ensembles")
    params, bpb = table.total_params.to_numpy(np.float64), table.oracle_bpb.to_numpy(np.float64)
    fits, points, curves = {}, [], []
    for name, rows in _series_points(table).items():
        x, y = params[rows], bpb[rows]
        try:
            fit = _fit_series(x, y, None if replicates is None else replicates[rows], seed)
        except MMCError as error:
            fits[name] = {"skipped": str(error)}
            continue
        fits[name] = {**fit.to_dict(), "holdout": _holdout(x, y, holdout_fraction)}
        points.append(pd.DataFrame({"series": name, "total_params": x, "bpb": y}))
        curves.append(_curve(name, fit, x, grid_points))
    if not any("params" in fit for fit in fits.values()):
        raise MMCError("no series has enough points to fit: " + "; ".join(
            f"series {name}: {fit['skipped'].removeprefix(f'law {COLLABORATION_LAW}: ')}" for name, fit in fits.items()))
    metrics = {
        "loss": "corpus bits per byte: sum of per-sample nll / (sum of bytes * ln 2)",
        "law": f"{COLLABORATION_LAW}: {LAWS[COLLABORATION_LAW].formula}, x = total parameters of the ensemble",
        "bootstrap": {"resamples": 0 if replicates is None else replicates.shape[1],
                      "over": "samples (Poisson weights), oracle losses recomputed; Pareto frontiers chosen on all "
                              "samples"},
        "holdout": {"fraction": holdout_fraction,
                    "rule": "fit on the smaller budgets, predict the largest fraction of distinct budgets "
                            "(at least 1)"},
        "fits": fits,
        "comparisons": _comparisons(table, fits),
    }
    points = pd.concat(points, ignore_index=True) if points else pd.DataFrame(columns=POINT_COLUMNS)
    curves = pd.concat(curves, ignore_index=True) if curves else pd.DataFrame(columns=CURVE_COLUMNS)
    return json_ready(metrics), points, curves


def _comparisons(table: pd.DataFrame, fits: dict) -> dict:
    """The paper's two comparisons: multi-model vs single-model floor; heterogeneous vs homogeneous scaling."""
    def param(series: str, name: str) -> float | None:
        return fits.get(series, {}).get("params", {}).get(name)

    def ci(series: str, name: str) -> list | None:
        return (fits.get(series, {}).get("ci95") or {}).get(name)

    singles = table[table.kind == "single"]
    single_bpb = dict(zip(singles.members.str[0], singles.oracle_bpb))
    gain_bpb = table.best_member.map(single_bpb).to_numpy() - table.oracle_bpb.to_numpy()
    gains = pd.DataFrame({"kind": table.kind, "k": table.k, "gain_bpb": gain_bpb})
    ensembles = gains[gains.kind != "single"]
    by_k = ensembles.groupby(["k", "kind"]).gain_bpb.mean().unstack("kind")
    homogeneous_alphas = {series.rsplit("/", 1)[1]: param(series, "alpha") for series in fits
                          if series.startswith("multi/homogeneous/") and param(series, "alpha") is not None}
    floor_single, floor_multi = param("single/pareto", "E"), param("multi/pareto", "E")
    determined = {series: fits.get(series, {}).get("identified", {}).get("E", False)
                  for series in ("single/pareto", "multi/pareto")}
    return {
        "floor": {
            "compared": "E of single/pareto (best single model per size) vs multi/pareto (best ensemble per size)",
            "identified": determined,
            "note": "both floors are determined by the data" if all(determined.values()) else
                    "a floor the data do not determine (identified: false) is no basis for comparison: compare "
                    "the predictions at matched budgets (predicted_bpb_at) instead",
            "single": floor_single, "single_ci95": ci("single/pareto", "E"),
            "multi": floor_multi, "multi_ci95": ci("multi/pareto", "E"),
            "multi_minus_single": None if None in (floor_single, floor_multi) else floor_multi - floor_single,
            # floors of a 3-parameter law on a handful of points are often not identified (E at its bound):
            # the two laws' predictions at common budgets compare them where the data are
            "predicted_bpb_at": _predictions_at_budgets(table, fits),
        },
        "heterogeneous_vs_homogeneous": {
            "alpha_heterogeneous": param("multi/heterogeneous", "alpha"),
            "alpha_heterogeneous_ci95": ci("multi/heterogeneous", "alpha"),
            "alpha_homogeneous": homogeneous_alphas,
            "alpha_homogeneous_mean": float(np.mean(list(homogeneous_alphas.values()))) if homogeneous_alphas else None,
            "mean_gain_bpb": {kind: float(group.gain_bpb.mean()) for kind, group in ensembles.groupby("kind")},
            "mean_gain_bpb_by_k": {int(k): {kind: float(value) for kind, value in row.dropna().items()}
                                   for k, row in by_k.iterrows()},
        },
    }


def _predictions_at_budgets(table: pd.DataFrame, fits: dict) -> dict:
    """single/pareto and multi/pareto predictions at the largest single model's size and at the whole pool's."""
    budgets = {"largest_single": float(table.total_params[table.kind == "single"].max()),
               "whole_pool": float(table.total_params.max())}
    law = LAWS[COLLABORATION_LAW]
    return {name: {"total_params": x, **{series: float(law.predict(fits[series]["params"], x=x))
                                         for series in ("single/pareto", "multi/pareto") if "params" in fits.get(series, {})}}
            for name, x in budgets.items()}




def fit_collaboration(pool_path: str | Path, oracle_dir: str | Path, out: str | Path, plots: str | Path, *,
                      bootstrap: int, seed: int, holdout_fraction: float = HOLDOUT_FRACTION,
                      sample_chunk: int = SAMPLE_CHUNK) -> dict:
    """The fit stage: the laws of `collaboration_laws` on the oracle's table, with `bootstrap` resamples of the
    pool's samples; writes the metrics JSON to `out` and points.csv and curves.csv into `plots`, atomically.
    Returns the metrics."""
    check_number("--bootstrap", bootstrap, 0, integer=True)
    check_outputs([(out, "collaboration laws"), (plots, "tables")], [pool_path, oracle_dir])
    table = read_ensembles(oracle_dir)
    replicates = None
    if bootstrap:
        replicates = bootstrap_ensembles(open_store(pool_path, chunks={}), table.members.tolist(), bootstrap, seed,
                                         sample_chunk)
    metrics, points, curves = collaboration_laws(table, replicates, seed=seed, holdout_fraction=holdout_fraction)
    write_json(metrics, out, "collaboration laws")
    write_tables({"points": points, "curves": curves}, plots)
    return metrics
