"""A warm start for the pipeline's stages: torch, transformers and the array libraries imported once, not per stage.

A stage that runs a model spends about 5 s importing torch, transformers and the array libraries before any work
(more than its work, for the embedded zoo's models), the others about 1 s, and a study runs dozens of stages, each
in a new process. So the first stage starts a *warm process* that imports those libraries and waits; every stage,
this first one included, hands its script to it (`hand_over`) and the warm process forks a copy that runs the
script exactly as `python SCRIPT ARGS` would: the stage's arguments, working directory, environment, sys.path and
its stdin, stdout and stderr (the file descriptors themselves), with Python's `random` and numpy's global generator
drawn afresh. The stage process waits and exits with the script's status, or by the signal that ended it; the signals
it receives (Ctrl-C, a kill) are passed on, and the script is stopped if the stage process goes away.

Only third-party libraries are imported ahead (`PRELOAD`): mmc and the stage scripts are imported by each run
from the files as they are now, so an edit takes effect at once. A warm process serves one interpreter, sys.path,
environment (DVC_* excepted) and installed version of the preloaded libraries (the key of its socket), only the
user who started it (a private folder and the peer's uid), and exits after `IDLE_SECONDS` with no stage running.
`MMC_WARM_START=0` turns it off; where it cannot work (no fork or fd passing: not Linux) or fails to start, the
stage runs in its own process as before. The arithmetic is the same either way, so the outputs are identical.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time

SWITCH = "MMC_WARM_START"  # "0": every stage runs in its own process
PRELOAD = ("numpy", "scipy.optimize", "scipy.stats", "pandas", "xarray", "zarr", "yaml", "pydantic", "tqdm",
           "sklearn.linear_model", "sklearn.neighbors", "matplotlib.figure", "datasets", "safetensors", "tokenizers",
           "torch", "transformers", "transformers.modeling_utils", "transformers.modeling_layers",
           "transformers.masking_utils", "transformers.activations")
IDLE_SECONDS = 60.0  # a warm process with no stage running for this long exits
START_SECONDS = 300.0  # the longest a stage waits for a warm process to finish its imports before running alone
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
_PER_RUN = ("PWD", "OLDPWD", "SHLVL", "_", "PYTEST_CURRENT_TEST")  # change between runs; no import reads them
_SYS_PATH = "MMC_WARM_SYS_PATH"  # how a starting warm process learns the stage's sys.path


def hand_over() -> None:
    """Run the calling script in a fork of the warm process and exit with its status; return at once (the script
    goes on in this process) where the warm start is off, unavailable, or the warm process does not answer."""
    if os.environ.get(SWITCH) == "0" or not _supported():
        return
    try:
        connection = _connect_or_start()
        if connection is None:
            return
        _send_request(connection)
        if connection.recv(1) != b"S":  # the warm process went away before it started the script: run it here
            connection.close()
            return
    except OSError:
        return
    _wait_for(connection)


def _supported() -> bool:
    return sys.platform.startswith("linux") and hasattr(os, "fork") and hasattr(socket, "send_fds") and \
        all(_is_open(fd) for fd in (0, 1, 2))


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _folder() -> str:
    """A folder only this user may enter, for the sockets."""
    folder = os.path.join(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir(), f"mmc-warm-{os.getuid()}")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    found = os.stat(folder)
    if found.st_uid != os.getuid() or found.st_mode & 0o077:
        raise OSError(f"{folder} is not private to this user")
    return folder


def _key() -> str:
    """What a warm process depends on: the interpreter and its flags, sys.path, the environment (DVC's per-stage
    variables aside), the preloaded libraries' files as installed, and this file."""
    libraries = {}
    for name in {module.partition(".")[0] for module in PRELOAD}:
        spec = importlib.util.find_spec(name)
        libraries[name] = None if spec is None or not spec.origin else [spec.origin, os.stat(spec.origin).st_mtime_ns]
    environment = {name: value for name, value in os.environ.items()
                   if not name.startswith("DVC_") and name not in _PER_RUN}
    this_file = [__file__, os.stat(__file__).st_mtime_ns]  # a warm process runs the code of this file as it started
    described = [sys.executable, sys.version, list(sys.flags), sys.path, sorted(environment.items()), libraries,
                 this_file]
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:32]


def _connect(path: str) -> socket.socket | None:
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.connect(path)
    except OSError:
        connection.close()
        return None
    return connection


def _connect_or_start() -> socket.socket | None:
    """A connection to the warm process for this key, started (and waited for) when none answers."""
    import fcntl

    path = os.path.join(_folder(), _key() + ".sock")
    if len(path.encode()) > 100:  # the limit of a socket's path
        return None
    connection = _connect(path)
    if connection is not None:
        return connection
    with open(path[:-len(".sock")] + ".lock", "w") as lock:  # one start at a time for a key
        fcntl.flock(lock, fcntl.LOCK_EX)
        connection = _connect(path)
        if connection is not None:
            return connection
        if os.path.lexists(path):  # left by a warm process that was killed
            os.unlink(path)
        interpreter_flags = subprocess._args_from_interpreter_flags()  # the same -X/-W/-O options as this process
        server = subprocess.Popen(
            [sys.executable, *interpreter_flags, os.path.abspath(__file__), path, str(IDLE_SECONDS)],
            env=os.environ | {_SYS_PATH: json.dumps(sys.path)}, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline and server.poll() is None:
            connection = _connect(path)
            if connection is not None:
                return connection
            time.sleep(0.05)
        if server.poll() is None:
            server.kill()
        return None


def _send_request(connection: socket.socket) -> None:
    request = json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "env": dict(os.environ), "path": sys.path,
                          "script": os.path.abspath(sys.argv[0])}).encode()
    socket.send_fds(connection, [struct.pack("!Q", len(request))], [0, 1, 2])
    connection.sendall(request)


def _wait_for(connection: socket.socket) -> None:
    """Pass on this process's signals to the script until it ends, then end as it did."""
    for number in FORWARDED:
        signal.signal(number, lambda received, frame: connection.send(bytes([received])))
    status = b""
    while len(status) < 5:
        try:
            chunk = connection.recv(5 - len(status))
        except OSError:
            chunk = b""
        if not chunk:
            print("mmc: error: the warm process running this stage ended before the stage did", file=sys.stderr)
            os._exit(1)
        status += chunk
    kind, number = struct.unpack("!ci", status)
    if kind == b"K":  # ended by a signal: end by the same one
        signal.signal(number, signal.SIG_DFL)
        os.kill(os.getpid(), number)
    os._exit(number)


# ---- the warm process (this file run as a script: the mmc package itself is never imported here) ----

def serve(path: str, idle_seconds: float) -> None:
    """Import PRELOAD, then fork a watcher for each stage that connects; exit after idle_seconds with none."""
    os.chdir("/")
    for module in PRELOAD:
        try:
            __import__(module)
        except Exception:  # a library this environment lacks (or cannot import) is imported by the stage if needed
            pass
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    staging = f"{path}.{os.getpid()}"
    listener.bind(staging)
    listener.listen(16)
    os.rename(staging, path)  # clients see the socket only once it accepts
    watchers: set[int] = set()
    idle_since = time.monotonic()
    try:
        while True:
            ready, _, _ = select.select([listener], [], [], 1.0)
            for pid in list(watchers):
                if os.waitpid(pid, os.WNOHANG)[0]:
                    watchers.discard(pid)
            if watchers or ready:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since > idle_seconds:
                return
            if not ready:
                continue
            connection, _ = listener.accept()
            peer_uid = struct.unpack("3i", connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
            if peer_uid != os.getuid():
                connection.close()
                continue
            pid = os.fork()
            if pid == 0:
                listener.close()
                _watch(connection)
            watchers.add(pid)
            connection.close()
    finally:
        if os.path.exists(path):
            os.unlink(path)
        listener.close()


def _watch(connection: socket.socket) -> None:
    """In a fork of the warm process: start the stage's script in a fork of its own, pass on the signals that the
    stage process sends, stop the script if the stage process goes away, and report how the script ended."""
    try:
        header, fds, _, _ = socket.recv_fds(connection, 8, 3)
        size = struct.unpack("!Q", header)[0]
        request = b""
        while len(request) < size:
            chunk = connection.recv(size - len(request))
            if not chunk:
                os._exit(0)
            request += chunk
        pid = os.fork()
        if pid == 0:
            connection.close()
            _run_script(json.loads(request), fds)
        for fd in fds:
            os.close(fd)
        connection.sendall(b"S")
        ended = os.pidfd_open(pid)
        while True:
            ready, _, _ = select.select([connection, ended], [], [])
            if ended in ready:
                status = os.waitpid(pid, 0)[1]
                if os.WIFSIGNALED(status):
                    connection.sendall(struct.pack("!ci", b"K", os.WTERMSIG(status)))
                else:
                    connection.sendall(struct.pack("!ci", b"E", os.waitstatus_to_exitcode(status)))
                break
            received = connection.recv(64)
            if not received:  # the stage process is gone (killed): so is the stage
                os.kill(pid, signal.SIGTERM)
                os.waitpid(pid, 0)
                break
            for number in received:
                os.kill(pid, number)
    finally:
        os._exit(0)


def _run_script(request: dict, fds: list[int]) -> None:
    """In the fork that runs the stage: become `python SCRIPT ARGS` as the stage process was started, run it, and
    exit as the interpreter would."""
    import atexit
    import random
    import runpy
    import threading

    for number in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(number, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"], **{SWITCH: "0"})  # the script's own hand_over runs it here
    sys.argv[:] = request["argv"]
    sys.path[:] = request["path"]
    sys.stdin = open(0, closefd=False)
    sys.stdout = open(1, "w", buffering=1 if os.isatty(1) else -1, closefd=False,
                      encoding=sys.stdout.encoding, errors=sys.stdout.errors)
    random.seed()
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    code = 0
    try:
        runpy.run_path(request["script"], run_name="__main__")
    except SystemExit as ended:
        if ended.code is None:
            code = 0
        elif isinstance(ended.code, int):
            code = ended.code
        else:
            print(ended.code, file=sys.stderr)
            code = 1
    except BaseException as error:
        traceback_ = error.__traceback__
        while traceback_ is not None and traceback_.tb_frame.f_code.co_filename in (__file__, "<frozen runpy>"):
            traceback_ = traceback_.tb_next  # from the script's own frames on, as the interpreter prints it
        sys.excepthook(type(error), error.with_traceback(traceback_), traceback_)
        code = -signal.SIGINT if isinstance(error, KeyboardInterrupt) else 1
    threading._shutdown()  # what the interpreter does at exit: executors stopped, other threads joined, then atexit
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    if code == -signal.SIGINT:  # as the interpreter does after an uncaught KeyboardInterrupt
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(code & 0xFF)


if __name__ == "__main__":
    sys.path[:] = json.loads(os.environ.pop(_SYS_PATH))
    serve(sys.argv[1], float(sys.argv[2]))
