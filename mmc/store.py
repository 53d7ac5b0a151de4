"""Zarr v3 stores written through xarray (atomic writes, a handful of chunks, strict reads), and the pool dataset."""

from __future__ import annotations

import os
import shutil
import uuid
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import xarray as xr

from mmc import MMCError


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; on success it replaces `path`, on failure it is removed.

    Readers never see a half-written output: the final rename is the only step that touches `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_store(dataset: xr.Dataset, path: str | Path) -> None:
    """Write `dataset` as a Zarr v3 store: one chunk per variable (a handful of files for DVC), or its dask
    chunks where a variable is dask-backed (written chunk by chunk, so memory holds one chunk at a time)."""
    dataset = dataset.copy()
    for name, variable in dataset.variables.items():
        variable.encoding = {}
        if variable.dtype.kind in "UT":  # variable-length strings are portable in Zarr v3
            dataset[name] = variable.astype(object)
    encoding = {name: {"chunks": tuple(sizes[0] for sizes in variable.chunks) if variable.chunks else variable.shape}
                for name, variable in dataset.variables.items() if variable.ndim}
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        dataset.to_zarr(tmp, mode="w", zarr_format=3, consolidated=True, encoding=encoding)


def open_store(path: str | Path, chunks: dict | None = None) -> xr.Dataset:
    """Open a store written by `write_store` (lazily, dask-backed when `chunks` is given)."""
    path = Path(path)
    if not path.exists():
        raise MMCError(f"store '{path}' does not exist")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        dataset = xr.open_zarr(path, consolidated=True, chunks=chunks)
    for name, variable in dataset.variables.items():
        if variable.dtype == object:
            dataset[name] = variable.astype(str) if chunks is None else variable
    return dataset


POOL_SAMPLE_CHUNK = 65_536  # samples per stored chunk of the pool: a reader streams one chunk of all models at a time


def assemble_pool(stores: Mapping[str, str | Path] | Sequence[str | Path]) -> xr.Dataset:
    """Combine loss stores into the pool dataset over (model, sample) (DESIGN.md §3, "Pool dataset").

    `stores` maps model names to store paths, or lists paths, each named by its file name without `.zarr`.
    Names must be unique and hold no comma (ensembles are written as comma-joined names). Every store must
    have scored the same eval set: the same dataset fingerprint, the same sample ids in the same order. Model
    coords `family`, `n_params`, `n_params_nonembedding` and `source` (the model scored) come from each
    store's attrs; sample coords `domain` and `n_bytes` from the first store. `nll` and `n_tokens` are
    dask-backed, in chunks of POOL_SAMPLE_CHUNK samples, so `write_store` streams the pool to disk.
    """
    if isinstance(stores, Mapping):
        names, paths = [str(name) for name in stores], list(stores.values())
    else:
        paths = list(stores)
        names = [Path(path).name.removesuffix(".zarr") for path in paths]
    if not paths:
        raise MMCError("the pool is empty: give at least one loss store")
    repeated = sorted(name for name, count in Counter(names).items() if count > 1)
    if repeated:
        raise MMCError(f"model names must be unique in a pool: {', '.join(repeated)} given more than once "
                       f"(a store is named by its file name without .zarr)")
    malformed = [repr(name) for name in names if not name or "," in name]
    if malformed:
        raise MMCError(f"model names must be non-empty and hold no comma: {', '.join(malformed)}")
    opened = {name: open_store(path, chunks={}) for name, path in zip(names, paths)}
    for name, path in zip(names, paths):
        missing = [key for key in ("n_params", "n_params_nonembedding") if key not in opened[name].attrs]
        missing += [var for var in ("nll", "n_tokens", "n_bytes") if var not in opened[name].variables]
        if missing:
            raise MMCError(f"loss store '{path}' ({name}) lacks {', '.join(missing)}: not written by `mmc losses`")
    by_fingerprint: dict[str, list[str]] = {}
    for name, dataset in opened.items():
        by_fingerprint.setdefault(str(dataset.attrs.get("dataset_fingerprint", "no fingerprint")), []).append(name)
    if len(by_fingerprint) > 1:
        groups = "; ".join(f"{', '.join(group)} scored {fingerprint}" for fingerprint, group in by_fingerprint.items())
        raise MMCError(f"loss stores scored different eval sets: {groups}; rerun their losses stages on one dataset")
    first_name, first = next(iter(opened.items()))
    for name, dataset in opened.items():
        if not dataset.indexes["sample"].equals(first.indexes["sample"]):
            extra = dataset.indexes["sample"].difference(first.indexes["sample"])
            if len(extra):
                reason = f"{len(extra)} sample ids of {name} are not in {first_name}"
            elif dataset.sizes["sample"] != first.sizes["sample"]:
                reason = f"{dataset.sizes['sample']} vs {first.sizes['sample']} samples"
            else:
                reason = "the same ids in another order"
            raise MMCError(f"loss stores {first_name} and {name} hold different samples despite one fingerprint "
                           f"({reason})")
    datasets = list(opened.values())
    chunks = {"model": -1, "sample": POOL_SAMPLE_CHUNK}
    sample_coords = {name: first[name].variable.compute() for name in ("domain", "n_bytes") if name in first.variables}
    return xr.Dataset(
        {var: xr.concat([dataset[var].reset_coords(drop=True) for dataset in datasets], dim="model").chunk(chunks)
         for var in ("nll", "n_tokens")},
        coords={
            "model": names,
            "family": ("model", [str(dataset.attrs.get("family", "")) for dataset in datasets]),
            "n_params": ("model", [int(dataset.attrs["n_params"]) for dataset in datasets]),
            "n_params_nonembedding": ("model", [int(dataset.attrs["n_params_nonembedding"]) for dataset in datasets]),
            "source": ("model", [str(dataset.attrs.get("model", "")) for dataset in datasets]),
            **sample_coords,
        },
        attrs={"dataset_fingerprint": next(iter(by_fingerprint))},
    )
