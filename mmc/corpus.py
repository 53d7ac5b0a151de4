"""Samples: the evaluation texts every loss is computed on (DESIGN.md §3, "Sample")."""

from __future__ import annotations

import hashlib
from pathlib import Path

import datasets

from mmc import MMCError

REQUIRED_COLUMNS = ("sample_id", "text")


def fingerprint(sample_ids: list[str], texts: list[str]) -> str:
    """Content hash of an evaluation set: its ids and texts, in order.

    Separators are control characters that cannot be confused with the ends of ids or texts.
    """
    digest = hashlib.sha256()
    digest.update("\x1f".join(sample_ids).encode("utf-8"))
    digest.update(b"\x1e")
    digest.update("\x1f".join(texts).encode("utf-8"))
    return digest.hexdigest()[:32]


def load_samples(data_dir: str | Path, split: str = "eval") -> datasets.Dataset:
    """Load an evaluation set saved with `save_to_disk`: a Dataset, or a DatasetDict and a split name."""
    data_dir = Path(data_dir)
    if not data_dir.exists():
        raise MMCError(f"dataset '{data_dir}' does not exist; build it with `mmc corpus` or `save_to_disk`")
    try:
        loaded = datasets.load_from_disk(str(data_dir))
    except FileNotFoundError as error:
        raise MMCError(f"'{data_dir}' is not a dataset saved with `save_to_disk` ({error})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise MMCError(f"dataset '{data_dir}' has no split '{split}' (it has: {', '.join(loaded)}); pass --split")
        loaded = loaded[split]
    missing = [column for column in REQUIRED_COLUMNS if column not in loaded.column_names]
    if missing:
        raise MMCError(
            f"dataset '{data_dir}' lacks column(s) {', '.join(missing)} "
            f"(it has: {', '.join(loaded.column_names)}); every sample needs 'sample_id' and 'text'"
        )
    if len(loaded) == 0:
        raise MMCError(f"dataset '{data_dir}' is empty: there is nothing to score")
    ids = loaded["sample_id"]
    if len(set(ids)) != len(ids):
        raise MMCError(f"dataset '{data_dir}' has duplicate sample_id values; ids must be unique")
    return loaded
