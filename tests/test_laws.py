"""Law fits recover known parameters: bootstrap intervals cover the truth, starts agree, extrapolation holds."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mmc import MMCError, laws

TRUE_PARAMS = {
    "power": {"E": 1.8, "A": 200.0, "alpha": 0.3},
    "chinchilla": {"E": 1.69, "A": 406.4, "alpha": 0.34, "B": 410.7, "beta": 0.28},
    "merging": {"L_star": 1.5, "B": 1.0, "beta": 0.4, "A0": 0.8, "gamma": 0.3, "b": 1.0},
}
NOISE = {"power": 0.01, "chinchilla": 0.01, "merging": 0.005}  # lognormal sigma of the observed losses
SPLIT_ON = {"power": "x", "chinchilla": "N", "merging": "N"}


def design(law_name: str) -> dict[str, np.ndarray]:
    if law_name == "power":
        return {"x": np.logspace(6, 9, 15)}  # e.g. total parameters over three decades
    if law_name == "chinchilla":
        n_params, n_tokens = np.meshgrid(np.logspace(7, 10, 6), np.logspace(9, 12, 6))
        return {"N": n_params.ravel(), "D": n_tokens.ravel()}
    base_size, experts = np.meshgrid([0.5, 1.5, 4.0, 14.0], np.arange(1, 9))  # billions × merged experts
    return {"N": base_size.ravel(), "k": experts.ravel().astype(float)}


def observe(law_name: str, seed: int, noise: float) -> tuple[dict[str, np.ndarray], np.ndarray]:
    inputs = design(law_name)
    clean = laws.LAWS[law_name].predict(TRUE_PARAMS[law_name], **inputs)
    return inputs, clean * np.exp(np.random.default_rng(seed).normal(0.0, noise, clean.shape))


@pytest.mark.parametrize("law_name", list(laws.LAWS))
def test_bootstrap_intervals_cover_the_true_parameters(law_name):
    covered = dict.fromkeys(TRUE_PARAMS[law_name], 0)
    for seed in range(10):
        inputs, loss = observe(law_name, seed, NOISE[law_name])
        fit = laws.fit_law(law_name, inputs, loss, bootstrap=200, seed=seed)
        assert fit.n_bootstrap == 200 and fit.n_bootstrap_converged >= 190
        assert fit.n_converged > 0 and fit.r2_log > 0.99
        for name, true_value in TRUE_PARAMS[law_name].items():
            low, high = fit.ci95[name]
            covered[name] += low <= true_value <= high
    assert all(count >= 9 for count in covered.values()), covered


@pytest.mark.parametrize("law_name", list(laws.LAWS))
def test_every_start_reaches_the_same_optimum_on_noise_free_data(law_name):
    inputs, loss = observe(law_name, 0, 0.0)
    fit = laws.fit_law(law_name, inputs, loss)
    assert fit.n_starts >= 8 and fit.n_converged == fit.n_starts and fit.same_optimum
    assert fit.objective < 1e-15 and fit.rmse_log < 1e-6 and fit.r2_log == pytest.approx(1.0)
    true_values = np.array([TRUE_PARAMS[law_name][name] for name in fit.law.params])
    np.testing.assert_allclose(fit.start_params, np.broadcast_to(true_values, fit.start_params.shape), rtol=1e-4)
    np.testing.assert_allclose(fit.start_objectives, 0.0, atol=1e-12)
    assert fit.params == pytest.approx(TRUE_PARAMS[law_name], rel=1e-5)


@pytest.mark.parametrize("law_name", list(laws.LAWS))
def test_predict_round_trips(law_name):
    law = laws.LAWS[law_name]
    inputs, loss = observe(law_name, 0, 0.0)
    fit = laws.fit_law(law_name, inputs, loss)
    np.testing.assert_allclose(fit.predict(**inputs), loss, rtol=1e-6)
    record = json.loads(json.dumps(fit.to_dict()))
    assert record["law"] == law_name and record["formula"] == law.formula
    assert record["params"] == fit.params  # unrounded
    assert record["same_optimum"] is True and record["n_points"] == len(loss)
    assert law.predict(record["params"], **inputs) == pytest.approx(fit.predict(**inputs))


def test_predict_matches_the_formulas():
    n, d, k = np.array([1e8, 1e9]), np.array([1e10, 2e11]), np.array([1.0, 4.0])
    assert laws.LAWS["power"].predict({"E": 1.0, "A": 10.0, "alpha": 0.5}, x=n) == pytest.approx(1 + 10 / np.sqrt(n))
    chinchilla = TRUE_PARAMS["chinchilla"]
    assert laws.LAWS["chinchilla"].predict(chinchilla, N=n, D=d) == pytest.approx(
        1.69 + 406.4 * n**-0.34 + 410.7 * d**-0.28)
    assert laws.LAWS["merging"].predict(TRUE_PARAMS["merging"], N=np.array([0.5, 4.0]), k=k) == pytest.approx(
        1.5 + np.array([0.5, 4.0])**-0.4 + 0.8 * np.array([0.5, 4.0])**-0.3 / (k + 1.0))
    with pytest.raises(MMCError, match="missing D"):
        laws.LAWS["chinchilla"].predict(chinchilla, N=n)


@pytest.mark.parametrize("law_name", list(laws.LAWS))
def test_holdout_check_extrapolates_noise_free_data(law_name):
    inputs, loss = observe(law_name, 0, 0.0)
    check = laws.holdout_check(law_name, inputs, loss, split_on=SPLIT_ON[law_name])
    largest = inputs[SPLIT_ON[law_name]].max()
    assert check.held_out == [largest]
    assert len(check.observed) == int((inputs[SPLIT_ON[law_name]] == largest).sum())
    assert check.fit.n_points == len(loss) - len(check.observed)
    summary = check.to_dict()
    assert summary["max_abs_relative_error"] < 1e-6 and summary["rmse_log"] < 1e-6


def test_holdout_check_reports_extrapolation_error_on_noisy_data():
    inputs, loss = observe("power", 3, 0.01)
    check = laws.holdout_check("power", inputs, loss, split_on="x", n_holdout=3)
    assert len(check.held_out) == 3 and check.fit.n_points == 12
    np.testing.assert_allclose(check.relative_error, check.predicted / check.observed - 1)
    assert 0 < np.abs(check.relative_error).max() < 0.1
    with pytest.raises(MMCError, match="cannot hold out"):
        laws.holdout_check("power", inputs, loss, split_on="x", n_holdout=15)
    with pytest.raises(MMCError, match="cannot split"):
        laws.holdout_check("power", inputs, loss, split_on="N")


def test_custom_resampling_drives_the_bootstrap():
    calls = []

    def resample(rng: np.random.Generator):
        calls.append(rng)
        return observe("power", int(rng.integers(1 << 30)), NOISE["power"])

    inputs, loss = observe("power", 0, NOISE["power"])
    fit = laws.fit_law("power", inputs, loss, bootstrap=20, seed=4, resample=resample)
    assert len(calls) == 20 and fit.n_bootstrap_converged == 20 and fit.bootstrap_params.shape == (20, 3)
    again = laws.fit_law("power", inputs, loss, bootstrap=20, seed=4, resample=resample)
    assert again.ci95 == fit.ci95  # seeded: the same resamples


def test_custom_starts_and_bad_data():
    inputs, loss = observe("power", 0, 0.0)
    fit = laws.fit_law("power", inputs, loss, starts={"alpha": [0.2], "E": [0.3], "A": [0.3]})
    assert fit.n_starts == 1 and fit.params == pytest.approx(TRUE_PARAMS["power"], rel=1e-5)
    with pytest.raises(MMCError, match="unknown law"):
        laws.fit_law("cubic", inputs, loss)
    with pytest.raises(MMCError, match="positive finite"):
        laws.fit_law("power", inputs, -loss)
    with pytest.raises(MMCError, match="cannot determine"):
        laws.fit_law("power", {"x": inputs["x"][:2]}, loss[:2])
    with pytest.raises(MMCError, match="missing input"):
        laws.fit_law("chinchilla", inputs, loss)
    with pytest.raises(MMCError, match="must stay positive"):
        laws.fit_law("merging", {"N": np.full(8, 1.0), "k": np.arange(8.0)}, np.linspace(2, 3, 8))
    with pytest.raises(MMCError, match="positive fractions"):
        laws.fit_law("power", inputs, loss, starts={"E": [0.0]})
