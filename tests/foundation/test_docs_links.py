"""Every relative link and every backticked repository path in the top-level READMEs and docs/ leads to a
file that exists in the clone, and no README cites a design outside it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", ROOT / "exports" / "README.md", ROOT / "benchmarks" / "README.md",
        *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve_inside_the_clone(doc):
    text = doc.read_text()
    assert "../shared/" not in text, f"{doc.name} cites a file outside the repository"
    for target in LINK.findall(text):
        if re.match(r"[a-z]+://", target):
            continue
        path = (doc.parent / target).resolve()
        assert path.exists(), f"{doc.relative_to(ROOT)} links to {target}, which does not exist"
        assert ROOT in path.parents or path == ROOT, f"{doc.relative_to(ROOT)} links outside the clone: {target}"
