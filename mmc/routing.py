"""Beyond the oracle: how much of the collaboration gain a real system realises, and at what inference cost.

The oracle gives every document the lowest loss any member achieves: no system knows that minimum before running
every member. On the same pool and ensembles this module measures what can be realised:

- sequence-level mixtures, −log Σᵢ wᵢ·exp(−nllᵢ) per document (each member gives the whole document a
  probability, so mixtures work across tokenizers): uniform weights (never more than log k nats above the
  oracle) and weights fitted by EM on the training documents;
- routers that pick one member per document from features known before scoring: each member's bits per byte
  is predicted by a ridge regression (one fit, all members as outputs) and the router runs the member with the
  lowest prediction. `ngram` reads hashed character n-grams of the text; `small_model` reads the smallest
  member's bits per byte on the document (which costs running that member); `best_single` always runs the
  member best on the training documents;
- each strategy's inference cost in FLOPs per byte: 2 · parameters per token for every member it runs.

Documents are split once (seeded) into a training half and a test half: mixture weights, routers, the best
single member and every Pareto frontier are chosen on the training documents and scored on the test documents
(cross-fitting). Intervals resample the test documents (Poisson weights). Everything is vectorised over
ensembles × members × documents.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr
from scipy.special import logsumexp
from sklearn.feature_extraction.text import HashingVectorizer
from sklearn.linear_model import Ridge

from mmc import MMCError, check_number
from mmc.corpus import load_samples
from mmc.laws import LAWS, fit_law, json_ready, too_few_members
from mmc.oracle import pareto_indices, read_ensembles
from mmc.store import atomic_path, check_outputs, check_pool, open_store, write_json

LN2 = math.log(2.0)
ROUTERS = ("best_single", "ngram", "small_model")
STRATEGIES = ("oracle", "mixture_fitted", "mixture_uniform", *(f"router_{name}" for name in ROUTERS))
ROUTING_LAW = "power"
NGRAM_FEATURES_MAX = 2**31 - 1  # scikit-learn's hashing vectorizer holds feature indices in int32
EM_ITERATIONS = 300  # at most, per ensemble
EM_TOLERANCE = 1e-9  # nats per document: an ensemble's EM stops when a step improves its fit by less
CURVE_COLUMNS = ["strategy", "total_params", "predicted_bpb", "lower_bpb", "upper_bpb", "extrapolated",
                 "observed_bpb"]


def split_documents(n_documents: int, test_fraction: float, seed: int) -> np.ndarray:
    """A seeded boolean mask of the test documents (at least one document on each side)."""
    check_number("routing.test_fraction", test_fraction, 0, 1, low_open=True, high_open=True)
    if n_documents < 2:
        raise MMCError(f"routing needs at least 2 documents to split into train and test (got {n_documents})")
    n_test = min(max(1, round(test_fraction * n_documents)), n_documents - 1)
    test = np.zeros(n_documents, dtype=bool)
    test[np.random.default_rng(seed).permutation(n_documents)[:n_test]] = True
    return test


def membership(members: Sequence[Sequence[str]], models: Sequence[str]) -> np.ndarray:
    """(ensembles, models) boolean: which models each ensemble holds."""
    index = {name: i for i, name in enumerate(models)}
    table = np.zeros((len(members), len(models)), dtype=bool)
    for row, names in enumerate(members):
        try:
            table[row, [index[name] for name in names]] = True
        except KeyError as error:
            raise MMCError(f"ensemble member {error} is not a model of the pool") from None
    return table


def oracle_nll(nll: np.ndarray, member: np.ndarray) -> np.ndarray:
    """(ensembles, documents): the per-document minimum over each ensemble's members."""
    return np.where(member[:, :, None], nll[None], np.inf).min(axis=1)


def mixture_nll(nll: np.ndarray, member: np.ndarray, log_weights: np.ndarray | None = None) -> np.ndarray:
    """(ensembles, documents): −log Σᵢ wᵢ·exp(−nllᵢ) over each ensemble's members (uniform w without weights)."""
    if log_weights is None:
        log_weights = np.where(member, -np.log(member.sum(axis=1, keepdims=True)), -np.inf)
    return -logsumexp(np.where(member[:, :, None], log_weights[:, :, None] - nll[None], -np.inf), axis=1)


def fit_mixture_weights(nll: np.ndarray, member: np.ndarray, iterations: int = EM_ITERATIONS,
                        tolerance: float = EM_TOLERANCE) -> np.ndarray:
    """(ensembles, models) log weights maximising each ensemble's mixture likelihood of the documents (EM).

    An ensemble stops iterating once a step lowers its mean mixture NLL by less than `tolerance` nats per
    document (the usual EM criterion: long documents make responsibilities nearly one-hot, so most ensembles
    converge in a few steps); the others go on, up to `iterations` steps."""
    log_weights = np.where(member, -np.log(member.sum(axis=1, keepdims=True)), -np.inf)
    active = np.arange(len(member))
    previous = np.full(len(member), np.inf)
    for _ in range(iterations):
        joint = np.where(member[active, :, None], log_weights[active, :, None] - nll[None], -np.inf)
        log_mixture = logsumexp(joint, axis=1, keepdims=True)
        responsibility = np.exp(joint - log_mixture)
        with np.errstate(divide="ignore"):
            log_weights[active] = np.where(member[active], np.log(responsibility.mean(axis=2)), -np.inf)
        mean_nll = -log_mixture[:, 0].mean(axis=1)  # before this step's update
        improving = previous[active] - mean_nll > tolerance
        previous[active] = mean_nll
        active = active[improving]
        if active.size == 0:
            break
    return log_weights


def route(predicted: np.ndarray, member: np.ndarray) -> np.ndarray:
    """(ensembles, documents): the member each ensemble's router runs, the one with the lowest predicted loss."""
    return np.where(member[:, :, None], predicted[None], np.inf).argmin(axis=1)


def router_predictions(name: str, bpb: np.ndarray, train: np.ndarray, texts: Sequence[str], n_params: np.ndarray,
                       *, ngram_features: int, ridge_alpha: float, n_bytes: np.ndarray | None = None) -> np.ndarray:
    """(models, documents) predicted bits per byte of every model on every document, trained on `train` only."""
    if name == "best_single":
        return np.broadcast_to(bpb[:, train].mean(axis=1, keepdims=True), bpb.shape)
    if name == "ngram":
        features = HashingVectorizer(analyzer="char_wb", ngram_range=(1, 4), n_features=ngram_features,
                                     alternate_sign=False, norm="l2").transform(texts)
    elif name == "small_model":
        smallest = int(np.argmin(n_params))
        sizes = np.fromiter(map(len, texts), float, len(texts)) if n_bytes is None else np.asarray(n_bytes, float)
        features = np.column_stack([bpb[smallest], np.log(np.maximum(sizes, 1.0))])
    else:
        raise MMCError(f"unknown router '{name}' (known: {', '.join(ROUTERS)})")
    model = Ridge(alpha=ridge_alpha).fit(features[train], bpb[:, train].T)
    return model.predict(features).T


def router_cost(name: str, flops_per_document: np.ndarray, n_params: np.ndarray) -> np.ndarray:
    """(documents,) FLOPs the router itself spends before the chosen member runs: the smallest member's forward
    pass for `small_model`; hashing n-grams and a linear model cost nothing next to a language model."""
    if name == "small_model":
        return flops_per_document[int(np.argmin(n_params))]
    return np.zeros(flops_per_document.shape[1])


def realised(pool: xr.Dataset, members: Sequence[Sequence[str]], texts: Sequence[str], *, test_fraction: float,
             seed: int, bootstrap: int, ngram_features: int = 4096, ridge_alpha: float = 1.0) -> dict:
    """Every strategy on every ensemble, cross-fitted: returns tables and bootstrap replicates (see module doc).

    Keys: `table` (one row per ensemble and strategy: test bits per byte, train bits per byte, FLOPs per byte,
    routing accuracy), `replicates` (strategy -> (ensembles, resamples) test bits per byte), `test` (the mask).
    """
    check_number("routing.bootstrap", bootstrap, 0, integer=True)
    models = [str(name) for name in pool["model"].values]
    nll = np.asarray(pool["nll"].transpose("model", "sample").values, dtype=np.float64)
    tokens = np.asarray(pool["n_tokens"].transpose("model", "sample").values, dtype=np.float64)
    n_bytes = np.asarray(pool["n_bytes"].values, dtype=np.float64)
    unknown = ~tokens.any(axis=1)  # imported losses that came without token counts (lm-eval gives none)
    if unknown.any():  # their cost: the other members' mean tokens per document, else 4 bytes per token
        tokens[unknown] = tokens[~unknown].mean(axis=0) if (~unknown).any() else n_bytes / 4.0
    n_params = np.asarray(pool["n_params"].values, dtype=np.float64)
    if len(texts) != nll.shape[1]:
        raise MMCError(f"{len(texts)} texts for {nll.shape[1]} pool samples: route on the pool's eval split")
    test = split_documents(nll.shape[1], test_fraction, seed)
    train = ~test
    member = membership(members, models)
    bpb = nll / (n_bytes * LN2)
    flops_per_document = 2.0 * n_params[:, None] * tokens  # (models, documents): 2·N FLOPs per token scored
    per_document = {"oracle": oracle_nll(nll, member), "mixture_uniform": mixture_nll(nll, member),
                    "mixture_fitted": mixture_nll(nll, member, fit_mixture_weights(nll[:, train], member))}
    every_member = member @ flops_per_document  # the oracle and the mixtures run every member
    flops = {"oracle": every_member, "mixture_uniform": every_member, "mixture_fitted": every_member}
    best_member = np.argmin(np.where(member[:, :, None], nll[None], np.inf), axis=1)
    accuracy = {}
    for name in ROUTERS:
        predicted = router_predictions(name, bpb, train, texts, n_params, ngram_features=ngram_features,
                                       ridge_alpha=ridge_alpha, n_bytes=n_bytes)
        chosen = route(predicted, member)
        documents = np.arange(nll.shape[1])
        per_document[f"router_{name}"] = nll[chosen, documents]
        flops[f"router_{name}"] = flops_per_document[chosen, documents] + router_cost(name, flops_per_document, n_params)
        accuracy[f"router_{name}"] = (chosen == best_member)[:, test].mean(axis=1)
    rng = np.random.default_rng([seed, 1])
    weights = rng.poisson(1.0, (int(test.sum()), bootstrap)).astype(np.float64)
    rows, replicates = [], {}
    for strategy in STRATEGIES:
        values = per_document[strategy]
        with np.errstate(invalid="ignore", divide="ignore"):
            replicates[strategy] = (values[:, test] @ weights) / ((n_bytes[test] @ weights) * LN2)
        rows.append(pd.DataFrame({
            "ensemble": np.arange(len(members)), "strategy": strategy,
            "test_bpb": values[:, test].sum(axis=1) / (n_bytes[test].sum() * LN2),
            "train_bpb": values[:, train].sum(axis=1) / (n_bytes[train].sum() * LN2),
            "flops_per_byte": flops[strategy][:, test].sum(axis=1) / n_bytes[test].sum(),
            "routing_accuracy": accuracy.get(strategy, np.nan),
        }))
    return {"table": pd.concat(rows, ignore_index=True), "replicates": replicates, "test": test}


def _interval(values: np.ndarray) -> list[float] | None:
    values = values[np.isfinite(values)]
    return [float(v) for v in np.percentile(values, [2.5, 97.5])] if len(values) else None


def routing_study(pool_path: str | Path, oracle_dir: str | Path, eval_split: str | Path, out: str | Path,
                  metrics_path: str | Path, *, test_fraction: float, seed: int, bootstrap: int,
                  ngram_features: int = 4096, ridge_alpha: float = 1.0) -> dict:
    """The routing stage: strategies × ensembles (tables in `out`), headline figures and the realisable laws
    (`metrics_path`). Returns the metrics."""
    # by range, before any work: a zero feature count divides by zero inside the hashing (SIGFPE, no message)
    check_number("routing.test_fraction", test_fraction, 0, 1, low_open=True, high_open=True)
    check_number("routing.bootstrap", bootstrap, 0, integer=True)
    check_number("routing.seed", seed, 0, integer=True)
    check_number("routing.ngram_features", ngram_features, 1, NGRAM_FEATURES_MAX, integer=True)
    check_number("routing.ridge_alpha", ridge_alpha, 0)
    check_outputs([(out, "routing tables"), (metrics_path, "routing metrics")], [pool_path, oracle_dir, eval_split])
    pool = check_pool(open_store(pool_path), pool_path)
    ensembles = read_ensembles(oracle_dir)
    samples = load_samples(eval_split)
    texts = pd.Series(samples["text"], index=samples["sample_id"]).reindex(pool.indexes["sample"].astype(str))
    if texts.isna().any():
        raise MMCError(f"pool sample '{texts.index[texts.isna()][0]}' is not in '{eval_split}': route on the eval "
                       "split the pool scored")
    texts = texts.tolist()
    result = realised(pool, ensembles.members.tolist(), texts, test_fraction=test_fraction, seed=seed,
                      bootstrap=bootstrap, ngram_features=ngram_features, ridge_alpha=ridge_alpha)
    table = result["table"].merge(ensembles[["kind", "k", "total_params"]], left_on="ensemble", right_index=True)
    metrics = _routing_metrics(table, result["replicates"], ensembles, result["test"], bootstrap)
    with atomic_path(out, "routing tables") as tmp:
        tmp.mkdir()
        table.to_parquet(tmp / "strategies.parquet", index=False)
        table.to_csv(tmp / "strategies.csv", index=False)
        metrics_frame = pd.DataFrame(metrics.pop("_curves"))
        metrics_frame.to_csv(tmp / "curves.csv", index=False)
    write_json(json_ready(metrics), metrics_path, "routing metrics")
    return metrics


def _shares_by_k(test_bpb: pd.DataFrame, replicates: dict, ensembles: pd.DataFrame) -> dict:
    """Per k ≥ 2, the share of the oracle's gain each strategy realises over the ensembles of that size: Σ (best
    member − strategy) / Σ (best member − oracle), the best member of each ensemble chosen on the training
    documents, with intervals over the test documents' resamples (paired: one set of weights for all strategies)."""
    test_bpb = test_bpb.loc[ensembles.index]
    by_k = ensembles.k.to_numpy()
    sizes = np.unique(by_k[by_k >= 2])
    total = (by_k[None] == sizes[:, None]).astype(np.float64)  # (k values, ensembles): sums over each size
    best = "router_best_single"
    point_gain = total @ (test_bpb[best] - test_bpb["oracle"]).to_numpy()
    gain = total @ (replicates[best] - replicates["oracle"])
    shares: dict = {"k": sizes.tolist()}
    for strategy in STRATEGIES[1:]:
        if strategy == best:
            continue
        with np.errstate(invalid="ignore", divide="ignore"):
            point = total @ (test_bpb[best] - test_bpb[strategy]).to_numpy() / point_gain
            resampled = total @ (replicates[best] - replicates[strategy]) / gain
        shares[strategy] = {"value": point.tolist(), "ci95": [_interval(row) for row in resampled]}
    return shares


def _routing_metrics(table: pd.DataFrame, replicates: dict, ensembles: pd.DataFrame, test: np.ndarray,
                     bootstrap: int) -> dict:
    """Headline figures at the whole pool (largest k), shares of the oracle's gain, and the realisable laws."""
    test_bpb = table.pivot(index="ensemble", columns="strategy", values="test_bpb")
    train_bpb = table.pivot(index="ensemble", columns="strategy", values="train_bpb")
    whole = int(ensembles.k.idxmax())
    singles = ensembles.index[ensembles.kind == "single"]
    best_single = int(train_bpb.loc[singles, "oracle"].idxmin())  # chosen on the training documents
    routers = [f"router_{name}" for name in ROUTERS]
    best_router = min(routers, key=lambda name: train_bpb.loc[whole, name])  # chosen on the training documents
    at_largest = {"k": int(ensembles.k[whole]), "total_params": float(ensembles.total_params[whole]),
                  "best_single_member": ensembles.members[best_single][0], "best_router": best_router, "bpb": {},
                  "share_of_oracle_gain": {}}
    gain = replicates["oracle"][best_single] - replicates["oracle"][whole]
    at_largest["oracle_gain_over_best_single"] = {  # paired: both on the same resampled test documents
        "value": float(test_bpb.loc[best_single, "oracle"] - test_bpb.loc[whole, "oracle"]), "ci95": _interval(gain)}
    for name in [*STRATEGIES, "best_single"]:
        row, strategy = (best_single, "oracle") if name == "best_single" else (whole, name)
        value = float(test_bpb.loc[row, strategy])
        at_largest["bpb"][name] = {"value": value, "ci95": _interval(replicates[strategy][row])}
        if name not in ("oracle", "best_single"):
            point_gain = test_bpb.loc[best_single, "oracle"] - test_bpb.loc[whole, "oracle"]
            share = (test_bpb.loc[best_single, "oracle"] - value) / point_gain if point_gain > 0 else math.nan
            with np.errstate(invalid="ignore", divide="ignore"):
                shares = (replicates["oracle"][best_single] - replicates[strategy][whole]) / gain
            at_largest["share_of_oracle_gain"][name] = {"value": float(share), "ci95": _interval(shares)}
            if name == "router_best_single":  # it runs the best single member: 0 by construction, no interval
                at_largest["share_of_oracle_gain"][name] = {"value": float(share), "ci95": None,
                                                            "note": "0 by construction: it runs the best single member"}
    accuracy = table[table.ensemble == whole].set_index("strategy").routing_accuracy.dropna()
    laws, curves = {}, []
    too_few_models = too_few_members(ROUTING_LAW, int(ensembles.k.eq(1).sum()), len(ensembles))
    x_all = ensembles.total_params.to_numpy(np.float64)
    every = ensembles.index.to_numpy()
    for name, strategy, rows in [("single", "oracle", singles.to_numpy()),  # the single-model frontier
                                 *[(strategy, strategy, every) for strategy in [*STRATEGIES[:3], best_router]]]:
        chosen = rows[pareto_indices(x_all[rows], train_bpb.loc[rows, strategy].to_numpy())]  # on training documents
        x, y = x_all[chosen], test_bpb.loc[chosen, strategy].to_numpy()
        curves.append(pd.DataFrame({"strategy": name, "total_params": x, "observed_bpb": y}))
        try:
            if too_few_models:
                raise MMCError(too_few_models)
            fit = fit_law(ROUTING_LAW, {"x": x}, y, replicates=replicates[strategy][chosen].T if bootstrap else None)
        except MMCError as error:
            laws[name] = {"skipped": str(error)}
            continue
        laws[name] = fit.to_dict()
        # a law is drawn beyond its frontier, up to the whole pool's size, only where the data determine it
        grid = np.geomspace(x.min(), x_all.max() if all(fit.identified.values()) else x.max(), 40)
        curve = pd.DataFrame({"strategy": name, "total_params": grid, "predicted_bpb": fit.predict(x=grid),
                              "extrapolated": grid > x.max()})
        band = fit.band(x=grid)
        if band is not None:
            curve["lower_bpb"], curve["upper_bpb"] = band
        curves.append(curve)
    return {
        "loss": "test-document bits per byte; mixtures, routers, the best single member and the frontiers are chosen "
                "on the training documents (cross-fitting)",
        "split": {"test_documents": int(test.sum()), "train_documents": int((~test).sum())},
        "bootstrap": {"resamples": bootstrap, "over": "test documents (Poisson weights)"},
        "at_largest_k": at_largest,
        "routing_accuracy_at_largest_k": {name: float(value) for name, value in accuracy.items()},
        "law": f"{ROUTING_LAW}: {LAWS[ROUTING_LAW].formula}, x = total parameters; each strategy's Pareto frontier",
        "laws": laws,
        "share_of_oracle_gain_by_k": _shares_by_k(test_bpb, replicates, ensembles),
        "_curves": pd.concat(curves, ignore_index=True).reindex(columns=CURVE_COLUMNS).to_dict("list"),
    }
