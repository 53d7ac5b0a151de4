"""The oracle ensemble: per-sample minimum loss over members, exact subset expectations, attribution.

Everything here is a sum over samples, so a pool is streamed in blocks of samples (within its stored chunks) and
only per-model or per-ensemble sums are kept: memory does not grow with the pool. Each block is summed on its own
and the blocks' sums are added in order, so a dask cluster's workers can sum the blocks (`_stream`).
"""

from __future__ import annotations

import copy
import itertools
import json
import math
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Protocol

import numpy as np
import pandas as pd
import xarray as xr

from mmc import THREADS, MMCError, one_library_thread
from mmc.store import (SAMPLE_CHUNK, atomic_path, check_losses, check_outputs, current_cluster, local_path,
                       one_line, output_path, remote_filesystem, streamed_pool, string_values)

if TYPE_CHECKING:
    from distributed import Client

LN2 = math.log(2.0)
# ensemble minima are taken for this many ensembles × samples at a time: small enough for the CPU caches
ENSEMBLE_BLOCK = 256
SAMPLE_BLOCK = 2048
# large ensembles are scanned from each sample's best model (see _EnsembleMinima): the chance a sample leaves some
# ensemble of a block unresolved, and the cost of one scanned position relative to one member's elementwise minimum
SCAN_MISS = 0.01
SCAN_STEP_COST = 3
FRAME_BLOCK = 4096  # ensembles per block of the ensemble table, built and written a block at a time
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
        """(samples, models): model indices from best to worst on each sample, in the smallest integer type (a
        quarter of the memory at 1,000 models)."""
        return np.argsort(self.losses, axis=1).astype(np.min_scalar_type(self.n_models - 1))

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
        j-th game pays 1/j to each of the j best, so rank i earns Σ_{j≥i} (l(j) − l(j+1)) / j. Computed
        SAMPLE_BLOCK samples at a time (the same values: every step is within a sample), so that its temporaries
        are small beside a chunk of 1,000 models × 65,536 samples (0.5 GB each).
        """
        values = np.empty_like(self.losses)
        for start in range(0, self.n_samples, SAMPLE_BLOCK):
            ascending = self.ascending[start:start + SAMPLE_BLOCK]
            shares = np.empty_like(ascending)
            np.subtract(ascending[:, :-1], ascending[:, 1:], out=shares[:, :-1])
            shares[:, -1] = ascending[:, -1]
            shares /= np.arange(1, self.n_models + 1)
            per_rank = np.cumsum(shares[:, ::-1], axis=1)[:, ::-1]
            np.put_along_axis(values[start:start + SAMPLE_BLOCK], self.order[start:start + SAMPLE_BLOCK], per_rank,
                              axis=1)
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
    members, kinds = _enumerate(families, max_subsets_per_k, seed)
    return [Ensemble(tuple(row), KINDS[kind]) for row, kind in zip(members.rows(), kinds.tolist())]


@dataclass(frozen=True)
class _Members:
    """Ensembles as integer index arrays (compressed rows): ensemble i holds the models
    flat[offsets[i]:offsets[i + 1]], ascending. At 1,000 models the ensembles hold some 50M members: as Python
    tuples of ints they would take gigabytes, as int32 200 MB."""

    flat: np.ndarray  # (Σ sizes,) int32 model indices
    offsets: np.ndarray  # (ensembles + 1,) int64

    @classmethod
    def of(cls, ensembles: Sequence[Sequence[int]]) -> _Members:
        """From member tuples (sorted here: an ensemble is a set)."""
        sizes = np.array([len(members) for members in ensembles], dtype=np.int64)
        flat = np.fromiter(itertools.chain.from_iterable(sorted(members) for members in ensembles),
                           dtype=np.int64, count=int(sizes.sum()))
        return cls(flat.astype(np.int32), np.concatenate([[0], np.cumsum(sizes)]))

    @classmethod
    def concat(cls, blocks: Sequence[np.ndarray]) -> _Members:
        """From (count, k) arrays of ascending members, one size k per array."""
        sizes = np.concatenate([np.full(len(block), block.shape[1], dtype=np.int64) for block in blocks])
        flat = np.concatenate([block.ravel() for block in blocks]).astype(np.int32)
        return cls(flat, np.concatenate([[0], np.cumsum(sizes)]))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)

    def rows(self) -> Iterator[list[int]]:
        flat = self.flat
        for start, stop in zip(self.offsets[:-1].tolist(), self.offsets[1:].tolist()):
            yield flat[start:stop].tolist()

    def padded(self, rows: np.ndarray, width: int) -> np.ndarray:
        """(len(rows), width) members of the ensembles `rows`, each padded by repeating its last member."""
        columns = np.minimum(np.arange(width), self.sizes[rows][:, None] - 1)
        return self.flat[self.offsets[rows][:, None] + columns].astype(np.intp)

    def membership(self, rows: np.ndarray, n_models: int) -> np.ndarray:
        """(len(rows), n_models) bool: which models each of the ensembles `rows` holds."""
        sizes = self.sizes[rows]
        starts = self.offsets[rows]
        positions = np.repeat(starts - np.concatenate([[0], np.cumsum(sizes)[:-1]]), sizes) + np.arange(sizes.sum())
        mask = np.zeros((len(rows), n_models), dtype=bool)
        mask[np.repeat(np.arange(len(rows)), sizes), self.flat[positions]] = True
        return mask


def _enumerate(families: Sequence[str], max_subsets_per_k: int, seed: int) -> tuple[_Members, np.ndarray]:
    """`enumerate_ensembles` as compact members and kind codes (int8 positions in KINDS)."""
    if max_subsets_per_k < 1:
        raise MMCError(f"max_subsets_per_k must be at least 1, got {max_subsets_per_k}")
    families = [str(family) for family in families]
    n_models = len(families)
    if n_models == 0:
        raise MMCError("the pool has no models")
    codes = np.unique(families, return_inverse=True)[1]
    groups = [tuple(np.flatnonzero(codes == code).tolist()) for code in range(codes.max() + 1)]

    blocks, kinds = [np.arange(n_models).reshape(n_models, 1)], [np.zeros(n_models, dtype=np.int8)]
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
            blocks.append(np.array(subsets, dtype=np.int32).reshape(len(subsets), k))
            kinds.append(np.full(len(subsets), KINDS.index(kind), dtype=np.int8))
    return _Members.concat(blocks), np.concatenate(kinds)


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
    """Sums over samples, fed one block of samples at a time. SUMS names the attributes that hold them (a float,
    an array, a dict of either; a bool array is an any over samples)."""
    SUMS: tuple[str, ...]

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
    carries its slice of `domain_codes` (samples,) when given.

    Every block is summed on its own, from zero, and its sums are then added to the accumulators' in the order of
    the blocks: so the blocks can be summed anywhere, on the workers of a dask cluster (`current_cluster`: inside
    `dask_scheduler`) as in this process, with the same result to the bit."""
    # one chunking along `sample` for nll and the sample coords: pools assembled before the coords were chunked
    # like nll hold them in one chunk, which xarray refuses as inconsistent chunks once nll has several
    pool = pool.unify_chunks()
    nll = pool["nll"].transpose("model", "sample")
    blocks = list(_sample_blocks(nll, sample_chunk))
    cluster = current_cluster()
    work = _BlockWork(nll.variable, pool["n_bytes"].variable, pool.encoding.get("source", "the pool"), accumulators,
                      anys_in_place=cluster is None)
    codes = [None if domain_codes is None else domain_codes[start:stop] for start, stop in blocks]
    summed = (_summed_on(cluster, work, blocks, codes) if cluster is not None
              else (work(start, stop, domains) for (start, stop), domains in zip(blocks, codes)))
    totals = _Totals()
    for sums, n_samples, n_bytes in summed:
        for accumulator, block_sums in zip(accumulators, sums):
            for name, value in block_sums.items():
                setattr(accumulator, name, _added(getattr(accumulator, name), value))
        totals.n_samples += n_samples
        totals.n_bytes += n_bytes
    return totals


class _BlockWork:
    """The sums of one block of samples [start, stop): read, checked, and fed to zeroed copies of the
    accumulators (their plans shared). Sent once to every worker of a cluster. With `anys_in_place` (in the
    accumulators' own process), a bool array, an any over samples and so the same in any order, is set in the
    accumulator's own array rather than in a zeroed copy (at 1,000 models the winners are 120 MB)."""

    def __init__(self, nll: xr.Variable, n_bytes: xr.Variable, where: str, accumulators: Sequence[_Accumulator],
                 anys_in_place: bool) -> None:
        self.nll, self.n_bytes, self.where, self.accumulators = nll, n_bytes, where, accumulators
        self.anys_in_place = anys_in_place

    @one_library_thread  # here, so that a dask worker holds BLAS to one thread too
    def __call__(self, start: int, stop: int, domains: np.ndarray | None) -> tuple[list[dict], int, float]:
        try:
            block = np.asarray(self.nll[:, start:stop].values, dtype=np.float64)
            block_bytes = np.asarray(self.n_bytes[start:stop].values, dtype=np.float64)
        except Exception as error:  # a corrupt or truncated chunk: zarr and numcodecs raise many kinds
            raise MMCError(f"store '{self.where}' cannot be read at samples {start}..{stop - 1}, it is corrupt or "
                           f"truncated: {one_line(error)}") from None
        check_losses(block, f"{self.where} (samples {start}..{stop - 1})")
        chunk = _Chunk(block, start, block_bytes, domains)
        sums = []
        for accumulator in self.accumulators:
            in_place = [name for name in accumulator.SUMS
                        if self.anys_in_place and _is_any(getattr(accumulator, name))]
            block_part = copy.copy(accumulator)
            for name in accumulator.SUMS:
                if name not in in_place:
                    setattr(block_part, name, _zeros(getattr(accumulator, name)))
            block_part.update(chunk)
            sums.append({name: _packed(getattr(block_part, name)) for name in accumulator.SUMS if name not in in_place})
        return sums, chunk.n_samples, float(chunk.n_bytes.sum())


def _is_any(value: object) -> bool:
    return isinstance(value, np.ndarray) and value.dtype == bool


def _packed(value: object) -> object:
    """A block's sums as sent: a bool array as bits (an eighth of the bytes), the rest as they are."""
    return np.packbits(value) if _is_any(value) else value


def _zeros(value: object) -> object:
    if isinstance(value, dict):
        return {key: _zeros(item) for key, item in value.items()}
    return np.zeros_like(value) if isinstance(value, np.ndarray) else 0.0


def _added(total: object, part: object) -> object:
    """`total` plus a block's `part` as `_packed` sent it (in place for arrays; an any for bool arrays)."""
    if isinstance(total, dict):
        return {key: _added(value, part[key]) for key, value in total.items()}
    if _is_any(total):
        np.logical_or(total, np.unpackbits(part, count=total.size).reshape(total.shape).view(bool), out=total)
        return total
    if isinstance(total, np.ndarray):
        np.add(total, part, out=total)
        return total
    return total + part


def _summed_on(cluster: Client, work: _BlockWork, blocks: list[tuple[int, int]], codes: list[np.ndarray | None]
               ) -> Iterator[tuple[list[dict], int, float]]:
    """`work` of every block on the cluster's workers (two blocks per worker thread in flight at most: the sums
    waiting to be added are bounded), yielded in the order of the blocks."""
    with _worker_errors():
        shared = cluster.scatter(work, broadcast=True)
    in_flight = 2 * max(1, sum(cluster.nthreads().values()))
    queue = iter(zip(blocks, codes))
    pending: deque = deque()

    def submit_next() -> None:
        for (start, stop), domains in itertools.islice(queue, 1):
            pending.append(cluster.submit(_work_on_worker, shared, start, stop, domains, pure=False))

    for _ in range(in_flight):
        submit_next()
    while pending:
        done = pending.popleft()
        submit_next()
        with _worker_errors():
            summed = done.result()
        yield summed


@contextmanager
def _worker_errors() -> Iterator[None]:
    """What a worker raised, as one line: its MMCError as it is (a corrupt block), any other error (a worker
    that cannot import mmc or read the pool's path) named as the cluster's."""
    try:
        yield
    except MMCError:
        raise
    except Exception as error:
        raise MMCError(f"a worker of the dask cluster failed: {one_line(error)}") from error


def _work_on_worker(work: _BlockWork, start: int, stop: int, domains: np.ndarray | None
                    ) -> tuple[list[dict], int, float]:
    """One block's `work`, as a task on a worker: a dask-backed pool's block is read in this task, not sent back
    to the cluster's scheduler as tasks of its own."""
    import dask

    with dask.config.set(scheduler="synchronous"):
        return work(start, stop, domains)


def _sample_blocks(nll: xr.DataArray, sample_chunk: int) -> Iterator[tuple[int, int]]:
    """[start, stop) ranges along `sample`: the chunks of nll itself, dask's or (opened lazily without dask) the
    store's, each split to at most `sample_chunk` (its coords' chunks do not matter), else even blocks."""
    if sample_chunk < 1:
        raise MMCError(f"sample_chunk must be at least 1, got {sample_chunk}")
    n_samples = nll.sizes["sample"]
    stored = nll.encoding.get("preferred_chunks", {}).get("sample") or n_samples
    sizes = nll.variable.chunksizes.get("sample") or [min(stored, n_samples - start)
                                                      for start in range(0, n_samples, stored)]
    edges = np.cumsum((0, *sizes))
    for chunk_start, chunk_stop in zip(edges[:-1], edges[1:]):
        for start in range(int(chunk_start), int(chunk_stop), sample_chunk):
            yield start, min(start + sample_chunk, int(chunk_stop))


class _Block(NamedTuple):
    """A block of ensembles [first, last) in size order, and how its minima are found: `padded` (ensembles ×
    width) members for the elementwise minimum, or `holds` (models × ensembles, 0 or 1) membership for a scan of
    `depth` positions."""
    first: int
    last: int
    width: int
    depth: int
    padded: np.ndarray | None
    holds: np.ndarray | None


def _scan_depth(k: int, n_models: int, n_ensembles: int) -> int:
    """Positions to scan so that, were ranks random, a sample leaves one of `n_ensembles` k-member ensembles
    unresolved with probability about SCAN_MISS: n · (1 − k/M)^depth ≤ SCAN_MISS."""
    if k >= n_models:
        return 1
    depth = math.ceil(math.log(SCAN_MISS / n_ensembles) / math.log1p(-k / n_models))
    return min(max(depth, 1), n_models)


def _rank_minimum(block_ranks: np.ndarray, padded: np.ndarray) -> np.ndarray:
    """(ensembles, samples) elementwise minimum of the rank rows (models, samples) of each ensemble's members."""
    best_rank = block_ranks[padded[:, 0]]
    member_ranks = np.empty_like(best_rank)
    for column in padded.T[1:]:
        # indices are valid: mode="clip" skips the bounds check that makes "raise" buffer its output
        np.take(block_ranks, column, axis=0, out=member_ranks, mode="clip")
        np.minimum(best_rank, member_ranks, out=best_rank)
    return best_rank


class _EnsembleMinima:
    """Σ over samples of min_{m∈S} nll[m, s] for every ensemble S, without a loop over ensembles per sample, and
    its winners: the members that are that minimum on some sample.

    Per block of samples, each model's rank on each sample is computed once (one sort); an ensemble's minimum
    is the loss at its members' smallest rank, then one gather from the sorted losses (and one from the sort
    order for the winner). Ensembles are processed in blocks of similar size (in order of size), and a block's
    smallest rank is found one of two ways, with the same result:
    - small ensembles: an elementwise minimum over member rows of the small integer rank matrix (padded to one
      size by repeating a member): k steps per ensemble and sample;
    - large ensembles: a scan of each sample's models from the best, through a (models × ensembles) membership
      table, for the first few positions only: a k-member ensemble of M models holds one of the first
      positions with probability 1 − (1 − k/M)^depth, so `_scan_depth` positions resolve nearly every sample, and
      the few samples left unresolved get the elementwise minimum. A few steps per ensemble and sample instead
      of k: at 1,000 models most ensembles have hundreds of members.
    Ranks break a sample's equal losses one way for every ensemble, so two ensembles with the same winners have
    the same minimum on every sample: the same oracle loss, bit for bit.
    """

    SUMS = ("sorted_sums", "sorted_winners", "model_sums")

    def __init__(self, ensembles: Sequence[Ensemble] | _Members, n_models: int) -> None:
        members = ensembles if isinstance(ensembles, _Members) else _Members.of(
            [ensemble.members for ensemble in ensembles])
        sizes = members.sizes
        if len(members) == 0 or sizes.min() < 1:
            raise MMCError("ensembles must be a non-empty list of non-empty member tuples")
        # members are ascending within each ensemble: distinct exactly where each step within one is positive
        steps_ok = np.diff(members.flat) > 0
        steps_ok[members.offsets[1:-1] - 1] = True  # a step from one ensemble to the next
        bad = (members.flat < 0) | (members.flat >= n_models)
        bad[1:] |= ~steps_ok
        if bad.any():
            row = int(np.searchsorted(members.offsets, np.flatnonzero(bad)[0], side="right")) - 1
            raise MMCError(f"ensemble {tuple(members.flat[members.offsets[row]:members.offsets[row + 1]].tolist())} "
                           f"must hold distinct model indices below {n_models}")
        self.members, self.n_models = members, n_models
        self.by_size = np.argsort(sizes, kind="stable")
        self.sorted_sizes = sizes[self.by_size]
        self.blocks = [self._plan(first, min(first + ENSEMBLE_BLOCK, len(members)))
                       for first in range(0, len(members), ENSEMBLE_BLOCK)]
        self.sorted_sums = np.zeros(len(members))
        self.sorted_winners = np.zeros((len(members), n_models), dtype=bool)
        self.model_sums = np.zeros(n_models)

    def _plan(self, first: int, last: int) -> _Block:
        rows = self.by_size[first:last]
        width = int(self.sorted_sizes[last - 1])
        depth = _scan_depth(int(self.sorted_sizes[first]), self.n_models, last - first)
        if depth * SCAN_STEP_COST < width and depth <= np.iinfo(np.uint8).max:  # scores (below) are uint8
            return _Block(first, last, width, depth, None, np.ascontiguousarray(
                self.members.membership(rows, self.n_models).T.view(np.uint8)))
        return _Block(first, last, width, 0, self.members.padded(rows, width), None)

    def update(self, chunk: _Chunk) -> None:
        for start, stop in self.for_blocks(chunk, self._accumulate):
            # summed block by block like the minima, so a single's gain comes out exactly 0
            self.model_sums += chunk.by_model[:, start:stop].sum(axis=1)

    def _accumulate(self, chunk: _Chunk, start: int, stop: int, block: _Block, best: np.ndarray) -> None:
        self.sorted_sums[block.first:block.last] += np.take(chunk.ascending[start:stop], best).sum(axis=1)
        first_cell = np.arange(block.first, block.last) * self.n_models  # of each ensemble's row of winners
        winners = np.add(np.take(chunk.order[start:stop], best), first_cell[:, None], dtype=np.intp)
        self.sorted_winners.reshape(-1)[winners] = True

    def for_blocks(self, chunk: _Chunk, accumulate: Callable[[_Chunk, int, int, _Block, np.ndarray], None]
                   ) -> Iterator[tuple[int, int]]:
        """Per block of samples [start, stop) of the chunk (yielded before its work starts), call `accumulate(chunk,
        start, stop, block, best)` for every block of ensembles, on THREADS threads: `best` is where the best member
        of each of the block's ensembles is on each of the samples, as flat positions into the rows [start, stop)
        of `chunk.ascending` (its loss) and `chunk.order` (the model), one cache-sized block at a time.

        Threads take blocks of ensembles, so each ensemble's sums are still added one block of samples after the
        other, in order: the same sums, bit for bit, however many threads."""
        ranks = chunk.ranks
        max_depth = max(block.depth for block in self.blocks)
        with ThreadPoolExecutor(THREADS) as executor:
            for start in range(0, chunk.n_samples, SAMPLE_BLOCK):
                stop = min(start + SAMPLE_BLOCK, chunk.n_samples)
                block_ranks = np.ascontiguousarray(ranks[:, start:stop])
                # the models at each sample's first positions, position-major: one contiguous row per position
                leaders = np.ascontiguousarray(chunk.order[start:stop, :max_depth].T) if max_depth else None
                row_offsets = np.arange(stop - start) * chunk.n_models
                yield start, stop
                run = partial(self._run_block, accumulate, chunk, start, stop, block_ranks, leaders, row_offsets)
                for _ in executor.map(run, self.blocks):  # raises what a thread raised
                    pass

    def _run_block(self, accumulate: Callable[[_Chunk, int, int, _Block, np.ndarray], None], chunk: _Chunk,
                   start: int, stop: int, block_ranks: np.ndarray, leaders: np.ndarray | None,
                   row_offsets: np.ndarray, block: _Block) -> None:
        best_rank = (_rank_minimum(block_ranks, block.padded) if block.padded is not None
                     else self._scan(block, block_ranks, leaders))
        best = best_rank.astype(np.intp)
        best += row_offsets
        accumulate(chunk, start, stop, block, best)

    def _scan(self, block: _Block, block_ranks: np.ndarray, leaders: np.ndarray) -> np.ndarray:
        """(ensembles, samples) smallest member rank of a block of large ensembles: the first of each sample's
        `block.depth` best models that the ensemble holds, else (rarely) the elementwise minimum.

        The first position held is found as a maximum of (depth − position) over the positions held: two fast
        passes over small integers per position (a masked write is several times slower)."""
        score = np.zeros((block_ranks.shape[1], block.last - block.first), dtype=np.uint8)
        held = np.empty_like(score)
        for position in range(block.depth):
            np.take(block.holds, leaders[position], axis=0, out=held, mode="clip")
            held *= block.depth - position
            np.maximum(score, held, out=score)
        best_rank = np.ascontiguousarray(score.T).astype(block_ranks.dtype)
        np.subtract(block.depth, best_rank, out=best_rank)
        unresolved = np.flatnonzero((score == 0).any(axis=1))
        if unresolved.size:
            padded = self.members.padded(self.by_size[block.first:block.last], block.width)
            best_rank[:, unresolved] = _rank_minimum(np.ascontiguousarray(block_ranks[:, unresolved]), padded)
        return best_rank

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

    SUMS = ("sorted_boot_sums", "boot_bytes")

    def __init__(self, ensembles: Sequence[Ensemble], n_models: int, n_columns: int,
                 weights: Callable[[int, int], np.ndarray | list[np.ndarray]]) -> None:
        super().__init__(ensembles, n_models)
        self.weights = weights
        self.sorted_boot_sums = np.zeros((len(ensembles), n_columns))
        self.boot_bytes = np.zeros(n_columns)
        # the current block of samples' weights: (columns, weights) per set, each multiplied apart (see `weights`)
        self.block_weights: list[tuple[slice, np.ndarray]] = []

    def update(self, chunk: _Chunk) -> None:
        for start, stop in self.for_blocks(chunk, self._accumulate_weighted):
            blocks = self.weights(chunk.offset + start, chunk.offset + stop)
            blocks = [blocks] if isinstance(blocks, np.ndarray) else blocks
            ends = np.cumsum([block.shape[1] for block in blocks])
            self.block_weights = [(slice(end - block.shape[1], end), block) for end, block in zip(ends, blocks)]
            for columns, block in self.block_weights:
                self.boot_bytes[columns] += chunk.n_bytes[start:stop] @ block

    def _accumulate_weighted(self, chunk: _Chunk, start: int, stop: int, block: _Block, best: np.ndarray) -> None:
        minima = np.take(chunk.ascending[start:stop], best)
        for columns, weights in self.block_weights:
            self.sorted_boot_sums[block.first:block.last, columns] += minima @ weights

    @property
    def boot_sums(self) -> np.ndarray:
        sums = np.empty_like(self.sorted_boot_sums)
        sums[self.by_size] = self.sorted_boot_sums
        return sums


class _SortedSums:
    """Σ over samples of the i-th smallest loss within each scope: the pool and each family."""

    SUMS = ("sums",)

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

    SUMS = ("n_samples", "model_sums", "win_sums", "shapley_sums")

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


def _ensemble_frame(models: _Models, members: _Members, kinds: np.ndarray, minima: _EnsembleMinima,
                    totals: _Totals) -> pd.DataFrame:
    """The ensemble table, built FRAME_BLOCK ensembles at a time: no (ensembles × models) array but the winners.
    Its lists of names share one Python string per model (some 50M list items at 1,000 models: 400 MB, not the
    gigabytes of a string object each)."""
    names = models.names.astype(object)
    family_names, family_codes = np.unique(models.families, return_inverse=True)
    family_names = family_names.astype(object)
    in_family = np.arange(len(family_names)) == family_codes[:, None]  # (models, families)
    model_nll = minima.model_sums / totals.n_samples
    winners = minima.winners
    columns: dict[str, list] = {name: [] for name in (
        "members", "families", "total_params", "total_params_nonembedding", "best_member", "winners")}
    for first in range(0, len(members), FRAME_BLOCK):
        rows = np.arange(first, min(first + FRAME_BLOCK, len(members)))
        membership = members.membership(rows, models.count)
        has_family = (membership @ in_family) > 0
        columns["members"].extend(names[members.flat[start:stop]].tolist()
                                  for start, stop in zip(members.offsets[rows].tolist(),
                                                         members.offsets[rows + 1].tolist()))
        columns["families"].extend(family_names[row].tolist() for row in has_family)
        columns["winners"].extend(names[row].tolist() for row in winners[rows])
        columns["total_params"].append(membership @ models.n_params)
        columns["total_params_nonembedding"].append(membership @ models.n_params_nonembedding)
        columns["best_member"].append(np.where(membership, model_nll, np.inf).argmin(axis=1))
    best_member = np.concatenate(columns["best_member"])
    oracle_nll = minima.sums / totals.n_samples
    return pd.DataFrame({
        "members": columns["members"],
        "kind": np.array(KINDS, dtype=object)[kinds],
        "k": members.sizes,
        "families": columns["families"],
        "n_families": [len(families) for families in columns["families"]],
        "total_params": np.concatenate(columns["total_params"]),
        "total_params_nonembedding": np.concatenate(columns["total_params_nonembedding"]),
        "oracle_nll": oracle_nll,
        "oracle_bpb": minima.sums / totals.bits_denominator,
        "best_member": models.names[best_member],
        "best_member_nll": model_nll[best_member],
        "gain": model_nll[best_member] - oracle_nll,
        # the members the oracle loss comes from: ensembles with the same winners have the same loss by construction
        "winners": columns["winners"],
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
    members, kinds = _enumerate(models.families, max_subsets_per_k, seed)
    minima = _EnsembleMinima(members, models.count)
    sorted_sums = _SortedSums(models)
    if "domain" in pool.coords:
        domains, codes = np.unique(string_values(pool["domain"]), return_inverse=True)
    else:
        domains, codes = np.array(["all"]), None
    sums = _Attribution(models.count, len(domains))
    totals = _stream(pool, [minima, sorted_sums, sums], sample_chunk, codes)
    table = _ensemble_frame(models, members, kinds, minima, totals)
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
    """Write ensembles.parquet and one tidy CSV per table into `out_dir`, replacing it atomically.

    Tables are written FRAME_BLOCK rows at a time (a parquet row group, a run of CSV lines): at 1,000 models the
    ensemble table's lists hold some 50M names, which as one Arrow or JSON column would take gigabytes more."""
    out_dir = output_path(out_dir)
    with atomic_path(out_dir, "oracle tables") as tmp:
        tmp.mkdir()
        _write_parquet(results["ensembles"], tmp / "ensembles.parquet")
        for name in OUTPUT_CSVS:
            table = results[name]
            with open(tmp / f"{name}.csv", "w", newline="") as file:
                for first in range(0, max(len(table), 1), FRAME_BLOCK):
                    block = table.iloc[first:first + FRAME_BLOCK].copy()
                    for column in LIST_COLUMNS:
                        if column in block:
                            block[column] = [json.dumps(list(names)) for names in block[column]]
                    block.to_csv(file, index=False, header=first == 0)
    return out_dir


def _write_parquet(table: pd.DataFrame, path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema, writer = None, None
    try:
        for first in range(0, max(len(table), 1), FRAME_BLOCK):
            block = pa.Table.from_pandas(table.iloc[first:first + FRAME_BLOCK], schema=schema, preserve_index=False)
            if writer is None:
                schema = block.schema
                writer = pq.ParquetWriter(path, schema)
            writer.write_table(block)
    finally:
        if writer is not None:
            writer.close()


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
    with streamed_pool(pool_path, scheduler) as pool:
        results = run_oracle(pool, max_subsets_per_k, seed, sample_chunk=sample_chunk)
    write_oracle_outputs(results, out)
    return results
