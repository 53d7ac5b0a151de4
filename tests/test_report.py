"""The report's tables: per-domain attribution, and the merging law's table at one base size."""

from __future__ import annotations

import json

import pandas as pd

from conftest import ROOT

from mmc.report import domain_attribution_markdown, summary_markdown


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
           "holdout": {"max_abs_relative_error": 0.01}, "forecast": {"skipped": "too few points"},
           "baselines": {"per_base_c_plus_a_over_k": {"max_abs_relative_error": 0.02},
                         "carry_last_k_forward": {"max_abs_relative_error": 0.03}}}
    merge_law = {"law": "merging_one_base: L = c + a / (k + b)", "fits": {"average": {"in_domain": fit}}}
    text = summary_markdown(json.loads((ROOT / "metrics" / "laws.json").read_text()), [], merge_law, None)
    assert "| method | loss | c | a | b | R² (log) |" in text
    assert ("| average | in_domain | 1.2 [1.1, 1.3] | 0.5 [0.4, 0.6] | not determined (≥ -0.2) | 0.980 | 0.01 / skipped "
            "| 0.02 / 0.03 |") in text
