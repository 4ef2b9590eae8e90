"""Numbers the docs quote from bench/results/*.json cannot drift from them.

docs/hooks/bench_results.py holds the conventions: tables made from the JSON at build
time (``<!-- bench: NAME -->``), numbers quoted in prose followed by a marker naming
them (``1.42x<!-- =NAME -->``), and tables copied into README.md, which mkdocs does not
build (``<!-- bench-copy: NAME -->``). The site's build checks the pages; this test
checks README.md and every page without building, and that the checks bite.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _hook():
    spec = importlib.util.spec_from_file_location(
        "bench_results", REPO / "docs" / "hooks" / "bench_results.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hook = _hook()


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_quoted_numbers_equal_their_json(path: Path) -> None:
    problems = hook.mismatches(path.read_text())
    assert not problems, f"{path.name}:\n" + "\n".join(problems)


def test_every_marker_names_a_number_or_table() -> None:
    for path in FILES:
        text = path.read_text()
        for match in hook.NUMBER.finditer(text):
            assert match.group("name") in hook.NUMBERS, f"{path.name}: {match.group()}"
        for match in (*hook.MARKER.finditer(text), *hook.COPY.finditer(text)):
            assert match.group("name") in hook.TABLES, f"{path.name}: {match.group()}"
        stray = re.findall(r"<!-- bench-copy: [\w-]+ -->(?!\n\n\|)", text)
        assert not stray, f"{path.name}: a bench-copy marker without its table: {stray}"


def test_the_pages_tables_of_results_are_generated() -> None:
    """benchmarks.md and when_global_pays.md write no table by hand: the tables that
    quote results come from the JSON (when_global_pays' rule table quotes ranges and
    carries markers in the prose instead)."""
    bench = (REPO / "docs" / "benchmarks.md").read_text()
    assert not re.findall(r"^\|.*\|$", bench, re.M), "benchmarks.md has a hand-written table"
    for name in ("throughput", "selection", "quality-final", "quality-cost", "roi-quality"):
        assert f"<!-- bench: {name} -->" in bench
    pays = (REPO / "docs" / "when_global_pays.md").read_text()
    for name in ("budget-headline", "budget-load", "budget-more-seeds-digits"):
        assert f"<!-- bench: {name} -->" in pays


def test_readme_benchmarks_section_quotes_only_checked_numbers() -> None:
    readme = (REPO / "README.md").read_text()
    section = re.search(r"^## Benchmarks\n(.*?)(?=^## )", readme, re.M | re.S).group(1)
    assert "<!-- bench-copy: throughput-short -->" in section
    # every figure with a x, ms or KB unit, or a date, is followed by its marker
    for match in re.finditer(r"\d(?:[\d.,]*\d)?(?:\u00d7| ms| KB)|\b2026-\d\d-\d\d\b", section):
        rest = section[match.end() :]
        in_table = section[: match.start()].rsplit("\n", 1)[-1].startswith("|")
        if in_table or rest.startswith("<!--"):
            continue
        if re.match(r"[\u2013-]", rest) or re.match(r"\d", rest):
            continue  # the first number of a range: its marker follows the range
        line = section[: match.end()].rsplit("\n", 1)[-1]
        assert match.group() in ALLOWED_UNMARKED, f"README: unmarked figure {line!r}"


#: Figures the README quotes from measurements without a results JSON
#: (bench/host_syncs.py prints its counts; it writes no results file).
ALLOWED_UNMARKED = {"2026-12-04", "2026-12-07"}


def test_a_changed_number_fails_the_check() -> None:
    text = "two-pass: 2.01\u00d7<!-- =throughput.w1.1_4 -->"
    assert not hook.mismatches(text)
    assert hook.mismatches(text.replace("2.01\u00d7", "2.02\u00d7"))
    assert hook.mismatches(text.replace("2.01\u00d7", "12.01\u00d7"))
    table = hook.TABLES["throughput-short"]()
    copy = f"<!-- bench-copy: throughput-short -->\n\n{table}\n"
    assert not hook.mismatches(copy)
    assert hook.mismatches(copy.replace("1.56\u00d7", "1.57\u00d7"))


def test_the_build_strips_markers_and_fills_tables() -> None:
    page = "a 25.8 ms<!-- =selection.dense_ms --> call\n\n<!-- bench: selection -->\n"
    out = hook.on_page_markdown(page, page=None)
    assert "<!--" not in out and "25.8 ms call" in out and "| case | measured |" in out
    with pytest.raises(ValueError, match=r"selection\.dense_ms"):
        hook.on_page_markdown(page.replace("25.8", "25.9"), page=None)
