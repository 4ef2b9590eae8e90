"""mkdocs hook: the config reference in docs/launchers.md, generated from ``Config``.

``<!-- config-reference -->`` in a page becomes a table of every key of
``launch.config.Config``: its type, default and meaning (the key's comment in
launch/config.py, as ``launch/train.py --help`` prints it). The docs cannot drift from
the code: the table is made from it at every build.
"""

from __future__ import annotations

import sys
from pathlib import Path

MARKER = "<!-- config-reference -->"
REPO = Path(__file__).resolve().parents[2]


def config_table() -> str:
    """The Markdown table of every config key."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from launch.config import config_reference

    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, default, kind, meaning in config_reference():
        cell = meaning.replace("|", "\\|")
        rows.append(f"| `{key}` | {kind} | `{default}` | {cell} |")
    return "\n".join(rows)


def on_page_markdown(markdown: str, **kwargs: object) -> str:
    """mkdocs event: replace the marker with the table."""
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, config_table())
