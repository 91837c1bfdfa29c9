"""The docs stand on their own: no link or path pointing outside the repository."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_docs_point_only_inside_the_repository():
    outside = []
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for number, line in enumerate(page.read_text().splitlines(), 1):
            for target in re.findall(r"\]\(([^)\s]+)\)", line):
                if "://" in target or target.startswith(("#", "mailto:")):
                    continue
                if not (page.parent / target.split("#")[0]).resolve().is_relative_to(REPO):
                    outside.append(f"{page.name}:{number}: {target}")
            if re.search(r"(?<![\w.])(\.\./)+shared/|\bshared/CONTRACT\.md", line):
                outside.append(f"{page.name}:{number}: {line.strip()}")
    assert not outside, outside
