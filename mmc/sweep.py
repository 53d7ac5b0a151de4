"""The merge sweep (the merge stage): every k-subset of a base's experts merged with each method, scored per sample.

The base and its experts are loaded once and stacked (`mmc.merging.stack_experts`); the eval samples are tokenized
and batched once (`mmc.losses.plan_scoring`); each merge is copied into the one loaded model and scores them with
the loss engine (`mmc.losses.score_windows`).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr
from tqdm.auto import tqdm

import mmc
from mmc import MMCError, check_name, check_number
from mmc.corpus import fingerprint, load_samples, sample_bytes
from mmc.losses import count_parameters, load_model, per_text, plan_scoring, score_windows
from mmc.merge_methods import METHODS, MergeSpec
from mmc.merging import check_expert_base, copy_into, merge, stack_experts
from mmc.store import check_outputs, write_store


def expert_subsets(n_experts: int, max_subsets_per_k: int, seed: int) -> list[tuple[int, ...]]:
    """Every subset of the experts for each size k = 1..n, or `max_subsets_per_k` seeded draws where C(n, k) is
    larger (without replacement, from a generator seeded with (seed, k): one k's draws do not move another's)."""
    if max_subsets_per_k < 1:
        raise MMCError(f"--max-subsets-per-k must be at least 1 (got {max_subsets_per_k})")
    subsets = []
    for k in range(1, n_experts + 1):
        every = list(itertools.combinations(range(n_experts), k))
        if len(every) > max_subsets_per_k:
            chosen = np.random.default_rng([seed, k]).choice(len(every), size=max_subsets_per_k, replace=False)
            every = [every[i] for i in np.sort(chosen)]
        subsets.extend(every)
    return subsets


def first_per_domain(samples, docs_per_domain: int | None):
    """The first `docs_per_domain` samples of each domain (all for None), in the split's order."""
    if docs_per_domain is None:
        return samples
    check_number("--docs-per-domain", docs_per_domain, 1, integer=True)
    domains = pd.Series(samples["domain"])
    return samples.select(np.flatnonzero(domains.groupby(domains).cumcount().to_numpy() < docs_per_domain))


def merge_sweep(base: str, experts: Mapping[str, str | Path], data_dir: str | Path, specs: Sequence[MergeSpec], *,
                max_subsets_per_k: int, seed: int, docs_per_domain: int | None = None, batch_tokens: int | None = None,
                device: str = "auto", allow_pickle: bool = False, progress: bool | None = None) -> xr.Dataset:
    """Merge chosen subsets of a base's `experts` (domain -> model directory) with every spec; score each merge.

    The base is loaded once; each merge is copied into it and the eval samples (`docs_per_domain` of every
    domain, expert domains and held-out ones alike) are scored with the loss engine. The first row is the base
    itself (method `base`, k = 0). A method defined for some k only (slerp and nearswap merge exactly two
    experts, model_stock at least two) merges only the subsets of those sizes; attrs `methods_k` lists the k
    each method was merged at. Returns per-sample losses over (merge, sample) with merge coords method, k
    and experts (comma-joined domains), sample coords domain and n_bytes; attrs name the base, its parameter
    counts and the expert domains.
    """
    for domain in experts:
        check_name("expert domain", domain)
    samples = load_samples(data_dir)
    if "domain" not in samples.column_names:
        raise MMCError(f"dataset '{data_dir}' has no 'domain' column: merges are scored per domain")
    samples = first_per_domain(samples, docs_per_domain)
    missing = sorted(set(experts) - set(samples["domain"]))
    if missing:
        raise MMCError(f"the eval split has no samples of expert domain(s) {', '.join(missing)}")
    for path in experts.values():
        check_expert_base(path, base)
    loaded = load_model(base, device=device, dtype="float32", allow_pickle=allow_pickle)
    states = {domain: load_model(str(path), device=device, dtype="float32", allow_pickle=allow_pickle).model.state_dict()
              for domain, path in experts.items()}
    stack = stack_experts(loaded.model.state_dict(), states)
    domains = list(experts)
    subsets = expert_subsets(len(domains), max_subsets_per_k, seed)
    runs = [("base", ())] + [(spec, subset) for spec in specs for subset in subsets
                             if METHODS[spec.method].accepts(len(subset))]
    texts = list(samples["text"])
    # every merge shares the base's tokenizer: the texts are tokenized and batched once, each merge scores them
    windows, groups = plan_scoring(loaded, texts, batch_tokens=batch_tokens)
    nll = np.empty((len(runs), len(texts)))
    bar = tqdm(runs, desc=f"merge {Path(base).name}", unit="merge", disable=None if progress is None else not progress)
    for row, (spec, subset) in enumerate(bar):
        copy_into(loaded.model, stack.base if spec == "base" else merge(stack, spec, [domains[i] for i in subset]))
        nll[row] = per_text(windows.doc, score_windows(loaded, windows, groups, progress=False), len(texts))
    n_tokens = np.tile(per_text(windows.doc, windows.n_pred, len(texts)).astype(np.int64), (len(runs), 1))
    n_params, n_params_nonembedding = count_parameters(loaded.model)
    return xr.Dataset(
        {"nll": (("merge", "sample"), nll, {"units": "nats"}), "n_tokens": (("merge", "sample"), n_tokens)},
        coords={
            "merge": np.arange(len(runs)),
            "method": ("merge", np.array(["base" if spec == "base" else spec.method for spec, _ in runs], dtype=object)),
            "k": ("merge", np.array([len(subset) for _, subset in runs])),
            "experts": ("merge", np.array([",".join(domains[i] for i in subset) for _, subset in runs], dtype=object)),
            "sample": np.asarray(samples["sample_id"], dtype=object),
            "domain": ("sample", np.asarray(samples["domain"], dtype=object)),
            "n_bytes": ("sample", sample_bytes(samples)),
        },
        attrs={"base": base, "n_params": int(n_params), "n_params_nonembedding": int(n_params_nonembedding),
               "expert_domains": ",".join(domains),
               "methods": json.dumps({spec.method: spec.settings() for spec in specs}, sort_keys=True),
               "methods_k": json.dumps({spec.method: [k for k in range(1, len(domains) + 1)
                                                      if METHODS[spec.method].accepts(k)] for spec in specs},
                                       sort_keys=True),
               "max_subsets_per_k": max_subsets_per_k, "seed": seed,
               "dataset_fingerprint": fingerprint(list(samples["sample_id"]), texts), "mmc_version": mmc.__version__},
    )


def write_sweep(base: str, experts_dir: str | Path, domains: Sequence[str], data_dir: str | Path, out: str | Path,
                methods: Sequence[str], *, seed: int, **options) -> xr.Dataset:
    """The merge stage: `merge_sweep` of the experts `experts_dir/<domain>` with each method spec (`ties` or
    `ties:density=0.2,lambda=1`; DARE masks seeded with `seed` unless the spec says), written as a store at `out`."""
    check_outputs([(out, "merge sweep")], [base, experts_dir, data_dir])
    specs = [MergeSpec.parse(text, seed=seed) for text in methods]
    experts = {domain: Path(experts_dir) / domain for domain in domains}
    store = merge_sweep(base, experts, data_dir, specs, seed=seed, **options)
    write_store(store, out, "merge sweep")
    return store
