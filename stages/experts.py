"""DVC stage experts@<base>-<domain>: fine-tune one base on one domain.
Usage: experts.py CORPUS_TRAIN OUT_TEMPLATE LOG_TEMPLATE (templates with {base} and {domain})

The base is the folder params `merging.base_dir`/<base>; DVC names the stage experts@<base>-<domain>, so a domain
label of `merging.domains` must not hold '-'.
"""
import sys
from pathlib import Path

from mmc.warm import hand_over

hand_over()  # the script runs in a fork of a process with its libraries imported (mmc/warm.py)

from common import fill, params, run, stage_pair  # noqa: E402

from mmc.train import train_expert  # noqa: E402

corpus_train, out, log = sys.argv[1:]
values = params("merging.base_dir", "merging.expert_tokens",
                "merging.expert_batch_size", "merging.expert_lr", "merging.expert_warmup_steps",
                "merging.expert_lora_rank", "merging.expert_context", "merging.seed", "zoo.device")
base, domain = stage_pair(("base", "domain"))
run(f"experts@{base}-{domain}", lambda: train_expert(
    str(Path(values["merging.base_dir"]) / base), corpus_train, domain, fill(out, base=base, domain=domain),
    fill(log, base=base, domain=domain), train_tokens=values["merging.expert_tokens"],
    batch_size=values["merging.expert_batch_size"], lr=values["merging.expert_lr"],
    warmup_steps=values["merging.expert_warmup_steps"], lora_rank=values["merging.expert_lora_rank"],
    context=values["merging.expert_context"],
    seed=values["merging.seed"], device=values["zoo.device"]))
