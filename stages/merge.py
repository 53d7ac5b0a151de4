"""DVC stage merge@<base>: merge k-subsets of a base's experts with every method; score each merge.
Usage: merge.py EXPERTS_TEMPLATE EVAL_SPLIT OUT_TEMPLATE (templates with {key}, the base)

The base is params `merging.base_dir`/<base>; the experts are EXPERTS_TEMPLATE/<domain> for the domains of
params `merging.domains` (globbing the folder would take experts of domains since removed);
`merging.methods` maps each method to its settings.
"""
import sys
from pathlib import Path

from mmc.warm import hand_over

hand_over()  # the script runs in a fork of a process with its libraries imported (mmc/warm.py)

from common import fill, params, run, safe_names, stage_key  # noqa: E402

from mmc.sweep import write_sweep  # noqa: E402

experts_dir, eval_split, out = sys.argv[1:]
values = params("merging.base_dir", "merging.domains", "merging.methods",
                "merging.max_subsets_per_k", "merging.docs_per_domain", "merging.seed", "losses.batch_tokens",
                "zoo.device")
base = stage_key("base")
domains = safe_names("domain", values["merging.domains"])
methods = [name + "".join(f"{',' if i else ':'}{key}={value}" for i, (key, value) in enumerate((settings or {}).items()))
           for name, settings in values["merging.methods"].items()]
run(f"merge@{base}", lambda: write_sweep(
    str(Path(values["merging.base_dir"]) / base), fill(experts_dir, key=base), domains, eval_split,
    fill(out, key=base), methods, seed=values["merging.seed"], max_subsets_per_k=values["merging.max_subsets_per_k"],
    docs_per_domain=values["merging.docs_per_domain"], batch_tokens=values["losses.batch_tokens"],
    device=values["zoo.device"]))
