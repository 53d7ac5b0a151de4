"""The report's tables: per-domain attribution, and the merging law's table beside its baselines."""

from __future__ import annotations

import json

import pandas as pd

from conftest import ROOT

from mmc.merge_law import fit_merge_laws, plan_from_law
from mmc.report import domain_attribution_markdown, merging_markdown, summary_markdown
from mmc.store import write_store
from test_merge_law import law_following_store


def test_domain_attribution_table_lists_each_members_win_share_and_shapley_per_domain():
    by_domain = pd.DataFrame({
        "domain": ["code", "code", "prose", "prose"], "model": ["big", "small", "big", "small"],
        "family": ["a", "b", "a", "b"], "n_params": [2e9, 1e8, 2e9, 1e8], "n_samples": [4, 4, 6, 6],
        "mean_nll": [10.0, 12.0, 30.0, 20.0], "win_share": [0.75, 0.25, 0.0, 1.0], "shapley": [6.5, 3.5, 11.25, 8.75]})
    lines = domain_attribution_markdown(by_domain).splitlines()
    assert lines[2:] == ["| domain | samples | small | big |", "|---|---|---|---|",
                         "| code | 4 | 25% / 3.5 | 75% / 6.5 |", "| prose | 6 | 100% / 8.8 | 0% / 11.2 |"]


def test_merging_table_at_one_base_shows_c_a_b_and_the_baselines_beside_the_law():
    fit = {"law": "merging_one_base", "params": {"c": 1.2, "a": 0.5, "b": 0.3},
           "identified": {"c": True, "a": True, "b": False},
           "profile_ci95": {"c": [1.1, 1.3], "a": [0.4, 0.6], "b": [-0.2, None]}, "r2_log": 0.98,
           "within_base_r2_log": 0.98, "base_means_r2_log": 0.0,
           "holdout": {"max_abs_relative_error": 0.01}, "forecast": {"skipped": "too few points"},
           "baselines": {"law": {"max_abs_relative_error": 0.01}, "per_base_c_plus_a_over_k": {"max_abs_relative_error": 0.02},
                         "carry_last_k_forward": {"max_abs_relative_error": 0.03}, "lowest_max_error": "law"}}
    merge_law = {"law": "merging_one_base: L = c + a / (k + b)", "fits": {"average": {"in_domain": fit}}}
    text = summary_markdown(json.loads((ROOT / "metrics" / "laws.json").read_text()), [], merge_law, None)
    assert ("| method | loss | c | a | b | R² within bases (log) | R² of one mean per base / overall | held-out k, max "
            "rel. error: law / c + a/k per base / last k carried forward |") in text
    assert ("| average | in_domain | 1.2 [1.1, 1.3] (conditional) | 0.5 [0.4, 0.6] (conditional) | not determined "
            "(≥ -0.2) | 0.98 | 0 / 0.98 | **0.01** / 0.02 / 0.03 | skipped |") in text


def test_merging_table_from_fresh_outputs_puts_the_baselines_beside_the_law(tmp_path):
    """The fit_merge stage's metrics and the plan, computed here: the headline is R² within bases, the held-out
    error of the law stands beside both baselines' (the lowest in bold), and the amplitude flag is spelled out."""
    paths = []
    for n_params in (1e4, 4e4, 1.6e5, 6.4e5):
        paths.append(tmp_path / f"{int(n_params)}.zarr")
        write_store(law_following_store(int(n_params), {"average": 1.0}), paths[-1], "merge sweep")
    merge_law, _, _ = fit_merge_laws(paths, bootstrap=0, seed=0)
    (tmp_path / "law.json").write_text(json.dumps(merge_law))
    plan = plan_from_law(tmp_path / "law.json", epsilon=0.01)
    text = summary_markdown(json.loads((ROOT / "metrics" / "laws.json").read_text()), [], merge_law, plan)
    fit = merge_law["fits"]["average"]["in_domain"]
    baselines = fit["baselines"]
    errors = [baselines[name]["max_abs_relative_error"] for name in ("law", "per_base_c_plus_a_over_k",
                                                                     "carry_last_k_forward")]
    assert baselines["lowest_max_error"] == "law" and errors[0] < min(errors[1:])
    held_out = f"**{errors[0]:.4g}** / {errors[1]:.4g} / {errors[2]:.4g}"
    row = next(line for line in text.splitlines() if line.startswith("| average | in_domain |"))
    assert (f"| {fit['within_base_r2_log']:.4g} | {fit['base_means_r2_log']:.4g} / {fit['r2_log']:.4g} | no | "
            f"{held_out} |") in row
    assert "R² within bases is the headline" in text and "## Planning" in text


def test_an_amplitude_flag_the_data_do_not_determine_is_shown_with_its_reason():
    fit = {"law": "merging", "params": dict.fromkeys(["L_star", "B", "beta", "A0", "gamma", "b"], 1.0),
           "identified": dict.fromkeys(["L_star", "B", "beta", "A0", "gamma", "b"], True),
           "profile_ci95": dict.fromkeys(["L_star", "B", "beta", "A0", "gamma", "b"], [0.5, 1.5]), "r2_log": 0.999,
           "within_base_r2_log": -0.43, "base_means_r2_log": 0.9995, "amplitude_grows_with_n": None,
           "amplitude_grows_with_n_reason": "gamma at its bound (-3)", "holdout": {"skipped": "too few k"},
           "forecast": {"skipped": "too few k"}, "baselines": {"skipped": "no held-out check to compare with"}}
    text = merging_markdown({"law": "merging", "fits": {"ties": {"cross_domain": fit}}})
    assert "| -0.43 | 0.9995 / 0.999 | not determined (gamma at its bound (-3)) | skipped | skipped |" in text


def test_the_collaboration_table_shows_the_combined_interval_and_labels_the_profile_conditional():
    """The interval shown resamples documents and members (ci95); a profile interval appears only where no resampled
    one is available, marked conditional; a parameter not determined keeps its one-sided (profile) bound."""
    laws = json.loads((ROOT / "metrics" / "laws.json").read_text())
    laws["member_jackknife"] = {"members": 24}
    laws["bootstrap"] = {"resamples": 200, "over": "samples (Poisson weights)"}
    fit = {**laws["fits"]["multi/pareto"], "params": {"E": 0.6, "A": 20.0, "alpha": 0.2},
           "identified": {"E": True, "A": True, "alpha": False},
           "profile_ci95": {"E": [0.58, 0.62], "A": [18.0, 22.0], "alpha": [0.1, None]},
           "ci95": {"E": [0.4, 0.9], "A": None, "alpha": None}, "ci95_documents": {"E": [0.59, 0.61]}}
    laws["fits"] = {"multi/pareto": fit}
    text = summary_markdown(laws, [], None, None)
    assert "| multi/pareto | " in text and ("| 0.6 [0.4, 0.9] | 20 [18, 22] (conditional) | not determined (≥ 0.1) |"
                                           in text)
    assert ("Intervals: 95%, resampling documents (200 resamples of the samples (Poisson weights)) and members "
            "(delete-one jackknife over the 24 members") in text
    assert "A profile interval is *conditional* (assumes independent, equal-variance errors" in text
    assert "[0.59, 0.61]" not in text  # the documents-only interval stays in the metrics
