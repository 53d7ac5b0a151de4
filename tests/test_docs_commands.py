"""The how-to guides' commands run as written: every ```bash block of docs/how-to/ that needs no GPU and no
network (no `# needs:` on its first line) runs in a small project (the project's files, a tiny model at
data/zoo/gpt2-s, an eval set, loss stores and a pool), unless it is listed in ELSEWHERE with the test that runs
the same commands on the same kind of input."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

from conftest import EVAL_TEXTS, ROOT, TRAIN_TEXTS, make_project
from mmc.corpus import write_corpus
from mmc.losses import write_losses
from mmc.store import write_pool

BLOCK = re.compile(r"^( *)```bash\n(.*?)^\1```", re.S | re.M)

# (page, block index among the page's bash blocks): where the same commands run instead, and why not here
ELSEWHERE = {
    ("experiments-and-remotes.md", 2): "dvc exp run needs a reproduced pipeline: tests/test_pipeline_laws.py",
    ("import-losses.md", 0): "placeholder file names: block 1 runs the same commands on a real lm-eval output",
    ("local-models.md", 0): "a whole local study (dvc repro): tests/test_own_pool.py runs presets/local.yaml's shape",
    ("local-models.md", 1): "a whole local study (dvc repro): tests/test_own_pool.py runs presets/local.yaml's shape",
    ("local-models.md", 3): "the SmolLM2 conversion (minutes): tests/test_real_model.py runs convert_gguf on it",
    ("local-models.md", 4): "installs packages and runs the real preset (minutes): tests/test_real_model.py",
}


def offline_blocks() -> list[tuple[str, int, str]]:
    found = []
    for page in sorted((ROOT / "docs" / "how-to").glob("*.md")):
        for index, match in enumerate(BLOCK.finditer(page.read_text(encoding="utf-8"))):
            block = "\n".join(line.removeprefix(match.group(1)) for line in match.group(2).splitlines())
            if not block.lstrip().startswith("# needs:"):
                found.append((page.name, index, block))
    return found


BLOCKS = offline_blocks()


@pytest.fixture(scope="module")
def project(tmp_path_factory, gpt2_dir, llama_dir) -> Path:
    """The project with what the guides assume a user has: a zoo model, the corpus, loss stores and the pool."""
    repo = make_project(tmp_path_factory.mktemp("docs") / "repo")
    (repo / "docs" / "reference").mkdir(parents=True)
    shutil.copytree(gpt2_dir, repo / "data" / "zoo" / "gpt2-s")
    shutil.copytree(llama_dir, repo / "data" / "zoo" / "llama-s")
    ids = {split: [f"{split}{i:03d}" for i in range(len(texts))]
           for split, texts in (("train", TRAIN_TEXTS), ("eval", EVAL_TEXTS))}
    write_corpus(datasets.DatasetDict({split: datasets.Dataset.from_dict({
        "sample_id": ids[split], "text": texts, "domain": ["code"] * len(texts),
        "n_bytes": [len(text.encode("utf-8")) for text in texts]})
        for split, texts in (("train", TRAIN_TEXTS), ("eval", EVAL_TEXTS))}), repo / "data" / "corpus", {"test": True})
    for name in ("gpt2-s", "llama-s"):
        write_losses(str(repo / "data" / "zoo" / name), repo / "data" / "corpus", repo / "data" / "losses" / f"{name}.zarr",
                     device="cpu", dtype="float32")
    write_pool({name: repo / "data" / "losses" / f"{name}.zarr" for name in ("gpt2-s", "llama-s")},
               repo / "data" / "pool.zarr")
    (repo / "models").mkdir()
    (repo / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF")  # `mmc pool add` reads no weights
    return repo


@pytest.mark.slow
@pytest.mark.parametrize("page, index, block", BLOCKS, ids=[f"{page}#{index}" for page, index, _ in BLOCKS])
def test_a_how_to_block_runs_as_written(project, page, index, block):
    if (page, index) in ELSEWHERE:
        pytest.skip(ELSEWHERE[(page, index)])
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                   "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    work = project.parent / f"{page.removesuffix('.md')}-{index}"
    shutil.copytree(project, work, symlinks=True)
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=work, capture_output=True, text=True,
                            env=environment, timeout=600)
    assert result.returncode == 0, f"{page} block {index} failed:\n{block}\n{result.stdout}\n{result.stderr}"


def test_every_skipped_block_still_exists():
    present = {(page, index) for page, index, _ in BLOCKS}
    assert set(ELSEWHERE) <= present, sorted(set(ELSEWHERE) - present)
