"""Zarr v3 stores written through xarray: atomic writes, whole-axis chunks, strict reads."""

from __future__ import annotations

import os
import shutil
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

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

