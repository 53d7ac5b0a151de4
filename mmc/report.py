"""The report: PNG figures of the fitted laws and a readable summary (reports/README.md).

Reads only the pipeline's outputs (metrics JSON, tidy CSVs); every figure is on log-log axes where the law is
a power law, with the fitted curves and their 95% bootstrap bands.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from mmc import MMCError  # noqa: E402
from mmc.laws import LAWS  # noqa: E402
from mmc.merge_law import MERGING_LAW, b_text, beyond_text, interval_text  # noqa: E402
from mmc.oracle import pareto_indices, read_ensembles  # noqa: E402
from mmc.store import atomic_path, check_outputs  # noqa: E402

STYLE = {"figure.dpi": 110, "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False,
         "axes.spines.right": False, "legend.frameon": False, "font.size": 10}
PARAMS_LABEL = "parameters (total of the ensemble)"
BPB_LABEL = "eval loss (bits per byte)"


def _plain(text: object) -> str:
    """A name as literal figure text: a `$` would start matplotlib's math mode."""
    return str(text).replace("$", r"\$")


def _md(text: object) -> str:
    """A name as literal Markdown table text: HTML escaped, `|` cannot end the cell."""
    return html.escape(str(text)).replace("|", r"\|")


def _read_csv(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise MMCError(f"'{path}' does not exist: run the stage that writes it first (dvc repro)")
    return pd.read_csv(path)


def _family_colors(families) -> dict[str, str]:
    palette = plt.get_cmap("tab10").colors
    return {family: palette[i % len(palette)] for i, family in enumerate(sorted(set(families)))}


def _band(ax, curve: pd.DataFrame, color, label: str | None, style: str = "-", alpha: float = 0.15) -> None:
    """A fitted law's curve with its 95% bootstrap band where it has one."""
    if curve.empty:
        return
    ax.plot(curve.total_params, curve.predicted_bpb, style, color=color, label=label, lw=1.6)
    if "lower_bpb" in curve and curve.lower_bpb.notna().all():
        ax.fill_between(curve.total_params, curve.lower_bpb, curve.upper_bpb, color=color, alpha=alpha, lw=0)


def _parameter_count(value: float, _position=None) -> str:
    """20k, 1.5M, 7B: short labels for parameter counts."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def _log_axes(ax, title: str, xlabel: str = PARAMS_LABEL) -> None:
    """Log-log axes whose tick labels never collide: parameters at 1, 2, 5 x 10^n, losses with two decimals."""
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(BPB_LABEL)
    ax.set_title(title)
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(_parameter_count))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=np.arange(1.0, 10.0), numticks=12))
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.2f"))
    ax.yaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def figure_scaling(points: pd.DataFrame, curves: pd.DataFrame, ensembles: pd.DataFrame, path: Path) -> None:
    """Single-model vs multi-model scaling: every ensemble, the two Pareto frontiers and their fitted laws."""
    fig, ax = plt.subplots(figsize=(7, 4.6))
    others = ensembles[ensembles.kind != "single"]
    ax.scatter(others.total_params, others.oracle_bpb, s=6, color="0.75", label="ensembles (oracle)", zorder=1)
    singles = ensembles[ensembles.kind == "single"].assign(family=lambda frame: frame.families.str[0])
    colors = _family_colors(singles.family)
    for family, color in colors.items():
        own = singles[singles.family == family]
        ax.scatter(own.total_params, own.oracle_bpb, s=28, color=color, label=f"{_plain(family)} models", zorder=3)
    frontier = points[points.series == "multi/pareto"]
    ax.scatter(frontier.total_params, frontier.bpb, s=14, marker="s", facecolor="none", edgecolor="black",
               label="multi-model Pareto frontier", zorder=2)
    _band(ax, curves[curves.series == "single/pareto"], "tab:red", "single-model law", "--")
    _band(ax, curves[curves.series == "multi/pareto"], "black", "multi-model law")
    _log_axes(ax, "Single-model vs multi-model (oracle) scaling")
    ax.legend(fontsize=8, loc="lower left")
    _save(fig, path)


def figure_kinds(points: pd.DataFrame, curves: pd.DataFrame, path: Path) -> None:
    """Heterogeneous vs homogeneous ensembles: points and fitted laws."""
    fig, ax = plt.subplots(figsize=(7, 4.6))
    hetero = points[points.series == "multi/heterogeneous"]
    ax.scatter(hetero.total_params, hetero.bpb, s=5, color="0.6", alpha=0.6, label="heterogeneous ensembles")
    _band(ax, curves[curves.series == "multi/heterogeneous"], "black", "heterogeneous law")
    homogeneous = sorted(s for s in points.series.unique() if s.startswith("multi/homogeneous/"))
    colors = _family_colors(s.rsplit("/", 1)[1] for s in homogeneous)
    for series in homogeneous:
        family = series.rsplit("/", 1)[1]
        own = points[points.series == series]
        ax.scatter(own.total_params, own.bpb, s=18, color=colors[family], label=f"homogeneous {_plain(family)}")
        _band(ax, curves[curves.series == series], colors[family], f"{family} law", "--")
    _log_axes(ax, "Heterogeneous vs homogeneous ensembles")
    ax.legend(fontsize=8, loc="lower left", ncol=2)
    _save(fig, path)


def figure_expected(expected: pd.DataFrame, path: Path) -> None:
    """The exact expected oracle loss of a random k-subset, for the pool and each family."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    colors = _family_colors(s for s in expected.scope.unique() if s != "pool")
    for scope, curve in expected.groupby("scope", sort=False):
        ax.plot(curve.k, curve.expected_oracle_bpb, "o-", ms=3, lw=1.6 if scope == "pool" else 1.2,
                color="black" if scope == "pool" else colors[scope], label="whole pool" if scope == "pool" else _plain(scope))
    ax.set_xlabel("ensemble size k (models drawn at random)")
    ax.set_ylabel(BPB_LABEL)
    ax.set_title("Expected oracle loss of a random k-subset")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.legend(fontsize=8)
    _save(fig, path)


def figure_attribution(attribution: pd.DataFrame, path: Path) -> None:
    """Each model's win share and Shapley value in the oracle game."""
    table = attribution.sort_values(["family", "n_params"])
    colors = _family_colors(table.family)
    fig, axes = plt.subplots(1, 2, figsize=(9, 0.32 * len(table) + 1.6), sharey=True)
    positions = np.arange(len(table))
    bar_colors = [colors[f] for f in table.family]
    axes[0].barh(positions, table.win_share, color=bar_colors)
    axes[0].set_xlabel("win share\n(fraction of samples on which it is best)")
    axes[1].barh(positions, table.shapley, color=bar_colors)
    axes[1].set_xlabel("Shapley value: share of the pool's oracle loss\n(nats per sample; lower = more useful)")
    axes[0].set_yticks(positions, [_plain(model) for model in table.model])
    axes[0].invert_yaxis()
    fig.suptitle("Who carries the oracle ensemble")
    _save(fig, path)


def figure_merging(curves: pd.DataFrame, fits: dict, path: Path) -> None:
    """Merging: in-domain loss against k, per method (panels) and base size (colors), with the fitted law."""
    methods = list(dict.fromkeys(curves.method))
    fig, axes = plt.subplots(1, len(methods), figsize=(3.3 * len(methods), 3.6), sharey=True, squeeze=False)
    sizes = sorted(curves.n_params.unique())
    palette = plt.get_cmap("viridis")(np.linspace(0.1, 0.85, len(sizes)))
    for ax, method in zip(axes[0], methods):
        fit = fits.get(method, {}).get("in_domain", {})
        for color, size in zip(palette, sizes):
            own = curves[(curves.method == method) & (curves.n_params == size)]
            ax.errorbar(own.k, own.in_domain_bpb_mean, yerr=own.in_domain_bpb_std.fillna(0), fmt="o", ms=3,
                        color=color, capsize=2, label=f"N = {size / 1e3:.0f}k")
            if "params" in fit:
                k = np.linspace(1, own.k.max(), 50)
                ax.plot(k, LAWS[fit.get("law", MERGING_LAW)].predict(fit["params"], N=size, k=k), color=color, lw=1.2)
        ax.set_title(_plain(method))
        ax.set_xlabel("experts merged (k)")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axes[0][0].set_ylabel("in-domain loss (bits per byte)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Merging k domain experts: mean loss over expert subsets (bars: ±1 std across subsets) "
                 "and the fitted merging law")
    _save(fig, path)


def figure_merging_spread(curves: pd.DataFrame, path: Path) -> None:
    """The spread of the in-domain loss across expert subsets against k (the paper: it shrinks roughly as 1/k)."""
    spread = curves.dropna(subset=["in_domain_bpb_std"])
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for method, own in spread.groupby("method", sort=True):
        mean = own.groupby("k").in_domain_bpb_std.mean()
        ax.plot(mean.index, mean.values, "o-", ms=4, lw=1.4, label=_plain(method))
    ax.set_xlabel("experts merged (k)")
    ax.set_ylabel("std of in-domain loss across subsets\n(bits per byte, mean over bases)")
    ax.set_title("Which experts are merged matters less as k grows")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.legend(fontsize=8)
    _save(fig, path)


STRATEGY_STYLE = {"oracle": ("black", "oracle (bound)"), "mixture_fitted": ("tab:blue", "mixture, fitted weights"),
                  "mixture_uniform": ("tab:cyan", "mixture, uniform"), "router_ngram": ("tab:orange", "router: n-grams"),
                  "router_small_model": ("tab:green", "router: smallest model"),
                  "router_knn": ("tab:purple", "router: nearest neighbours"),
                  "router_mlp": ("tab:brown", "router: perceptron"), "perfect": ("black", "perfect router (bound)"),
                  "cascade": ("tab:olive", "cascade: smallest, then best"),
                  "router_best_single": ("tab:red", "best single member"), "single": ("tab:red", "single models")}


def figure_routing(curves: pd.DataFrame, shares: dict, path: Path) -> None:
    """Realisable collaboration. Left: each strategy's test loss on its Pareto frontier (chosen on the training
    documents) against total parameters, with its fitted law and 95% band, dashed beyond the frontier's largest
    budget (drawn there only for a law whose parameters are all determined). Right: the share of the oracle's gain each strategy realises at each k."""
    fig, (ax, right) = plt.subplots(1, 2, figsize=(11, 4.6), gridspec_kw={"width_ratios": [3, 2]})
    for strategy, own in curves.groupby("strategy", sort=False):
        color, label = STRATEGY_STYLE.get(strategy, ("0.5", _plain(strategy)))
        seen = own.dropna(subset=["observed_bpb"])
        ax.scatter(seen.total_params, seen.observed_bpb, s=12, color=color, label=label, zorder=3)
        law = own.dropna(subset=["predicted_bpb"])
        extrapolated = law.extrapolated.astype(bool)
        _band(ax, law[~extrapolated], color, None, alpha=0.08)
        _band(ax, law[extrapolated | extrapolated.shift(-1, fill_value=False)], color, None, "--", alpha=0.08)
    _log_axes(ax, "Realisable vs oracle scaling (test documents)")
    ax.legend(fontsize=8)
    for strategy, share in shares.items():
        if strategy == "k":
            continue
        color, label = STRATEGY_STYLE.get(strategy, ("0.5", _plain(strategy)))
        values = np.asarray(share["value"], dtype=np.float64)
        right.plot(shares["k"], values, "o-", ms=3, color=color, label=label)
        bounds = np.array([ci if ci else (np.nan, np.nan) for ci in share["ci95"]], dtype=np.float64)
        right.fill_between(shares["k"], bounds[:, 0], bounds[:, 1], color=color, alpha=0.15, lw=0)
    right.axhline(1.0, color="black", lw=0.8)
    right.axhline(0.0, color="tab:red", lw=0.8)
    right.set_xlabel("ensemble size k")
    right.set_ylabel("share of the oracle's gain realised")
    right.set_title("Share realised, by k")
    right.legend(fontsize=8)
    right.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    _save(fig, path)


def figure_routing_cost(strategies: pd.DataFrame, path: Path, router_curves: pd.DataFrame | None = None) -> None:
    """Test loss against inference FLOPs per byte for every ensemble and strategy, with the frontier over all; with
    `router_curves`, a right panel: each router's cost–quality curve at the whole pool (λ or threshold swept), its
    operating points and the non-decreasing convex hull whose mean is its AIQ, on RouterBench's linear cost axis."""
    if router_curves is None:
        fig, ax = plt.subplots(figsize=(7, 4.6))
    else:
        fig, (ax, right) = plt.subplots(1, 2, figsize=(12, 4.6))
        for router, own in router_curves.groupby("router", sort=False):
            color, label = STRATEGY_STYLE.get(router, ("0.5", _plain(router)))
            right.scatter(own.flops_per_byte, own.test_bpb, s=6, alpha=0.4, color=color)
            knots = own[own.on_hull.astype(bool)].sort_values("flops_per_byte")
            right.plot([*knots.flops_per_byte, own.flops_per_byte.max()], [*knots.test_bpb, knots.test_bpb.iloc[-1]],
                       "-", lw=1.4, color=color, label=label)  # the hull, held flat to the curve's largest cost
        right.set_xlabel("inference FLOPs per byte")
        right.set_ylabel(BPB_LABEL)
        right.set_title("Cost–quality curves at the whole pool (hulls)")
        right.legend(fontsize=7)
    for strategy, own in strategies.groupby("strategy", sort=False):
        color, label = STRATEGY_STYLE.get(strategy, ("0.5", _plain(strategy)))
        ax.scatter(own.flops_per_byte, own.test_bpb, s=5, alpha=0.5, color=color, label=label)
    realisable = strategies[strategies.strategy != "oracle"]
    frontier = realisable.iloc[pareto_indices(realisable.flops_per_byte.to_numpy(), realisable.test_bpb.to_numpy())]
    ax.step(frontier.flops_per_byte, frontier.test_bpb, where="post", color="black", lw=1.2,
            label="best realisable loss at each cost")
    _log_axes(ax, "Loss against inference cost", xlabel="inference FLOPs per byte")
    ax.legend(fontsize=7, markerscale=2)
    _save(fig, path)


def routing_markdown(routing: dict) -> str:
    """The realisable-collaboration section of reports/README.md."""
    largest = routing["at_largest_k"]
    rows = [f"At the whole pool (k = {largest['k']}, {largest['total_params']:.3g} parameters), test documents "
            f"(bits per byte, 95% intervals over {routing['bootstrap']['resamples']} resamples of them); best single "
            f"member {_md(largest['best_single_member'])}, best router {_md(largest['best_router'])} (both chosen on "
            "the training documents)" + (":" if "oracle_gain_over_best_single" not in largest else
                                         "; the oracle's gain over the best single member, paired on the same "
                                         "resampled documents, is " + _fmt(largest["oracle_gain_over_best_single"]["value"],
                                                                           largest["oracle_gain_over_best_single"]["ci95"])
                                         + " bits per byte:"),
            "", "| strategy | bits per byte | share of the oracle's gain |", "|---|---|---|"]
    for name, value in largest["bpb"].items():
        if name == "best_single":  # the same member as router_best_single's row
            continue
        share = largest["share_of_oracle_gain"].get(name)
        rows.append(f"| {_md(STRATEGY_STYLE.get(name, (None, name))[1])} | {_fmt(value['value'], value['ci95'])} | "
                    + (_fmt(share["value"], share["ci95"]) if share else "–") + " |")
    rows += ["", "| frontier law | points | E | A | alpha |", "|---|---|---|---|---|"]
    for name, fit in routing["laws"].items():
        label = _md(STRATEGY_STYLE.get(name, (None, name))[1])
        rows.append(f"| {label} | skipped: {_skipped(fit)} | | | |" if "params" not in fit else
                    f"| {label} | {_points(fit)} | "
                    + " | ".join(parameter_text(fit, name) for name in ("E", "A", "alpha")) + " |")
    shares = routing["share_of_oracle_gain_by_k"]
    strategies = [name for name in shares if name != "k"]
    rows += ["", ("Share of the oracle's gain realised over all ensembles of each size k (Σ best member − strategy "
                  "over Σ best member − oracle; each ensemble's best member chosen on the training documents):"), "",
             "| k | " + " | ".join(_md(STRATEGY_STYLE.get(name, (None, name))[1]) for name in strategies) + " |",
             "|---|" + "---|" * len(strategies)]
    for i, k in enumerate(shares["k"]):
        rows.append(f"| {k} | " + " | ".join(_fmt(shares[name]["value"][i], shares[name]["ci95"][i])
                                             for name in strategies) + " |")
    return "\n".join(rows + _cost_quality_rows(routing))


def _cost_quality_rows(routing: dict) -> list[str]:
    """The whole pool's cost–quality curves: each router's AIQ and oracle gap at matched cost, and the router that
    realises most of the oracle's gain."""
    curves, largest = routing.get("cost_quality_at_largest_k"), routing["at_largest_k"]
    if not curves:  # older routing metrics
        return []
    best = largest["best_router"]
    share = largest["share_of_oracle_gain"][best]
    rows = ["", f"The router chosen on the training documents, {_md(STRATEGY_STYLE.get(best, (None, best))[1])}, "
                f"realises {_fmt(share['value'], share.get('ci95'))} of the oracle's gain at the whole pool (test "
                "documents).", "",
            "Cost–quality curves at the whole pool (" + curves["axes"] + "). Higher AIQ is better; the oracle gap "
            "is in bits per byte." + (f" The cascade runs {_md(curves['cascade']['cheap'])} and escalates to "
                                      f"{_md(curves['cascade']['escalates_to'])}; " + curves["cascade"]["note"] + "."
                                      if curves.get("cascade") else ""), "",
            "| router | AIQ | oracle gap at matched cost | FLOPs per byte spanned |", "|---|---|---|---|"]
    for name, values in curves["routers"].items():
        low, high = values["flops_per_byte_range"]
        rows.append(f"| {_md(STRATEGY_STYLE.get(name, (None, name))[1])} | "
                    f"{_fmt(values['aiq']['value'], values['aiq']['ci95'])} | "
                    f"{_fmt(values['oracle_gap']['value'], values['oracle_gap']['ci95'])} | {low:.3g}–{high:.3g} |")
    return rows


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    with atomic_path(path, "figure") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _fmt(value, ci=None) -> str:
    if value is None:
        return "–"
    text = f"{value:.4g}"
    return f"{text} [{ci[0]:.4g}, {ci[1]:.4g}]" if ci else text


def _points(fit: dict) -> str:
    measurements = fit["n_measurements"]
    return f"{fit['n_points']}" + (f" ({measurements} measurements)" if measurements < fit["n_points"] else "")


def parameter_text(fit: dict, name: str) -> str:
    """A fitted parameter as the data determine it: the value with the 95% interval its fit shows (`ci95`: for the
    collaboration laws documents and members resampled), or, where there is none, its profile interval marked
    "conditional" (it assumes independent, equal-variance errors); "not determined" with the one-sided bound the
    profile gives where the profile does not close (never a number with a zero-width interval)."""
    low, high = (fit.get("profile_ci95") or {}).get(name, (None, None))
    if not fit.get("identified", {}).get(name, False):
        bound = f" (≥ {low:.4g})" if low is not None else f" (≤ {high:.4g})" if high is not None else ""
        return f"not determined{bound}"
    shown = (fit.get("ci95") or {}).get(name)
    return _fmt(fit["params"][name], shown) if shown else f"{_fmt(fit['params'][name], (low, high))} (conditional)"


def intervals_text(laws: dict) -> str:
    """What the collaboration tables' intervals resample, for the report's header."""
    members = laws.get("member_jackknife", {}).get("members")
    resampled = (f"Intervals: 95%, resampling documents ({laws['bootstrap']['resamples']} resamples of the "
                 f"{laws['bootstrap']['over']})")
    if members is not None:
        resampled += (f" and members (delete-one jackknife over the {members} members: each left out, its ensembles "
                      "removed, the frontiers chosen again), combined as estimate ± 1.96·√(SE documents² + SE "
                      "members²) on the fitted scale (log E, log A, alpha); each alone is in metrics/laws.json "
                      "(ci95_documents, ci95_members), and the curves' bands resample documents only")
    return (resampled + ". A profile interval is *conditional* (assumes independent, equal-variance errors, "
            "which points of one pool are not: they share documents and members) and serves identification: a "
            "parameter whose profile interval reaches a bound or never closes is *not determined* by the data (its "
            "one-sided bound is the profile's); a value marked (conditional) has no resampled interval (the reason "
            "is each fit's ci95_note). The merging and routing laws show their document bootstrap intervals.")


def _prediction_text(row: dict, series: str) -> str:
    """A law's prediction at a budget, marked where it extrapolates or rests on parameters the data do not
    determine."""
    if series not in row:
        return "–"
    marks = ([f"extrapolated {row['extrapolation'][series]:.3g}× beyond its points"]
             if series in row.get("extrapolation", {}) else [])
    marks += ["its law not determined by the data"] if series in row.get("not_determined", []) else []
    return _fmt(row[series], row.get("ci95", {}).get(series)) + (f" ({'; '.join(marks)})" if marks else "")


def _frontier_comparison_lines(comparisons: dict) -> list[str]:
    """Single vs multi where both have data, the frontiers first: the step frontiers' difference at matched
    budgets beside the laws', a law difference that claims what the frontiers do not marked as the law's alone;
    then the joint fit's calibrated tests."""
    lines = []
    matched = comparisons.get("matched_budgets", {})
    if "data" in matched:
        data, law = matched["data"], matched["law"]
        n = len(matched["total_params"])
        lines += ["", "**Single vs multi at matched budgets**, the frontiers themselves first (each frontier's lowest "
                  "bits per byte among its points at or below the budget; 95% intervals over the same document "
                  "resamples, the points re-scored), the fitted laws' difference beside:", "",
                  "| total parameters | single frontier | multi frontier | multi − single (data) | "
                  "multi − single (laws) |", "|---|---|---|---|---|"]
        for i, budget in enumerate(matched["total_params"]):
            data_ci = data.get("multi_minus_single_ci95", [None] * n)[i]
            law_ci = law.get("multi_minus_single_ci95", [None] * n)[i]
            multi_point = "the same model" if data["same_ensemble"][i] else _md(data["multi_ensemble"][i])
            law_text = _fmt(law["multi_minus_single"][i], law_ci)
            if not law["agrees_with_data"][i]:
                law_text += " (law only; the frontiers disagree)"
            lines.append(f"| {budget:.3g} | {_md(data['single_ensemble'][i])} {_fmt(data['single'][i])} | "
                         f"{multi_point} {_fmt(data['multi'][i])} | {_fmt(data['multi_minus_single'][i], data_ci)} | "
                         f"{law_text} |")
    frontiers = comparisons.get("matched_frontiers", {})
    if "multi_lower" in frontiers:
        lines += ["", f"At the {len(frontiers['total_params'])} budgets inside both ranges where either frontier has "
                  f"a point, the multi frontier is lower at {frontiers['multi_lower']}, equal at "
                  f"{frontiers['equal']} (the same model on both) and higher at {frontiers['multi_higher']}."]
    joint = comparisons.get("joint_fit", {})
    if "points" in joint:  # metrics written before the calibrated tests have none: nothing uncalibrated is shown
        shared = joint["shared_floor"]
        floors, exponents = joint["separate_floors_supported"], joint["separate_exponents_supported"]
        documents = shared.get("alpha_multi_minus_single_ci95")
        lines += ["", f"**Joint fit, one floor for both** (least squares on log loss; {joint['points']['single']} "
                  f"single and {joint['points']['multi']} multi points, a single model on both frontiers counted once; "
                  f"p-values calibrated by a block-wild bootstrap of {floors['wild_draws']} draws, blocks of "
                  f"{floors['block_length']} neighbouring budgets): E = {_fmt(shared['E'], shared.get('E_ci95'))}, "
                  f"exponents single {_fmt(shared['alpha_single'], shared.get('alpha_single_ci95'))} and multi "
                  f"{_fmt(shared['alpha_multi'], shared.get('alpha_multi_ci95'))}, multi − single "
                  f"{_fmt(shared['alpha_multi_minus_single'], shared['alpha_multi_minus_single_ci95_wild'])} (wild "
                  f"interval" + (f"; over documents [{documents[0]:.4g}, {documents[1]:.4g}]" if documents else "")
                  + "); "
                  f"separate floors: p = {floors['p_value']:.3g} (F = {floors['f_statistic']:.3g}, uncalibrated "
                  f"p = {floors['p_value_uncalibrated']:.3g}); separate exponents: p = {exponents['p_value']:.3g} "
                  f"(F = {exponents['f_statistic']:.3g}, uncalibrated p = {exponents['p_value_uncalibrated']:.3g}). "
                  f"{joint['reading'][0].upper()}{joint['reading'][1:]}."]
    return lines


def _skipped(fit: dict) -> str:
    return _md(fit.get("skipped", ""))


def summary_markdown(laws: dict, figures: list[str], merge_law: dict | None, plan: dict | None,
                     routing: dict | None = None, attribution: pd.DataFrame | None = None,
                     not_run_merging: bool = False, attribution_by_domain: pd.DataFrame | None = None) -> str:
    """reports/README.md: what was fitted, with the figures and tables of parameters: each with its 95% interval
    (`parameter_text`) where the data determine it, "not determined" (and its one-sided bound) where they do not; with
    `not_run_merging`, a line that says the merging study did not run."""
    lines = ["# mmc report", "", f"Loss: {laws['loss']}. Law: {laws['law']}. {intervals_text(laws)} "
             "Ensembles whose oracle loss comes from the same members (an ensemble whose added members win no document "
             "has its best member's loss) are one measurement and count once; *points* gives the measurements in "
             "brackets where they are fewer.",
             "", "## Single-model and multi-model scaling", ""]
    lines += [f"![{name}]({name})" for name in ("scaling.png", "kinds.png") if name in figures]
    lines += ["", "| series | points | E (floor) | A | alpha | R² (log) | held-out max rel. error |",
              "|---|---|---|---|---|---|---|"]
    for series, fit in laws["fits"].items():
        if "params" not in fit:
            lines.append(f"| {_md(series)} | – | skipped: {_skipped(fit)} | | | | |")
            continue
        holdout = fit.get("holdout", {})
        lines.append(f"| {_md(series)} | {_points(fit)} | {parameter_text(fit, 'E')} | {parameter_text(fit, 'A')} | "
                     f"{parameter_text(fit, 'alpha')} | {fit['r2_log']:.3f} | "
                     f"{_fmt(holdout.get('max_abs_relative_error')) if 'skipped' not in holdout else 'skipped'} |")
    if not any("params" in fit for series, fit in laws["fits"].items() if not series.endswith("/cross_fitted")):
        lines += ["", "**No law is determined by these data.** A fit needs parameters + 2 distinct points, and a law "
                  "of ensembles as many models (the ensembles of a few models are subsets of them, not independent "
                  "points): a pool of a few models has neither, so the figures and tables show the measured losses "
                  "of the models and their ensembles, without a fitted curve."]
    floor = laws["comparisons"]["floor"]
    kinds = laws["comparisons"]["heterogeneous_vs_homogeneous"]
    single, multi = laws["fits"].get("single/pareto", {}), laws["fits"].get("multi/pareto", {})
    lines += _frontier_comparison_lines(laws["comparisons"])  # the frontiers first, the laws' floors after
    lines += ["", "**Floors.** single-model " + (parameter_text(single, "E") if "params" in single else "–") + ", multi-model "
              + (parameter_text(multi, "E") if "params" in multi else "–") + f". {floor.get('note', '').capitalize()}. "
              "Predicted at common budgets:", ""]
    for name, row in floor["predicted_bpb_at"].items():
        lines.append(f"- {name.replace('_', ' ')} ({row['total_params']:.3g} parameters): single "
                     f"{_prediction_text(row, 'single/pareto')}, multi {_prediction_text(row, 'multi/pareto')} "
                     "bits per byte")
    hetero = laws["fits"].get("multi/heterogeneous", {})
    difference = kinds.get("alpha_heterogeneous_minus_homogeneous_mean")
    lines += ["", "**Heterogeneous vs homogeneous.** exponent "
              + (parameter_text(hetero, "alpha") if "params" in hetero else "–")
              + f" vs {_fmt(kinds['alpha_homogeneous_mean'])} (mean over families"
              + (f"; not determined for {', '.join(map(_md, kinds['alpha_homogeneous_not_determined']))}"
                 if kinds["alpha_homogeneous_not_determined"] else "") + "); "
              + (f"difference {_fmt(difference, kinds.get('alpha_heterogeneous_minus_homogeneous_mean_ci95'))}; "
                 if difference is not None else f"{_md(kinds.get('alpha_difference_note', ''))}; ")
              + "mean oracle gain over the best member: "
              + ", ".join(f"{kind} {gain:.4f}" for kind, gain in kinds["mean_gain_bpb"].items()) + " bits per byte "
              "(all ensembles, whatever their sizes and data).", ""]
    if "by_data" in kinds.get("matched", {}):
        lines += [matched_markdown(kinds["matched"]), ""]
    lines += [f"![{name}]({name})" for name in ("expected_k.png", "attribution.png") if name in figures]
    if attribution is not None:
        lines += ["", attribution_markdown(attribution)]
    if attribution_by_domain is not None:
        lines += ["", domain_attribution_markdown(attribution_by_domain)]
    if merge_law:
        lines += ["", "## Model merging", "", f"Law: {_md(merge_law.get('law', MERGING_LAW))}.", "",
                  "![merging](merging.png)", "", "![spread](merging_spread.png)", "", merging_markdown(merge_law)]
    elif not_run_merging:
        lines += ["", "## Model merging", "", "The merging study did not run in this project (params "
                  "`studies.merging: []`, `merging.bases: []`): no experts, merges or merging law."]
    if routing:
        lines += ["", "## Realisable collaboration: mixtures and routers", "", "![routing](routing.png)", "",
                  "![routing cost](routing_cost.png)", "", routing_markdown(routing)]
    if plan:
        lines += ["", "## Planning", "", plan_markdown(plan)]
    return "\n".join(lines) + "\n"


BASELINE_LABELS = {"law": "law", "per_base_c_plus_a_over_k": "c + a/k per base",
                   "carry_last_k_forward": "last k carried forward"}


def merging_markdown(merge_law: dict) -> str:
    """The merging law's table, judged against what needs no law: R² within each base (the headline: one mean per
    base already explains the differences between bases, its R² beside), whether the amplitude grows with N
    ("not determined" with the reason where the data do not say), and the held-out error beside two baselines'
    on the same held-out k (the lowest in bold)."""
    fitted = [fit for by_target in merge_law["fits"].values() for fit in by_target.values() if "params" in fit]
    law = fitted[0].get("law", MERGING_LAW) if fitted else MERGING_LAW
    names = LAWS[law].params
    columns = [*(_md(name.replace("_star", "*")) for name in names), "R² within bases (log)",
               "R² of one mean per base / overall", *(["amplitude grows with N"] if law == MERGING_LAW else []),
               "held-out k, max rel. error: " + " / ".join(BASELINE_LABELS.values()), "forecast from k ∈ {1,2,4}"]
    lines = ["R² within bases is the headline: one mean per base, with no dependence on k, already explains the "
             "differences between base sizes, so the overall R² says little about the law in k. The held-out check fits "
             "on k ≤ K − h and predicts the h largest k; two baselines predict the same points (the lowest error in bold).",
             "", "| method | loss | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 2)]
    for method, by_target in merge_law["fits"].items():
        for target, fit in by_target.items():
            if "params" not in fit:
                lines.append(f"| {_md(method)} | {target} | skipped: {_skipped(fit)} |" + " |" * (len(columns) - 1))
                continue
            cells = [parameter_text(fit, name) for name in names]
            within = fit.get("within_base_r2_log")  # outputs of older code hold it per base only
            cells += [_fmt(within if isinstance(within, float) else None),
                      f"{_fmt(fit.get('base_means_r2_log'))} / {_fmt(fit['r2_log'])}"]
            if law == MERGING_LAW:
                cells.append(_amplitude_text(fit))
            cells += [_held_out_text(fit), _check_text(fit.get("forecast", {}))]
            lines.append(f"| {_md(method)} | {target} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _amplitude_text(fit: dict) -> str:
    grows = fit.get("amplitude_grows_with_n")
    if grows is None:
        return f"not determined ({_md(fit.get('amplitude_grows_with_n_reason', 'not recorded'))})"
    return "yes" if grows else "no"


def _check_text(check: dict) -> str:
    return "skipped" if "skipped" in check else _fmt(check.get("max_abs_relative_error"))


def _held_out_text(fit: dict) -> str:
    """The law's held-out error / the per-base baseline's / carry-forward's, the lowest in bold."""
    baselines = fit.get("baselines", {})
    if "skipped" in baselines:
        return "skipped"
    errors = {**{name: baselines.get(name, {}) for name in BASELINE_LABELS}, "law": fit.get("holdout", {})}
    return " / ".join(f"**{_check_text(errors[name])}**" if name == baselines.get("lowest_max_error")
                      else _check_text(errors[name]) for name in BASELINE_LABELS)


def domain_attribution_markdown(by_domain: pd.DataFrame) -> str:
    """Win share and Shapley value of each member within each domain: who carries the oracle where."""
    models = list(dict.fromkeys(by_domain.sort_values("n_params").model))
    header = "| domain | samples | " + " | ".join(_md(model) for model in models) + " |"
    rows = ["**Per domain.** Win share (the share of the domain's samples on which the member has the lowest "
            "loss) / Shapley value (nats per sample) of each member within each domain:", "", header,
            "|" + "---|" * (len(models) + 2)]
    for domain, table in by_domain.groupby("domain", sort=True):
        cells = table.set_index("model").loc[models]
        rows.append(f"| {_md(domain)} | {int(cells.n_samples.iloc[0])} | " + " | ".join(
            f"{row.win_share:.0%} / {row.shapley:.1f}" for row in cells.itertuples()) + " |")
    return "\n".join(rows)


def attribution_markdown(attribution: pd.DataFrame) -> str:
    """Each member's share of the oracle: win share and Shapley value, largest first, and how many samples the
    largest member leaves to smaller ones."""
    table = attribution.sort_values("n_params", ascending=False)
    largest = table.iloc[0]
    rows = [f"**Who carries the oracle.** The largest member, {_md(largest.model)} ({largest.n_params:,.0f} parameters), "
            f"is the best model on {largest.win_share:.1%} of the samples; smaller members win the other "
            f"{1 - largest.win_share:.1%}.", "",
            "| member | family | parameters | mean nll (nats per sample) | win share | Shapley value |",
            "|---|---|---|---|---|---|"]
    rows += [f"| {_md(row.model)} | {_md(row.family)} | {row.n_params:,.0f} | {row.mean_nll:.2f} | {row.win_share:.1%} | "
             f"{row.shapley:.2f} |" for row in table.itertuples()]
    return "\n".join(rows)


def matched_markdown(matched: dict) -> str:
    """The heterogeneous-minus-homogeneous gains at matched k and sizes, per training-data label, as a table."""
    rows = ["**Heterogeneous minus homogeneous gain at matched k and sizes**, within each training-data label "
            "(gain: best member's bits per byte minus the oracle's; 95% intervals over documents, over models "
            "(seed replicates), and both):", "",
            "| data | k | size sets | heterogeneous gain | homogeneous gain | difference | over documents | "
            "over models | both | total params ratio |", "|---|---|---|---|---|---|---|---|---|---|"]
    for data, entry in matched["by_data"].items():
        for k, row in entry["by_k"].items():
            intervals = [_interval(row.get(f"ci95_{name}")) for name in ("documents", "models", "documents_and_models")]
            rows.append(f"| {_md(data)} | {k} | {row['size_sets']} | {row['heterogeneous_gain_bpb']:.4f} | "
                        f"{row['homogeneous_gain_bpb']:.4f} | {row['heterogeneous_minus_homogeneous_gain_bpb']:.4f} | "
                        + " | ".join(intervals) + f" | {row['total_params_ratio']:.2f} |")
    if matched.get("ratios"):
        rows += ["", "Ratio of two labels' differences at the same k (95% interval over the same document resamples; "
                 "none where the denominator's interval reaches 0): " + "; ".join(
                     f"{_md(r['numerator'])} / {_md(r['denominator'])} at k = {r['k']}: {_fmt(r['ratio'])} "
                     f"{_interval(r['ci95_documents'])}" for r in matched["ratios"]) + "."]
    uncertainty = matched["uncertainty"]
    widths = uncertainty["mean_ci95_width_bpb"]
    rows += ["", f"Mean interval width: over documents {_fmt(widths['documents'])}, over models "
             f"{_fmt(widths['models'])} bits per byte; {uncertainty['note']}."]
    for replicate in uncertainty["seed_replicates"]:
        rows.append(f"- seeds {', '.join(replicate['members'])}: spread {replicate['spread_bpb']:.4f} bits per byte "
                    f"(document-bootstrap sd of one of them: {_fmt(replicate['document_sd_bpb'])})")
    return "\n".join(rows)


def _interval(interval: list | None) -> str:
    return "–" if interval is None else f"[{interval[0]:.4f}, {interval[1]:.4f}]"


def plan_markdown(plan: dict) -> str:
    """The answers of `mmc plan` as a table."""
    rows = [f"Law: {plan.get('method', '')} fit of the {plan.get('loss', '').replace('_', '-')} loss, at base size "
            f"N = {plan['n_params']:,.0f}: floor {plan['floor']:.4f}{interval_text(plan.get('floor_ci95'))}, one expert "
            f"{plan['predicted_at_k1']:.4f}{interval_text(plan.get('predicted_at_k1_ci95'))} bits per byte (95% "
            "intervals over the bootstrap resamples' laws)." + (f" {b_text(plan)}" if b_text(plan) else ""),
            "", "| question | answer |", "|---|---|"]
    if "target" in plan:
        target = plan["target"]
        answer = (f"k = {target['k']} (predicted {target['predicted']:.4f})" if target["k"]
                  else f"unreachable: {target['reason']}")
        rows.append(f"| (a) experts to reach {target['target']} bits per byte | {answer}{beyond_text(target)} |")
    stop = plan["stop"]
    rows.append(f"| (b) stop adding experts (next gains < {stop['epsilon']}) | k = {stop['k']}{beyond_text(stop)} "
                f"(next expert gains {stop['marginal_gain_at_k']:.5f}) |")
    rows += [f"| k reaching {row['fraction']:.0%} of the gain beyond one expert | k = {row['k']}{beyond_text(row)} |"
             for row in plan.get("gain_fractions", [])]
    if "budget" in plan:
        for option in plan["budget"]["options"]:
            best = " **(best)**" if option == plan["budget"]["best"] else ""
            rows.append(f"| (c) budget {plan['budget']['budget']:,.0f}: base N = {option['n_params']:,.0f} | "
                        f"k = {option['k']}, predicted {option['predicted']:.4f}{beyond_text(option)}{best} |")
    observed = plan.get("observed")
    if observed:
        rows += ["", f"Observed range: k ≤ {observed['max_k']}, N ≤ {observed['max_n_params']:,.0f}; answers "
                 "beyond it are marked extrapolated, with 95% intervals over the bootstrap resamples' laws."]
    return "\n".join(rows)


def write_report(laws_path: str | Path, law_plots: str | Path, oracle_dir: str | Path, out: str | Path, *,
                 merge_law_path: str | Path | None = None, merge_plots: str | Path | None = None,
                 plan_path: str | Path | None = None, routing_dir: str | Path | None = None,
                 routing_path: str | Path | None = None, merging_ran: bool = True) -> list[str]:
    """Draw every figure the inputs allow and write the summary into `out`, replaced atomically. Without
    `merging_ran`, the merging inputs are not read (stale files of an earlier run may be there) and the summary
    says the merging study did not run."""
    if not merging_ran:
        merge_law_path = merge_plots = plan_path = None
    plt.rcParams.update(STYLE)
    inputs = [laws_path, law_plots, oracle_dir, merge_law_path, merge_plots, plan_path, routing_dir, routing_path]
    check_outputs([(out, "report")], inputs)
    laws = json.loads(Path(laws_path).read_text())
    points, curves = _read_csv(Path(law_plots) / "points.csv"), _read_csv(Path(law_plots) / "curves.csv")
    ensembles = read_ensembles(oracle_dir)
    merge_law = json.loads(Path(merge_law_path).read_text()) if merge_law_path else None
    plan = json.loads(Path(plan_path).read_text()) if plan_path else None
    routing = json.loads(Path(routing_path).read_text()) if routing_path else None
    with atomic_path(out, "report") as tmp:
        tmp.mkdir()
        figure_scaling(points, curves, ensembles, tmp / "scaling.png")
        if points.series.str.startswith("multi/").any():  # a small pool fits no law of ensembles: nothing to draw
            figure_kinds(points, curves, tmp / "kinds.png")
        figure_expected(_read_csv(Path(oracle_dir) / "expected_curves.csv"), tmp / "expected_k.png")
        figure_attribution(_read_csv(Path(oracle_dir) / "attribution.csv"), tmp / "attribution.png")
        if merge_law and merge_plots:
            merge_curves = _read_csv(Path(merge_plots) / "curves.csv")
            figure_merging(merge_curves, merge_law["fits"], tmp / "merging.png")
            figure_merging_spread(merge_curves, tmp / "merging_spread.png")
        if routing and routing_dir:
            figure_routing(_read_csv(Path(routing_dir) / "curves.csv"), routing["share_of_oracle_gain_by_k"],
                           tmp / "routing.png")
            router_curves = Path(routing_dir) / "router_curves.csv"  # absent from older routing outputs
            figure_routing_cost(_read_csv(Path(routing_dir) / "strategies.csv"), tmp / "routing_cost.png",
                                _read_csv(router_curves) if router_curves.exists() else None)
        figures = sorted(p.name for p in tmp.glob("*.png"))
        attribution = _read_csv(Path(oracle_dir) / "attribution.csv")
        by_domain = Path(oracle_dir) / "attribution_by_domain.csv"  # absent from oracle outputs of mmc before 0.2
        (tmp / "README.md").write_text(summary_markdown(laws, figures, merge_law, plan, routing, attribution,
                                                        not_run_merging=not merging_ran,
                                                        attribution_by_domain=_read_csv(by_domain)
                                                        if by_domain.exists() else None),
                                       encoding="utf-8")
    return figures
