"""The warm start of model stages (mmc/warm.py): a script handed to the warm process runs as `python SCRIPT ARGS`
would (arguments, folder, environment, stdin/stdout/stderr, exit status, signals, tracebacks) with torch already
imported, sees edits of the code at once, and scores to the bit what it scores in a process of its own."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from mmc import warm

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the warm start needs Linux")

PROBE = """\
import os, sys
preloaded = "torch" in sys.modules  # before this script imports anything heavy: imported ahead, or not
from mmc.warm import hand_over
hand_over()
import helper
print(json.dumps({"preloaded": "torch" in sys.modules and preloaded, "argv": sys.argv, "cwd": os.getcwd(),
                  "env": os.environ.get("PROBE_VALUE"), "stdin": sys.stdin.read(), "helper": helper.VALUE,
                  "pid": os.getpid(), "server": int(open(f"/proc/{os.getppid()}/stat").read().split()[3])}))
print("to stderr", file=sys.stderr)
mode = sys.argv[1]
if mode == "exit":
    sys.exit(int(sys.argv[2]))
if mode == "message":
    sys.exit("a message")
if mode == "raise":
    raise ValueError("from the script")
if mode == "sleep":
    sys.stdout.flush()
    time.sleep(60)
"""


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("probe")
    (folder / "probe.py").write_text("import json, time\n" + PROBE)
    (folder / "helper.py").write_text("VALUE = 1\n")
    return folder / "probe.py"


@pytest.fixture(scope="module")
def environment() -> dict:
    """An environment of this module's own, so that its warm process is started by these tests."""
    return os.environ | {"PROBE_TOKEN": uuid.uuid4().hex, "MMC_WARM_START": "1"}


def run_probe(probe: Path, *args: str, env: dict, stdin: str = "", cwd: Path | None = None):
    return subprocess.run([sys.executable, str(probe), *args], input=stdin, capture_output=True, text=True,
                          env=env, cwd=cwd or probe.parent, timeout=300)


def test_a_script_runs_warm_as_it_would_alone(probe, environment, tmp_path):
    alone = run_probe(probe, "exit", "3", env=environment | {"MMC_WARM_START": "0", "PROBE_VALUE": "x"},
                      stdin="some input", cwd=tmp_path)
    first = run_probe(probe, "exit", "3", env=environment | {"PROBE_VALUE": "x"}, stdin="some input", cwd=tmp_path)
    (probe.parent / "helper.py").write_text("VALUE = 2\n")  # an edit between two runs is seen by the second
    second = run_probe(probe, "exit", "3", env=environment | {"PROBE_VALUE": "x", "DVC_STAGE": "losses@a"},
                       cwd=tmp_path)
    (probe.parent / "helper.py").write_text("VALUE = 1\n")
    for result in (alone, first, second):
        assert result.returncode == 3 and result.stderr == "to stderr\n"
    reports = [json.loads(result.stdout) for result in (alone, first, second)]
    assert [report["preloaded"] for report in reports] == [False, True, True]
    assert [report["helper"] for report in reports] == [1, 1, 2]
    assert [report["stdin"] for report in reports] == ["some input", "some input", ""]
    for report in reports:
        assert report["argv"] == [str(probe), "exit", "3"] and report["cwd"] == str(tmp_path)
        assert report["env"] == "x"
    # both warm runs were forks of one warm process (DVC's per-stage variables do not start another)
    assert reports[1]["server"] == reports[2]["server"] != reports[0]["server"]
    assert reports[1]["pid"] != reports[2]["pid"]


def test_exits_and_tracebacks_are_those_of_a_script_alone(probe, environment):
    for args, status in ((("message",), 1), (("raise",), 1), (("exit", "0"), 0), (("exit", "300"), 300 & 0xFF)):
        alone = run_probe(probe, *args, env=environment | {"MMC_WARM_START": "0"})
        warm_run = run_probe(probe, *args, env=environment)
        assert warm_run.returncode == alone.returncode == status
        assert warm_run.stderr == alone.stderr
    raised = run_probe(probe, "raise", env=environment)
    line = probe.read_text().splitlines().index('    raise ValueError("from the script")') + 1
    assert raised.stderr.splitlines()[:3] == ["to stderr", "Traceback (most recent call last):",
                                              f'  File "{probe}", line {line}, in <module>']
    assert raised.stderr.splitlines()[-1] == "ValueError: from the script"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def wait_gone(pid: int, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not alive(pid)


@pytest.mark.parametrize("sent, ends_by", [(signal.SIGTERM, -signal.SIGTERM), (signal.SIGINT, -signal.SIGINT),
                                           (signal.SIGKILL, -signal.SIGKILL)])
def test_a_signal_to_the_stage_process_reaches_the_script(probe, environment, sent, ends_by):
    """A kill of the stage process ends the script the same way; SIGKILL cannot be passed on, but the script is
    stopped when the stage process is gone."""
    process = subprocess.Popen([sys.executable, str(probe), "sleep"], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=environment, text=True)
    report = json.loads(process.stdout.readline())
    assert report["preloaded"] and report["pid"] != process.pid
    process.send_signal(sent)
    assert process.wait(timeout=30) == ends_by
    assert wait_gone(report["pid"])


def test_the_warm_process_exits_when_idle_and_removes_its_socket(tmp_path):
    path = str(tmp_path / "idle.sock")
    server = subprocess.Popen([sys.executable, warm.__file__, path, "0.5"], env=os.environ | {
        "MMC_WARM_SYS_PATH": json.dumps(sys.path)}, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not os.path.exists(path) and server.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert os.path.exists(path), "the warm process never listened"
    assert server.wait(timeout=30) == 0
    assert not os.path.exists(path)


SCORE = """\
import sys
from mmc.warm import hand_over
hand_over()
from mmc.losses import write_losses
write_losses(sys.argv[1], sys.argv[2], sys.argv[3], max_length=32, stride=16)
"""


def test_scores_are_the_same_to_the_bit_warm_or_alone(gpt2_dir, eval_dir, environment, tmp_path):
    script = tmp_path / "score.py"
    script.write_text(SCORE)
    for name, switch in (("alone", "0"), ("warm", "1")):
        subprocess.run([sys.executable, str(script), str(gpt2_dir), str(eval_dir), str(tmp_path / f"{name}.zarr")],
                       env=environment | {"MMC_WARM_START": switch}, check=True, timeout=300)
    alone, warm_scored = (xr.open_zarr(tmp_path / f"{name}.zarr").load() for name in ("alone", "warm"))
    assert alone.attrs == warm_scored.attrs
    for name in ("nll", "n_tokens", "n_bytes"):
        np.testing.assert_array_equal(alone[name].values, warm_scored[name].values)
