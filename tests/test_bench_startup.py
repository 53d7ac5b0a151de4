"""What a command costs beyond its work (issue 26: `mmc oracle` overhead ≤ 1 s), and a model stage's start.

`mmc oracle` runs as a user runs it (a fresh interpreter, `python -m mmc.cli`) on a pool small enough that the
oracle's own work takes milliseconds; the same work is timed in this process, and the difference is the
command's overhead: starting Python, importing mmc and what the command needs, checking inputs and outputs,
writing the tables.
    python -m pytest tests/test_bench_startup.py --benchmark-enable -s
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import pytest
from conftest import ROOT, synthetic_pool

from mmc.oracle import oracle_study


def test_bench_oracle_command_overhead(benchmark, tmp_path):
    pool = synthetic_pool(tmp_path / "pool.zarr", n_samples=400)
    started = time.perf_counter()
    oracle_study(pool, tmp_path / "in-process", max_subsets_per_k=20, seed=0)
    work = time.perf_counter() - started
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def command() -> None:
        out = tmp_path / "command"
        subprocess.run([sys.executable, "-m", "mmc.cli", "oracle", "--pool", str(pool), "--out", str(out),
                        "--max-subsets-per-k", "20", "--seed", "0"], env=env, check=True, capture_output=True)

    benchmark.pedantic(command, rounds=5, iterations=1, warmup_rounds=1)
    assert (tmp_path / "command" / "ensembles.parquet").is_file()
    benchmark.extra_info.update(work_seconds=work)
    if benchmark.stats is not None:  # None under --benchmark-disable: the command ran once, untimed
        overhead = benchmark.stats.stats.median - work
        benchmark.extra_info.update(overhead_seconds=overhead)
        print(f"\nmmc oracle: median {benchmark.stats.stats.median:.2f} s, of which the work {work:.3f} s: "
              f"overhead {overhead:.2f} s")


# what a model stage imports before its work: the loss engine, the training loop, the zoo's model classes
MODEL_STAGE_START = """\
from mmc.warm import hand_over
hand_over()
import mmc.losses, mmc.train, mmc.sweep
from transformers import GPT2LMHeadModel, GPTNeoXForCausalLM, LlamaForCausalLM
"""


@pytest.mark.parametrize("switch", ["1", "0"], ids=["warm", "alone"])
def test_bench_model_stage_start(benchmark, tmp_path, switch):
    """A model stage's start: warm (a fork of the warm process, which the warm-up round starts) or alone (a fresh
    interpreter importing torch and transformers), as `MMC_WARM_START` says."""
    script = tmp_path / "stage.py"
    script.write_text(MODEL_STAGE_START)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MMC_WARM_START": switch, "BENCH_TOKEN": uuid.uuid4().hex}
    benchmark.pedantic(lambda: subprocess.run([sys.executable, str(script)], env=env, check=True),
                       rounds=5, iterations=1, warmup_rounds=1)
    if benchmark.stats is not None:
        mode = "warm" if switch == "1" else "alone"
        print(f"\nmodel stage start, {mode}: median {benchmark.stats.stats.median:.2f} s")
