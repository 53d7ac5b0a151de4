"""Zarr v3 stores written through xarray (atomic writes, a handful of chunks, strict reads), and the pool dataset."""

from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import math
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse
from urllib.request import url2pathname

import fsspec
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import xarray as xr
import zarr
from fsspec.registry import known_implementations
from tqdm.auto import tqdm
from zarr.codecs import Crc32cCodec, ZstdCodec

from mmc import MMCError

if TYPE_CHECKING:
    from distributed import Client


CHECKSUMMED = (ZstdCodec(), Crc32cCodec())  # every chunk compressed, then checksummed: a flipped bit is an error
MARKER = ".mmc-output"  # in every folder mmc writes: the kind of output it is
PROGRESS_SIGNATURE = b"# mmc progress file v1\n"  # how a progress file (`Partial`) begins
# file outputs are recognised by their content: a JSON object's keys, or how a text file begins
JSON_SIGNATURES = {"collaboration laws": {"law", "fits", "comparisons"}, "merging law": {"law", "fits", "bases"},
                   "merge plan": {"floor", "stop", "gain_fractions"},
                   "routing metrics": {"at_largest_k", "laws", "split"}}
TEXT_SIGNATURES = {"training log": b"step,tokens,loss,lr\n", "figure": b"\x89PNG\r\n",
                   "mergekit config": b"# mergekit configuration equivalent to `mmc merge",
                   "params check": b"params.yaml matches mmc's schema\n",
                   "progress file": PROGRESS_SIGNATURE,
                   "losses table": b"model,sample_id,domain,nll,n_tokens,n_bytes\n"}  # `mmc export` as CSV
PARQUET_MAGIC = b"PAR1"
PARQUET_KIND_KEY = b"mmc_output"  # a parquet file mmc writes names its kind in its schema metadata (`mmc export`)
DASK_CONNECT_SECONDS = 30  # how long `--scheduler ADDRESS` waits for the scheduler to answer
REMOTE_CONNECT_SECONDS = 10  # how long an http(s) server or object store may take to accept a connection
REMOTE_READ_SECONDS = 120  # how long a read from a remote store may stall
CLOUD_SCHEMES = {"s3": "aws", "s3a": "aws", "gs": "gcp", "gcs": "gcp"}  # URL schemes that need cloud credentials
CLOUD_HINTS = {
    "aws": "AWS credentials are configured: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or AWS_PROFILE, write "
           "~/.aws/credentials (`aws configure`), or set FSSPEC_S3_ANON=true for a public bucket",
    "gcp": "Google Cloud credentials are configured: set GOOGLE_APPLICATION_CREDENTIALS, run `gcloud auth "
           "application-default login`, or set FSSPEC_GS_TOKEN=anon for a public bucket",
}
PARTIAL_SUFFIX = ".partial"  # `.NAME.partial`: the resumable progress of a computation of NAME (not a leftover)
LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?:tmp|old)-(?:(?P<pid>\d+)-)?[0-9a-f]{8}")


def local_path(path: str | Path) -> Path | None:
    """The local path that `path` names (a path, or a file:// URL), or None for another fsspec URL (s3://, gs://).

    `file:/x` counts as a URL too: it is what `Path("file:///x")` makes of one.
    """
    text = str(path)
    if "://" not in text and not text.startswith("file:"):
        return Path(path)
    url = urlparse(text)
    return Path(url2pathname(url.path)) if url.scheme == "file" and url.netloc in ("", "localhost") else None


def remote_filesystem(url: str, what: str) -> tuple[fsspec.AbstractFileSystem, str, dict]:
    """The fsspec filesystem, path and storage options to read the remote `url` (s3://, gs://, http://) with;
    `what` names it in errors ("store 'URL'"). Refused in one line before any network access: a scheme fsspec
    does not know or whose package is not installed, s3/gs with no credentials configured. An http(s) server
    must accept a connection within REMOTE_CONNECT_SECONDS; reads stall for at most REMOTE_READ_SECONDS."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else urlparse(url).scheme.lower()
    try:
        fsspec.get_filesystem_class(scheme)  # imports the scheme's package: no network
    except (ImportError, ValueError) as error:
        package = known_implementations.get(scheme, {}).get("class", "").split(".")[0]
        hint = f" (pip install {package})" if package and package != "fsspec" else ""
        raise MMCError(f"{what} cannot be read: {one_line(error)}{hint}") from None
    cloud = CLOUD_SCHEMES.get(scheme)
    if cloud is not None and not _cloud_credentials(cloud, scheme):
        raise MMCError(f"{what} cannot be read: no {CLOUD_HINTS[cloud]}")
    options: dict = {}
    if scheme in ("http", "https"):
        import aiohttp  # fsspec's http filesystem is built on it: importable once get_filesystem_class worked

        options["client_kwargs"] = {"timeout": aiohttp.ClientTimeout(sock_connect=REMOTE_CONNECT_SECONDS,
                                                                     sock_read=REMOTE_READ_SECONDS)}
        parsed = urlparse(url)
        try:  # fsspec reports a refused connection as a missing file: ask the server first, briefly
            port = parsed.port or (443 if scheme == "https" else 80)
            socket.create_connection((parsed.hostname or "", port), timeout=REMOTE_CONNECT_SECONDS).close()
        except (OSError, ValueError) as error:
            reason = getattr(error, "strerror", None) or one_line(error)
            raise MMCError(f"{what} cannot be reached: no connection to {parsed.netloc} ({reason})") from None
    elif scheme in ("s3", "s3a"):
        options["config_kwargs"] = {"connect_timeout": REMOTE_CONNECT_SECONDS, "read_timeout": REMOTE_READ_SECONDS,
                                    "retries": {"max_attempts": 2}}
    try:
        filesystem, root = fsspec.core.url_to_fs(url, **options)
    except (ImportError, ValueError, OSError) as error:
        raise MMCError(f"{what} cannot be reached: {one_line(error)}") from None
    return filesystem, root, options


def _cloud_credentials(cloud: str, scheme: str) -> bool:
    """Whether credentials for `cloud` ("aws", "gcp") are configured where its SDK looks, read locally (environment,
    config files, whether this machine is a cloud VM with an instance identity), or fsspec is told to read anonymously
    (FSSPEC_S3_ANON=true, FSSPEC_GS_TOKEN=anon)."""
    home = Path.home()
    configured = fsspec.config.conf.get(scheme, {})
    if cloud == "aws":
        if configured.get("anon") in (True, "true", "True", "1") or configured.get("key") or configured.get("profile"):
            return True
        variables = ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE",
                     "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI")
        files = (os.environ.get("AWS_SHARED_CREDENTIALS_FILE", home / ".aws" / "credentials"),
                 os.environ.get("AWS_CONFIG_FILE", home / ".aws" / "config"), "/etc/boto.cfg", home / ".boto")
        metadata_disabled = os.environ.get("AWS_EC2_METADATA_DISABLED", "").lower() == "true"
        vm = not metadata_disabled and any(_read_text(f"/sys/devices/virtual/dmi/id/{name}").startswith("Amazon EC2")
                                           for name in ("sys_vendor", "board_vendor"))
        vm = vm or (not metadata_disabled and _read_text("/sys/hypervisor/uuid").lower().startswith("ec2"))
    else:
        if configured.get("token") or fsspec.config.conf.get("gcs", {}).get("token"):
            return True
        variables = ("GOOGLE_APPLICATION_CREDENTIALS",)
        gcloud = Path(os.environ.get("CLOUDSDK_CONFIG", home / ".config" / "gcloud"))
        files = (gcloud / "application_default_credentials.json", home / ".gcs_tokens")
        vm = "Google" in _read_text("/sys/class/dmi/id/product_name")
    return vm or any(os.environ.get(name) for name in variables) or any(Path(file).is_file() for file in files)


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return ""


def output_path(path: str | Path) -> Path:
    """The local path an output is written to: outputs are replaced by a rename, which object stores cannot do
    atomically, so a remote URL is refused (write locally, then upload: `dvc push`)."""
    local = local_path(path)
    if local is None:
        raise MMCError(f"cannot write '{path}': mmc writes outputs atomically on a local filesystem only (a file:// "
                       f"URL or a path); write it locally and upload it (e.g. `dvc push`)")
    return local


def output_kind(path: Path) -> str | None:
    """The kind of mmc output at `path`: "" where there is nothing (no such path, or an empty folder), the kind
    mmc recorded (a folder's marker, a file's content), or None for anything mmc did not write."""
    if path.is_symlink():
        return None
    if not path.exists():
        return ""
    if path.is_dir():
        if not any(path.iterdir()):
            return ""
        try:
            return (path / MARKER).read_text(encoding="utf-8").strip()
        except FileNotFoundError:  # no marker, or the folder was just renamed away by a writer replacing it
            return None if path.is_dir() else ""
    with path.open("rb") as file:
        head = file.read(64)
    for kind, signature in TEXT_SIGNATURES.items():
        if head.startswith(signature):
            return kind
    if head.startswith(PARQUET_MAGIC):
        return _parquet_kind(path)
    if path.suffix == ".json":
        try:
            content = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            return None
        for kind, keys in JSON_SIGNATURES.items():
            if isinstance(content, dict) and keys <= content.keys():
                return kind
    return None


def _parquet_kind(path: Path) -> str | None:
    """The kind a parquet file that mmc wrote records in its schema metadata; None for any other parquet file."""

    try:
        kind = (pq.read_schema(path).metadata or {}).get(PARQUET_KIND_KEY)
    except (OSError, ValueError):  # not readable as parquet (pyarrow's errors derive from these)
        return None
    return kind.decode("utf-8", "replace") if kind else None


def _refuse_replacing(path: Path, kind: str) -> None:
    found = output_kind(path)
    if found is None:
        raise MMCError(f"'{path}' exists and was not written by mmc: refusing to replace it with a {kind} "
                       f"(move it away or choose another path)")
    if found and found != kind:
        raise MMCError(f"'{path}' holds an mmc {found}, not a {kind}: refusing to replace it")


def check_outputs(outputs: Sequence[tuple[str | Path, str]], inputs: Sequence[str | Path | None] = ()) -> None:
    """Refuse, before any work, output paths ((path, kind) pairs) that would destroy what mmc did not write, that
    are or hold an input, that coincide, or that cannot be written."""
    resolved = {output_path(path).resolve() for path, _ in outputs}
    if len(resolved) < len(outputs):
        raise MMCError(f"two outputs share one path: {', '.join(str(path) for path, _ in outputs)}")
    local_inputs = [(given, local_path(given)) for given in inputs if given is not None]
    for path, kind in outputs:
        path = output_path(path)
        where = path.resolve()
        if path.name in ("", ".", "..") or where == Path.cwd().resolve() or where == Path(where.anchor):
            raise MMCError(f"output path '{path}' names the current or a parent folder: give a new path")
        for given, source in local_inputs:
            if source is None:  # a remote input cannot be a local output
                continue
            try:
                source = source.resolve()
            except (RuntimeError, OSError):  # Python 3.11 raises RuntimeError for a symlink loop, 3.13 OSError
                raise MMCError(f"input '{given}' is a symbolic link that leads back to itself (a symlink loop): "
                               f"point it at a file or folder") from None
            if source == where or where in source.parents:
                raise MMCError(f"output '{path}' is {'the input' if source == where else 'a folder holding the input'} "
                               f"'{given}': give another output path")
        _refuse_replacing(path, kind)
        folder = path.parent
        while not folder.exists():
            folder = folder.parent
        try:
            tempfile.TemporaryFile(dir=folder).close()
        except OSError as error:
            raise MMCError(f"cannot write '{path}': {folder} is not writable ({error.strerror})") from None


def _clean_leftovers(path: Path) -> None:
    """Remove temporary and old siblings of `path` left by writers that died (their process is gone)."""
    for sibling in path.parent.glob(f".{glob.escape(path.name)}.*-*"):
        match = LEFTOVER.fullmatch(sibling.name)
        if match and match["name"] == path.name and not _alive(int(match["pid"] or 0)):
            _remove(sibling)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on a folder (flock on its descriptor): concurrent writers replace one path in turn."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


@contextmanager
def atomic_path(path: str | Path, kind: str | None) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; on success it replaces `path`, on failure it is removed.

    Readers never see a half-written output: the final rename is the only step that touches `path`. An existing
    `path` is replaced only when it is an mmc output of the same `kind` (a folder's marker, a file's content);
    folders get the marker. `kind=None` replaces whatever is there: only for a file the user asked to rewrite.
    Temporaries of writers that died are removed; concurrent writers replace `path` one after another.
    """
    path = output_path(path)
    if kind is not None and path.parent.is_dir():
        with _folder_lock(path.parent):  # not mid-way through another writer's two renames
            _refuse_replacing(path, kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clean_leftovers(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    old = path.with_name(f".{path.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        if kind is not None and tmp.is_dir():
            (tmp / MARKER).write_text(kind + "\n", encoding="utf-8")
        with _folder_lock(path.parent):
            if kind is not None:
                _refuse_replacing(path, kind)
            if path.exists() or path.is_symlink():
                os.replace(path, old)
            os.replace(tmp, path)
    except OSError as error:  # a full disk or a file-size limit: write() names no file, so name the output
        if error.filename is None:
            error.filename = str(path)
        raise
    finally:
        _remove(tmp)
        _remove(old)


def remove_output(path: str | Path, kind: str) -> None:
    """Remove `path` if it holds an mmc output of this `kind` (a progress file, a shard store once joined); never
    what someone else put there meanwhile."""
    path = Path(path)
    if output_kind(path) == kind:
        _remove(path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def partial_path(path: str | Path) -> Path:
    """Where a resumable computation of the output `path` keeps its progress: a sibling with a fixed name (not a
    temporary, so no writer removes it) that a rerun after a crash resumes from."""
    path = output_path(path)
    return path.with_name(f".{path.name}{PARTIAL_SUFFIX}")


class Partial:
    """Arrays saved atomically to `path` (a rename: never half-written), in a file that verifies itself.

    The file is a signature line, one JSON header line (the `identity` of the inputs the arrays belong to, any JSON
    value; each array's dtype and shape; a SHA-256 of the header and the arrays) and the arrays' bytes. `load`
    returns the arrays only for the same identity, with the `expected` dtypes and shapes, an intact checksum and
    values that `valid` accepts; anything else (another run's progress, a truncated or edited file) is discarded
    with a warning, and the work starts over. `save` writes at most once every `every` seconds, so that saving
    stays cheap beside the work it records, and never over a file that is not an mmc progress file.
    """

    def __init__(self, path: str | Path, identity: object, every: float,
                 expected: Mapping[str, tuple[np.dtype, tuple[int, ...]]]) -> None:
        self.path, self.every = Path(path), every
        self.identity = json.loads(json.dumps(identity, sort_keys=True))
        self.expected = {name: (np.dtype(dtype), tuple(shape)) for name, (dtype, shape) in expected.items()}
        self.saved_at = time.monotonic()

    def load(self, valid: Callable[[dict[str, np.ndarray]], bool] = lambda arrays: True
             ) -> dict[str, np.ndarray] | None:
        if not self.path.is_file():
            return None
        arrays, reason = self._read()
        if arrays is not None and not valid(arrays):
            arrays, reason = None, "it holds values no run writes (NaN or negative losses)"
        if arrays is None:
            warnings.warn(f"progress file '{self.path}' is discarded, {reason}: starting over", stacklevel=2)
        return arrays

    def _read(self) -> tuple[dict[str, np.ndarray] | None, str]:
        with self.path.open("rb") as file:
            data = file.read()
        signature, _, rest = data.partition(b"\n")
        header_line, _, payload = rest.partition(b"\n")
        if signature + b"\n" != PROGRESS_SIGNATURE:
            return None, "it is not an mmc progress file"
        try:
            header = json.loads(header_line)
            checksum, layout = header.pop("sha256"), header["arrays"]
        except (ValueError, KeyError, TypeError, AttributeError):
            return None, "its header is damaged"
        if hashlib.sha256(json.dumps(header, sort_keys=True).encode() + payload).hexdigest() != checksum:
            return None, "its checksum does not match its content (truncated or edited)"
        if header.get("identity") != self.identity:
            return None, "it holds the progress of a run with other inputs or options"
        expected = {name: [dtype.str, list(shape)] for name, (dtype, shape) in self.expected.items()}
        if {name: [entry["dtype"], entry["shape"]] for name, entry in layout.items()} != expected:
            return None, "its arrays have other dtypes or lengths than this run's"
        arrays, offset = {}, 0
        for name, (dtype, shape) in self.expected.items():
            size = dtype.itemsize * math.prod(shape)
            arrays[name] = np.frombuffer(payload, dtype, math.prod(shape), offset).reshape(shape).copy()
            offset += size
        return arrays, ""

    def save(self, arrays: Mapping[str, np.ndarray]) -> None:
        if time.monotonic() - self.saved_at < self.every:
            return
        arrays = {name: np.ascontiguousarray(arrays[name], dtype) for name, (dtype, _) in self.expected.items()}
        header = {"identity": self.identity,
                  "arrays": {name: {"dtype": array.dtype.str, "shape": list(array.shape)}
                             for name, array in arrays.items()}}
        payload = b"".join(array.tobytes() for array in arrays.values())
        checksum = hashlib.sha256(json.dumps(header, sort_keys=True).encode() + payload).hexdigest()
        with atomic_path(self.path, "progress file") as tmp, tmp.open("wb") as file:
            file.write(PROGRESS_SIGNATURE)
            file.write(json.dumps({**header, "sha256": checksum}, sort_keys=True).encode() + b"\n")
            file.write(payload)
        self.saved_at = time.monotonic()

    def remove(self) -> None:
        _remove(self.path)


def files_signature(path: str | Path) -> str:
    """A hash of the names, sizes and modification times of a file or of a folder's files: it changes when they
    are rewritten, without reading their content (model weights can be many GB)."""
    path = Path(path)
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    entries = [(str(file.relative_to(path)) if path.is_dir() else file.name, file.stat().st_size,
                file.stat().st_mtime_ns) for file in files if file.is_file()]
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]


@contextmanager
def streamed_pool(path: str | Path, scheduler: str | None) -> Iterator[xr.Dataset]:
    """The pool at `path` opened for a reader that streams it block by block, region by region through xarray's
    lazy indexing (no dask: importing dask.array and its scheduler is 0.3 s of a command's start): in this
    process, or, with a dask `scheduler`, on its workers (each reads and sums whole blocks; see `current_cluster`)."""
    if scheduler is None:
        yield check_pool(open_store(path, lazy=True), path)
        return
    local = local_path(path)  # the workers open it where they run: a relative path would be relative to them
    with dask_scheduler(scheduler):
        yield check_pool(open_store(local.absolute() if local else path, lazy=True), path)


def current_cluster() -> Client | None:
    """The dask.distributed client of an enclosing `dask_scheduler` (or any client made the default), else None.
    Readers that stream a pool send their blocks' work to its workers when there is one."""
    if "distributed" not in sys.modules:  # never imported here: no client can exist
        return None
    try:
        return sys.modules["distributed"].default_client()
    except ValueError:
        return None


@contextmanager
def dask_scheduler(address: str) -> Iterator[None]:
    """Run the dask computations and the streamed blocks of the `with` block on the dask.distributed scheduler at
    `address`. Workers read the stores themselves, so their paths must be reachable there."""
    # imported only when a cluster is asked for: it is slow to import
    from distributed import Client

    # Client's own timeout covers the TCP connection, not the handshake that follows: a server that accepts and
    # says nothing would hold it forever. So the whole connection runs in a thread, waited for DASK_CONNECT_SECONDS;
    # a client that connects after that is closed by its thread.
    seconds = DASK_CONNECT_SECONDS
    outcome: dict = {}
    lock = threading.Lock()

    def connect() -> None:
        try:
            client = Client(address, timeout=seconds)
        except BaseException as error:  # handed to the waiting thread
            with lock:
                outcome["error"] = error
            return
        with lock:
            late = outcome.setdefault("client", client) is not client
        if late:
            client.close()

    thread = threading.Thread(target=connect, name="mmc-dask-connect", daemon=True)
    thread.start()
    thread.join(seconds + 1)  # Client's own timeout, where it applies, ends first and says more
    with lock:
        if not outcome:
            outcome["client"] = None  # abandoned: a late client is closed by its thread
    error = outcome.get("error")
    if outcome.get("client") is None and error is None:
        raise MMCError(f"cannot connect to the dask scheduler at '{address}': no dask handshake within {seconds:g} s "
                       f"(is a dask scheduler listening there?)")
    if isinstance(error, (OSError, TimeoutError, ValueError)):
        raise MMCError(f"cannot connect to the dask scheduler at '{address}': {one_line(error)}") from None
    if error is not None:
        raise error
    with outcome["client"] as client:
        if not client.nthreads():  # work sent to it would wait for a worker forever
            raise MMCError(f"the dask scheduler at '{address}' has no workers: start some (`dask worker {address}`)")
        yield


def write_json(value: object, path: str | Path, kind: str) -> None:
    """`value` as indented JSON (strict: no NaN), written atomically."""
    text = json.dumps(value, indent=2, allow_nan=False) + "\n"
    with atomic_path(path, kind) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_tables(tables: Mapping[str, pd.DataFrame], folder: str | Path) -> None:
    """One CSV per table (`name.csv`, no index) in `folder`, which is replaced atomically."""
    with atomic_path(folder, "tables") as tmp:
        tmp.mkdir()
        for name, table in tables.items():
            table.to_csv(tmp / f"{name}.csv", index=False)


def loss_dataset(nll: np.ndarray, n_tokens: np.ndarray, n_bytes: np.ndarray, coords: dict, attrs: dict) -> xr.Dataset:
    """A loss store's content (per-sample nll in nats, n_tokens, n_bytes): from a scoring run, its shards or
    losses imported from elsewhere."""
    return xr.Dataset(
        {
            "nll": ("sample", nll.astype(np.float64), {"units": "nats", "long_name": "total negative log-likelihood"}),
            "n_tokens": ("sample", n_tokens),
            "n_bytes": ("sample", n_bytes),
        },
        coords=coords,
        attrs=attrs,
    )


def write_store(dataset: xr.Dataset, path: str | Path, kind: str) -> None:
    """Write `dataset` as a Zarr v3 store: one chunk per variable (a handful of files for DVC), or its dask
    chunks where a variable is dask-backed (written chunk by chunk, so memory holds one chunk at a time)."""
    dataset, encoding = _zarr_layout(dataset)
    with atomic_path(path, kind) as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        dataset.to_zarr(tmp, mode="w", zarr_format=3, consolidated=True, encoding=encoding)


def _zarr_layout(dataset: xr.Dataset) -> tuple[xr.Dataset, dict]:
    """`dataset` as `write_store` writes it (strings as variable-length strings) and its Zarr encoding: one chunk
    per variable, or its dask chunks; every chunk checksummed."""
    dataset = dataset.copy()
    for name, variable in dataset.variables.items():
        variable.encoding = {}
        if variable.dtype.kind in "UT":  # variable-length strings are portable in Zarr v3
            dataset[name] = variable.astype(object)
    encoding = {name: {"chunks": tuple(sizes[0] for sizes in variable.chunks) if variable.chunks else variable.shape,
                       "compressors": CHECKSUMMED}
                for name, variable in dataset.variables.items() if variable.ndim}
    return dataset, encoding


def string_values(array: xr.DataArray) -> np.ndarray:
    """A string coordinate as a plain numpy unicode array, whatever string dtype Zarr gave it."""
    return np.array(array.values.tolist(), dtype=str)


def open_store(path: str | Path, chunks: dict | None = None, drop_variables: Sequence[str] = (),
               lazy: bool = False) -> xr.Dataset:
    """Open a store written by `write_store`: read and verified (chunk checksums; `nll` finite and non-negative),
    or lazily when `chunks` is given (dask-backed) or `lazy` (no dask: xarray's lazy indexing reads the chunks of
    the region a reader indexes); readers that stream a lazy store check each block they read.
    `drop_variables` are not read at all (a coordinate's index is read whole on opening, even lazily).

    `path` is a local path or any fsspec URL (file://, s3://, ...; remote filesystems need their fsspec package).
    `encoding["source"]` names the store, so that a streaming reader can name it in its errors.
    """
    loaded = chunks is None and not lazy
    location = local_path(path) or str(path)
    options: dict = {}
    if not isinstance(location, Path):  # refused before any network access where it cannot work
        filesystem, root, options = remote_filesystem(location, f"store '{path}'")
    try:
        if isinstance(location, Path):
            filesystem, root = fsspec.core.url_to_fs(str(location))
        found = filesystem.exists(root), filesystem.isfile(f"{root}/zarr.json")
    except (ImportError, ValueError, OSError) as error:
        raise MMCError(f"store '{path}' cannot be reached: {one_line(error)}") from None
    if not found[0]:
        raise MMCError(f"store '{path}' does not exist")
    if not found[1]:
        raise MMCError(f"'{path}' is not a Zarr store written by mmc (it has no zarr.json)")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
            dataset = xr.open_zarr(location, consolidated=True, chunks=chunks, storage_options=options or None,
                                   drop_variables=list(drop_variables) or None)
            if loaded:
                dataset = dataset.load()
    except MMCError:
        raise
    except Exception as error:  # corrupt metadata or chunks: zarr, numcodecs and JSON raise many kinds
        raise MMCError(f"store '{path}' cannot be read, it is corrupt or truncated: {one_line(error)}") from None
    for name, variable in dataset.variables.items():
        if variable.dtype == object and loaded:
            dataset[name] = variable.astype(str)
    if loaded and "nll" in dataset:
        check_losses(dataset["nll"].values, f"store '{path}'")
    dataset.encoding["source"] = str(path)
    return dataset


def check_pool(dataset: xr.Dataset, path: str | Path) -> xr.Dataset:
    """`dataset` (opened from `path`) if it is a pool over (model, sample), else an MMCError saying what kind of
    store it is (a loss store, one shard of a scoring run, a merge sweep) and what was expected."""
    nll = dataset.variables.get("nll")
    if nll is not None and set(nll.dims) == {"model", "sample"}:
        return dataset
    if "window_nll" in dataset.variables or "shard" in dataset.attrs:
        kind = "one shard of a scoring run (`mmc losses --shard`; join the shards with `mmc combine-shards`)"
    elif "merge" in dataset.dims:
        kind = "a merge sweep store (`mmc merge-sweep`, read by `mmc fit-merge`)"
    elif nll is not None and tuple(nll.dims) == ("sample",):
        kind = "the loss store of one model (`mmc losses`; combine loss stores with `mmc assemble`)"
    else:
        kind = f"a store over {', '.join(map(str, dataset.dims)) or 'no dimension'} without nll over (model, sample)"
    raise MMCError(f"'{path}' is {kind}, not a pool: give the pool store over (model, sample) written by "
                   f"`mmc assemble`")


def check_losses(nll: np.ndarray, where: str) -> None:
    """Losses must be finite and non-negative: NaN, infinities or negative values end in one line naming `where`."""
    bad = ~np.isfinite(nll) | (nll < 0)
    if bad.any():
        raise MMCError(f"{where} has {int(bad.sum())} NaN, infinite or negative losses (first at position "
                       f"{np.argwhere(bad)[0].tolist()}): rescore it")


def one_line(error: BaseException) -> str:
    """An exception as one line: its type and its message's first line."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


SAMPLE_CHUNK = 65_536  # samples per chunk of the pool, stored and streamed: memory holds one chunk of all models
# models per chunk of the pool: one chunk of nll (MODEL_CHUNK x SAMPLE_CHUNK float64) is 64 MiB, the region that
# `write_pool` fills at a time; readers of a block of samples read every chunk of models in it
MODEL_CHUNK = 128
POOL_LOSSES = ("nll", "n_tokens")  # the pool's variables over (model, sample), written region by region


def assemble_pool(stores: Mapping[str, str | Path] | Sequence[str | Path]) -> xr.Dataset:
    """Combine loss stores into the pool dataset over (model, sample), lazily.

    `stores` maps model names to store paths, or lists paths, each named by its file name without `.zarr`.
    Names must be unique and hold no comma (ensembles are written as comma-joined names). Every store must
    have scored the same eval set: the same dataset fingerprint, the same sample ids in the same order. Model
    coords `family`, `data` (the training-data label), `n_params`, `n_params_nonembedding` and `source` (the model
    scored) come from each store's attrs; sample coords `domain` and `n_bytes` from the first store. `nll` and
    `n_tokens` are dask-backed, read from the stores when computed, in chunks of MODEL_CHUNK models x SAMPLE_CHUNK
    samples; the model and sample coords are chunked alike, so every variable is stored (and read back) in the same
    chunks along each dimension. Each store is read whole once, one at a time, to verify it; memory then holds the
    first store's sample coords, not the losses.
    """
    return _assemble(stores)[0]


def _assemble(stores: Mapping[str, str | Path] | Sequence[str | Path]) -> tuple[xr.Dataset, list[xr.Dataset]]:
    """The lazy pool of `assemble_pool` and each store opened lazily (`nll`, `n_tokens`), in the pool's model order."""
    if isinstance(stores, Mapping):
        names, paths = [str(name) for name in stores], list(stores.values())
    else:
        paths = list(stores)
        names = [Path(path).name.removesuffix(".zarr") for path in paths]
    if not paths:
        raise MMCError("the pool is empty: give at least one loss store")
    repeated = sorted(name for name, count in Counter(names).items() if count > 1)
    if repeated:
        raise MMCError(f"model names must be unique in a pool: {', '.join(repeated)} given more than once "
                       f"(a store is named by its file name without .zarr)")
    malformed = [repr(name) for name in names if not name or "," in name]
    if malformed:
        raise MMCError(f"model names must be non-empty and hold no comma: {', '.join(malformed)}")
    first_name, first = names[0], None
    problems: list[str] = []
    by_fingerprint: dict[str, list[str]] = {}
    attrs: list[dict] = []
    other_samples: str | None = None  # the first store whose samples differ from the first store's
    for name, path in tqdm(list(zip(names, paths)), desc="checking loss stores", unit="store", disable=None):
        dataset = open_store(path)  # read whole, one store at a time: checksums and losses verified
        attrs.append(dataset.attrs)
        by_fingerprint.setdefault(str(dataset.attrs.get("dataset_fingerprint", "no fingerprint")), []).append(name)
        if "window_nll" in dataset.variables:
            problems.append(f"loss store '{path}' ({name}) is one shard of a scoring run: join the shards first with "
                            f"`mmc combine-shards OUT SHARD...`")
            continue
        missing = [key for key in ("n_params", "n_params_nonembedding") if key not in dataset.attrs]
        missing += [var for var in ("nll", "n_tokens", "n_bytes") if var not in dataset.variables]
        if missing:
            problems.append(f"loss store '{path}' ({name}) lacks {', '.join(missing)}: not written by `mmc losses`")
            continue
        if first is None:
            first = dataset
        elif other_samples is None and not dataset.indexes["sample"].equals(first.indexes["sample"]):
            extra = dataset.indexes["sample"].difference(first.indexes["sample"])
            if len(extra):
                reason = f"{len(extra)} sample ids of {name} are not in {first_name}"
            elif dataset.sizes["sample"] != first.sizes["sample"]:
                reason = f"{dataset.sizes['sample']} vs {first.sizes['sample']} samples"
            else:
                reason = "the same ids in another order"
            other_samples = (f"loss stores {first_name} and {name} hold different samples despite one fingerprint "
                             f"({reason})")
    if problems:
        raise MMCError(problems[0])
    if len(by_fingerprint) > 1:
        groups = "; ".join(f"{', '.join(group)} scored {fingerprint}" for fingerprint, group in by_fingerprint.items())
        raise MMCError(f"loss stores scored different eval sets: {groups}; rerun their losses stages on one dataset")
    if other_samples is not None:
        raise MMCError(other_samples)
    # opened again lazily, without the sample ids: an index is read whole on opening, and one per store adds up
    sources = [open_store(path, chunks={}, drop_variables=("sample",))[list(POOL_LOSSES)].reset_coords(drop=True)
               for path in paths]
    chunks = {"model": MODEL_CHUNK, "sample": SAMPLE_CHUNK}
    # the coords in the chunks of nll along their dimension: a coord in one chunk beside nll in several makes the
    # pool's chunks inconsistent, which xarray refuses (DataArray.chunksizes) once the pool has over one chunk.
    # Strings as variable-length strings (numpy's object dtype tagged str, as xarray reads them), which Zarr writes
    # chunk by chunk, without loading the whole coord to infer a dtype.
    vlen_str = np.dtype(object, metadata={"element_type": str})

    def chunked(variable: xr.Variable) -> xr.Variable:
        return (variable.astype(vlen_str) if variable.dtype.kind in "OUT" else variable).chunk(
            {dim: chunks[dim] for dim in variable.dims})

    model_coords = {"family": [str(store.get("family", "")) for store in attrs],
                    "data": [str(store.get("data", "")) for store in attrs],
                    "n_params": [int(store["n_params"]) for store in attrs],
                    "n_params_nonembedding": [int(store["n_params_nonembedding"]) for store in attrs],
                    "source": [str(store.get("model", "")) for store in attrs]}
    pool = xr.Dataset(
        {var: xr.concat([source[var] for source in sources], dim="model").chunk(chunks) for var in POOL_LOSSES},
        coords={
            "model": names,
            "sample": first["sample"].variable,
            **{name: chunked(xr.Variable("model", values)) for name, values in model_coords.items()},
            **{name: chunked(first[name].variable) for name in ("domain", "n_bytes") if name in first.variables},
        },
        attrs={"dataset_fingerprint": next(iter(by_fingerprint))},
    )
    return pool, sources


def write_pool(stores: Mapping[str, str | Path] | Sequence[str | Path], out: str | Path) -> xr.Dataset:
    """The assemble stage: `assemble_pool(stores)` written as the pool store `out`, atomically.

    The coords and metadata are written first, then `nll` and `n_tokens` one chunk of the pool (MODEL_CHUNK models x
    SAMPLE_CHUNK samples) at a time, each read from its stores: memory holds one such region of each variable, not
    the pool, so a thousand models of a hundred thousand samples assemble in well under 2 GB."""
    stores = stores if isinstance(stores, Mapping) else list(stores)
    check_outputs([(out, "pool")], list(stores.values()) if isinstance(stores, Mapping) else stores)
    pool, sources = _assemble(stores)
    dataset, encoding = _zarr_layout(pool)
    # everything but the losses in memory (the coords: small), so that the first write stores all of it
    skeleton = dataset.assign_coords({name: dataset[name].variable.compute() for name in dataset.coords
                                      if dataset[name].chunks})
    n_models, n_samples = pool.sizes["model"], pool.sizes["sample"]
    regions = [(slice(model_start, min(model_start + MODEL_CHUNK, n_models)),
                slice(sample_start, min(sample_start + SAMPLE_CHUNK, n_samples)))
               for model_start in range(0, n_models, MODEL_CHUNK) for sample_start in range(0, n_samples, SAMPLE_CHUNK)]
    with atomic_path(out, "pool") as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        skeleton.to_zarr(tmp, mode="w", zarr_format=3, consolidated=True, encoding=encoding, compute=False)
        arrays = {var: zarr.open_array(tmp / var, mode="r+", zarr_format=3) for var in POOL_LOSSES}
        for models, samples in tqdm(regions, desc="writing pool", unit="region", disable=None):
            for var, array in arrays.items():
                region = np.empty((models.stop - models.start, samples.stop - samples.start), array.dtype)
                for row, source in enumerate(sources[models]):
                    region[row] = source[var].data[samples].compute()
                array[models, samples] = region  # aligned with the pool's chunks: each chunk written once, whole
    return pool
