"""DVC stage zoo@<member>: train one member of the embedded zoo. Usage: zoo.py CORPUS_TRAIN OUT_TEMPLATE LOG_TEMPLATE"""
import sys

from mmc.warm import hand_over

hand_over()  # the script runs in a fork of a process with its libraries imported (mmc/warm.py)

from common import comma_list, fill, params, run, stage_key  # noqa: E402

from mmc.zoo import train_zoo_member  # noqa: E402

corpus_train, out, log = sys.argv[1:]
member = stage_key("zoo member")
shared = ("context", "train_tokens", "batch_size", "warmup_steps", "seed", "device")
values = params(*(f"zoo.{name}" for name in shared), f"zoo.members.{member}")
# a member's own setting (e.g. its seed, for a replicate) overrides the zoo-wide one
spec = {name: values[f"zoo.{name}"] for name in shared} | values[f"zoo.members.{member}"]
run(f"zoo@{member}", lambda: train_zoo_member(
    corpus_train, fill(out, key=member), fill(log, key=member), domains=comma_list(spec.pop("domains", None)),
    tokenizer_kind=spec.pop("tokenizer"), **spec))
