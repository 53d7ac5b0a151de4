"""Every DVC stage depends on exactly the code it runs: editing a module makes `dvc status` name exactly the
stages whose script imports it (directly or through other mmc modules), and no other."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from dvc.repo import Repo

from conftest import ROOT, make_project, sh



def imported_files(path: Path, root: Path) -> set[str]:
    """The project files (mmc modules, stages/common.py) that the file at `path` imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module == "common":
            found.add("stages/common.py")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "mmc":
            found.add("mmc/__init__.py")
            if node.module != "mmc":
                found.add(node.module.replace(".", "/") + ".py")
            found |= {f"mmc/{alias.name}.py" for alias in node.names
                      if node.module == "mmc" and (root / "mmc" / f"{alias.name}.py").exists()}
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "mmc":
                    found |= {"mmc/__init__.py", alias.name.replace(".", "/") + ".py"} - {"mmc.py"}
    return found


def import_closure(script: Path, root: Path) -> set[str]:
    seen: set[str] = set()
    todo = [script]
    while todo:
        for name in imported_files(todo.pop(), root) - seen:
            seen.add(name)
            todo.append(root / name)
    return seen


def fake_outputs(repo: Path) -> None:
    """A placeholder for every stage output (and every path inside one that a stage reads), so that `dvc commit`
    can record a lock without running anything."""
    stages = Repo(str(repo)).index.stages
    for path in [Path(out.fs_path) for stage in stages for out in stage.outs] + \
            [Path(dep.fs_path) for stage in stages for dep in stage.deps if not Path(dep.fs_path).exists()]:
        if path.suffix in (".json", ".csv"):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("{}\n" if path.suffix == ".json" else "x\n")
        else:
            path.mkdir(parents=True, exist_ok=True)
            (path / "placeholder").write_text(path.name)


@pytest.mark.slow
def test_editing_a_module_reruns_exactly_the_stages_that_run_it(tmp_path):
    repo = make_project(tmp_path / "repo", ROOT / "presets" / "tiny.yaml")
    fake_outputs(repo)
    sh(repo, "dvc", "commit", "--force", "--quiet")
    assert "up to date" in sh(repo, "dvc", "status")
    stage_names = [line.split()[0] for line in sh(repo, "dvc", "stage", "list").splitlines() if line.strip()]
    runs = {name: import_closure(repo / "stages" / f"{name.split('@')[0]}.py", repo) for name in stage_names}
    edited = sorted(str(path.relative_to(repo)) for path in (repo / "mmc").glob("*.py")) + ["stages/common.py"]
    assert {"mmc/cli.py", "mmc/presets.py", "mmc/losses.py", "mmc/merging.py"} <= set(edited)
    for name in edited:
        path = repo / name
        original = path.read_text(encoding="utf-8")
        path.write_text(original + "\n# an edit\n", encoding="utf-8")
        changed = sorted(json.loads(sh(repo, "dvc", "status", "--json")))
        path.write_text(original, encoding="utf-8")
        expected = sorted(stage for stage, files in runs.items() if name in files)
        assert changed == expected, f"editing {name}"
    assert "up to date" in sh(repo, "dvc", "status")
