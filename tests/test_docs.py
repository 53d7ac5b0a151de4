"""The documentation cannot rot: every internal link of README.md and docs/ resolves (files and #anchors), and the
generated references (docs/reference/cli.md, docs/reference/params.md) are checked beside the code they describe
(tests/test_cli.py, tests/test_params.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import ROOT

PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")  # [text](target), not images' ![alt](src) (checked below)
IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)


def slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it: lowercase, punctuation dropped, spaces to '-'."""
    text = re.sub(r"[`*_~]|\[([^\]]*)\]\([^)]*\)", lambda match: match.group(1) or "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    found, seen = set(), {}
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", text, re.M):
        base = slug(heading)
        count = seen.get(base, 0)
        found.add(base if count == 0 else f"{base}-{count}")
        seen[base] = count + 1
    return found


def links(page: Path) -> list[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return LINK.findall(text) + IMAGE.findall(text)


@pytest.mark.parametrize("page", PAGES, ids=[str(page.relative_to(ROOT)) for page in PAGES])
def test_every_internal_link_resolves(page):
    broken = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:: not checked offline
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading with anchor #{anchor}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_every_docs_page_is_reachable_from_the_index():
    index = ROOT / "docs" / "index.md"
    reached, todo = {index}, [index]
    while todo:
        page = todo.pop()
        for target in links(page):
            path = target.partition("#")[0]
            if path.endswith(".md") and not re.match(r"^[a-z]+:", path):
                found = (page.parent / path).resolve()
                if found.exists() and found not in reached:
                    reached.add(found)
                    todo.append(found)
    unreached = sorted(str(page.relative_to(ROOT)) for page in (ROOT / "docs").rglob("*.md") if page.resolve()
                       not in reached)
    assert not unreached, f"pages no link reaches from docs/index.md: {unreached}"


def test_the_checker_catches_a_broken_link_and_a_missing_anchor(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n## A `code` heading, with punctuation!\n\n[ok](#a-code-heading-with-punctuation) "
                    "[gone](other.md) [bad](#nowhere)\n\n```\n[in a fence](ignored.md)\n```\n")
    assert anchors(page) == {"title", "a-code-heading-with-punctuation"}
    assert links(page) == ["#a-code-heading-with-punctuation", "other.md", "#nowhere"]
