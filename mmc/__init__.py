"""mmc: scaling laws of multi-model collaboration and model merging, measured end to end."""

import difflib
import errno
import functools
import math
import os
import re
import sys
import traceback
from collections.abc import Callable

__version__ = "0.1.0"

# threads for the batched numeric loops (the oracle's ensemble blocks, the law fitter's rows): the cores this
# process may use, at most 16. Each thread's share is computed exactly as in one thread (BLAS held to one thread:
# `one_library_thread`), so results do not depend on it; numpy releases the GIL in the large array operations that
# these loops are made of.
THREADS = min(16, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def in_threads(compute: Callable, items: list) -> list:
    """[compute(item) for item in items], on up to THREADS threads, in the items' order: for independent pieces of
    numeric work (the law fits of a study's series), each computed as it would be alone, so the results are those of
    the loop, bit for bit. A piece's exception is raised here."""
    if THREADS < 2 or len(items) < 2:
        return [compute(item) for item in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(THREADS, len(items))) as executor:
        return list(executor.map(compute, items))


def one_library_thread(function: Callable) -> Callable:
    """`function` run with BLAS and OpenMP held to one thread each (a decorator), for numeric work that mmc spreads
    over its own THREADS threads. A BLAS's threads change its sums' last bits (OpenBLAS on two AMD EPYC cores: the
    fit's bootstrap sums differ between one and two BLAS threads), so results would depend on the machine's cores
    and differ between one process and a dask cluster's one-thread workers; and under mmc's threads they contend
    (`mmc fit` at 48 models × 100,000 samples: 75.6 and 76.2 s with them, 68.7 and 67.0 s without)."""

    @functools.wraps(function)
    def held(*args, **kwargs):
        from threadpoolctl import threadpool_limits  # imported on use: the command line starts without it

        with threadpool_limits(limits=1):
            return function(*args, **kwargs)

    return held


# Defaults and vocabularies that the params schema (mmc.params), the command line and the library share, here so
# that the command line reads them without importing the schema's pydantic or the scoring engine's torch.
FAMILIES = ("gpt2", "llama", "gpt_neox")  # the embedded zoo's architecture families
TOKENIZER_KINDS = ("byte_bpe", "byte_bpe_bos", "metaspace_bpe")  # the zoo's tokenizer kinds
BATCH_TOKENS = 16384  # padded tokens per scoring batch on an accelerator
CPU_BATCH_TOKENS = 2048  # padded tokens per scoring batch on a CPU (`mmc.losses.batch_budget`)
FLUSH_SECONDS = 60.0  # a scoring run saves its progress (resumable after a crash) at most this often
HEAD_DTYPE = "auto"  # the output head's dtype: fp32 on a GPU, the weights' dtype elsewhere


class MMCError(Exception):
    """A problem with the user's input: the CLI prints it as one line, without a traceback."""


def exit_status(where: str, call: Callable[[], object], *, debug: bool = False) -> int:
    """Run `call`; an MMCError becomes one line on stderr ("mmc WHERE: error: ...") and exit status 2.

    The CLI and the DVC stage scripts both end this way; `debug` re-raises, keeping the traceback.
    """
    try:
        call()
    except MMCError as error:
        if debug:
            raise
        print(f"mmc {where}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # disk full, a file-size limit, a lost connection: the system's reason, in one line
        if debug:
            raise
        package = os.path.dirname(os.path.abspath(__file__))
        ours = [frame for frame in traceback.extract_tb(error.__traceback__)[1:]  # not this function's own frame
                if frame.filename.startswith(package + os.sep)]
        step = f" in {ours[-1].name} ({os.path.relpath(ours[-1].filename, os.path.dirname(package))})" if ours else ""
        names = " -> ".join(f"'{name}'" for name in (error.filename, error.filename2) if name is not None)
        lines = str(error).strip().splitlines()
        reason = error.strerror or (lines[0] if lines else "no reason given")
        code = f" [{errno.errorcode.get(error.errno, error.errno)}]" if isinstance(error.errno, int) else ""
        print(f"mmc {where}: error: {type(error).__name__}{step}{' on ' + names if names else ''}: {reason}{code}",
              file=sys.stderr)
        return 2
    return 0


def check_number(name: str, value: float, low: float = -math.inf, high: float = math.inf, *,
                 low_open: bool = False, high_open: bool = False, integer: bool = False) -> float:
    """`value` if it is finite (an integer where `integer`) and within [low, high] (open where told), else an
    MMCError naming the setting `name` (`--lambda`, `plan.epsilon`) and the allowed range."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    in_range = (number > low if low_open else number >= low) and (number < high if high_open else number <= high)
    if not math.isfinite(number) or not in_range or (integer and number != int(number)) or isinstance(value, bool):
        bounds = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        what = ("an integer" if integer else "a finite number") + ("" if bounds == "[-inf, inf]" else f" in {bounds}")
        raise MMCError(f"{name} must be {what}, got {value}")
    return int(number) if integer else number


SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}")


def check_name(kind: str, name: object) -> str:
    """A slug, domain label or base name that becomes part of paths and stage names: letters, digits, `_`, `.`,
    `+`, `-`, starting with a letter or digit, no `..`; anything else (`;`, spaces, `$(`, `/`) is refused."""
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name) or ".." in name:
        raise MMCError(f"{kind} {name!r} is not a safe name: use letters, digits and _ . + - (starting with a letter "
                       f"or digit, no '..'), as it becomes part of paths and stage names")
    return name


def did_you_mean(given: str, valid) -> str:
    """` (did you mean 'X'?)` with the valid name closest to `given`, or "" when none is close."""
    close = difflib.get_close_matches(str(given), [str(name) for name in valid], n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""
