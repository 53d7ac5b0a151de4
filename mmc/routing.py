"""Beyond the oracle: how much of the collaboration gain a real system realises, and at what inference cost.

The oracle gives every document the lowest loss any member achieves: no system knows that minimum before running
every member. On the same pool and ensembles this module measures what can be realised:

- sequence-level mixtures, −log Σᵢ wᵢ·exp(−nllᵢ) per document (each member gives the whole document a
  probability, so mixtures work across tokenizers): uniform weights (never more than log k nats above the
  oracle) and weights fitted by EM on the training documents;
- routers that pick one member per document from what is known before scoring. A router is one function in
  `ROUTERS`: it predicts every member's bits per byte on every document (`Prediction`) and names the members it
  runs itself to decide (its own cost). `best_single` (the member best on the training documents), `ngram`
  (ridge regression on hashed character n-grams), `knn` and `mlp` (nearest neighbours and a one-layer
  perceptron on the same n-grams), `small_model` (ridge regression on the smallest member's bits per byte,
  which costs running it). At λ = 0 a router runs the member it predicts lowest;
- each strategy's inference cost in FLOPs per byte: 2 · parameters per token for every member it runs;
- at the whole pool (the largest k), cost–quality curves: each router swept over λ (per document, the member
  minimising predicted bits per byte + λ · its FLOPs per byte, RouterBench-style), the perfect router (the
  same sweep on the true losses) and a cascade (run the cheapest member, escalate when its bits per byte
  exceed a threshold); per curve its AIQ and its oracle gap at matched cost (`aiq`, `oracle_gap`).

Documents are split once (seeded) into a training half and a test half: mixture weights, routers, the best
single member and every Pareto frontier are chosen on the training documents and scored on the test documents
(cross-fitting); a learned router's predictions for training documents are out of fold (K folds within the
training half), so choosing the best router on them is fair to flexible learners. Intervals resample the test
documents (Poisson weights, one set for every strategy and curve: paired).

Memory is bounded by a block of documents, not by the pool: mixtures and routed choices are computed over
ensembles × members × one block of documents at a time (`document_blocks`) and reduced into per-ensemble sums,
the mixture weights' EM accumulates its statistics block by block, and the learned routers fit on at most
ROUTER_TRAINING_MAX training documents (a seeded sample beyond that, said in the metrics) and build their
features and predictions block by block. Blocks depend on the shapes alone, so sums are added in one order.

Blocks, EM steps' blocks and the routers' fits run on THREADS threads (`_in_threads`), one BLAS and OpenMP thread
each (`one_library_thread`: on small matrices, a BLAS's own threads contend, the perceptron's fits took 2.6 times as
long): each block's reductions are computed whole on one thread and added in block order, so the results are the
same to the bit however many threads.
"""

from __future__ import annotations

import math
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import xarray as xr
from sklearn import config_context, get_config
from sklearn.decomposition import TruncatedSVD
from sklearn.exceptions import ConvergenceWarning
from sklearn.feature_extraction.text import HashingVectorizer
from sklearn.linear_model import Ridge
from sklearn.model_selection import KFold
from sklearn.neighbors import KNeighborsRegressor
from sklearn.neural_network import MLPRegressor
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from mmc import THREADS, MMCError, check_number, one_library_thread
from mmc.corpus import load_samples
from mmc.laws import LAWS, fit_law, json_ready, too_few_members
from mmc.oracle import pareto_indices, read_ensembles
from mmc.store import atomic_path, check_outputs, check_pool, open_store, write_json

LN2 = math.log(2.0)
ROUTING_LAW = "power"
NGRAM_FEATURES_MAX = 2**31 - 1  # scikit-learn's hashing vectorizer holds feature indices in int32
EM_ITERATIONS = 300  # at most, per ensemble
EM_TOLERANCE = 1e-9  # nats per document: an ensemble's EM stops when a step improves its fit by less
CROSS_FIT_FOLDS = 5  # out-of-fold predictions for the training documents
MLP_ITERATIONS = 300  # L-BFGS steps of the perceptron router
MLP_COMPONENTS = 64  # n-gram directions the perceptron router reads
BLOCK_CELLS = 2**22  # ensemble × model × document cells of a block's temporaries (32 MiB in float64)
ROUTER_TRAINING_MAX = 20_000  # training documents a learned router fits on: a seeded sample of them beyond this
PREDICT_BLOCK = 8192  # documents whose router features are built at a time
KNN_WORKING_MEMORY_MB = 128  # scikit-learn's chunks of query × fitted distances (at its 1 GiB default: 2.4 GiB)
CURVE_COLUMNS = ["strategy", "total_params", "predicted_bpb", "lower_bpb", "upper_bpb", "extrapolated",
                 "observed_bpb"]
ROUTER_CURVE_COLUMNS = ["router", "sweep", "setting", "flops_per_byte", "test_bpb", "on_hull"]
COST_QUALITY_AXES = ("cost: inference FLOPs per byte of the test documents (2 · parameters per token of every "
                     "member run, the router's own runs included), on a linear axis as in RouterBench; quality: "
                     "minus the test documents' bits per byte. AIQ: the area under the smallest concave, "
                     "non-decreasing function of cost above the curve's points, divided by the cost range they "
                     "span (minus the hull's mean bits per byte). oracle_gap: the perfect router's hull minus this "
                     "curve's hull, averaged over this curve's cost range (bits per byte; the perfect hull is "
                     "held flat beyond its own range)")
CASCADE_NOTE = ("the cascade reads the cheapest member's bits per byte on the whole document, because the pool "
                "stores only whole-document losses: a real cascade would decide on a prefix, so this one knows "
                "more than it could and its curve is optimistic")


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


def document_blocks(n_documents: int, cells_per_document: int) -> list[slice]:
    """Consecutive blocks of documents whose temporaries hold at most BLOCK_CELLS cells (`cells_per_document`
    each, at least one document a block). They depend on the shapes alone: sums over blocks come in one order."""
    size = max(1, BLOCK_CELLS // max(cells_per_document, 1))
    return [slice(start, min(start + size, n_documents)) for start in range(0, n_documents, size)]


def _in_threads(compute: Callable, items: Iterable) -> Iterator:
    """`compute(item)` of each item, on THREADS threads, yielded in the items' order; at most 2·THREADS are computed
    ahead of the one yielded, so memory holds a few blocks' temporaries. Called from one thread only (the
    routing's caller): a task never starts threads of its own.

    A thread's settings that are the caller's alone follow the tasks: scikit-learn's config (the knn router's
    `working_memory`: at its 1 GiB default two threads took 30,000 documents to 4.17 GiB) and one OpenMP thread."""
    items = list(items)
    if THREADS < 2 or len(items) < 2:
        yield from map(compute, items)
        return
    config = get_config()

    def configured(item):
        with config_context(**config):
            return compute(item)

    with ThreadPoolExecutor(THREADS, initializer=threadpool_limits, initargs=(1, "openmp")) as executor:
        ahead: deque = deque()
        for item in items:
            ahead.append(executor.submit(configured, item))
            if len(ahead) > 2 * THREADS:
                yield ahead.popleft().result()  # raises what the thread raised
        while ahead:
            yield ahead.popleft().result()


def _by_block(reduce: Callable[[slice], np.ndarray], n_documents: int, member: np.ndarray) -> np.ndarray:
    """(ensembles, documents): `reduce` of each block of documents, so ensemble × model × document temporaries
    stay block-sized."""
    return np.concatenate(list(_in_threads(reduce, document_blocks(n_documents, member.size))), axis=-1)


def uniform_log_weights(member: np.ndarray) -> np.ndarray:
    """(ensembles, models): log 1/k on each ensemble's k members, −∞ elsewhere."""
    return np.where(member, -np.log(member.sum(axis=1, keepdims=True)), -np.inf)


def _scaled_joint(nll: np.ndarray, log_weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """wᵢ·exp(−nllᵢ) over (ensembles, models, documents) divided by each ensemble's and document's largest term,
    and the log of that term (ensembles, documents): a log-sum-exp in place, in one temporary of the block (−∞
    weights, the non-members, give 0)."""
    joint = log_weights[:, :, None] - nll[None]
    peak = joint.max(axis=1)
    joint -= peak[:, None]
    return np.exp(joint, out=joint), peak


def _log_mixture(nll: np.ndarray, log_weights: np.ndarray) -> np.ndarray:
    """(ensembles, documents): log Σᵢ wᵢ·exp(−nllᵢ)."""
    scaled, peak = _scaled_joint(nll, log_weights)
    return np.log(scaled.sum(axis=1)) + peak


def _lowest(values: np.ndarray, member: np.ndarray) -> np.ndarray:
    """(ensembles, documents): the member with the lowest of `values` (models, documents) in each ensemble."""
    return np.where(member[:, :, None], values[None], np.inf).argmin(axis=1)


def oracle_nll(nll: np.ndarray, member: np.ndarray) -> np.ndarray:
    """(ensembles, documents): the per-document minimum over each ensemble's members."""
    return _by_block(lambda block: np.where(member[:, :, None], nll[None, :, block], np.inf).min(axis=1),
                     nll.shape[1], member)


def mixture_nll(nll: np.ndarray, member: np.ndarray, log_weights: np.ndarray | None = None) -> np.ndarray:
    """(ensembles, documents): −log Σᵢ wᵢ·exp(−nllᵢ) over each ensemble's members (uniform w without weights)."""
    log_weights = uniform_log_weights(member) if log_weights is None else log_weights
    return _by_block(lambda block: -_log_mixture(nll[:, block], log_weights), nll.shape[1], member)


@one_library_thread
def fit_mixture_weights(nll: np.ndarray, member: np.ndarray, iterations: int = EM_ITERATIONS,
                        tolerance: float = EM_TOLERANCE) -> np.ndarray:
    """(ensembles, models) log weights maximising each ensemble's mixture likelihood of the documents (EM).

    An ensemble stops iterating once a step lowers its mean mixture NLL by less than `tolerance` nats per
    document (the usual EM criterion: long documents make responsibilities nearly one-hot, so most ensembles
    converge in a few steps); the others go on, up to `iterations` steps. A step's E-statistics (summed
    responsibilities, summed mixture NLL) are accumulated over blocks of documents."""
    log_weights = uniform_log_weights(member)
    active = np.arange(len(member))
    previous = np.full(len(member), np.inf)
    n_documents = nll.shape[1]

    def e_step(block: slice, active_weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scaled, peak = _scaled_joint(nll[:, block], active_weights)
        total = scaled.sum(axis=1)  # responsibilities: scaled / total
        return np.matmul(scaled, (1.0 / total)[:, :, None])[:, :, 0], (np.log(total) + peak).sum(axis=1)

    for _ in range(iterations):
        responsibility_sums = np.zeros((active.size, member.shape[1]))
        nll_sums = np.zeros(active.size)
        blocks = document_blocks(n_documents, active.size * member.shape[1])
        e_step_now = partial(e_step, active_weights=log_weights[active])
        for responsibilities, block_nll in _in_threads(e_step_now, blocks):
            responsibility_sums += responsibilities
            nll_sums -= block_nll
        with np.errstate(divide="ignore"):
            log_weights[active] = np.where(member[active], np.log(responsibility_sums / n_documents), -np.inf)
        mean_nll = nll_sums / n_documents  # before this step's update
        improving = previous[active] - mean_nll > tolerance
        previous[active] = mean_nll
        active = active[improving]
        if active.size == 0:
            break
    return log_weights


def route(predicted: np.ndarray, member: np.ndarray) -> np.ndarray:
    """(ensembles, documents): the member each ensemble's router runs, the one with the lowest predicted loss."""
    return _by_block(lambda block: _lowest(predicted[:, block], member), predicted.shape[1], member)


class Prediction(NamedTuple):
    """What a router gives: predicted bits per byte (models, documents), and the members it runs itself to decide
    (their FLOPs count on every document; their losses are then known, so choosing one of them costs nothing more)."""
    bpb: np.ndarray
    runs: tuple[int, ...] = ()


@dataclass
class RouterData:
    """What a router may read. `bpb` holds the true losses of every document: a router fits on the training
    columns only (`train`), and reads other columns only of the members it runs (`Prediction.runs`)."""
    bpb: np.ndarray  # (models, documents) bits per byte
    train: np.ndarray  # (documents,) the training half
    texts: Sequence[str]
    n_bytes: np.ndarray
    n_params: np.ndarray
    seed: int = 0
    ngram_features: int = 4096
    ridge_alpha: float = 1.0
    knn_neighbors: int = 10
    mlp_hidden: int = 64

    @cached_property
    def fit_rows(self) -> np.ndarray:
        """The training documents the learned routers fit on: all of them, or a seeded sample of
        ROUTER_TRAINING_MAX where there are more (a kNN query reads every fitted document, and the perceptron's
        fit grows with them: the sample keeps the stage linear in documents)."""
        rows = np.flatnonzero(self.train)
        if len(rows) <= ROUTER_TRAINING_MAX:
            return rows
        return np.sort(np.random.default_rng([self.seed, 2]).choice(rows, ROUTER_TRAINING_MAX, replace=False))

    @cached_property
    def _texts(self) -> np.ndarray:
        return np.asarray(self.texts, dtype=object)

    def ngrams(self, rows: np.ndarray):
        """Hashed character 1–4-grams of the texts of `rows`, L2-normalised (sparse, rows × ngram_features)."""
        return HashingVectorizer(analyzer="char_wb", ngram_range=(1, 4), n_features=self.ngram_features,
                                 alternate_sign=False, norm="l2").transform(self._texts[rows])

    def blocks(self) -> Iterator[np.ndarray]:
        """The documents, PREDICT_BLOCK at a time: features are built for one block at a time."""
        for start in range(0, len(self.texts), PREDICT_BLOCK):
            yield np.arange(start, min(start + PREDICT_BLOCK, len(self.texts)))


Features = Callable[[np.ndarray], object]  # documents' indices -> their feature rows (dense or sparse)


def _predict(regressor, features) -> np.ndarray:
    """(rows, models) float64, also for one model (scikit-learn drops the axis)."""
    return np.asarray(regressor.predict(features), dtype=np.float64).reshape(features.shape[0], -1)


def cross_fit(make: Callable[[int], object], features: Features | np.ndarray, data: RouterData) -> np.ndarray:
    """(models, documents) bits per byte predicted by scikit-learn regressors fitted on the training documents
    (`data.fit_rows`): other documents from one fit on all of them, those out of fold (CROSS_FIT_FOLDS seeded
    folds of them), so a document's prediction never saw its own loss. `make(n)` builds the regressor for n
    fitting rows; `features` are the documents' rows, or a function building them for some documents (called
    block by block)."""
    features = features if callable(features) else features.__getitem__
    rows = data.fit_rows
    target = data.bpb[:, rows].T
    fitting = features(rows)
    folds = min(CROSS_FIT_FOLDS, len(rows))
    splits = list(KFold(folds, shuffle=True, random_state=data.seed).split(rows)) if folds >= 2 else []

    def fitted(split: tuple[np.ndarray, np.ndarray] | None):
        """The regressor fitted on every fitting row (None), or a fold's predictions of its held-out rows: a fold's
        regressor (a knn one holds a copy of its rows) is dropped once it has predicted."""
        if split is None:
            return make(len(rows)).fit(fitting, target)
        fit, held = split
        return _predict(make(len(fit)).fit(fitting[fit], target[fit]), fitting[held])

    regressor, *out_of_fold = _in_threads(fitted, [None, *splits])
    predicted = np.concatenate(list(_in_threads(lambda block: _predict(regressor, features(block)), data.blocks())))
    for (_, held), values in zip(splits, out_of_fold):
        predicted[rows[held]] = values
    return predicted.T


def best_single_router(data: RouterData) -> Prediction:
    """Every document: the members' mean bits per byte on the training documents (the best one always runs)."""
    return Prediction(np.broadcast_to(data.bpb[:, data.train].mean(axis=1, keepdims=True), data.bpb.shape))


def ngram_router(data: RouterData) -> Prediction:
    """One multi-output ridge regression on the hashed n-grams."""
    return Prediction(cross_fit(lambda n: Ridge(alpha=data.ridge_alpha), data.ngrams, data))


def knn_router(data: RouterData) -> Prediction:
    """The mean bits per byte of the nearest training documents in n-gram space (cosine: the rows are unit).
    Distances come in chunks of KNN_WORKING_MEMORY_MB: the same neighbours, in bounded memory."""
    with config_context(working_memory=KNN_WORKING_MEMORY_MB):
        return Prediction(cross_fit(lambda n: KNeighborsRegressor(n_neighbors=min(data.knn_neighbors, n)),
                                    data.ngrams, data))


def mlp_router(data: RouterData) -> Prediction:
    """A one-hidden-layer perceptron (L-BFGS, seeded, L2 penalty `ridge_alpha`) on the n-grams' leading
    MLP_COMPONENTS singular directions over its fitting texts (on thousands of sparse inputs it takes minutes),
    standardised on them (the scale a perceptron's penalty assumes)."""
    if data.ngram_features <= MLP_COMPONENTS:  # few n-grams: read as they are
        project = lambda rows: data.ngrams(rows).toarray()  # noqa: E731
    else:
        svd = TruncatedSVD(min(MLP_COMPONENTS, len(data.fit_rows)), random_state=data.seed).fit(
            data.ngrams(data.fit_rows))
        project = lambda rows: svd.transform(data.ngrams(rows))  # noqa: E731
    features = np.concatenate([project(block) for block in data.blocks()])
    features = StandardScaler().fit(features[data.fit_rows]).transform(features)
    with warnings.catch_warnings():  # L-BFGS stopping where its line search makes no progress: its optimum
        warnings.simplefilter("ignore", ConvergenceWarning)
        return Prediction(cross_fit(lambda n: MLPRegressor(hidden_layer_sizes=(data.mlp_hidden,), solver="lbfgs",
                                                           alpha=data.ridge_alpha, max_iter=MLP_ITERATIONS,
                                                           random_state=data.seed), features, data))


def small_model_router(data: RouterData) -> Prediction:
    """Ridge regression on the smallest member's bits per byte and the document's log length: it runs that member."""
    smallest = int(np.argmin(data.n_params))
    features = np.column_stack([data.bpb[smallest], np.log(np.maximum(data.n_bytes, 1.0))])
    return Prediction(cross_fit(lambda n: Ridge(alpha=data.ridge_alpha), features, data), runs=(smallest,))


# The routers, by name: `router_<name>` is a strategy on every ensemble and a λ-swept curve at the whole pool.
ROUTERS: dict[str, Callable[[RouterData], Prediction]] = {
    "best_single": best_single_router, "ngram": ngram_router, "knn": knn_router, "mlp": mlp_router,
    "small_model": small_model_router}
STRATEGIES = ("oracle", "mixture_fitted", "mixture_uniform", *(f"router_{name}" for name in ROUTERS))


def spent(chosen: np.ndarray, runs: Sequence[int], flops: np.ndarray) -> np.ndarray:
    """FLOPs per document of running the chosen members (any shape × documents) and the router's own `runs`,
    each member once."""
    documents = np.arange(flops.shape[1])
    own = flops[list(runs)].sum(axis=0)
    return own + np.where(np.isin(chosen, list(runs)), 0.0, flops[chosen, documents])


class Curve(NamedTuple):
    """A router's operating points: its setting (λ or threshold), and per point the member it leaves each
    document with (points, documents) and the FLOPs it spent on it (points, documents)."""
    sweep: str
    setting: np.ndarray
    chosen: np.ndarray
    flops: np.ndarray


def lambda_curve(prediction: Prediction, flops: np.ndarray, n_bytes: np.ndarray, points: int) -> Curve:
    """Per document the member minimising predicted bits per byte + λ · its extra FLOPs per byte (a member the
    router runs anyway costs nothing more), λ from 0 over quantiles of the λ at which some document's choice
    flips, up to the last flip: there every document runs its cheapest member. Ties go to the cheaper member."""
    cost = flops / n_bytes
    cost[list(prediction.runs)] = 0.0
    predicted = np.asarray(prediction.bpb, dtype=np.float64)
    n_models, n_documents = predicted.shape
    blocks = document_blocks(n_documents, n_models * max(n_models, points))
    flips = np.concatenate([_flips(predicted[:, block], cost[:, block]) for block in blocks])
    lambdas = np.unique(np.concatenate([[0.0], np.quantile(flips, np.linspace(0, 1, points - 1), overwrite_input=True)
                                        if flips.size else []]))
    chosen = np.concatenate([_lowest_score(predicted[:, block], cost[:, block], lambdas) for block in blocks], axis=1)
    return Curve("lambda", lambdas, chosen, spent(chosen, prediction.runs, flops))


def _flips(predicted: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """The λ at which a document's choice flips from a member to a cheaper, worse one (any order)."""
    gain, extra = predicted[:, None] - predicted[None], cost[None] - cost[:, None]  # [a, b]: a − b, b − a
    flipping = (extra > 0) & (gain > 0)
    return gain[flipping] / extra[flipping]


def _lowest_score(predicted: np.ndarray, cost: np.ndarray, lambdas: np.ndarray) -> np.ndarray:
    """(λs, documents): the member of lowest predicted bits per byte + λ · cost, the cheaper of equal scores."""
    order = np.argsort(cost, axis=0, kind="stable")  # cheaper first: argmin keeps the first of equal scores
    score = (np.take_along_axis(predicted, order, 0)[None]
             + lambdas[:, None, None] * np.take_along_axis(cost, order, 0)[None])
    return np.take_along_axis(order, score.argmin(axis=1), 0)


def cascade_curve(bpb: np.ndarray, flops: np.ndarray, cheap: int, target: int, points: int) -> Curve:
    """Run the `cheap` member; escalate to `target` where its bits per byte exceed the threshold (swept from +∞,
    never, over quantiles of its losses to −∞, always). Cost: the cheap member always, plus the target where it
    escalates; the loss: the target's where it escalates. See CASCADE_NOTE for what this cascade knows."""
    thresholds = np.concatenate([[np.inf], np.quantile(bpb[cheap], np.linspace(1, 0, max(points - 2, 0))), [-np.inf]])
    chosen = np.where(bpb[cheap][None] > thresholds[:, None], target, cheap)
    return Curve("threshold", thresholds, chosen, spent(chosen, (cheap,), flops))


def hull(cost: np.ndarray, quality: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RouterBench's non-decreasing convex hull: the smallest concave, non-decreasing function of cost above
    every (cost, quality) point (picking between two operating points at random realises any point between
    them, and a budget can be left unspent). Returns the indices of the points that are its knots, and its knots
    (costs, qualities) up to the largest cost, where it is held flat."""
    knots: list[int] = []
    for i in np.lexsort((-quality, cost)):  # by cost, the best first among equal costs
        if knots and quality[i] <= quality[knots[-1]]:
            continue  # no better than a cheaper point: under the hull
        while len(knots) >= 2:
            a, b = knots[-2], knots[-1]
            if (cost[b] - cost[a]) * (quality[i] - quality[a]) < (quality[b] - quality[a]) * (cost[i] - cost[a]):
                break  # b lies above the chord from a to i: it stays a knot
            knots.pop()
        knots.append(int(i))
    xs, ys = cost[knots], quality[knots]
    if cost.max() > xs[-1]:
        xs, ys = np.append(xs, cost.max()), np.append(ys, ys[-1])
    return np.asarray(knots), xs, ys


def aiq(cost: np.ndarray, quality: np.ndarray) -> float:
    """RouterBench's AIQ: the area under the hull (see `hull`) over the cost range the points span, divided by
    that range (the hull's mean quality); a curve of one cost is its best quality."""
    _, xs, ys = hull(cost, quality)
    return float(ys[0]) if len(xs) == 1 else float(np.trapezoid(ys, xs) / (xs[-1] - xs[0]))


def oracle_gap(cost: np.ndarray, quality: np.ndarray, perfect_cost: np.ndarray, perfect_quality: np.ndarray) -> float:
    """The perfect router's hull minus this curve's hull, averaged over this curve's cost range (matched cost).
    The perfect hull is held flat beyond its own cost range (np.interp), where it has no points of its own."""
    _, xs, ys = hull(cost, quality)
    _, pxs, pys = hull(perfect_cost, perfect_quality)
    if len(xs) == 1:
        return float(np.interp(xs[0], pxs, pys) - ys[0])
    knots = np.union1d(xs, pxs[(pxs > xs[0]) & (pxs < xs[-1])])  # both are linear between these: exact
    return float(np.trapezoid(np.interp(knots, pxs, pys) - np.interp(knots, xs, ys), knots) / (xs[-1] - xs[0]))


class BlockSums(NamedTuple):
    """A strategy's per-ensemble sums over one block of documents (see `StrategyTotals`)."""
    test: np.ndarray
    train: np.ndarray
    flops: np.ndarray
    replicates: np.ndarray
    correct: np.ndarray | None


def block_sums(nll: np.ndarray, flops: np.ndarray, *, test: np.ndarray, weights: np.ndarray,
               correct: np.ndarray | None = None) -> BlockSums:
    """One block's sums of a strategy: (ensembles, block documents) NLL, FLOPs and choices; `test` the block's test
    mask, `weights` its test documents' resample weights."""
    return BlockSums(nll[:, test].sum(axis=1), nll[:, ~test].sum(axis=1), flops[:, test].sum(axis=1),
                     nll[:, test] @ weights, None if correct is None else correct[:, test].sum(axis=1))


class StrategyTotals:
    """Per-ensemble sums of each strategy over the documents, added block by block, in block order: its NLL over
    the test and the training documents, its FLOPs and its NLL under each resample over the test documents, and
    (routers) on how many test documents it chose the ensemble's best member."""

    def __init__(self, n_ensembles: int, bootstrap: int) -> None:
        self.test = {strategy: np.zeros(n_ensembles) for strategy in STRATEGIES}
        self.train = {strategy: np.zeros(n_ensembles) for strategy in STRATEGIES}
        self.flops = {strategy: np.zeros(n_ensembles) for strategy in STRATEGIES}
        self.replicates = {strategy: np.zeros((n_ensembles, bootstrap)) for strategy in STRATEGIES}
        self.correct: dict[str, np.ndarray] = {}

    def add(self, strategy: str, sums: BlockSums) -> None:
        self.test[strategy] += sums.test
        self.train[strategy] += sums.train
        self.flops[strategy] += sums.flops
        self.replicates[strategy] += sums.replicates
        if sums.correct is not None:
            self.correct[strategy] = self.correct.get(strategy, 0) + sums.correct


@one_library_thread
def realised(pool: xr.Dataset, members: Sequence[Sequence[str]], texts: Sequence[str], *, test_fraction: float,
             seed: int, bootstrap: int, ngram_features: int = 4096, ridge_alpha: float = 1.0, knn_neighbors: int = 10,
             mlp_hidden: int = 64, sweep_points: int = 48) -> dict:
    """Every strategy on every ensemble, cross-fitted, and the cost–quality curves at the whole pool: returns
    tables and bootstrap replicates (see module doc).

    Keys: `table` (one row per ensemble and strategy: test bits per byte, train bits per byte, FLOPs per byte,
    routing accuracy), `replicates` (strategy -> (ensembles, resamples) test bits per byte), `test` (the mask),
    `curves` (curve name -> its `Curve` and, per point, test bits per byte and FLOPs per byte with their
    (points, resamples) replicates), `cascade` (its cheap member and the member it escalates to),
    `router_training` (the training documents the learned routers fit on).
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
    fitted_weights = fit_mixture_weights(nll[:, train], member)
    data = RouterData(bpb, train, texts, n_bytes, n_params, seed=seed, ngram_features=ngram_features,
                      ridge_alpha=ridge_alpha, knn_neighbors=knn_neighbors, mlp_hidden=mlp_hidden)
    predictions = {name: router(data) for name, router in ROUTERS.items()}
    rng = np.random.default_rng([seed, 1])
    weights = rng.poisson(1.0, (int(test.sum()), bootstrap)).astype(np.float64)
    totals = StrategyTotals(len(members), bootstrap)
    weight_row = np.cumsum(test) - 1  # a test document's row of `weights`
    uniform_weights = uniform_log_weights(member)

    def strategies_on(block: slice) -> dict[str, BlockSums]:
        """Every strategy's sums over one block of documents (on one thread)."""
        block_nll, block_flops, block_test = nll[:, block], flops_per_document[:, block], test[block]
        sums = partial(block_sums, test=block_test, weights=weights[weight_row[block][block_test]])
        documents = np.arange(block_nll.shape[1])
        best_member = _lowest(block_nll, member)
        every_member = member @ block_flops  # the oracle and the mixtures run every member
        found = {"oracle": sums(block_nll[best_member, documents], every_member),
                 "mixture_uniform": sums(-_log_mixture(block_nll, uniform_weights), every_member),
                 "mixture_fitted": sums(-_log_mixture(block_nll, fitted_weights), every_member)}
        for name, prediction in predictions.items():
            chosen = _lowest(prediction.bpb[:, block], member)
            cost = spent(chosen, prediction.runs, block_flops)
            found[f"router_{name}"] = sums(block_nll[chosen, documents], cost, correct=chosen == best_member)
        return found

    for found in _in_threads(strategies_on, document_blocks(nll.shape[1], member.size)):
        for strategy, sums in found.items():
            totals.add(strategy, sums)
    whole = np.flatnonzero(member[int(np.argmax(member.sum(axis=1)))])  # the whole pool's members
    sweep = np.ix_(whole, np.flatnonzero(test))  # the curves: the whole pool on the test documents
    curves = {"perfect": lambda_curve(Prediction(bpb[sweep]), flops_per_document[sweep], n_bytes[test], sweep_points)}
    for name, prediction in predictions.items():
        runs = tuple(int(i) for i in np.flatnonzero(np.isin(whole, prediction.runs)))
        curves[f"router_{name}"] = lambda_curve(Prediction(prediction.bpb[sweep], runs), flops_per_document[sweep],
                                                n_bytes[test], sweep_points)
    cascade = {}
    if len(whole) >= 2:  # cheap: the fewest parameters; escalate to the member best on the training documents
        cheap = int(np.argmin(n_params[whole]))
        on_train = nll[whole][:, train].sum(axis=1)
        target = int(np.argmin(np.where(np.arange(len(whole)) == cheap, np.inf, on_train)))
        curves["cascade"] = cascade_curve(bpb[sweep], flops_per_document[sweep], cheap, target, sweep_points)
        cascade = {"cheap": models[whole[cheap]], "escalates_to": models[whole[target]]}
    rows, replicates = [], {}
    for strategy in STRATEGIES:
        with np.errstate(invalid="ignore", divide="ignore"):
            replicates[strategy] = totals.replicates[strategy] / ((n_bytes[test] @ weights) * LN2)
        rows.append(pd.DataFrame({
            "ensemble": np.arange(len(members)), "strategy": strategy,
            "test_bpb": totals.test[strategy] / (n_bytes[test].sum() * LN2),
            "train_bpb": totals.train[strategy] / (n_bytes[train].sum() * LN2),
            "flops_per_byte": totals.flops[strategy] / n_bytes[test].sum(),
            "routing_accuracy": totals.correct[strategy] / test.sum() if strategy in totals.correct else np.nan,
        }))
    points = {}
    for name, curve in curves.items():
        chosen_nll = nll[sweep][curve.chosen, np.arange(int(test.sum()))]
        with np.errstate(invalid="ignore", divide="ignore"):
            points[name] = {"curve": curve, "test_bpb": chosen_nll.sum(axis=1) / (n_bytes[test].sum() * LN2),
                            "flops_per_byte": curve.flops.sum(axis=1) / n_bytes[test].sum(),
                            "replicate_bpb": (chosen_nll @ weights) / ((n_bytes[test] @ weights) * LN2),
                            "replicate_flops": (curve.flops @ weights) / (n_bytes[test] @ weights)}
    sampled = len(data.fit_rows) < int(train.sum())
    router_training = {"documents": len(data.fit_rows), "training_documents": int(train.sum()), "sampled": sampled,
                       "note": (f"the learned routers fit on a seeded sample of {len(data.fit_rows)} of the "
                                f"{int(train.sum())} training documents (at most {ROUTER_TRAINING_MAX})" if sampled
                                else "the learned routers fit on every training document")}
    return {"table": pd.concat(rows, ignore_index=True), "replicates": replicates, "test": test, "curves": points,
            "cascade": cascade, "router_training": router_training}


def curve_metrics(points: dict, cascade: dict) -> tuple[pd.DataFrame, dict]:
    """The curves' table (one row per operating point, `ROUTER_CURVE_COLUMNS`) and their AIQ and oracle gap at
    matched cost, each with its interval over the resampled test documents (paired: the perfect router's curve
    is resampled with the same weights)."""
    perfect = points["perfect"]
    rows, summary = [], {}
    for name, point in points.items():
        cost, quality = point["flops_per_byte"], -point["test_bpb"]
        knots, xs, _ = hull(cost, quality)
        rows.append(pd.DataFrame({"router": name, "sweep": point["curve"].sweep, "setting": point["curve"].setting,
                                  "flops_per_byte": cost, "test_bpb": point["test_bpb"],
                                  "on_hull": np.isin(np.arange(len(cost)), knots)}))
        resampled = [(point["replicate_flops"][:, b], -point["replicate_bpb"][:, b],
                      perfect["replicate_flops"][:, b], -perfect["replicate_bpb"][:, b])
                     for b in range(point["replicate_bpb"].shape[1])]
        summary[name] = {
            "aiq": {"value": aiq(cost, quality), "ci95": _interval(np.array([aiq(*r[:2]) for r in resampled]))},
            "oracle_gap": {"value": oracle_gap(cost, quality, perfect["flops_per_byte"], -perfect["test_bpb"]),
                           "ci95": _interval(np.array([oracle_gap(*r) for r in resampled]))},
            "flops_per_byte_range": [float(xs[0]), float(xs[-1])], "points": len(cost)}
    summary["perfect"]["oracle_gap"] = {"value": 0.0, "ci95": None, "note": "0 by construction: it is the reference"}
    return pd.concat(rows, ignore_index=True).reindex(columns=ROUTER_CURVE_COLUMNS), {
        "axes": COST_QUALITY_AXES,
        "sweep": "routers and the perfect router (predictions = the true losses): per test document the member "
                 "minimising predicted bits per byte + λ · its extra FLOPs per byte, λ from 0 up to where every "
                 "document runs its cheapest member; the cascade: its threshold from +∞ (never escalate) to −∞",
        "cascade": {**cascade, "note": CASCADE_NOTE} if cascade else None,
        "routers": summary}


def _interval(values: np.ndarray) -> list[float] | None:
    values = values[np.isfinite(values)]
    return [float(v) for v in np.percentile(values, [2.5, 97.5])] if len(values) else None


def routing_study(pool_path: str | Path, oracle_dir: str | Path, eval_split: str | Path, out: str | Path,
                  metrics_path: str | Path, *, test_fraction: float, seed: int, bootstrap: int,
                  ngram_features: int = 4096, ridge_alpha: float = 1.0, knn_neighbors: int = 10, mlp_hidden: int = 64,
                  sweep_points: int = 48) -> dict:
    """The routing stage: strategies × ensembles and the whole pool's cost–quality curves (tables in `out`),
    headline figures, AIQ and oracle gaps, and the realisable laws (`metrics_path`). Returns the metrics."""
    # by range, before any work: a zero feature count divides by zero inside the hashing (SIGFPE, no message)
    check_number("routing.test_fraction", test_fraction, 0, 1, low_open=True, high_open=True)
    check_number("routing.bootstrap", bootstrap, 0, integer=True)
    check_number("routing.seed", seed, 0, integer=True)
    check_number("routing.ngram_features", ngram_features, 1, NGRAM_FEATURES_MAX, integer=True)
    check_number("routing.ridge_alpha", ridge_alpha, 0)
    check_number("routing.knn_neighbors", knn_neighbors, 1, integer=True)
    check_number("routing.mlp_hidden", mlp_hidden, 1, integer=True)
    check_number("routing.sweep_points", sweep_points, 2, integer=True)
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
                      bootstrap=bootstrap, ngram_features=ngram_features, ridge_alpha=ridge_alpha,
                      knn_neighbors=knn_neighbors, mlp_hidden=mlp_hidden, sweep_points=sweep_points)
    table = result["table"].merge(ensembles[["kind", "k", "total_params"]], left_on="ensemble", right_index=True)
    metrics = _routing_metrics(table, result["replicates"], ensembles, result["test"], bootstrap)
    metrics["router_training"] = result["router_training"]
    router_curves, metrics["cost_quality_at_largest_k"] = curve_metrics(result["curves"], result["cascade"])
    with atomic_path(out, "routing tables") as tmp:
        tmp.mkdir()
        table.to_parquet(tmp / "strategies.parquet", index=False)
        table.to_csv(tmp / "strategies.csv", index=False)
        metrics_frame = pd.DataFrame(metrics.pop("_curves"))
        metrics_frame.to_csv(tmp / "curves.csv", index=False)
        router_curves.to_csv(tmp / "router_curves.csv", index=False)
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
            # no groups: ensembles that are one measurement by construction (the same winners, or the same member
            # routed to on every document) tie on the training documents, and a frontier's losses fall strictly there
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
