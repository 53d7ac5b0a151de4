"""Zarr v3 stores written through xarray: atomic writes, whole-axis chunks, strict reads."""

from __future__ import annotations

import os
import shutil
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path
from collections.abc import Iterator, Mapping

import numpy as np
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
    """Write `dataset` as a Zarr v3 store with one chunk per variable (a handful of files for DVC)."""
    dataset = dataset.copy()
    for name, variable in dataset.variables.items():
        variable.encoding = {}
        if variable.dtype.kind == "U":  # variable-length strings are portable in Zarr v3
            dataset[name] = variable.astype(object)
    encoding = {name: {"chunks": dataset[name].shape} for name in dataset.variables if dataset[name].ndim}
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



def assemble_pool(stores: Mapping[str, str | Path]) -> xr.Dataset:
    """Combine loss stores (slug -> path) into the pool dataset over (model, sample) (DESIGN.md §3, "Pool").

    Every store must have scored the same eval set: the same dataset fingerprint and the same samples in the
    same order. The model coordinate takes the slugs, with `family`, `n_params` and `n_params_nonembedding`
    from each store's attrs.
    """
    if not stores:
        raise MMCError("the pool is empty: give at least one loss store")
    opened = {slug: open_store(path) for slug, path in stores.items()}
    fingerprints: dict[str, list[str]] = {}
    for slug, dataset in opened.items():
        fingerprints.setdefault(dataset.attrs.get("dataset_fingerprint", "missing"), []).append(slug)
    if len(fingerprints) > 1:
        groups = "; ".join(f"{', '.join(slugs)} scored {fp}" for fp, slugs in fingerprints.items())
        raise MMCError(f"loss stores scored different eval sets: {groups}; rerun their losses stages on one dataset")
    first_slug, first = next(iter(opened.items()))
    for slug, dataset in opened.items():
        if not np.array_equal(dataset.sample.values, first.sample.values):
            raise MMCError(f"loss stores {first_slug} and {slug} hold different samples despite one fingerprint")
    pool = xr.Dataset(
        {name: xr.concat([dataset[name] for dataset in opened.values()], dim="model") for name in ("nll", "n_tokens")},
        coords={
            "model": list(opened),
            "family": ("model", [dataset.attrs.get("family", "") for dataset in opened.values()]),
            "n_params": ("model", [int(dataset.attrs["n_params"]) for dataset in opened.values()]),
            "n_params_nonembedding": ("model", [int(dataset.attrs["n_params_nonembedding"])
                                                for dataset in opened.values()]),
            "n_bytes": first.n_bytes,
        },
        attrs={"dataset_fingerprint": next(iter(fingerprints)), "n_models": len(opened)},
    )
    if "domain" in first.coords:
        pool = pool.assign_coords(domain=first.domain)
    return pool.transpose("model", "sample")
