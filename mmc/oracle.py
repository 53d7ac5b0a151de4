"""The oracle ensemble: per-sample minimum loss over members, exact subset expectations, attribution.

Everything here is a sum over samples, so a pool is streamed in blocks of samples (its dask chunks when it
is dask-backed) and only per-model or per-ensemble sums are kept: memory does not grow with the pool.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np
import pandas as pd
import xarray as xr

from mmc import MMCError
from mmc.store import (SAMPLE_CHUNK, atomic_path, check_losses, check_outputs, check_pool, dask_scheduler, local_path,
                       one_line, open_store, output_path, remote_filesystem, string_values)

LN2 = math.log(2.0)
# ensemble minima are taken for this many ensembles × samples at a time: small enough for the CPU caches
ENSEMBLE_BLOCK = 256
SAMPLE_BLOCK = 2048
WEIGHT_BLOCK = 2048  # bootstrap weights are drawn for fixed blocks of this many samples (see poisson_weights)
KINDS = ("single", "homogeneous", "heterogeneous")


class Ensemble(NamedTuple):
    members: tuple[int, ...]  # model indices, ascending
    kind: str  # one of KINDS


# ---------------------------------------------------------------------------------------------- numpy core


def expected_subset_min(nll: np.ndarray, k: int) -> np.ndarray:
    """Mean over all C(M, k) subsets of models of the per-sample minimum loss: (models, samples) -> (samples,).

    Exact, from order statistics: the i-th smallest loss is a subset's minimum in C(M−i, k−1) of the C(M, k)
    subsets. Ties need no care: any tie-break gives the same sum.
    """
    nll = _loss_matrix(nll)
    n_models = nll.shape[0]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n_models:
        raise MMCError(f"subset size k={k!r} must be an integer from 1 to the number of models ({n_models})")
    return subset_min_weights(n_models, [k])[0] @ np.sort(nll, axis=0)


def subset_min_weights(n_models: int, sizes: Sequence[int]) -> np.ndarray:
    """w[j, i] = C(M−1−i, k_j−1) / C(M, k_j): weight of the (i+1)-th smallest of M losses in E[min of k_j].

    Built from ratios of consecutive weights (all in [0, 1]), so no factorial overflows for large pools.
    """
    sizes = np.asarray(sizes, dtype=np.float64)[:, None]
    position = np.arange(n_models - 1)
    ratios = np.clip((n_models - position - sizes) / (n_models - position - 1), 0.0, None)
    first = sizes / n_models
    return np.concatenate([first, first * np.cumprod(ratios, axis=1)], axis=1)


def shapley_values(nll: np.ndarray) -> np.ndarray:
    """Exact Shapley values (models,) of the game v(S) = mean over samples of min_{m∈S} nll[m, s], v(∅) = 0."""
    nll = _loss_matrix(nll)
    return _Chunk(nll).shapley_sums() / nll.shape[1]


def win_shares(nll: np.ndarray) -> np.ndarray:
    """Fraction of samples on which each model has the minimum loss, ties split equally (sums to 1)."""
    nll = _loss_matrix(nll)
    return _Chunk(nll).win_share_sums() / nll.shape[1]


def _loss_matrix(nll: np.ndarray) -> np.ndarray:
    nll = np.asarray(nll, dtype=np.float64)
    if nll.ndim != 2 or 0 in nll.shape:
        raise MMCError(f"losses must be a non-empty (models, samples) array, got shape {nll.shape}")
    if not np.isfinite(nll).all():
        raise MMCError("losses contain NaN or infinite values")
    return nll


class _Chunk:
    """A block of samples, stored sample-major so that sorts run along contiguous memory."""

    def __init__(self, nll: np.ndarray, offset: int = 0, n_bytes: np.ndarray | None = None,
                 domains: np.ndarray | None = None) -> None:
        self.offset = offset  # position of the block's first sample in the pool
        self.n_bytes = n_bytes  # (samples,) UTF-8 bytes, when the block came from a pool
        self.domains = domains  # (samples,) domain codes, when the block came from a pool
        self.by_model = np.asarray(nll, dtype=np.float64)  # (models, samples)
        self.losses = np.ascontiguousarray(self.by_model.T)  # (samples, models)
        self.n_samples, self.n_models = self.losses.shape

    @cached_property
    def order(self) -> np.ndarray:
        """(samples, models): model indices from best to worst on each sample."""
        return np.argsort(self.losses, axis=1)

    @cached_property
    def ascending(self) -> np.ndarray:
        """(samples, models): each sample's losses, sorted ascending."""
        return np.take_along_axis(self.losses, self.order, axis=1)

    @cached_property
    def ranks(self) -> np.ndarray:
        """(models, samples): each model's position in its sample's order, in the smallest integer type."""
        ranks = np.empty(self.losses.shape, dtype=np.min_scalar_type(self.n_models - 1))
        np.put_along_axis(ranks, self.order, np.arange(self.n_models, dtype=ranks.dtype)[None, :], axis=1)
        return np.ascontiguousarray(ranks.T)

    def model_sums(self) -> np.ndarray:
        return self.by_model.sum(axis=1)

    def win_shares(self) -> np.ndarray:
        """(samples, models): 1 for the best model of each sample, ties split equally."""
        is_best = self.losses == self.ascending[:, :1]
        return is_best / is_best.sum(axis=1, keepdims=True)

    def win_share_sums(self) -> np.ndarray:
        return self.win_shares().sum(axis=0)

    def shapley(self) -> np.ndarray:
        """(samples, models): each model's Shapley value on each sample.

        On one sample, min over S = Σ_j (l(j) − l(j+1)) · 1[S holds one of the j best] with l(M+1) = 0; the
        j-th game pays 1/j to each of the j best, so rank i earns Σ_{j≥i} (l(j) − l(j+1)) / j.
        """
        ascending = self.ascending
        shares = np.empty_like(ascending)
        np.subtract(ascending[:, :-1], ascending[:, 1:], out=shares[:, :-1])
        shares[:, -1] = ascending[:, -1]
        shares /= np.arange(1, self.n_models + 1)
        per_rank = np.cumsum(shares[:, ::-1], axis=1)[:, ::-1]
        values = np.empty_like(per_rank)
        np.put_along_axis(values, self.order, per_rank, axis=1)
        return values

    def shapley_sums(self) -> np.ndarray:
        """Σ over samples of each model's Shapley value."""
        return self.shapley().sum(axis=0)

    def sorted_sums(self, rows: np.ndarray | None = None) -> np.ndarray:
        """Σ over samples of the i-th smallest loss among `rows` (all models when None)."""
        if rows is None:
            return self.ascending.sum(axis=0)
        return np.sort(self.losses[:, rows], axis=1).sum(axis=0)


# ---------------------------------------------------------------------------------------------- ensembles


def enumerate_ensembles(families: Sequence[str], max_subsets_per_k: int, seed: int) -> list[Ensemble]:
    """Singles, homogeneous (one family, k ≥ 2) and heterogeneous (≥ 2 families) ensembles of every size k.

    A (kind, k) with at most `max_subsets_per_k` subsets is enumerated exactly; a larger one is represented
    by that many distinct uniformly drawn subsets, from a generator seeded by (seed, kind, k) so that the
    draws for one size do not depend on the others.
    """
    if max_subsets_per_k < 1:
        raise MMCError(f"max_subsets_per_k must be at least 1, got {max_subsets_per_k}")
    families = [str(family) for family in families]
    n_models = len(families)
    if n_models == 0:
        raise MMCError("the pool has no models")
    codes = np.unique(families, return_inverse=True)[1]
    groups = [tuple(np.flatnonzero(codes == code).tolist()) for code in range(codes.max() + 1)]

    ensembles = [Ensemble((m,), "single") for m in range(n_models)]
    for kind in KINDS[1:]:
        for k in range(2, n_models + 1):
            homogeneous = sum(math.comb(len(group), k) for group in groups)
            count = homogeneous if kind == "homogeneous" else math.comb(n_models, k) - homogeneous
            if count == 0:
                continue
            if count <= max_subsets_per_k:
                subsets = _all_subsets(kind, k, groups, codes)
            else:
                rng = np.random.default_rng([seed, KINDS.index(kind), k])
                subsets = _draw_subsets(kind, k, groups, codes, max_subsets_per_k, rng)
            ensembles.extend(Ensemble(members, kind) for members in subsets)
    return ensembles


def _all_subsets(kind: str, k: int, groups: list[tuple[int, ...]], codes: np.ndarray) -> list[tuple[int, ...]]:
    if kind == "homogeneous":
        return sorted(subset for group in groups for subset in itertools.combinations(group, k))
    # few heterogeneous subsets means few subsets at all: C(M, k) <= (1 + M²) · (heterogeneous count)
    return [subset for subset in itertools.combinations(range(len(codes)), k)
            if len(set(codes[list(subset)].tolist())) > 1]


def _draw_subsets(kind: str, k: int, groups: list[tuple[int, ...]], codes: np.ndarray, n_subsets: int,
                  rng: np.random.Generator) -> list[tuple[int, ...]]:
    """`n_subsets` distinct subsets drawn uniformly from those of the kind (rejecting repeats)."""
    weights = np.array([math.comb(len(group), k) for group in groups], dtype=np.float64)
    chosen: dict[tuple[int, ...], None] = {}
    while len(chosen) < n_subsets:
        batch = 2 * (n_subsets - len(chosen))
        if kind == "homogeneous":
            picks = rng.choice(len(groups), size=batch, p=weights / weights.sum())
            draws = [np.asarray(groups[g])[_random_subsets(rng, int((picks == g).sum()), len(groups[g]), k)]
                     for g in np.unique(picks)]
            subsets = np.sort(np.concatenate(draws), axis=1)
        else:
            subsets = np.sort(_random_subsets(rng, batch, len(codes), k), axis=1)
            member_codes = codes[subsets]
            subsets = subsets[(member_codes != member_codes[:, :1]).any(axis=1)]
        for subset in map(tuple, subsets.tolist()):
            if len(chosen) < n_subsets:
                chosen[subset] = None
    return sorted(chosen)


def _random_subsets(rng: np.random.Generator, n_draws: int, n_items: int, k: int) -> np.ndarray:
    """(n_draws, k) uniformly random k-subsets of range(n_items): the first k of random permutations."""
    return np.argsort(rng.random((n_draws, n_items)), axis=1)[:, :k]


# ---------------------------------------------------------------------------------------------- streaming


@dataclass(frozen=True)
class _Models:
    names: np.ndarray
    families: np.ndarray
    n_params: np.ndarray
    n_params_nonembedding: np.ndarray

    @classmethod
    def of(cls, pool: xr.Dataset) -> _Models:
        missing = [name for name in ("nll", "family", "n_params", "n_params_nonembedding", "n_bytes")
                   if name not in pool.variables]
        if missing or set(pool["nll"].dims) != {"model", "sample"}:
            raise MMCError(f"not a pool dataset: needs nll over (model, sample) and coords family, n_params, "
                           f"n_params_nonembedding, n_bytes; missing {missing or 'the (model, sample) dims'}")
        if pool.sizes["model"] == 0 or pool.sizes["sample"] == 0:
            raise MMCError(f"the pool is empty: {dict(pool.sizes)}")
        return cls(names=np.array([str(name) for name in pool["model"].values]),
                   families=np.array([str(family) for family in pool["family"].values]),
                   n_params=np.asarray(pool["n_params"].values, dtype=np.int64),
                   n_params_nonembedding=np.asarray(pool["n_params_nonembedding"].values, dtype=np.int64))

    @property
    def count(self) -> int:
        return len(self.names)


class _Accumulator(Protocol):
    def update(self, chunk: _Chunk) -> None: ...


@dataclass
class _Totals:
    n_samples: int = 0
    n_bytes: float = 0.0

    @property
    def bits_denominator(self) -> float:
        return self.n_bytes * LN2


def _stream(pool: xr.Dataset, accumulators: Sequence[_Accumulator], sample_chunk: int,
            domain_codes: np.ndarray | None = None) -> _Totals:
    """Feed the pool to every accumulator one block of samples at a time; one read of the data in all. Each block
    carries its slice of `domain_codes` (samples,) when given."""
    totals = _Totals()
    # one chunking along `sample` for nll and the sample coords: pools assembled before the coords were chunked
    # like nll hold them in one chunk, which xarray refuses as inconsistent chunks once nll has several
    pool = pool.unify_chunks()
    nll = pool["nll"].transpose("model", "sample")
    n_bytes = pool["n_bytes"]
    where = pool.encoding.get("source", "the pool")
    for start, stop in _sample_blocks(nll, sample_chunk):
        try:
            block = np.asarray(nll[:, start:stop].values, dtype=np.float64)
            block_bytes = np.asarray(n_bytes[start:stop].values, dtype=np.float64)
        except Exception as error:  # a corrupt or truncated chunk: zarr and numcodecs raise many kinds
            raise MMCError(f"store '{where}' cannot be read at samples {start}..{stop - 1}, it is corrupt or "
                           f"truncated: {one_line(error)}") from None
        check_losses(block, f"{where} (samples {start}..{stop - 1})")
        chunk = _Chunk(block, start, block_bytes, None if domain_codes is None else domain_codes[start:stop])
        for accumulator in accumulators:
            accumulator.update(chunk)
        totals.n_samples += chunk.n_samples
        totals.n_bytes += float(chunk.n_bytes.sum())
    return totals


def _sample_blocks(nll: xr.DataArray, sample_chunk: int) -> Iterator[tuple[int, int]]:
    """[start, stop) ranges along `sample`: the dask chunks of nll itself (split to at most `sample_chunk`; its
    coords' chunks do not matter), else even blocks."""
    if sample_chunk < 1:
        raise MMCError(f"sample_chunk must be at least 1, got {sample_chunk}")
    sizes = nll.variable.chunksizes.get("sample") or (nll.sizes["sample"],)
    edges = np.cumsum((0, *sizes))
    for chunk_start, chunk_stop in zip(edges[:-1], edges[1:]):
        for start in range(int(chunk_start), int(chunk_stop), sample_chunk):
            yield start, min(start + sample_chunk, int(chunk_stop))


class _EnsembleMinima:
    """Σ over samples of min_{m∈S} nll[m, s] for every ensemble S, without a loop over ensembles per sample, and
    its winners: the members that are that minimum on some sample.

    Per block of samples, each model's rank on each sample is computed once (one sort); an ensemble's minimum
    is then the loss at its members' smallest rank: an elementwise minimum over member rows of the small
    integer rank matrix, for a block of ensembles at a time (padded to one size by repeating a member), then
    one gather from the sorted losses (and one from the sort order for the winner). Ensembles are processed in
    order of size, so padding wastes little. Ranks break a sample's equal losses one way for every ensemble, so
    two ensembles with the same winners have the same minimum on every sample: the same oracle loss, bit for bit.
    """

    def __init__(self, ensembles: Sequence[Ensemble], n_models: int) -> None:
        sizes = np.array([len(ensemble.members) for ensemble in ensembles])
        if len(ensembles) == 0 or sizes.min() < 1:
            raise MMCError("ensembles must be a non-empty list of non-empty member tuples")
        for ensemble in ensembles:
            if len(set(ensemble.members)) != len(ensemble.members) or not all(
                    0 <= m < n_models for m in ensemble.members):
                raise MMCError(f"ensemble {ensemble.members} must hold distinct model indices below {n_models}")
        self.by_size = np.argsort(sizes, kind="stable")
        width = int(sizes.max())
        self.padded = np.array([ensembles[i].members + ensembles[i].members[:1] * (width - sizes[i])
                                for i in self.by_size], dtype=np.intp)
        self.sorted_sizes = sizes[self.by_size]
        self.sorted_sums = np.zeros(len(ensembles))
        self.sorted_winners = np.zeros((len(ensembles), n_models), dtype=bool)
        self.model_sums = np.zeros(n_models)

    def update(self, chunk: _Chunk) -> None:
        for start, stop, first, last, best in self.block_best(chunk):
            self.sorted_sums[first:last] += np.take(chunk.ascending[start:stop], best).sum(axis=1)
            self.sorted_winners[np.arange(first, last)[:, None], np.take(chunk.order[start:stop], best)] = True
            if first == 0:  # summed block by block like the minima, so a single's gain comes out exactly 0
                self.model_sums += chunk.by_model[:, start:stop].sum(axis=1)

    def block_best(self, chunk: _Chunk) -> Iterator[tuple[int, int, int, int, np.ndarray]]:
        """(start, stop, first, last, best): where the best member of each of the ensembles [first, last) (in size
        order) is on each of the samples [start, stop) of the chunk, as flat positions into the rows [start, stop)
        of `chunk.ascending` (its loss) and `chunk.order` (the model), one cache-sized block at a time."""
        ranks = chunk.ranks
        buffer = np.empty(ENSEMBLE_BLOCK * SAMPLE_BLOCK, dtype=ranks.dtype)
        for start in range(0, chunk.n_samples, SAMPLE_BLOCK):
            stop = min(start + SAMPLE_BLOCK, chunk.n_samples)
            block_ranks = np.ascontiguousarray(ranks[:, start:stop])
            row_offsets = np.arange(stop - start) * chunk.n_models
            for first in range(0, len(self.padded), ENSEMBLE_BLOCK):
                last = min(first + ENSEMBLE_BLOCK, len(self.padded))
                members = self.padded[first:last, :self.sorted_sizes[last - 1]]
                best_rank = block_ranks[members[:, 0]]
                member_ranks = buffer[:best_rank.size].reshape(best_rank.shape)
                for column in members.T[1:]:
                    # indices are valid: mode="clip" skips the bounds check that makes "raise" buffer its output
                    np.take(block_ranks, column, axis=0, out=member_ranks, mode="clip")
                    np.minimum(best_rank, member_ranks, out=best_rank)
                best = best_rank.astype(np.intp)
                best += row_offsets
                yield start, stop, first, last, best

    @property
    def sums(self) -> np.ndarray:
        sums = np.empty_like(self.sorted_sums)
        sums[self.by_size] = self.sorted_sums
        return sums

    @property
    def winners(self) -> np.ndarray:
        """(ensembles, models): whether the model is its ensemble's minimum on some sample."""
        winners = np.empty_like(self.sorted_winners)
        winners[self.by_size] = self.sorted_winners
        return winners


def poisson_weights(seed: int, start: int, stop: int, n_bootstrap: int) -> np.ndarray:
    """(samples, replicates) Poisson(1) bootstrap weights of the pool's samples [start, stop).

    Drawn per fixed block of WEIGHT_BLOCK samples from a generator seeded with (seed, block index), so a
    sample's weights depend on its position alone, not on how the pool is chunked or streamed.
    """
    first, last = start // WEIGHT_BLOCK, -(-stop // WEIGHT_BLOCK)
    blocks = [np.random.default_rng([seed, block]).poisson(1.0, (WEIGHT_BLOCK, n_bootstrap))
              for block in range(first, last)]
    offset = first * WEIGHT_BLOCK
    return np.concatenate(blocks)[start - offset:stop - offset].astype(np.float64)


def half_weights(seed: int, start: int, stop: int) -> np.ndarray:
    """(samples, 2) indicators of two seeded halves of the pool's samples [start, stop), by position (as
    `poisson_weights`, the same however the pool is streamed)."""
    first, last = start // WEIGHT_BLOCK, -(-stop // WEIGHT_BLOCK)
    draws = np.concatenate([np.random.default_rng([seed, block, 2]).random(WEIGHT_BLOCK) for block in range(first, last)])
    first_half = draws[start - first * WEIGHT_BLOCK:stop - first * WEIGHT_BLOCK] < 0.5
    return np.column_stack([first_half, ~first_half]).astype(np.float64)


class _BootstrapMinima(_EnsembleMinima):
    """Σ_s w[s, r] · min_{m∈S} nll[m, s] for every ensemble S and weight column r, and Σ_s w[s, r] · bytes:
    (minima block) @ (weights block), accumulated in the streaming pass that takes the minima. `weights(start,
    stop)` gives the (samples, columns) weights of the pool's samples [start, stop), or a list of such blocks of
    columns: each multiplied on its own (the same products, to the bit, as a pass of its own: two ensembles with
    the same minima keep equal sums, which a wider product's blocking need not keep), their columns side by side."""

    def __init__(self, ensembles: Sequence[Ensemble], n_models: int, n_columns: int,
                 weights: Callable[[int, int], np.ndarray | list[np.ndarray]]) -> None:
        super().__init__(ensembles, n_models)
        self.weights = weights
        self.sorted_boot_sums = np.zeros((len(ensembles), n_columns))
        self.boot_bytes = np.zeros(n_columns)

    def update(self, chunk: _Chunk) -> None:
        parts: list[tuple[slice, np.ndarray]] = []
        for start, stop, first, last, best in self.block_best(chunk):
            if first == 0:  # the first block of ensembles on new samples
                blocks = self.weights(chunk.offset + start, chunk.offset + stop)
                blocks = [blocks] if isinstance(blocks, np.ndarray) else blocks
                ends = np.cumsum([block.shape[1] for block in blocks])
                parts = [(slice(end - block.shape[1], end), block) for end, block in zip(ends, blocks)]
                for columns, block in parts:
                    self.boot_bytes[columns] += chunk.n_bytes[start:stop] @ block
            minima = np.take(chunk.ascending[start:stop], best)
            for columns, block in parts:
                self.sorted_boot_sums[first:last, columns] += minima @ block

    @property
    def boot_sums(self) -> np.ndarray:
        sums = np.empty_like(self.sorted_boot_sums)
        sums[self.by_size] = self.sorted_boot_sums
        return sums


class _SortedSums:
    """Σ over samples of the i-th smallest loss within each scope: the pool and each family."""

    def __init__(self, models: _Models) -> None:
        self.scopes: dict[str, np.ndarray | None] = {"pool": None}
        for family in dict.fromkeys(models.families):
            self.scopes[family] = np.flatnonzero(models.families == family)
        self.sums = {scope: 0.0 for scope in self.scopes}

    def update(self, chunk: _Chunk) -> None:
        for scope, rows in self.scopes.items():
            self.sums[scope] = self.sums[scope] + chunk.sorted_sums(rows)


class _Attribution:
    """Per domain (rows) and model (columns): Σ over samples of the loss, the win share and the Shapley value."""

    def __init__(self, n_models: int, n_domains: int) -> None:
        self.n_samples = np.zeros(n_domains)
        self.model_sums, self.win_sums, self.shapley_sums = (np.zeros((n_domains, n_models)) for _ in range(3))

    def update(self, chunk: _Chunk) -> None:
        codes = np.zeros(chunk.n_samples, dtype=np.int64) if chunk.domains is None else chunk.domains
        one_hot = np.zeros((len(self.n_samples), chunk.n_samples))
        one_hot[codes, np.arange(chunk.n_samples)] = 1.0
        self.n_samples += one_hot.sum(axis=1)
        self.model_sums += one_hot @ chunk.losses
        self.win_sums += one_hot @ chunk.win_shares()
        self.shapley_sums += one_hot @ chunk.shapley()


# ---------------------------------------------------------------------------------------------- tables


def _ensemble_frame(models: _Models, ensembles: Sequence[Ensemble], minima: _EnsembleMinima,
                    totals: _Totals) -> pd.DataFrame:
    membership = np.zeros((len(ensembles), models.count), dtype=bool)
    for row, ensemble in enumerate(ensembles):
        membership[row, list(ensemble.members)] = True
    model_nll = minima.model_sums / totals.n_samples
    best_member = np.where(membership, model_nll, np.inf).argmin(axis=1)
    oracle_nll = minima.sums / totals.n_samples
    family_sets = [sorted(set(models.families[list(ensemble.members)])) for ensemble in ensembles]
    return pd.DataFrame({
        "members": [models.names[list(ensemble.members)].tolist() for ensemble in ensembles],
        "kind": [ensemble.kind for ensemble in ensembles],
        "k": membership.sum(axis=1),
        "families": family_sets,
        "n_families": [len(families) for families in family_sets],
        "total_params": membership @ models.n_params,
        "total_params_nonembedding": membership @ models.n_params_nonembedding,
        "oracle_nll": oracle_nll,
        "oracle_bpb": minima.sums / totals.bits_denominator,
        "best_member": models.names[best_member],
        "best_member_nll": model_nll[best_member],
        "gain": model_nll[best_member] - oracle_nll,
        # the members the oracle loss comes from: ensembles with the same winners have the same loss by construction
        "winners": [models.names[row].tolist() for row in minima.winners],
    })


def _curves_frame(models: _Models, sorted_sums: _SortedSums, totals: _Totals) -> pd.DataFrame:
    frames = []
    for scope, rows in sorted_sums.scopes.items():
        rows = np.arange(models.count) if rows is None else rows
        sizes = np.arange(1, len(rows) + 1)
        expected_sums = subset_min_weights(len(rows), sizes) @ sorted_sums.sums[scope]
        frames.append(pd.DataFrame({
            "scope": scope,
            "k": sizes,
            "expected_oracle_nll": expected_sums / totals.n_samples,
            "expected_oracle_bpb": expected_sums / totals.bits_denominator,
            "mean_total_params": sizes * models.n_params[rows].mean(),
            "mean_total_params_nonembedding": sizes * models.n_params_nonembedding[rows].mean(),
        }))
    return pd.concat(frames, ignore_index=True)


def pareto_indices(cost: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """Positions of the Pareto frontier in ascending cost: the points whose loss is strictly below that of
    every point of lower or equal cost (ties go to the earlier point)."""
    cost, loss = np.asarray(cost), np.asarray(loss)
    order = np.lexsort((loss, cost))
    best_before = np.concatenate([[np.inf], np.minimum.accumulate(loss[order])[:-1]])
    return order[loss[order] < best_before]


def pareto_frontier(table: pd.DataFrame) -> pd.DataFrame:
    """Rows whose oracle_nll is strictly below that of every row with fewer or equal total_params.

    These are the best oracle losses reachable at each parameter budget, in ascending total_params.
    """
    rows = pareto_indices(table["total_params"].to_numpy(), table["oracle_nll"].to_numpy())
    return table.iloc[rows].reset_index(drop=True)


def _attribution_frame(models: _Models, sums: _Attribution, totals: _Totals) -> pd.DataFrame:
    return pd.DataFrame({
        "model": models.names,
        "family": models.families,
        "n_params": models.n_params,
        "n_params_nonembedding": models.n_params_nonembedding,
        "mean_nll": sums.model_sums.sum(axis=0) / totals.n_samples,
        "win_share": sums.win_sums.sum(axis=0) / totals.n_samples,
        "shapley": sums.shapley_sums.sum(axis=0) / totals.n_samples,
    })


def _domain_attribution_frame(models: _Models, domains: np.ndarray, sums: _Attribution) -> pd.DataFrame:
    """One row per domain and model: the attribution within that domain's samples."""
    count = sums.n_samples[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):  # a domain without samples cannot occur: codes come from them
        return pd.DataFrame({
            "domain": np.repeat(domains, models.count),
            "model": np.tile(models.names, len(domains)),
            "family": np.tile(models.families, len(domains)),
            "n_params": np.tile(models.n_params, len(domains)),
            "n_samples": np.repeat(sums.n_samples.astype(np.int64), models.count),
            "mean_nll": (sums.model_sums / count).ravel(),
            "win_share": (sums.win_sums / count).ravel(),
            "shapley": (sums.shapley_sums / count).ravel(),
        })


def run_oracle(pool: xr.Dataset, max_subsets_per_k: int, seed: int,
               sample_chunk: int = SAMPLE_CHUNK) -> dict[str, pd.DataFrame]:
    """The whole oracle analysis in one pass over the pool: ensembles, expected curves, Pareto front, attribution."""
    models = _Models.of(pool)
    ensembles = enumerate_ensembles(models.families, max_subsets_per_k, seed)
    minima = _EnsembleMinima(ensembles, models.count)
    sorted_sums = _SortedSums(models)
    if "domain" in pool.coords:
        domains, codes = np.unique(string_values(pool["domain"]), return_inverse=True)
    else:
        domains, codes = np.array(["all"]), None
    sums = _Attribution(models.count, len(domains))
    totals = _stream(pool, [minima, sorted_sums, sums], sample_chunk, codes)
    table = _ensemble_frame(models, ensembles, minima, totals)
    return {
        "ensembles": table,
        "expected_curves": _curves_frame(models, sorted_sums, totals),
        "pareto": pareto_frontier(table),
        "attribution": _attribution_frame(models, sums, totals),
        "attribution_by_domain": _domain_attribution_frame(models, domains, sums),
    }


def bootstrap_ensembles(pool: xr.Dataset, members: Sequence[Sequence[str]], n_bootstrap: int, seed: int,
                        sample_chunk: int = SAMPLE_CHUNK) -> np.ndarray:
    """(ensembles, replicates): each ensemble's oracle bits per byte on `n_bootstrap` resamples of the samples.

    `members` are the ensembles as lists of model names (the `members` column of the ensemble table).
    A replicate weighs each sample by an independent Poisson(1) count (`poisson_weights`: seeded, and the same
    however the pool is chunked); all replicates come from one streaming pass over the pool. A replicate that
    drew no sample at all (possible only for tiny pools) is NaN.
    """
    if n_bootstrap < 1:
        raise MMCError(f"the number of bootstrap resamples must be at least 1 (got {n_bootstrap})")
    return _weighted_ensembles(pool, members, n_bootstrap,
                               lambda start, stop: poisson_weights(seed, start, stop, n_bootstrap), sample_chunk)


def resampled_ensembles(pool: xr.Dataset, members: Sequence[Sequence[str]], n_bootstrap: int, seed: int,
                        sample_chunk: int = SAMPLE_CHUNK) -> np.ndarray:
    """(ensembles, 1 + n_bootstrap): each ensemble's oracle bits per byte on all samples (column 0), then on the
    resamples of `bootstrap_ensembles` (the same seeded weights), in one streaming pass."""
    return _weighted_ensembles(
        pool, members, 1 + n_bootstrap,
        lambda start, stop: np.column_stack([np.ones(stop - start), poisson_weights(seed, start, stop, n_bootstrap)]),
        sample_chunk)


def halves_ensembles(pool: xr.Dataset, members: Sequence[Sequence[str]], seed: int,
                     sample_chunk: int = SAMPLE_CHUNK) -> np.ndarray:
    """(ensembles, 2): each ensemble's oracle bits per byte on two seeded halves of the samples (`half_weights`),
    for choosing on one half and scoring on the other (cross-fitting), in one streaming pass."""
    return _weighted_ensembles(pool, members, 2, lambda start, stop: half_weights(seed, start, stop), sample_chunk)


def bootstrap_and_halves_ensembles(pool: xr.Dataset, members: Sequence[Sequence[str]], n_bootstrap: int, seed: int,
                                   sample_chunk: int = SAMPLE_CHUNK) -> tuple[np.ndarray | None, np.ndarray]:
    """`bootstrap_ensembles` (None where `n_bootstrap` is 0) and `halves_ensembles` together, in one streaming pass
    over the pool instead of two: the minima are taken once, and each call's weights (drawn by position) multiply
    them on their own, so the values are those of the two calls, bit for bit."""
    both = _weighted_ensembles(
        pool, members, n_bootstrap + 2,
        lambda start, stop: [poisson_weights(seed, start, stop, n_bootstrap), half_weights(seed, start, stop)],
        sample_chunk)
    return (both[:, :n_bootstrap] if n_bootstrap else None), both[:, n_bootstrap:]


def _weighted_ensembles(pool: xr.Dataset, members: Sequence[Sequence[str]], n_columns: int,
                        weights: Callable[[int, int], np.ndarray | list[np.ndarray]],
                        sample_chunk: int) -> np.ndarray:
    """(ensembles, columns): each ensemble's oracle bits per byte under each column of sample weights."""
    models = _Models.of(pool)
    index = {name: i for i, name in enumerate(models.names)}
    try:
        ensembles = [Ensemble(tuple(sorted(index[name] for name in names)), "") for names in members]
    except KeyError as error:
        raise MMCError(f"ensemble member {error} is not a model of the pool") from None
    sums = _BootstrapMinima(ensembles, models.count, n_columns, weights)
    _stream(pool, [sums], sample_chunk)
    with np.errstate(invalid="ignore"):
        return sums.boot_sums / (sums.boot_bytes * LN2)


OUTPUT_CSVS = ("ensembles", "expected_curves", "pareto", "attribution", "attribution_by_domain")
LIST_COLUMNS = ("members", "families", "winners")  # lists of names: native lists in parquet, JSON arrays in CSVs


def write_oracle_outputs(results: dict[str, pd.DataFrame], out_dir: str | Path) -> Path:
    """Write ensembles.parquet and one tidy CSV per table into `out_dir`, replacing it atomically."""
    out_dir = output_path(out_dir)
    with atomic_path(out_dir, "oracle tables") as tmp:
        tmp.mkdir()
        results["ensembles"].to_parquet(tmp / "ensembles.parquet", index=False)
        for name in OUTPUT_CSVS:
            table = results[name].copy()
            for column in LIST_COLUMNS:
                if column in table:
                    table[column] = [json.dumps(list(names)) for names in table[column]]
            table.to_csv(tmp / f"{name}.csv", index=False)
    return out_dir


def read_ensembles(out_dir: str | Path) -> pd.DataFrame:
    """The ensemble table written by `write_oracle_outputs` (members and families as lists of names)."""
    local = local_path(out_dir)
    path = local / "ensembles.parquet" if local is not None else f"{str(out_dir).rstrip('/')}/ensembles.parquet"
    try:
        if local is not None:
            table = pd.read_parquet(path)
        else:  # through fsspec, as stores are read: refused before any network access where it cannot work
            filesystem, root, _ = remote_filesystem(str(path), f"oracle folder '{out_dir}'")
            with filesystem.open(root, "rb") as file:
                table = pd.read_parquet(file)
    except FileNotFoundError:
        raise MMCError(f"'{path}' does not exist: give the folder written by `mmc oracle`") from None
    except OSError as error:  # a connection refused, reset or timed out
        raise MMCError(f"oracle folder '{out_dir}' cannot be reached: {one_line(error)}") from None
    for column in LIST_COLUMNS:
        if column in table:  # winners: absent from tables written before the oracle wrote it
            table[column] = [list(names) for names in table[column]]
    return table


def winner_groups(table: pd.DataFrame) -> np.ndarray:
    """An integer label per ensemble of the table, one for each set of winners: ensembles whose oracle loss comes
    from the same members are one measurement by construction (`mmc.laws.fit_law`'s groups)."""
    if "winners" not in table:
        raise MMCError("the oracle table has no winners column (written by an older mmc): rerun `mmc oracle`")
    return pd.factorize(table["winners"].map(tuple))[0]


def oracle_study(pool_path: str | Path, out: str | Path, *, max_subsets_per_k: int, seed: int,
                 sample_chunk: int = SAMPLE_CHUNK, scheduler: str | None = None) -> dict[str, pd.DataFrame]:
    """The oracle stage: `run_oracle` on the pool store (streamed in its stored chunks, read on the dask
    `scheduler` when given), written into `out`."""
    check_outputs([(out, "oracle tables")], [pool_path])
    with dask_scheduler(scheduler):
        pool = check_pool(open_store(pool_path, chunks={}), pool_path)
        results = run_oracle(pool, max_subsets_per_k, seed, sample_chunk=sample_chunk)
    write_oracle_outputs(results, out)
    return results
