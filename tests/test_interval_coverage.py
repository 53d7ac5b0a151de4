"""Coverage of the collaboration laws' 95% intervals, by simulation on pools that share documents and members.

Opt-in (minutes): MMC_COVERAGE=200 python -m pytest tests/test_interval_coverage.py -s
(the value is the number of simulated pools; results in docs/results/benchmarks.md).

Design. A pool of 12 members: 3 families x 4 sizes (1e4 to 1e6 parameters, the families' sizes 10% apart), each
family with its own law of bits per byte l_f(N) = E_f + A_f N^-alpha_f. Every simulated pool draws
- new documents (300, lengths log-normal): a difficulty shared by every member, and one affinity per family and
  document, so all points share the same documents (dependent errors) and families win on different documents
  (the oracle gains);
- new members: a seed effect per member (every ensemble holding it moves with it: member redraws);
- per member and document noise whose spread falls with size (heteroscedastic: 3x larger at the smallest size).
A sample's nll is its bytes x ln 2 x l_f(N) x exp(difficulty + affinity + seed effect + noise).

The truth. The estimand is the law fitted to the expected points: each ensemble's oracle bits per byte averaged
over redraws of documents and members (TRUTH_DRAWS pools of TRUTH_DOCUMENTS documents), the multi-model frontier
chosen on those expected points. A simulated pool goes through the pipeline's own code (`run_oracle`,
`bootstrap_ensembles`, `collaboration_laws`), and its interval (`ci95`, what the report shows) covers the truth
or not. A parameter the pool does not determine has no interval; it is counted apart (`not_determined`), and
coverage is over the pools that give an interval. Beside coverage: the spread of the estimates over the simulated
pools (what an interval should reflect) and the standard error the intervals imply (width / 3.92), on the log
scale for E and A: an interval much wider than the spread covers by being uninformative, and the summary says so.
"""

from __future__ import annotations

import math
import os
from functools import lru_cache

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from mmc.collaboration import COLLABORATION_LAW, collaboration_laws
from mmc.laws import fit_law
from mmc.oracle import bootstrap_ensembles, pareto_indices, run_oracle

SIMULATIONS = int(os.environ.get("MMC_COVERAGE", "0"))
pytestmark = pytest.mark.skipif(not SIMULATIONS, reason="coverage simulation: opt in with MMC_COVERAGE=<pools>")

FAMILIES = {"f": (2.00, 60.0, 0.30), "g": (2.05, 40.0, 0.26), "h": (1.95, 90.0, 0.33)}  # E, A, alpha (bits/byte)
SIZES = np.geomspace(1e4, 1e6, 4)
DOCUMENTS = 300
RESAMPLES = 200
TRUTH_DRAWS, TRUTH_DOCUMENTS = 100, 6000
DIFFICULTY_SD, AFFINITY_SD, SEED_SD, NOISE_SD = 0.25, 0.12, 0.03, 0.08
SERIES = ("multi/pareto", "multi/heterogeneous")
LOG_SCALE = {"E", "A"}  # scale parameters: their spread and intervals are compared on the log scale


def members() -> pd.DataFrame:
    rows = [(f"{family}{i}", family, round(size * (1.1 ** j)), law)
            for j, (family, law) in enumerate(FAMILIES.items()) for i, size in enumerate(SIZES)]
    return pd.DataFrame(rows, columns=["name", "family", "n_params", "law"])


def simulate_pool(rng: np.random.Generator, n_documents: int) -> xr.Dataset:
    table = members()
    e, a, alpha = (np.array([law[i] for law in table.law]) for i in range(3))
    n_params = table.n_params.to_numpy(np.float64)
    bits_per_byte = e + a * n_params ** -alpha
    family = pd.factorize(table.family)[0]
    n_bytes = np.maximum(20, rng.lognormal(np.log(800), 0.6, n_documents)).round()
    difficulty = rng.normal(0.0, DIFFICULTY_SD, n_documents)
    affinity = rng.normal(0.0, AFFINITY_SD, (len(FAMILIES), n_documents))[family]
    seed_effect = rng.normal(0.0, SEED_SD, len(table))
    noise_sd = NOISE_SD * (n_params / SIZES[0]) ** -0.24  # 3x larger at the smallest size than at the largest
    noise = rng.normal(0.0, 1.0, (len(table), n_documents)) * noise_sd[:, None]
    nll = (n_bytes * math.log(2) * bits_per_byte[:, None]
           * np.exp(difficulty + affinity + seed_effect[:, None] + noise))
    return xr.Dataset({"nll": (("model", "sample"), nll)},
                      coords={"model": table.name.tolist(), "family": ("model", table.family.tolist()),
                              "n_params": ("model", table.n_params.to_numpy()),
                              "n_params_nonembedding": ("model", table.n_params.to_numpy()),
                              "n_bytes": ("sample", n_bytes.astype(np.int64)),
                              "sample": [f"s{i}" for i in range(n_documents)]})


def oracle_table(pool: xr.Dataset) -> pd.DataFrame:
    return run_oracle(pool, max_subsets_per_k=10**6, seed=0)["ensembles"]


@lru_cache(maxsize=1)
def truth() -> dict[str, dict[str, float]]:
    """The law's parameters fitted to the expected points, per series."""
    tables = [oracle_table(simulate_pool(np.random.default_rng([7, draw]), TRUTH_DOCUMENTS))
              for draw in range(TRUTH_DRAWS)]
    table = tables[0].copy()
    table["oracle_bpb"] = np.mean([t.oracle_bpb.to_numpy() for t in tables], axis=0)
    x, y = table.total_params.to_numpy(np.float64), table.oracle_bpb.to_numpy()
    rows = {"multi/pareto": pareto_indices(x, y), "multi/heterogeneous": np.flatnonzero(table.kind == "heterogeneous")}
    return {name: fit_law(COLLABORATION_LAW, {"x": x[r]}, y[r], profile=False).params for name, r in rows.items()}


def simulate(seed: int) -> dict[str, dict]:
    pool = simulate_pool(np.random.default_rng([11, seed]), DOCUMENTS)
    table = oracle_table(pool)
    replicates = bootstrap_ensembles(pool, table.members.tolist(), RESAMPLES, seed)
    metrics, _, _ = collaboration_laws(table, replicates, seed=seed)
    return {name: metrics["fits"][name] for name in SERIES}


def test_the_intervals_shown_cover_the_truth_on_pools_with_shared_documents_and_members():
    expected = truth()
    outcomes = []
    for seed in range(SIMULATIONS):
        for name, fit in simulate(seed).items():
            for param, value in expected[name].items():
                interval = (fit.get("ci95") or {}).get(param)
                profile = (fit.get("profile_ci95") or {}).get(param)
                scale = np.log if param in LOG_SCALE else (lambda v: v)
                estimate = (fit.get("params") or {}).get(param)
                outcomes.append({"series": name, "param": param, "truth": value, "estimate": estimate,
                                 "fitted_scale": None if estimate is None else scale(estimate),
                                 "implied_se": None if interval is None else float(np.diff(scale(interval))[0]) / 3.92,
                                 "shown": None if interval is None else interval[0] <= value <= interval[1],
                                 "profile": None if profile is None or None in profile
                                 else profile[0] <= value <= profile[1]})
    outcomes = pd.DataFrame(outcomes)
    summary = outcomes.groupby(["series", "param"]).agg(
        truth=("truth", "first"), mean_estimate=("estimate", "mean"),
        shown=("shown", lambda c: c.dropna().astype(float).mean()),
        profile=("profile", lambda c: c.dropna().astype(float).mean()),
        not_determined=("shown", lambda c: int(c.isna().sum())),
        sd_of_estimates=("fitted_scale", "std"), median_implied_se=("implied_se", "median"))
    print(f"\n{SIMULATIONS} simulated pools; coverage of the 95% intervals:\n{summary.to_string()}")
    assert (summary.shown >= 0.90).all(), summary
