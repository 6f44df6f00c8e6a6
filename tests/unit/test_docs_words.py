"""The user docs speak of the projects users migrate from by name, never by our internal labels."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_no_internal_seed_labels_in_the_docs() -> None:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    found = [
        f"{page.relative_to(ROOT)}:{n}: {line.strip()}"
        for page in pages
        for n, line in enumerate(page.read_text().splitlines(), 1)
        # The `<!-- example: 003/... -->` markers are for the docs' tests and never shown.
        if re.search(r"\bseeds? \d{3}\b", line, re.IGNORECASE) and "<!--" not in line
    ]
    assert not found, "\n".join(found)
