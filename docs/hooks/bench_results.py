"""mkdocs hook: the benchmarks' figures and tables, from bench/results/ at every build.

- Every ``bench/results/*.png`` is published as ``results/NAME.png``, so a page embeds
  it with ``![...](results/NAME.png)``: the figure shown is the one the benchmark wrote.
- ``<!-- bench: NAME -->`` in a page becomes the table ``TABLES[NAME]`` makes from the
  results JSON. The numbers cannot drift from the measurements: they are read from
  them, as the config reference is read from ``launch/config.py``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

from mkdocs.structure.files import File, Files

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "bench" / "results"
MARKER = re.compile(r"<!-- bench: (?P<name>[\w-]+) -->")
SHARDS = ("iid", "skewed", "sources")
TASKS = ("digits", "detection")
HEADLINE = {"digits": "tail_acc", "detection": "ap"}
#: A headline difference shown in bold: global ahead in every seed, by this much on average.
BOLD_FROM = 0.03


def load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def _signed(value: float) -> str:
    return f"{value:+.3f}".replace("-", "\N{MINUS SIGN}")


def _budget_rows() -> tuple[dict, list[tuple[int, int]]]:
    rows = {(r["task"], r["world_size"], r["per_rank"], r["shard"]): r for r in _budget()}
    grid = sorted({(w, n) for _, w, n, _ in rows})
    return rows, grid


def _budget() -> list[dict]:
    return load("budget.json")["rows"]


def _columns() -> str:
    names = [f"{task} {shard}" for task in TASKS for shard in SHARDS]
    return "| " + " | ".join(names) + " |", "|---" * len(names) + "|"


def budget_headline() -> str:
    """Headline global minus local per cell: mean ± std (seeds where global was ahead / n)."""
    rows, grid = _budget_rows()
    names, rule = _columns()
    lines = [f"| W | n | budget keep·n {names}", f"|---|---|---{rule}"]
    for w, n in grid:
        cells = []
        for task in TASKS:
            for shard in SHARDS:
                row = rows[(task, w, n, shard)]
                diff = row["global_minus_local"][HEADLINE[task]]
                text = f"{_signed(diff['mean'])} ± {diff['std']:.3f} ({diff['ahead']}/{diff['n']})"
                if diff["ahead"] == diff["n"] and diff["mean"] >= BOLD_FROM:
                    text = f"**{text}**"
                cells.append(text)
        budget = rows[(TASKS[0], w, n, SHARDS[0])]["budget"]
        lines.append(f"| {w} | {n} | {budget} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def budget_load() -> str:
    """The hardest rank's mean hard examples per step, over its budget keep·n."""
    rows, grid = _budget_rows()
    names, rule = _columns()
    lines = [f"| W | n {names}", f"|---|---{rule}"]
    for w, n in grid:
        cells = [
            f"{rows[(t, w, n, s)]['hard_on_fullest_rank'] / rows[(t, w, n, s)]['budget']:.2f}"
            for t in TASKS
            for s in SHARDS
        ]
        lines.append(f"| {w} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


TABLES: dict[str, Callable[[], str]] = {
    "budget-headline": budget_headline,
    "budget-load": budget_load,
}


def on_files(files: Files, config: dict, **kwargs: object) -> Files:
    """mkdocs event: publish the results' figures under results/."""
    for png in sorted(RESULTS.glob("*.png")):
        files.append(
            File(
                f"results/{png.name}",
                src_dir=str(RESULTS.parent),
                dest_dir=config["site_dir"],
                use_directory_urls=config["use_directory_urls"],
            )
        )
    return files


def on_page_markdown(markdown: str, **kwargs: object) -> str:
    """mkdocs event: replace each marker with its table."""
    return MARKER.sub(lambda m: TABLES[m.group("name")](), markdown)
