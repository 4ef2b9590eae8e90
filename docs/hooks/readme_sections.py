"""mkdocs hook: sections of README.md, shown on a page of the site.

``<!-- readme: Quick start -->`` in a page becomes the body of README.md's
``## Quick start`` section (without its heading), its links to ``docs/`` pages made
relative to the site. The README's examples are run by tests/test_docs_examples.py
where they are written; the site shows the same text, so the two cannot differ.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MARKER = re.compile(r"<!-- readme: (?P<title>[^>]+?) -->")


def section(title: str, repo_url: str, readme: str | None = None) -> str:
    """The body of README.md's ``## title`` section."""
    text = readme if readme is not None else (REPO / "README.md").read_text()
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    if match is None:
        raise ValueError(f"README.md has no section '## {title}'")
    body = match.group(1).strip("\n")
    body = re.sub(r"\]\(docs/", "](", body)  # a docs/ page, from the site's top

    def link(match: re.Match[str]) -> str:
        """A link to a repository file outside docs/ points to it in the repository."""
        target = match.group(1)
        if (REPO / "docs" / target.split("#")[0]).exists():
            return match.group(0)
        return f"]({repo_url.rstrip('/')}/blob/main/{target})"

    return re.sub(r"\]\((?!https?://|#)([^)]+)\)", link, body)


def on_page_markdown(markdown: str, config: dict, **kwargs: object) -> str:
    """mkdocs event: replace each marker with its README section."""
    return MARKER.sub(lambda m: section(m.group("title"), config["repo_url"]), markdown)
