"""Every relative link in README.md and docs/*.md resolves: the file exists and an #anchor names a heading
(GitHub's anchors: lower case, punctuation dropped, spaces -> '-', repeats numbered)."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PAGES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]


def slug(heading: str) -> str:
    text = heading.strip().lower().replace("`", "").replace("*", "")
    return "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN").replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    found, in_code = set(), False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        match = re.match(r"(#{1,6}) (.*)", line)
        if match and not in_code:
            name = slug(match.group(2))
            found.add(name if name not in seen else f"{name}-{seen[name]}")
            seen[name] = seen.get(name, 0) + 1
    return found


def test_every_relative_link_resolves():
    errors, count = [], 0
    for page in PAGES:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            count += 1
            file, _, anchor = target.partition("#")
            destination = (page.parent / file).resolve() if file else page
            if not destination.exists():
                errors.append(f"{page.name}: {target}: no such file")
            elif anchor and destination.suffix == ".md" and anchor not in anchors(destination):
                errors.append(f"{page.name}: {target}: no heading #{anchor}")
    assert count > 50 and not errors, errors


def test_readme_stays_short():
    assert len((REPO_ROOT / "README.md").read_text().splitlines()) <= 150
