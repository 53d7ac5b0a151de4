"""Benchmarks of the fitting engine, each fit with 1,000 bootstrap refits (and profile intervals).

Targets on 2 CPU cores: `merging` on 6 base sizes x 9 values of k <= 2 s; `power` on 40 points <= 0.5 s;
`chinchilla` on 240 points (24 x 10) <= 2 s.
    python -m pytest tests/test_bench_laws.py --benchmark-enable -s
"""

from __future__ import annotations

import numpy as np
import pytest

from mmc import laws

RESAMPLES = 1000


def data(law_name: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    rng = np.random.default_rng(0)
    if law_name == "merging":
        n_params, k = np.meshgrid(np.geomspace(1e4, 3e6, 6), np.arange(1.0, 10.0))
        inputs = {"N": n_params.ravel(), "k": k.ravel()}
        truth = {"L_star": 1.5, "B": 30.0, "beta": 0.3, "A0": 2.0, "gamma": 0.1, "b": 0.5}
    elif law_name == "power":
        inputs = {"x": np.geomspace(1e4, 1e8, 40)}
        truth = {"E": 1.5, "A": 40.0, "alpha": 0.3}
    else:
        n_params, n_tokens = np.meshgrid(np.geomspace(1e7, 1e10, 24), np.geomspace(1e9, 1e12, 10))
        inputs = {"N": n_params.ravel(), "D": n_tokens.ravel()}
        truth = {"E": 1.69, "A": 406.4, "alpha": 0.34, "B": 410.7, "beta": 0.28}
    clean = laws.LAWS[law_name].predict(truth, **inputs)
    return inputs, clean * rng.lognormal(0.0, 0.01, clean.shape)


@pytest.mark.parametrize("law_name", ["merging", "power", "chinchilla"])
def test_bench_fit_with_bootstrap(benchmark, law_name):
    inputs, loss = data(law_name)
    fit = benchmark.pedantic(laws.fit_law, args=(law_name, inputs, loss), kwargs={"bootstrap": RESAMPLES},
                             rounds=3, iterations=1)
    assert fit.n_bootstrap_converged == RESAMPLES and all(fit.identified.values())
    benchmark.extra_info["points"] = len(loss)
