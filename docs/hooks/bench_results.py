"""mkdocs hook: the benchmarks' figures, tables and quoted numbers, from bench/results/.

Three conventions keep every number the docs quote from a results JSON equal to it:

- ``<!-- bench: NAME -->`` in a page becomes the table ``TABLES[NAME]`` makes from the
  JSON at every build, as the config reference is made from ``launch/config.py``.
- ``FIGURE<!-- =NAME -->``: a number quoted in the prose, followed by a marker naming it.
  ``NUMBERS[NAME]`` formats it from the JSON; the text right before the marker must be
  exactly that (at the quoted precision), or the build fails and so does
  tests/test_docs_numbers.py, which checks README.md and every page. The marker is an
  HTML comment: invisible on GitHub, stripped from the site.
- ``<!-- bench-copy: NAME -->`` then a table: a copy of ``TABLES[NAME]`` in a file
  mkdocs does not build (README.md). The test checks the copy;
  ``python docs/hooks/bench_results.py README.md`` rewrites it from the JSON.

Every ``bench/results/*.png`` is published as ``results/NAME.png``, so a page embeds it
with ``![...](results/NAME.png)``: the figure shown is the one the benchmark wrote.
"""

from __future__ import annotations

import functools
import importlib
import json
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "bench" / "results"
MARKER = re.compile(r"<!-- bench: (?P<name>[\w-]+) -->")
NUMBER = re.compile(r"<!-- =(?P<name>[\w.-]+) -->")
COPY = re.compile(r"<!-- bench-copy: (?P<name>[\w-]+) -->\n\n(?P<table>(?:\|.*\n)+)")
SHARDS = ("iid", "skewed", "sources")
TASKS = ("digits", "detection")
HEADLINE = {"digits": "tail_acc", "detection": "ap"}
#: A headline difference shown in bold: global ahead in every seed, by this much on average.
BOLD_FROM = 0.03
VARIANTS = {
    "all": "no mining",
    "random": "random subset",
    "local": "local OHEM",
    "global": "global OHEM",
}
ROI_VARIANTS = {
    "sampler": "standard sampler",
    "random": "random RoIs",
    "local": "local OHEM",
    "global": "global OHEM",
}
MINUS = "\N{MINUS SIGN}"


@functools.cache
def load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def _signed(value: float, digits: int = 3) -> str:
    return f"{value:+.{digits}f}".replace("-", MINUS)


def _pm(stat: dict, digits: int = 3) -> str:
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def _date(name: str) -> str:
    """The day a results file was measured (its metadata's UTC date)."""
    return load(name)["meta"]["date"][:10]


def _time(name: str) -> str:
    """Day and time of the run, UTC, as '2026-12-04 16:57 UTC'."""
    date = load(name)["meta"]["date"]
    return f"{date[:10]} {date[11:16]} UTC"


# --- two-pass throughput (throughput.json) ---------------------------------------


def _tp(world_size: int, label: str, case: str = "uniform") -> dict:
    for run in load("throughput.json")["runs"]:
        if run["world_size"] == world_size and run["case"] == case:
            for method in run["methods"]:
                if method["label"] == label:
                    return method
    raise KeyError((world_size, label, case))


KEEPS = ("1/2", "1/4", "1/8")


def _x(value: float) -> str:
    return f"{value:.2f}\u00d7"


def throughput(rows: tuple[tuple[int, str], ...] | None = None, memory: bool = True) -> str:
    """Speed-up over plain training in the same run, two-pass with and without balance."""
    head = "| W | keep | two-pass | two-pass + balance | ideal |"
    rule = "|---|---|---|---|---|"
    if memory:
        head += " saved activations (MiB, max rank) |"
        rule += "---|"
    else:
        head = head.replace("| ideal |", "| ideal 3K/(K+3M) |")
    lines = [head, rule]
    for w, keep in rows or [(w, k) for w in (1, 2) for k in KEEPS]:
        two, bal = _tp(w, f"two-pass {keep}"), _tp(w, f"two-pass+balance {keep}")
        cells = [str(w), keep, _x(two["speedup"]), _x(bal["speedup"]), _x(two["ideal"])]
        if memory:
            a = max(two["saved_activation_mib_per_rank"])
            b = max(bal["saved_activation_mib_per_rank"])
            text = f"{a:.1f}" if f"{a:.1f}" == f"{b:.1f}" else f"{a:.1f} / {b:.1f}"
            if (w, keep) == (1, "1/2"):
                plain = max(_tp(1, "plain")["saved_activation_mib_per_rank"])
                text += f" (plain {plain:.1f})"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mask_range() -> str:
    ratios = [_tp(w, f"mask {k}")["speedup"] for w in (1, 2) for k in KEEPS]
    return f"{min(ratios):.2f}\u2013{max(ratios):.2f}\u00d7"


# --- one selection call (selection.json) -----------------------------------------


def _sel(world_size: int) -> dict:
    return next(r for r in load("selection.json")["runs"] if r["world_size"] == world_size)


def _sel_keys(world_size: int, keys: int) -> dict:
    return next(k for k in _sel(world_size)["keys"] if k["keys_per_rank"] == keys)


def _ms(value: float) -> str:
    """Milliseconds at three significant figures (359, 25.8, 2.00, 0.579)."""
    return f"{value:.0f}" if value >= 100 else f"{value:#.3g}"


def selection() -> str:
    """The selection call against its yardsticks, from the same run."""
    w2 = _sel(2)
    small, paths1 = w2["small"], _sel(1)["paths"][0]
    paths2 = w2["paths"][0]
    dense = _sel_keys(2, 10_000_000)
    bracket, stream, topk = dense["bracket"]["median_ms"], dense["stream_ms"], dense["topk_ms"]

    def ratio(a: float, b: float, digits: int = 1) -> str:
        return f"{_ms(a)} ms / {_ms(b)} ms = {a / b:.{digits}f}\u00d7"

    rows = [
        (
            "K = 256 per rank, W = 2, `gather` (keep 0.25): call / one 16-int64 all-gather",
            ratio(small["selector_ms"], small["all_gather_ms"]),
        ),
        (
            "same, a minimal gather selection with no checks / the all-gather",
            ratio(small["minimal_ms"], small["all_gather_ms"]),
        ),
        (
            "K = 256 per rank, W = 1: device path / host path",
            ratio(paths1["deferred_ms"], paths1["eager_ms"], 2),
        ),
        (
            "same, W = 2 (5 blocking gloo collectives against 1)",
            ratio(paths2["deferred_ms"], paths2["eager_ms"]),
        ),
        ("K = 1e7 per rank, W = 2, `bracket`: call / streaming pass", ratio(bracket, stream)),
        ("same: single-process `torch.topk` / the `bracket` call", ratio(topk, bracket)),
    ]
    return "\n".join(["| case | measured |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows)])


# --- training quality (quality.json) ---------------------------------------------


def _q(cell: str, variant: str) -> dict:
    return next(
        r for r in load("quality.json")["rows"] if r["cell"] == cell and r["variant"] == variant
    )


def _cells() -> list[str]:
    return list(dict.fromkeys(r["cell"] for r in load("quality.json")["rows"]))


def _headline(cell: str) -> str:
    return _q(cell, "global")["target"]["metric"]


def _q_minus(cell: str) -> dict:
    """global - local, paired by seed: the local row's difference to global, negated."""
    d = _q(cell, "local")["headline_minus_global"]
    return {"mean": -d["mean"], "std": d["std"], "n": d["n"], "ahead": d["below"]}


def _q_step_ms(cell: str, variant: str) -> float:
    row = _q(cell, variant)
    steps = next(
        c["max_steps"]
        for c in load("quality.json")["cells"]
        if f"{c['task']} W={c['world_size']} {c['shard']}" == cell
    )
    return row["train_s"]["mean"] / steps * 1000


METRIC = {"ap": "AP", "tail_acc": "tail acc"}


def quality_final() -> str:
    head = (
        "| cell | metric | no mining | random subset | local OHEM | global OHEM "
        "| global \u2212 local (paired) | hard kept local / global |"
    )
    lines = [head, "|---" * 8 + "|"]
    for cell in _cells():
        metric = _headline(cell)
        finals = [_pm(_q(cell, v)["final"][metric]) for v in VARIANTS]
        d = _q_minus(cell)
        diff = f"{_signed(d['mean'])} ± {d['std']:.3f} (ahead in {d['ahead']}/{d['n']})"
        kept = " / ".join(f"{_q(cell, v)['hard_kept']['mean']:.2f}" for v in ("local", "global"))
        lines.append(f"| {cell} | {METRIC[metric]} | " + " | ".join([*finals, diff, kept]) + " |")
    return "\n".join(lines)


def quality_cost() -> str:
    lines = [
        "| cell | target | no mining | random subset | local OHEM | global OHEM |",
        "|---" * 6 + "|",
    ]
    for cell in _cells():
        target = _q(cell, "global")["target"]
        cells = []
        for v in VARIANTS:
            row = _q(cell, v)
            n = row["reached"] + row["not_reached"]
            text = f"{row['reached']}/{n}"
            if row["reached"]:
                t = row["to_target"]
                text += f": {t['examples']['mean'] / 1000:.1f}k ex, {t['train_s']['mean']:.1f} s"
            cells.append(text)
        goal = f"{METRIC[target['metric']]} ≥ {target['value']:.3f}"
        lines.append(f"| {cell} | {goal} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- RoI study (roi_quality.json, roi_skewed.json) -------------------------------


def _roi(name: str, world_size: int, variant: str) -> dict:
    return next(
        r for r in load(name)["rows"] if r["world_size"] == world_size and r["variant"] == variant
    )


def _roi_minus(row: dict) -> str:
    d = row["global_minus_local"]
    if d is None:
        return ""
    return f"{_signed(d['mean'])} ± {d['std']:.3f} (ahead in {d['above']}/{d['n']})"


def roi_quality() -> str:
    lines = [
        "| W | variant | mAP@[.5:.95] | mAP@0.5 | global \u2212 local (paired) | fg RoIs trained "
        "| look-alike RoIs trained |",
        "|---" * 7 + "|",
    ]
    for row in load("roi_quality.json")["rows"]:
        cells = [
            str(row["world_size"]),
            ROI_VARIANTS[row["variant"]],
            _pm(row["map"]),
            _pm(row["map50"]),
            _roi_minus(row),
            f"{row['fg_kept']['mean']:.3f}",
            f"{row['lookalike_kept']['mean']:.3f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def roi_skewed() -> str:
    lines = [
        "| variant | mAP@[.5:.95] | mAP@0.5 | global \u2212 local (paired) | fg RoIs trained "
        "| look-alike RoIs trained | rank 0 share of trained RoIs |",
        "|---" * 7 + "|",
    ]
    for row in load("roi_skewed.json")["rows"]:
        share = row["rank0_share"]
        share_text = f"{share['mean']:.3f}"
        if share["std"]:
            share_text = _pm(share)
        cells = [
            ROI_VARIANTS[row["variant"]],
            _pm(row["map"]),
            _pm(row["map50"]),
            _roi_minus(row),
            f"{row['fg_kept']['mean']:.3f}",
            f"{row['lookalike_kept']['mean']:.3f}",
            share_text,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _trails(world_size: int) -> str:
    """How far global OHEM's mAP trails local's, paired by seed: mean ± std."""
    d = _roi("roi_quality.json", world_size, "global")["global_minus_local"]
    return f"{-d['mean']:.3f} ± {d['std']:.3f}"


def _roi_over_sampler() -> list[tuple[float, float, float]]:
    """Local and global OHEM against the standard sampler at each W: mAP gained, and
    how many times the sampler's share of foreground and look-alike RoIs they train."""
    out = []
    for w, _ in load("roi_quality.json")["cells"]:
        base = _roi("roi_quality.json", w, "sampler")
        for v in ("local", "global"):
            row = _roi("roi_quality.json", w, v)
            out.append(
                (
                    row["map"]["mean"] - base["map"]["mean"],
                    row["fg_kept"]["mean"] / base["fg_kept"]["mean"],
                    row["lookalike_kept"]["mean"] / base["lookalike_kept"]["mean"],
                )
            )
    return out


def _roi_ohem_min_map() -> float:
    runs = load("roi_quality.json")["runs"]
    return min(r["final"]["map"] for r in runs if r["variant"] in ("local", "global"))


def _range(values: list[float], fmt: Callable[[float], str], dash: str) -> str:
    low, high = fmt(min(values)), fmt(max(values))
    return low if low == high else f"{low}{dash}{high}"


def _roi_timing(hidden: int, mode: str) -> float:
    """Median over the alternated runs of each run's median step, ms."""
    times = sorted(
        t["median_step_s"] * 1000
        for t in load("roi_quality.json")["timing"]
        if t["head_hidden"] == hidden and t["mode"] == mode
    )
    return times[len(times) // 2]


def _roi_seed_shares() -> list[float]:
    runs = load("roi_skewed.json")["runs"]
    return [r["rank_share"][0] for r in runs if r["variant"] == "global"]


def _diag() -> dict:
    """roi_skewed_diagnosis.json: global - local on the iid test set at the study's LR."""
    row = next(
        r
        for r in load("roi_skewed_diagnosis.json")["rows"]
        if r["lr_factor"] == 1.0 and r["test"] == "iid"
    )
    return row["variants"]["global"]["minus_local"]


def _diag_row(lr_factor: float = 1.0, test: str = "iid") -> dict:
    return next(
        r
        for r in load("roi_skewed_diagnosis.json")["rows"]
        if r["lr_factor"] == lr_factor and r["test"] == test
    )


#: roi_skewed_diagnosis.json's test sets, as the runs name their final mAP.
DIAG_TESTS = {"iid": "map", "easy": "map_easy", "hard": "map_hard"}


def _diag_seeds(variant: str, lr_factor: float = 1.0) -> list[int]:
    return sorted(
        r["seed"]
        for r in load("roi_skewed_diagnosis.json")["runs"]
        if r["variant"] == variant and r["lr_factor"] == lr_factor
    )


def _diag_diffs(
    variant: str = "global",
    base: str = "local",
    lr_factor: float = 1.0,
    test: str = "iid",
    seeds: Callable[[int], bool] = lambda seed: True,
) -> list[tuple[int, float]]:
    """(seed, variant - base mAP on a test set), paired by seed, from the runs."""
    runs = {
        (r["variant"], r["seed"]): r["final"][DIAG_TESTS[test]]
        for r in load("roi_skewed_diagnosis.json")["runs"]
        if r["lr_factor"] == lr_factor
    }
    return [
        (s, runs[(variant, s)] - runs[(base, s)])
        for s in _diag_seeds(variant, lr_factor)
        if seeds(s)
    ]


def _stat(diffs: list[tuple[int, float]]) -> dict:
    values = [v for _, v in diffs]
    n = len(values)
    mean = sum(values) / n
    std = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5 if n > 1 else 0.0
    return {
        "mean": mean,
        "std": std,
        "sem": std / n**0.5,
        "n": n,
        "ahead": sum(v > 0 for v in values),
        "behind": sum(v < 0 for v in values),
    }


def _seed_span(seeds: list[int]) -> str:
    if seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}\u2013{seeds[-1]}"
    return ", ".join(map(str, seeds))


def _diag_halves() -> tuple[list[int], list[int]]:
    """The first and the second half of the diagnosis's seeds at the study's LR (the first:
    the seeds roi_skewed.json was run with)."""
    seeds = _diag_seeds("global")
    return seeds[: len(seeds) // 2], seeds[len(seeds) // 2 :]


def _diag_half(first: bool) -> dict:
    """global - local on the iid test at the study's LR over one half of the seeds."""
    half = _diag_halves()[0 if first else 1]
    return _stat(_diag_diffs(seeds=lambda s: s in half))


def roi_diagnosis() -> str:
    """roi_skewed_diagnosis.json: global - local (and per-image weighting - global) on the
    three test sets, paired by seed, from the runs."""
    tests = list(DIAG_TESTS)
    lines = [
        f"| measurement ({load('roi_skewed_diagnosis.json')['steps']} steps, global \u2212 "
        "local mAP@[.5:.95] paired by seed) | " + " | ".join(f"{t} test" for t in tests) + " |",
        "|---" * (1 + len(tests)) + "|",
    ]

    def full(d: dict, note: str = "") -> str:
        return f"{_signed(d['mean'])} ± {d['std']:.3f} ({d['ahead']}/{d['n']}{note})"

    def row(name: str, cells: list[str]) -> None:
        cells = cells + [""] * (len(tests) - len(cells))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")

    base = [_stat(_diag_diffs(test=t)) for t in tests]
    row(
        f"seeds {_seed_span(_diag_seeds('global'))}, the example's learning rate",
        [full(base[0], f" ahead; s.e. {base[0]['sem']:.3f}")] + [full(d) for d in base[1:]],
    )
    for first, half in zip((True, False), _diag_halves(), strict=True):
        d = _diag_half(first)
        row(
            f"seeds {_seed_span(half)} only",
            [f"{_signed(d['mean'])} ({d['ahead']}/{d['n']} ahead)"],
        )
    for lr, name in ((0.5, "learning rate \u00d7 0.5"), (2.0, "learning rate \u00d7 2")):
        stats = [_stat(_diag_diffs(lr_factor=lr, test=t)) for t in tests]
        row(
            f"{name}, seeds {_seed_span(_diag_seeds('global', lr))}",
            [full(stats[0])] + [_signed(d["mean"]) for d in stats[1:]],
        )
    per_image = [_stat(_diag_diffs("global_per_image", "global", test=t)) for t in tests]
    row(
        "per-image normalization (global's RoIs, each image weighted as under local), "
        f"seeds {_seed_span(_diag_seeds('global_per_image'))}, vs global",
        [f"**{full(per_image[0])}**"]
        + [f"{_signed(d['mean'])} ({d['ahead']}/{d['n']})" for d in per_image[1:]],
    )
    return "\n".join(lines)


def _diag_kept(key: str) -> tuple[str, str]:
    """A kept share of global and of local OHEM in the diagnosis (the study's LR)."""
    v = _diag_row()["variants"]
    return f"{v['global'][key]['mean']:.3f}", f"{v['local'][key]['mean']:.3f}"


def _diag_worst_two() -> list[tuple[int, float]]:
    """The two most negative per-seed global - local differences (iid test, the study's
    LR), in seed order."""
    return sorted(sorted(_diag_diffs(), key=lambda sv: sv[1])[:2])


def _dedup(images: int, per_label: bool) -> dict:
    return next(
        r
        for r in load("roi_dedup.json")["rows"]
        if r["images"] == images and r["per_label"] == per_label
    )


# --- the per-rank budget (budget.json) -------------------------------------------


def _budget() -> list[dict]:
    return load("budget.json")["rows"]


def _budget_rows() -> tuple[dict, list[tuple[int, int]]]:
    rows = {(r["task"], r["world_size"], r["per_rank"], r["shard"]): r for r in _budget()}
    grid = sorted({(w, n) for _, w, n, _ in rows})
    return rows, grid


def _load_of(row: dict) -> float:
    return row["hard_on_fullest_rank"] / row["budget"]


def _columns() -> tuple[str, str]:
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
        cells = [f"{_load_of(rows[(t, w, n, s)]):.2f}" for t in TASKS for s in SHARDS]
        lines.append(f"| {w} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _overflowing_tail_range() -> str:
    """Digits tail accuracy, global - local, over the cells whose fullest rank holds
    about 2x its budget or more."""
    gains = [
        r["global_minus_local"]["tail_acc"]["mean"]
        for r in _budget()
        if r["task"] == "digits" and _load_of(r) >= 2
    ]
    return f"{_signed(min(gains), 2)} to {_signed(max(gains), 2)}"


def _overflowing_all_ahead() -> bool:
    return all(
        r["global_minus_local"][HEADLINE[r["task"]]]["ahead"]
        == r["global_minus_local"][HEADLINE[r["task"]]]["n"]
        for r in _budget()
        if _load_of(r) >= 2
    )


def budget_more_seeds(task: str) -> str:
    """The iid cells rerun with more seeds: global - local, its standard error, and the
    seeds where global was ahead / behind."""
    name = {"digits": "digits tail acc", "detection": "detection AP"}[task]
    lines = [
        f"| iid cell | seeds | {name}, global \u2212 local | standard error | ahead / behind |",
        "|---|---|---|---|---|",
    ]
    for row in load("budget.json")["more_seeds"]:
        if row["task"] != task:
            continue
        d = row["global_minus_local"][HEADLINE[task]]
        lines.append(
            f"| W={row['world_size']} n={row['per_rank']} | {d['n']} "
            f"| {_signed(d['mean'])} ± {d['std']:.3f} | {d['sem']:.3f} "
            f"| {d['ahead']} / {d['behind']} |"
        )
    return "\n".join(lines)


def _budget_cell(task: str, w: int, n: int, shard: str) -> dict:
    rows, _ = _budget_rows()
    return rows[(task, w, n, shard)]["global_minus_local"][HEADLINE[task]]


def _more_seeds(task: str, w: int, n: int) -> dict:
    row = next(
        r
        for r in load("budget.json")["more_seeds"]
        if (r["task"], r["world_size"], r["per_rank"]) == (task, w, n)
    )
    return row["global_minus_local"][HEADLINE[task]]


def _global_extra_ms() -> list[float]:
    return [_q_step_ms(c, "global") - _q_step_ms(c, "local") for c in _cells()]


def _mbm_rows(world_size: int = 1) -> list[dict]:
    return [r for r in load("micro_batch_memory.json")["rows"] if r["world_size"] == world_size]


def micro_batch_memory() -> str:
    """Peak saved activations and largest layer output per micro_batch_size (W = 1; the
    same on both ranks of W = 2)."""
    rows = _mbm_rows()
    plain = max(rows[0]["peak_saved_mib_per_rank"])
    batch, keep = (load("micro_batch_memory.json")["config"][k] for k in ("batch", "keep"))
    lines = [
        f"| method (per rank: {batch} scored, {round(batch * keep)} trained) "
        "| peak saved activations | vs plain | largest layer output |",
        "|---|---|---|---|",
    ]
    for row in rows:
        peak = max(row["peak_saved_mib_per_rank"])
        if row["method"] == "plain":
            name, ratio = f"plain training ({batch} forward + backward)", "1"
        else:
            ratio = f"{peak / plain:.3f}".rstrip("0")
            size = row["micro_batch_size"]
            name = "`ohem_step`, one chunk" if size is None else f"`micro_batch_size={size}`"
        lines.append(f"| {name} | {peak:.2f} MiB | {ratio} | {row['largest_output_mib']:.2f} MiB |")
    return "\n".join(lines)


def _mbm_two_pass_ms() -> str:
    rows = _mbm_rows()
    times = [r["step_ms"] for r in rows if r["method"] != "plain"]
    plain = next(r["step_ms"] for r in rows if r["method"] == "plain")
    return f"{min(times):.0f}-{max(times):.0f} ms against {plain:.0f} ms"


# --- prose figures of the quality and budget studies -------------------------------

_DET = ("detection W=2 iid", "detection W=2 skewed", "detection W=4 skewed")


def _q_all_detection_aps() -> tuple[list[float], list[float]]:
    """No mining's final AP on detection: the seeds that left the "everything negative"
    plateau (those that reached the cell's target), and every other seed."""
    off, stuck = [], []
    for r in load("quality.json")["runs"]:
        if r["cell"] in _DET and r["variant"] == "all":
            (off if r["to_target"] else stuck).append(r["final"]["ap"])
    return off, stuck


def _q_all_detection_off_seeds() -> str:
    """How many of each detection cell's seeds left the plateau without mining."""
    reached = [_q(c, "all")["reached"] for c in _DET]
    (seeds,) = {len(_q(c, "all")["seeds"]) for c in _DET}
    return _range(reached, str, "\u2013") + f" of {seeds}"


def _q_step_range() -> str:
    """Every cell's and variant's mean step, ms (training seconds over steps)."""
    steps = [_q_step_ms(c, v) for c in _cells() for v in VARIANTS]
    return f"{min(steps):.0f}\u2013{max(steps):.0f} ms"


def _q_rank0_hard(cell: str) -> float:
    """The hard share of rank 0's batches in a skewed cell of the quality study. There each
    rank draws from its own shard (``batch_size``, launch/data.py's ``rank_pool``): rank 0
    holds every hard example and 1/W of the others, so with a hard share g of the training
    set its share is g / (g + (1 - g) / W). g is the tasks' hard share as budget.json
    measured it in the batches."""
    row = _q(cell, "global")
    g, w = _hard_share(row["task"]), row["world_size"]
    return g / (g + (1 - g) / w)


def _q_final_range(cells: tuple[str, ...], variants: tuple[str, ...], metric: str) -> str:
    values = [_q(c, v)["final"][metric]["mean"] for c in cells for v in variants]
    return _range(values, lambda v: f"{v:.2f}", "\u2013")


def _q_load() -> str:
    meta = load("quality.json")["meta"]
    loads = [meta["load_start"][0], meta["load_end"][0]]
    return f"{min(loads):.1f}\u2013{max(loads):.1f}"


def _hard_share(task: str) -> float:
    """The share of hard examples in the task's batches, from the largest iid cell."""
    rows, _ = _budget_rows()
    row = rows[(task, 4, 64, "iid")]
    return row["hard_per_rank_mean"] / row["per_rank"]


#: shard=sources: rank r reads source r mod 4, the sources holding the hard examples
#: 4 : 2 : 1 : 0 (launch/data.py), so source 0 holds 4/7 of them in a quarter of the data.
SOURCE_WEIGHTS = (4, 2, 1, 0)


def _p_over_keep(task: str, shard: str, world_size: int = 4) -> float:
    """*p* / keep: the hard share of the rank that gets the most, over keep."""
    g = _hard_share(task)
    p = {
        "iid": g,
        "sources": g * len(SOURCE_WEIGHTS) * SOURCE_WEIGHTS[0] / sum(SOURCE_WEIGHTS),
        "skewed": min(1.0, world_size * g),
    }[shard]
    return p / load("budget.json")["keep"]


def _gml(task: str, w: int, n: int, shard: str) -> dict:
    """Headline global - local of a budget cell, over the more seeds where rerun."""
    if shard == "iid":
        for r in load("budget.json")["more_seeds"]:
            if (r["task"], r["world_size"], r["per_rank"]) == (task, w, n):
                return r["global_minus_local"][HEADLINE[task]]
    return _budget_cell(task, w, n, shard)


def _rule_cells(rule: str, task: str, shard: str | None = None) -> list[tuple[int, int, dict]]:
    """The cells of a row of the rule table: (W, n, global - local) for 'over' (*p* / keep
    >= 2), 'small' (below that, budget keep·n <= 2) and 'large' (below, budget >= 4)."""
    out = []
    for r in _budget():
        if r["task"] != task or (shard and r["shard"] != shard):
            continue
        over = _p_over_keep(task, r["shard"], r["world_size"]) >= 2
        kind = "over" if over else "small" if r["budget"] <= 2 else "large"
        if kind == rule:
            w, n = r["world_size"], r["per_rank"]
            out.append((w, n, _gml(task, w, n, r["shard"])))
    return out


def _sig(value: float) -> str:
    """Signed, two significant figures (+0.015, +0.12)."""
    return f"{value:+#.2g}".replace("-", MINUS)


def _rule_over(task: str, fmt: Callable[[float], str], join: str) -> str:
    cells = sorted(_rule_cells("over", task), key=lambda c: c[2]["mean"])
    low, high = cells[0], cells[-1]
    return f"{fmt(low[2]['mean'])} (n = {low[1]}){join}{fmt(high[2]['mean'])} (n = {high[1]})"


def _means_range(cells: list[tuple[int, int, dict]], digits: int = 3) -> str:
    means = [d["mean"] for _, _, d in cells]
    return _range(means, lambda v: _signed(v, digits), " to ")


def _rule_small_detection_iid() -> str:
    cells = _rule_cells("small", "detection", "iid")
    ahead = [d["ahead"] for _, _, d in cells]
    seeds = {d["n"] for _, _, d in cells}
    (n,) = seeds
    return f"{_means_range(cells)} (ahead in {min(ahead)}\u2013{max(ahead)} of {n} seeds)"


def _rule_small_detection_skewed() -> str:
    cells = sorted(_rule_cells("small", "detection", "skewed"), key=lambda c: c[1])
    return " and ".join(f"{_signed(d['mean'])} (n = {n})" for _, n, d in cells)


def _rule_small_digits() -> tuple[tuple, tuple, list]:
    """The digits cells of the small-budget row: the iid and the sources cell with the
    largest gain, and the others."""
    iid = max(_rule_cells("small", "digits", "iid"), key=lambda c: c[2]["mean"])
    src = max(_rule_cells("small", "digits", "sources"), key=lambda c: c[2]["mean"])
    rest = [c for c in _rule_cells("small", "digits") if c not in (iid, src)]
    return iid, src, rest


def _rule_small_digits_iid() -> str:
    (w, n, d), _, _ = _rule_small_digits()
    return f"{_signed(d['mean'])} at W={w} n={n} iid ({d['ahead']} of {d['n']} seeds)"


def _digits_skewed() -> list[dict]:
    return [r for r in _budget() if r["task"] == "digits" and r["shard"] == "skewed"]


def _kept_range(variant: str) -> str:
    kept = [r["variants"][variant]["hard_kept"]["mean"] for r in _digits_skewed()]
    return _range(kept, lambda v: f"{v:.2f}", "\u2013")


def _head_range() -> str:
    d = [r["global_minus_local"]["head_acc"]["mean"] for r in _digits_skewed()]
    return f"{_signed(max(d))} to {_signed(min(d))}"


def _tail(variant: str, w: int, n: int, shard: str) -> float:
    rows, _ = _budget_rows()
    return rows[("digits", w, n, shard)]["variants"][variant]["final"]["tail_acc"]["mean"]


def _global_same_tail() -> str:
    a, b = f"{_tail('global', 4, 8, 'iid'):.3f}", f"{_tail('global', 8, 4, 'iid'):.3f}"
    return a if a == b else f"{a} and {b}"


def _source_shares(task: str) -> str:
    """shard=sources at W = 4: each rank's hard share, its source's weight times the task's."""
    g = _hard_share(task) * len(SOURCE_WEIGHTS) / sum(SOURCE_WEIGHTS)
    return "/".join(f"{100 * g * w:.0f}" for w in SOURCE_WEIGHTS) + "%"


def _iid_kept_gap() -> float:
    """The largest difference between global's and local's kept share on iid shards."""
    return max(
        abs(
            r["variants"]["global"]["hard_kept"]["mean"]
            - r["variants"]["local"]["hard_kept"]["mean"]
        )
        for r in _budget()
        if r["shard"] == "iid"
    )


def _sign_test(ahead: int, behind: int) -> float:
    """Two-sided sign test: the chance of a split at least this uneven under a fair coin."""
    n, k = ahead + behind, min(ahead, behind)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


# --- language models (lm_selection.json, throughput.json's trainer_lm) -------------------


def _bench(module: str) -> ModuleType:
    """``bench.<module>``, whose own renderer makes the table the benchmark printed."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    return importlib.import_module(f"bench.{module}")


def lm_selection() -> str:
    """Held-out learnable loss at equal FLOPs per variant and cell, with Δ vs plain."""
    return _bench("lm_selection").main_table(load("lm_selection.json"))


def lm_throughput() -> str:
    """The tiny GPT-2 under the HF Trainer: plain, mask mode, two-pass, with a reference."""
    return _bench("throughput").trainer_lm_table(load("throughput.json")["trainer_lm"])


def _throughput_wall_s() -> float:
    """The whole ``bench/throughput.py`` run: the CNN rows and the language-model rows."""
    report = load("throughput.json")
    return report["meta"]["wall_s"] + report.get("trainer_lm", {}).get("meta", {}).get("wall_s", 0)


def _lm_row(cell: str, variant: str) -> dict:
    rows = load("lm_selection.json")["rows"]
    return next(r for r in rows if r["cell"] == cell and r["variant"] == variant)


def _lm_noise_kept(cell: str, variant: str) -> str:
    return _pct(_lm_row(cell, variant)["kept_share"]["noise"]["mean"])


def _lm_speedup(name: str, keep: float | None) -> str:
    rows = load("throughput.json")["trainer_lm"]["rows"]
    row = next(r for r in rows if r["name"] == name and r["keep"] == keep)
    return f"{row['speedup']:.2f}\u00d7"


TABLES: dict[str, Callable[[], str]] = {
    "micro-batch-memory": micro_batch_memory,
    "budget-more-seeds-digits": lambda: budget_more_seeds("digits"),
    "budget-more-seeds-detection": lambda: budget_more_seeds("detection"),
    "throughput": throughput,
    "lm-selection": lm_selection,
    "lm-throughput": lm_throughput,
    "throughput-short": lambda: throughput(((1, "1/4"), (2, "1/4"), (2, "1/8")), memory=False),
    "selection": selection,
    "quality-final": quality_final,
    "quality-cost": quality_cost,
    "roi-quality": roi_quality,
    "roi-skewed": roi_skewed,
    "roi-diagnosis": roi_diagnosis,
    "budget-headline": budget_headline,
    "budget-load": budget_load,
}


def _q_diff(cell: str) -> str:
    d = _q_minus(cell)
    return f"{_signed(d['mean'])} ± {d['std']:.3f}"


def _pct(value: float) -> str:
    return f"{100 * value:.0f}%"


_Q_D4, _Q_G4 = "digits W=4 skewed", "detection W=4 skewed"
_SKEW = ("roi_skewed.json", 2)

#: Numbers quoted in prose, by name, as the docs write them (see the module's docstring).
NUMBERS: dict[str, Callable[[], str]] = {
    # language models
    "lm.date": lambda: _date("lm_selection.json"),
    "lm.seeds": lambda: str(len(load("lm_selection.json")["seeds"])),
    "lm.noise_kept.top_loss_30": lambda: _lm_noise_kept("noise 30% iid", "global"),
    "lm.noise_kept.top_loss_10": lambda: _lm_noise_kept("noise 10% iid", "global"),
    "lm.throughput.date": lambda: load("throughput.json")["trainer_lm"]["meta"]["date"][:10],
    "lm.throughput.two_pass_1_4": lambda: _lm_speedup("two-pass", 0.25),
    "lm.throughput.two_pass_1_8": lambda: _lm_speedup("two-pass", 0.125),
    "lm.throughput.reference": lambda: _lm_speedup("two-pass+reference", 0.25),
    # dates and software of each run
    "throughput.date": lambda: _date("throughput.json"),
    "throughput.time": lambda: _time("throughput.json"),
    "throughput.torch": lambda: load("throughput.json")["meta"]["torch"],
    "throughput.load_start": lambda: f"{load('throughput.json')['meta']['load_start'][0]:.1f}",
    "throughput.load_end": lambda: f"{load('throughput.json')['meta']['load_end'][0]:.1f}",
    "throughput.minutes": lambda: f"{_throughput_wall_s() / 60:.0f} minutes",
    "throughput.repeats": lambda: str(load("throughput.json")["config"]["repeats"]),
    "throughput.backward_over_forward": lambda: (
        f"{load('throughput.json')['runs'][0]['backward_over_forward']:.1f}\u00d7"
    ),
    "throughput.allreduce_mb": lambda: (
        f"{load('throughput.json')['meta']['parameters'] * 4 / 1e6:.2f} MB"
    ),
    "selection.date": lambda: _date("selection.json"),
    "selection.time": lambda: _time("selection.json"),
    "quality.date": lambda: _date("quality.json"),
    "quality.minutes": lambda: f"{load('quality.json')['meta']['wall_s'] / 60:.0f} min",
    "quality.runs": lambda: str(len(load("quality.json")["runs"])),
    "roi_quality.date": lambda: _date("roi_quality.json"),
    "roi_quality.minutes": lambda: f"{load('roi_quality.json')['meta']['wall_s'] / 60:.0f} min",
    "roi_skewed.date": lambda: _date("roi_skewed.json"),
    "roi_skewed.minutes": lambda: f"{load('roi_skewed.json')['meta']['wall_s'] / 60:.0f} min",
    "budget.date": lambda: _date("budget.json"),
    "micro_batch_memory.date": lambda: _date("micro_batch_memory.json"),
    "micro_batch_memory.load": lambda: "{:.1f}-{:.1f}".format(
        load("micro_batch_memory.json")["meta"]["load_start"][0],
        load("micro_batch_memory.json")["meta"]["load_end"][0],
    ),
    "micro_batch_memory.step_ms": _mbm_two_pass_ms,
    # two-pass throughput
    "throughput.mask_range": _mask_range,
    **{
        f"throughput.ratio.w2.{k.replace('/', '_')}{suffix}": (
            lambda k=k, label=label: f"{_tp(2, f'{label} {k}')['ratio_to_ideal']:.2f}"
        )
        for k in KEEPS
        for suffix, label in (("", "two-pass"), (".balance", "two-pass+balance"))
    },
    "throughput.skewed.w2.1_2": lambda: _x(_tp(2, "two-pass 1/2", "skewed")["speedup"]),
    **{
        f"throughput.skewed.w2.{k.replace('/', '_')}.balance": (
            lambda k=k: _x(_tp(2, f"two-pass+balance {k}", "skewed")["speedup"])
        )
        for k in KEEPS
    },
    **{
        f"throughput.w{w}.{k.replace('/', '_')}{suffix}": (
            lambda w=w, k=k, label=label: _x(_tp(w, f"{label} {k}")["speedup"])
        )
        for w in (1, 2)
        for k in KEEPS
        for suffix, label in (("", "two-pass"), (".balance", "two-pass+balance"))
    },
    # one selection call
    "selection.small_over_allgather": lambda: (
        f"{load('selection.json')['targets']['small_over_allgather']:.1f}\u00d7"
    ),
    "selection.minimal_over_allgather": lambda: (
        f"{load('selection.json')['targets']['minimal_over_allgather']:.1f}\u00d7"
    ),
    "selection.deferred_over_eager_w1": lambda: (
        f"{load('selection.json')['targets']['deferred_over_eager_w1']:.2f}\u00d7"
    ),
    "selection.dense_ms": lambda: f"{_ms(_sel_keys(2, 10_000_000)['bracket']['median_ms'])} ms",
    "selection.dense_bytes": lambda: (
        f"{max(_sel_keys(2, 10_000_000)['bracket']['bytes_per_rank']):,} bytes"
    ),
    "selection.dense_kb": lambda: (
        f"{max(_sel_keys(2, 10_000_000)['bracket']['bytes_per_rank']) / 1000:.0f} KB"
    ),
    "selection.topk_over_dense": lambda: (
        f"{load('selection.json')['targets']['topk_over_dense']:.1f}\u00d7"
    ),
    "selection.w1_1e6": lambda: (
        f"{_sel_keys(1, 10**6)['gather']['median_ms']:.1f} ms against "
        f"{_sel_keys(1, 10**6)['bracket']['median_ms']:.1f} ms"
    ),
    # training quality
    "quality.detection_iid_kept": lambda: (
        f"{_q('detection W=2 iid', 'local')['hard_kept']['mean']:.2f}"
    ),
    "quality.detection_w4.kept": lambda: (
        f"{_q(_Q_G4, 'global')['hard_kept']['mean']:.2f} of the hard examples against local's "
        f"{_q(_Q_G4, 'local')['hard_kept']['mean']:.2f}"
    ),
    "quality.detection_w4.diff": lambda: _q_diff(_Q_G4),
    "quality.digits_w4.kept": lambda: (
        f"{_q(_Q_D4, 'global')['hard_kept']['mean']:.2f} against "
        f"{_q(_Q_D4, 'local')['hard_kept']['mean']:.2f}"
    ),
    "quality.digits_w4.diff": lambda: _q_diff(_Q_D4),
    "quality.digits_w4.ahead": lambda: f"{_q_minus(_Q_D4)['ahead']} of {_q_minus(_Q_D4)['n']}",
    "quality.digits_w4.balanced": lambda: (
        f"{_q(_Q_D4, 'global')['final']['balanced_acc']['mean']:.3f} vs "
        f"{_q(_Q_D4, 'local')['final']['balanced_acc']['mean']:.3f}"
    ),
    "quality.digits_w4.fewer": lambda: _pct(
        1
        - _q(_Q_D4, "global")["to_target"]["examples"]["mean"]
        / _q(_Q_D4, "local")["to_target"]["examples"]["mean"]
    ),
    "quality.all_slower": lambda: "{:.0f}\u2013{:.0f}%".format(
        *(
            f(100 * (_q_step_ms(c, "all") / _q_step_ms(c, "local") - 1) for c in _cells())
            for f in (min, max)
        )
    ),
    "quality.digits_w2.ms": lambda: (
        f"{_q_step_ms('digits W=2 skewed', 'all'):.1f} vs "
        f"{_q_step_ms('digits W=2 skewed', 'global'):.1f} ms"
    ),
    "quality.detection_w2.ms": lambda: (
        f"{_q_step_ms('detection W=2 iid', 'global'):.1f} vs "
        f"{_q_step_ms('detection W=2 iid', 'local'):.1f} ms"
    ),
    "quality.digits_w4.ms": lambda: (
        f"{_q_step_ms(_Q_D4, 'global'):.1f} vs {_q_step_ms(_Q_D4, 'local'):.1f} ms"
    ),
    # RoI study
    "roi.w2.trails": lambda: _trails(2),
    "roi.w4.trails": lambda: _trails(4),
    "roi.gain_over_sampler": lambda: _range(
        [d for d, _, _ in _roi_over_sampler()], lambda v: _signed(v, 2), " to "
    ),
    "roi.fg_over_sampler": lambda: (
        _range([f for _, f, _ in _roi_over_sampler()], lambda v: f"{v:.1f}", "\u2013") + "\u00d7"
    ),
    "roi.lookalike_over_sampler": lambda: (
        _range([a for _, _, a in _roi_over_sampler()], lambda v: f"{v:.0f}", "\u2013") + "\u00d7"
    ),
    "roi.ohem_min_map": lambda: f"{_roi_ohem_min_map():.2f}",
    "roi.mask_128": lambda: (
        f"{_roi_timing(128, 'mask'):.1f} vs {_roi_timing(128, 'two_pass'):.1f} ms a step "
        f"({_roi_timing(128, 'mask') / _roi_timing(128, 'two_pass'):.2f}\u00d7)"
    ),
    "roi.mask_1024": lambda: (
        f"{_roi_timing(1024, 'mask'):.1f} vs {_roi_timing(1024, 'two_pass'):.1f} ms "
        f"({_roi_timing(1024, 'mask') / _roi_timing(1024, 'two_pass'):.2f}\u00d7)"
    ),
    "roi_skewed.share": lambda: f"{_roi(*_SKEW, 'global')['rank0_share']['mean']:.3f}",
    "roi_skewed.share_range": lambda: (
        f"{min(_roi_seed_shares()):.3f} to {max(_roi_seed_shares()):.3f}"
    ),
    "roi_skewed.local_share": lambda: f"{_roi(*_SKEW, 'local')['rank0_share']['mean']:.3f}",
    "roi_skewed.diff": lambda: "{:.3f} ± {:.3f}".format(
        -_roi(*_SKEW, "global")["global_minus_local"]["mean"],
        _roi(*_SKEW, "global")["global_minus_local"]["std"],
    ),
    "roi_skewed.diagnosis": lambda: "{} ± {:.3f} (global ahead in {} of {})".format(
        _signed(_diag()["mean"]), _diag()["std"], _diag()["ahead"], _diag()["n"]
    ),
    "roi_skewed.share_pct": lambda: f"{100 * _roi(*_SKEW, 'global')['rank0_share']['mean']:.1f}%",
    "roi_skewed.behind": lambda: "{below} of {n}".format(
        **_roi(*_SKEW, "global")["global_minus_local"]
    ),
    "roi_skewed.slots": lambda: str(load("roi_skewed.json")["plan"]["rois_per_image"]),
    "roi_skewed.proposals": lambda: f"{load('roi_skewed.json')['plan']['proposals']:,}",
    # the diagnosis of the skewed RoI cell (roi_skewed_diagnosis.json)
    "roi_diag.spread": lambda: f"{_stat(_diag_diffs())['std']:.3f}",
    "roi_diag.worst_two": lambda: " and ".join(_signed(v) for _, v in _diag_worst_two()),
    "roi_diag.second_half": lambda: _signed(_diag_half(False)["mean"]),
    "roi_diag.n": lambda: str(_stat(_diag_diffs())["n"]),
    "roi_diag.mean": lambda: _signed(_stat(_diag_diffs())["mean"]),
    "roi_diag.sem": lambda: f"{_stat(_diag_diffs())['sem']:.3f}",
    "roi_diag.first_half": lambda: "{}, behind in {} of {}".format(
        _signed(_diag_half(True)["mean"]), _diag_half(True)["behind"], _diag_half(True)["n"]
    ),
    "roi_diag.easy": lambda: "{}, {}/{}".format(
        _signed(_stat(_diag_diffs(test="easy"))["mean"]),
        _stat(_diag_diffs(test="easy"))["ahead"],
        _stat(_diag_diffs(test="easy"))["n"],
    ),
    "roi_diag.lr_gaps": lambda: "{}, {} and {}".format(
        *(_signed(_stat(_diag_diffs(lr_factor=lr))["mean"]) for lr in (0.5, 1.0, 2.0))
    ),
    "roi_diag.per_image": lambda: (
        f"{-_stat(_diag_diffs('global_per_image', 'global'))['mean']:.3f}"
    ),
    "roi_diag.per_image_behind": lambda: "{behind} of {n}".format(
        **_stat(_diag_diffs("global_per_image", "global"))
    ),
    "roi_diag.lookalike": lambda: "{} against local's {}".format(*_diag_kept("lookalike_kept")),
    "roi_diag.fg": lambda: "{} and {}".format(*_diag_kept("fg_kept")),
    "roi.dedup_1": lambda: f"{_dedup(1, False)['dedup_rois_ms']:.0f} ms",
    "roi.dedup_1_label": lambda: f"{_dedup(1, True)['dedup_rois_ms']:.0f} ms",
    "roi.dedup_speedup": lambda: (
        f"{_dedup(1, False)['sequential_ms'] / _dedup(1, False)['dedup_rois_ms']:.0f}\u00d7"
    ),
    "roi.dedup_4": lambda: (
        f"{_dedup(4, False)['dedup_rois_ms']:.0f}-{_dedup(4, True)['dedup_rois_ms']:.0f} ms"
    ),
    # the per-rank budget
    "budget.overflow_tail_range": _overflowing_tail_range,
    "budget.cells": lambda: str(len(_budget())),
    "budget.digits_skewed_w4": lambda: " / ".join(
        _signed(_budget_cell("digits", 4, n, "skewed")["mean"], 2) for n in (4, 8, 16, 64)
    ),
    "budget.digits_skewed_w8": lambda: _signed(_budget_cell("digits", 8, 4, "skewed")["mean"], 2),
    "budget.detection_overflow_max": lambda: _signed(
        max(
            r["global_minus_local"]["ap"]["mean"]
            for r in _budget()
            if r["task"] == "detection" and _load_of(r) >= 2
        ),
        2,
    ),
    "budget.local_lead": lambda: f"{-_budget_cell('digits', 4, 8, 'iid')['mean']:.3f}",
    "budget.local_lead_more_seeds": lambda: "{} ± {:.3f} over {} seeds".format(
        _signed(_more_seeds("digits", 4, 8)["mean"]),
        _more_seeds("digits", 4, 8)["std"],
        _more_seeds("digits", 4, 8)["n"],
    ),
    "quality.global_extra_ms": lambda: (
        f"{_signed(min(_global_extra_ms()), 1)} to {_signed(max(_global_extra_ms()), 1)} ms"
    ),
    "quality.detection_w2.train_s": lambda: (
        f"{_q('detection W=2 iid', 'local')['train_s']['mean']:.2f} → "
        f"{_q('detection W=2 iid', 'global')['train_s']['mean']:.2f} s"
    ),
    "quality.digits_w4.train_s": lambda: (
        f"{_q(_Q_D4, 'local')['train_s']['mean']:.2f} → "
        f"{_q(_Q_D4, 'global')['train_s']['mean']:.2f} s"
    ),
    "selection.small_ms": lambda: f"{_sel(2)['small']['selector_ms']:.1f} ms",
    # prose of the quality study (benchmarks.md)
    "quality.detection_all.off": lambda: _range(
        _q_all_detection_aps()[0], lambda v: f"{v:.2f}", "\u2013"
    ),
    "quality.detection_all.stuck": lambda: _range(
        _q_all_detection_aps()[1], lambda v: f"{v:.2f}", "\u2013"
    ),
    "quality.keep": lambda: _pct(load("quality.json")["keep"]),
    "quality.head_acc": lambda: _q_final_range(
        tuple(c for c in _cells() if c.startswith("digits")), tuple(VARIANTS), "head_acc"
    ),
    "quality.hard_negative_ohem": lambda: _q_final_range(
        _DET, ("local", "global"), "hard_negative_acc"
    ),
    "quality.hard_negative_all": lambda: _q_final_range(_DET, ("all",), "hard_negative_acc"),
    "quality.positive_all": lambda: _q_final_range(_DET, ("all",), "positive_acc"),
    "quality.load": _q_load,
    "quality.detection_all.off_seeds": _q_all_detection_off_seeds,
    "quality.step_ms_range": _q_step_range,
    "quality.rank0_hard.detection_w4": lambda: _pct(_q_rank0_hard(_Q_G4)),
    "quality.rank0_hard.digits_w4": lambda: _pct(_q_rank0_hard(_Q_D4)),
    "quality.rank0_hard.w2": lambda: (
        f"{_pct(_q_rank0_hard('detection W=2 skewed'))} and "
        f"{_pct(_q_rank0_hard('digits W=2 skewed'))}"
    ),
    # the rule of when_global_pays.md
    **{
        f"budget.p_keep.{task}.{shard}{'' if w == 4 else '.w8'}": (
            lambda task=task, shard=shard, w=w: f"{_p_over_keep(task, shard, w):#.2g}"
        )
        for task in TASKS
        for shard, w in (("iid", 4), ("sources", 4), ("skewed", 4), ("skewed", 8))
    },
    **{f"budget.hard_share.{task}": (lambda task=task: _pct(_hard_share(task))) for task in TASKS},
    "budget.rule.over.digits": lambda: _rule_over("digits", lambda v: _signed(v, 2), " to "),
    "budget.rule.over.detection": lambda: _rule_over("detection", _sig, ", "),
    "budget.rule.over.cells": lambda: str(sum(len(_rule_cells("over", task)) for task in TASKS)),
    "budget.rule.small.detection_iid": _rule_small_detection_iid,
    "budget.rule.small.detection_iid_2": lambda: _means_range(
        _rule_cells("small", "detection", "iid"), 2
    ),
    "budget.rule.small.detection_skewed": _rule_small_detection_skewed,
    "budget.rule.small.detection_sources": lambda: _means_range(
        _rule_cells("small", "detection", "sources")
    ),
    "budget.rule.small.digits_iid": _rule_small_digits_iid,
    "budget.rule.small.digits_sources": lambda: _signed(_rule_small_digits()[1][2]["mean"]),
    "budget.rule.small.digits_rest": lambda: _means_range(_rule_small_digits()[2]),
    "budget.rule.large": lambda: _means_range(
        [c for task in TASKS for c in _rule_cells("large", task)]
    ),
    "budget.rule.large_abs": lambda: (
        f"{max(abs(d['mean']) for t in TASKS for _, _, d in _rule_cells('large', t)):.3f}"
    ),
    "budget.global_same_tail": _global_same_tail,
    "budget.local_tail.iid": lambda: f"{_tail('local', 4, 8, 'iid'):.3f}",
    "budget.local_tail.skewed": lambda: f"{_tail('local', 4, 8, 'skewed'):.3f}",
    "budget.kept.local": lambda: _kept_range("local"),
    "budget.kept.global": lambda: _kept_range("global"),
    "budget.head_range": _head_range,
    "budget.source_shares.digits": lambda: _source_shares("digits"),
    "budget.kept.iid_gap": lambda: f"{_iid_kept_gap():.3f}",
    "budget.kept.random": lambda: _range(
        [r["variants"]["random"]["hard_kept"]["mean"] for r in _budget()],
        lambda v: f"{v:.2f}",
        "\u2013",
    ),
    "budget.local_lead_seeds": lambda: "{behind} of {n}".format(
        **_budget_cell("digits", 4, 8, "iid")
    ),
    "budget.local_lead_more_seeds.mean": lambda: _signed(_more_seeds("digits", 4, 8)["mean"]),
    "budget.local_lead_more_seeds.split": lambda: (
        "{ahead} seeds there and local in {behind}".format(**_more_seeds("digits", 4, 8))
    ),
    "budget.local_lead_more_seeds.sign_p": lambda: "p \u2248 {:.1f}".format(
        _sign_test(_more_seeds("digits", 4, 8)["ahead"], _more_seeds("digits", 4, 8)["behind"])
    ),
}


def number(name: str) -> str:
    if name not in NUMBERS:
        raise KeyError(f"no number named {name!r} in docs/hooks/bench_results.py")
    return NUMBERS[name]()


def mismatches(text: str) -> list[str]:
    """Each marked number that differs from its JSON, or a copied table that does."""
    problems = []
    for match in NUMBER.finditer(text):
        want = number(match.group("name"))
        before = text[: match.start()]
        line = before.rsplit("\n", 1)[-1]
        ok = before.endswith(want) and not re.search(r"[\d.]$", before[: len(before) - len(want)])
        if not ok:
            problems.append(f"{match.group('name')}: the JSON gives {want!r}, the text {line!r}")
    for match in COPY.finditer(text):
        want = TABLES[match.group("name")]()
        if match.group("table").rstrip("\n") != want:
            problems.append(f"table {match.group('name')} differs from the JSON:\n{want}")
    return problems


def refresh(path: Path) -> None:
    """Rewrite the copied tables of a file from the JSON."""
    text = path.read_text()
    path.write_text(
        COPY.sub(
            lambda m: m.group(0).replace(m.group("table"), TABLES[m.group("name")]() + "\n"),
            text,
        )
    )


def on_files(files, config: dict, **kwargs: object):
    """mkdocs event: publish the results' figures under results/."""
    from mkdocs.structure.files import File

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


def on_page_markdown(markdown: str, page: object, **kwargs: object) -> str:
    """mkdocs event: check each quoted number, then make the tables and drop the markers."""
    problems = mismatches(markdown)
    if problems:
        where = getattr(getattr(page, "file", None), "src_path", "a page")
        raise ValueError(f"{where}: numbers differ from bench/results:\n" + "\n".join(problems))
    markdown = NUMBER.sub("", markdown)
    return MARKER.sub(lambda m: TABLES[m.group("name")](), markdown)


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        refresh(Path(arg))
