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
    for name in ("budget-headline", "budget-load", "budget-more-seeds-digits", "roi-diagnosis"):
        assert f"<!-- bench: {name} -->" in pays
    headers = re.findall(r"(?:^|\n)[^|\n][^\n]*\n+(\|[^\n]*\|)\n\|---", pays)
    assert headers == [RULE_TABLE], f"when_global_pays.md has a hand-written table: {headers}"


#: The one table of when_global_pays.md written by hand: it quotes ranges, marked.
RULE_TABLE = (
    "| your setup | *p* / keep | per-rank budget keep·n | use | measured global \u2212 local |"
)


FIGURE = re.compile(r"\d(?:[\d.,]*\d)?(?:\u00d7| ms| KB)|\b2026-\d\d-\d\d\b")


def _unmarked(text: str) -> list[tuple[str, str]]:
    """Each figure with a x, ms or KB unit, or a date, not followed by its marker
    (outside tables and code blocks): (figure, its line)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    # drop each checked figure with its marker (a figure may hold several numbers)
    kept, end = [], 0
    for match in hook.NUMBER.finditer(text):
        want = hook.number(match.group("name"))
        start = match.start() - len(want) if text[: match.start()].endswith(want) else None
        kept.append(text[end : match.start() if start is None else start])
        end = match.end()
    text = "".join(kept) + text[end:]
    out = []
    for match in FIGURE.finditer(text):
        rest = text[match.end() :]
        line_start = text[: match.start()].rsplit("\n", 1)[-1]
        if line_start.startswith("|") or rest.startswith("<!--"):
            continue
        if re.match(r"[\u2013-]", rest) or re.match(r"\d", rest):
            continue  # the first number of a range: its marker follows the range
        out.append((match.group(), line_start + match.group()))
    return out


def test_readme_benchmarks_section_quotes_only_checked_numbers() -> None:
    readme = (REPO / "README.md").read_text()
    section = re.search(r"^## Benchmarks\n(.*?)(?=^## )", readme, re.M | re.S).group(1)
    assert "<!-- bench-copy: throughput-short -->" in section
    for figure, line in _unmarked(section):
        assert figure in ALLOWED_UNMARKED["README.md"], f"README: unmarked figure {line!r}"


@pytest.mark.parametrize("name", ["benchmarks.md", "when_global_pays.md"])
def test_results_pages_quote_only_checked_numbers(name: str) -> None:
    for figure, line in _unmarked((REPO / "docs" / name).read_text()):
        assert figure in ALLOWED_UNMARKED[name], f"{name}: unmarked figure {line!r}"


#: Figures quoted without a results JSON to check them against, each with its reason.
ALLOWED_UNMARKED: dict[str, dict[str, str]] = {
    "README.md": {
        "2026-12-04": "bench/host_syncs.py prints its counts; it writes no results file",
        "2026-12-07": "bench/host_syncs.py prints its counts; it writes no results file",
    },
    "benchmarks.md": {
        "0.1 ms": "the selector's host work on a quiet core: selection.json has no quiet run",
        "4\u00d7": "3-4x that host work on shared cores: an estimate, not a recorded ratio",
        "9.4\u00d7": "the radix selection, timed before it became bracket's fallback; no JSON",
    },
    "when_global_pays.md": {
        "2\u00d7": "the rule's threshold on p / keep, not a measurement",
    },
}


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


def test_the_diagnosis_table_pairs_the_runs_as_the_benchmark_did() -> None:
    """The RoI diagnosis table pairs the runs by seed itself (for the halves of the seeds
    and for per-image weighting against global); on the whole seed set it must give the
    benchmark's own summaries."""
    for row in hook.load("roi_skewed_diagnosis.json")["rows"]:
        for variant, values in row["variants"].items():
            if variant == "local":
                continue
            got = hook._stat(hook._diag_diffs(variant, "local", row["lr_factor"], row["test"]))
            want = values["minus_local"]
            assert got["n"] == want["n"] and got["ahead"] == want["ahead"]
            assert got["mean"] == pytest.approx(want["mean"], abs=1e-12)
            assert got["std"] == pytest.approx(want["std"], abs=1e-12)


def test_the_words_around_the_numbers_hold() -> None:
    """Claims the pages make in words about the JSON: these fail when a rerun changes them."""
    # when_global_pays, the RoI puzzle: "a spread of 0.040, more than twice the gap"
    gap = hook._roi(*hook._SKEW, "global")["global_minus_local"]["mean"]
    assert hook._stat(hook._diag_diffs())["std"] > 2 * abs(gap)
    # "Seeds 0-4 happen to include the two largest negative differences"
    first, _ = hook._diag_halves()
    assert all(seed in first and value < 0 for seed, value in hook._diag_worst_two())
    # "Seeds 5-9 put global ahead"
    assert hook._diag_half(False)["mean"] > 0
    # "the only negative mean ... is one standard error from zero"
    means = [
        (r["cell"], r["global_minus_local"][hook.HEADLINE[r["task"]]])
        for r in hook.load("budget.json")["more_seeds"]
    ]
    negative = [(cell, d) for cell, d in means if d["mean"] < 0]
    assert [cell for cell, _ in negative] == ["digits W=4 n=8 iid"]
    assert round(abs(negative[0][1]["mean"]) / negative[0][1]["sem"]) == 1
    # "A random subset ... was the worst variant in every cell"
    for r in hook.load("budget.json")["rows"]:
        finals = {v: x["final"][hook.HEADLINE[r["task"]]]["mean"] for v, x in r["variants"].items()}
        assert min(finals, key=finals.get) == "random", r["cell"]


def test_the_quality_studys_hard_shares_follow_from_the_tasks() -> None:
    """benchmarks.md quotes rank 0's hard share in the quality study's skewed cells,
    derived from budget.json's measured hard share; the tasks' definitions
    (launch/tasks.py) give the same rounded shares."""
    from launch.tasks import DetectionSpec, digits_train_counts

    counts = digits_train_counts()
    spec = DetectionSpec()
    exact = {
        "digits": sum(counts[len(counts) // 2 :]) / sum(counts),
        "detection": spec.positive_rate + spec.hard_negative_rate,
    }
    for cell in ("detection W=2 skewed", "detection W=4 skewed", "digits W=2 skewed", _Q_D4):
        task, w = hook._q(cell, "global")["task"], hook._q(cell, "global")["world_size"]
        g = exact[task]
        assert hook._pct(hook._q_rank0_hard(cell)) == hook._pct(g / (g + (1 - g) / w)), cell


_Q_D4 = "digits W=4 skewed"
