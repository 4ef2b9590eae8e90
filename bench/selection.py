"""Run: ``python bench/selection.py`` (full, about a minute on 2 cores) or add ``--quick`` (< 30 s).

``--paths-only``: only the two paths side by side (below), W = 1 and 2, in well under a
minute; writes ``selection_paths.*``.

Cost of one global selection for each strategy (``gather``, ``bracket``;
DESIGN.md §5, ``dist_ohem/kselect.py``) on W = 1, 2 and 4 gloo ranks (one thread each,
FileStore rendezvous: no port) with K = 1e3 ... 1e7 float32 losses per rank, rule
``keep=0.1``, next to what any exact selection must at least do, measured in the same
run. Writes ``selection.json`` and ``selection.md`` to ``bench/results/``
(``selection_quick.*`` with ``--quick``).

Time: one ``HardExampleSelector`` call, from a barrier to the end of the call on each
rank; a repeat counts the slowest rank; reported is the median over the repeats after
two warm-up calls (the second one is the steady state: what the first call taught the
selector to send with its row), the strategies interleaved (their order rotates) so
that machine noise hits all alike. All strategies must return bit-identical masks
(checked). ``gather`` is skipped above ``--gather-max`` keys per rank (seconds per call).

Yardsticks, in the same run and timed the same way: one all-gather of a 16-int64 row
(the least one collective costs) and one streaming pass over the rank's losses
(``losses.sum()``: the least that reading them costs). Peers, single-process calls on
one rank's losses: ``torch.topk`` of the M hardest (run on every rank at once, timed
like the selector, so that it meets the same contention) and, in the W = 1 run, a full
``torch.sort`` (mmseg's OHEM sorts every pixel). The small-batch case, K = 256 per rank with
``keep=0.25`` and ``gather``, is timed against the tiny all-gather.

Bytes: every ``torch.distributed`` collective of one steady-state call is wrapped and
the bytes of the tensor this rank hands to it are added up (all-reduce: the tensor;
all-gather: the rank's input; all-gather of objects: the pickle). Counted on every
rank, not estimated; the table shows the largest rank's count. What the wire carries
depends on gloo's algorithm (a ring all-gather forwards (W-1) inputs).

Paths (DESIGN.md §5, §13): the same selector, ``HardExampleSelector(keep=...)`` with the
default strategy, once with ``check="eager"`` (the host path, what CPU takes by
default) and once with ``check="deferred"`` (the read-free path a GPU takes, here on CPU
tensors), on the same losses, K = 256 (``keep=0.25``, the small-batch case), 1e3 and 1e4
(``keep=0.1``) per rank; after three calls each (the first is eager by design), the two
interleaved (order alternating), timed like the rest; masks checked identical. Reported:
the medians and their ratio deferred / eager. Target: at most 1.0 at K = 256, W = 1.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import pickle
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(1, str(ROOT))  # `python bench/selection.py` puts bench/ first on sys.path

from bench.common import markdown_table, run_meta, run_world, write_report  # noqa: E402
from dist_ohem import HardExampleSelector  # noqa: E402
from dist_ohem.on_host import AUTO_BRACKET_MIN_KEYS  # noqa: E402

STRATEGIES = ("gather", "bracket")
KEEP = 0.1
#: The small-batch case of the issue: K per rank, rule, strategy.
SMALL_KEYS, SMALL_KEEP = 256, 0.25
ROW_INTS = 16
#: Targets (issue 16): small call <= 2x the tiny all-gather; dense call at 1e7 per rank,
#: W=2, <= 15x the streaming pass and >= 10x faster than single-process torch.topk.
SMALL_TARGET, STREAM_TARGET, TOPK_TARGET = 2.0, 15.0, 10.0
#: The paths comparison: the selector's two checks, K per rank timed, and the rule at
#: each K (the small-batch rule at SMALL_KEYS, KEEP elsewhere); target deferred / eager
#: at K = SMALL_KEYS, W = 1.
CHECKS = ("eager", "deferred")
PATH_KEYS = (SMALL_KEYS, 10**3, 10**4)
PATH_TARGET = 1.0
#: Collectives the selector can call, and the position of the tensor a rank sends.
COLLECTIVES = {"all_reduce": 0, "all_gather_single": 1, "all_gather_into_tensor": 1}
#: The all-gather that comm uses (torch >= 2.10 names it all_gather_single).
GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

logger = logging.getLogger("bench.selection")


@dataclass(frozen=True)
class Config:
    """Benchmark settings, identical on every rank."""

    keys_per_rank: tuple[int, ...]
    repeats: int
    gather_max: int
    seed: int = 0
    path_keys: tuple[int, ...] = PATH_KEYS
    paths_only: bool = False


class ByteMeter:
    """Counts the collectives this rank calls and the bytes it hands to them."""

    def __init__(self) -> None:
        self.calls = 0
        self.bytes = 0

    @contextmanager
    def counting(self) -> Iterator[ByteMeter]:
        """Wrap the ``torch.distributed`` collectives for the duration of the block."""
        originals = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}
        originals["all_gather_object"] = dist.all_gather_object
        for name, original in originals.items():
            setattr(dist, name, self._wrap(name, original))
        try:
            yield self
        finally:
            for name, original in originals.items():
                setattr(dist, name, original)

    def _wrap(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            if name == "all_gather_object":
                self.bytes += len(pickle.dumps(args[1]))
            else:
                sent = args[COLLECTIVES[name]]
                self.bytes += sent.numel() * sent.element_size()
            return original(*args, **kwargs)

        return counted


def slowest(seconds: float) -> float:
    """The largest of every rank's ``seconds`` (a collective: call on all ranks)."""
    value = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return float(value)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Seconds of ``fn()`` on the slowest rank, started together after a barrier."""
    dist.barrier()
    start = time.perf_counter()
    out = fn()
    return slowest(time.perf_counter() - start), out


def median_ms(fn: Callable[[], Any], repeats: int) -> float:
    """Median over ``repeats`` of :func:`timed` (slowest rank), in ms."""
    return 1e3 * statistics.median(timed(fn)[0] for _ in range(repeats))


def repeats_for(num_keys: int, repeats: int) -> int:
    """Fewer repeats for the slow large cases, so the full run stays near 5 minutes."""
    return repeats if num_keys < 10**6 else max(3, repeats // 2)


def measure_keys(num_keys: int, config: Config) -> dict[str, Any]:
    """Every strategy, the streaming pass and (single process) the peers on ``num_keys``
    uniform float32 losses per rank."""
    gen = torch.Generator().manual_seed(config.seed * 1000 + dist.get_rank())
    losses = torch.rand(num_keys, generator=gen)
    strategies = [s for s in STRATEGIES if s != "gather" or num_keys <= config.gather_max]
    selectors = {s: HardExampleSelector(keep=KEEP, strategy=s) for s in strategies}
    meters = {s: ByteMeter() for s in strategies}
    masks = {}
    for strategy in strategies:
        selectors[strategy](losses)  # first call: teaches the selector what to send
        with meters[strategy].counting():  # the steady state, counted
            masks[strategy] = selectors[strategy](losses).mask
    for strategy in strategies[1:]:
        if not torch.equal(masks[strategies[0]], masks[strategy]):
            raise AssertionError(f"{strategy} mask differs at K={num_keys} per rank")
    repeats = repeats_for(num_keys, config.repeats)
    # The single-process peer runs on every rank at once, like the selector, so that it
    # meets the same contention for the cores and memory; it takes its turn in the same
    # rotation as the strategies, so that the topk / bracket ratio is side by side.
    calls = {s: functools.partial(selectors[s], losses) for s in strategies}
    calls["topk"] = functools.partial(torch.topk, losses, math.ceil(KEEP * num_keys))
    times: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(timed(calls[name])[0])
    row = {
        "keys_per_rank": num_keys,
        "stream_ms": median_ms(losses.sum, repeats),
        "topk_ms": 1e3 * statistics.median(times["topk"]),
        **{
            strategy: {
                "median_ms": 1e3 * statistics.median(times[strategy]),
                "times_ms": [1e3 * t for t in times[strategy]],
                "bytes_per_rank": all_ranks(meters[strategy].bytes),
                "collectives": meters[strategy].calls,
            }
            for strategy in strategies
        },
    }
    if dist.get_world_size() == 1:
        row["sort_ms"] = median_ms(lambda: torch.sort(losses), min(repeats, 3))
    return row


def small_batch(config: Config) -> dict[str, float]:
    """The small-batch case against one all-gather of a 16-int64 row and against the
    minimal gather selection, interleaved."""
    losses = torch.rand(SMALL_KEYS, generator=torch.Generator().manual_seed(dist.get_rank()))
    selector = HardExampleSelector(keep=SMALL_KEEP, strategy="gather")
    row = torch.arange(ROW_INTS, dtype=torch.int64)
    gathered = row.new_empty(dist.get_world_size() * ROW_INTS)
    calls = {
        "selector": lambda: selector(losses),
        "all_gather": lambda: GATHER(gathered, row),
        "minimal": functools.partial(minimal_gather_selection, losses, SMALL_KEEP),
    }
    for fn in calls.values():
        fn(), fn()  # warm-up; the selector's second call is the steady state
    times: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for repeat in range(10 * config.repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(timed(calls[name])[0])
    return {f"{name}_ms": 1e3 * statistics.median(t) for name, t in times.items()}


def path_keep(num_keys: int) -> float:
    """The rule of the paths comparison at ``num_keys`` per rank."""
    return SMALL_KEEP if num_keys == SMALL_KEYS else KEEP


def paths(config: Config) -> list[dict[str, Any]]:
    """The host path (``check="eager"``) and the read-free path (``check="deferred"``)
    of the same selector on the same losses, interleaved, for each K of ``path_keys``."""
    rows = []
    for num_keys in config.path_keys:
        gen = torch.Generator().manual_seed(config.seed * 1000 + 500 + dist.get_rank())
        losses = torch.rand(num_keys, generator=gen)
        keep = path_keep(num_keys)
        selectors = {check: HardExampleSelector(keep=keep, check=check) for check in CHECKS}
        results = {}
        for check, selector in selectors.items():
            selector(losses), selector(losses)  # the first call is eager by design
            results[check] = selector(losses)  # the steady state
        if not torch.equal(results["eager"].mask, results["deferred"].mask):
            raise AssertionError(f"deferred and eager masks differ at K={num_keys} per rank")
        times: dict[str, list[float]] = {check: [] for check in CHECKS}
        for repeat in range(10 * config.repeats):
            order = CHECKS if repeat % 2 == 0 else CHECKS[::-1]
            for check in order:
                times[check].append(timed(functools.partial(selectors[check], losses))[0])
        row: dict[str, Any] = {"keys_per_rank": num_keys, "keep": keep}
        for check in CHECKS:
            row[f"{check}_ms"] = 1e3 * statistics.median(times[check])
            row[f"{check}_strategy"] = results[check].strategy
        row["deferred_over_eager"] = row["deferred_ms"] / row["eager_ms"]
        rows.append(row)
    return rows


def minimal_gather_selection(losses: torch.Tensor, keep: float) -> torch.Tensor:
    """The least work of any exact gather selection, written for this one case: float32
    losses, equal sizes, no checks, ties to the lower index. Builds a row of
    ``[size, *keys]``, all-gathers it (one collective) and takes the top
    ``ceil(keep * K)`` of the gathered keys with numpy. Returns this rank's mask."""
    array = losses.numpy()
    row = numpy.empty(1 + array.size, dtype=numpy.int32)
    row[0] = array.size
    keys = row[1:]
    keys[:] = (array + 0.0).view(numpy.int32)  # -0.0 -> +0.0
    keys ^= (keys >> 31) & 0x7FFFFFFF
    gathered = torch.empty(dist.get_world_size() * row.size, dtype=torch.int32)
    GATHER(gathered, torch.from_numpy(row))
    rows = gathered.numpy().reshape(dist.get_world_size(), -1)
    flat = rows[:, 1:].reshape(-1)
    m = math.ceil(keep * int(rows[:, 0].sum()))
    kth = numpy.partition(flat, flat.size - m)[flat.size - m]
    picked = flat > kth
    picked[(flat == kth).nonzero()[0][: m - int(picked.sum())]] = True
    return torch.from_numpy(picked.reshape(rows.shape[0], -1)[dist.get_rank()])


def all_ranks(value: int) -> list[int]:
    """``value`` of every rank, rank order."""
    values = [0] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def rank_main(rank: int, world_size: int, init_file: str, config: Config, out_file: str) -> None:
    """One rank: join the gloo group, measure the small batch and every K."""
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        results: dict[str, Any] = {"world_size": world_size, "paths": paths(config)}
        if rank == 0:
            logger.info("W=%d paths done", world_size)
        if not config.paths_only:
            results["small"], results["keys"] = small_batch(config), []
        for num_keys in () if config.paths_only else config.keys_per_rank:
            results["keys"].append(measure_keys(num_keys, config))
            if rank == 0:
                logger.info("W=%d K=%d per rank done", world_size, num_keys)
        if rank == 0:
            Path(out_file).write_text(json.dumps(results))
    finally:
        dist.barrier()
        dist.destroy_process_group()


def crossover(run: dict[str, Any]) -> int | None:
    """Smallest K per rank from which bracket is faster than gather at every larger K
    where both ran."""
    found = None
    for row in reversed(run.get("keys", [])):
        if "gather" not in row:
            continue
        if row["bracket"]["median_ms"] >= row["gather"]["median_ms"]:
            break
        found = row["keys_per_rank"]
    return found


def cell(row: dict[str, Any], strategy: str) -> str:
    return f"{row[strategy]['median_ms']:.2f}" if strategy in row else "-"


def results_table(runs: list[dict[str, Any]]) -> str:
    """One row per (W, K): each strategy's median time and bytes, the streaming pass."""
    headers = [
        "W",
        "K per rank",
        *(f"{s} ms" for s in STRATEGIES),
        "stream pass ms",
        "bracket / stream",
        "torch.topk ms",
        "topk / bracket",
        *(f"{s} bytes/rank" for s in STRATEGIES),
        "collectives " + " / ".join(s[0] for s in STRATEGIES),
    ]
    rows = []
    for run in runs:
        for row in run["keys"]:
            rows.append(
                [
                    str(run["world_size"]),
                    f"{row['keys_per_rank']:.0e}",
                    *(cell(row, s) for s in STRATEGIES),
                    f"{row['stream_ms']:.2f}",
                    f"{row['bracket']['median_ms'] / row['stream_ms']:.1f}",
                    f"{row['topk_ms']:.2f}",
                    f"{row['topk_ms'] / row['bracket']['median_ms']:.2f}",
                    *(
                        f"{max(row[s]['bytes_per_rank']):,}" if s in row else "-"
                        for s in STRATEGIES
                    ),
                    " / ".join(str(row[s]["collectives"]) if s in row else "-" for s in STRATEGIES),
                ]
            )
    return markdown_table(headers, rows)


def peers_table(run: dict[str, Any]) -> str:
    """Single process (W = 1): the strategies next to torch.topk and torch.sort."""
    headers = ["K", "bracket ms", "gather ms", "torch.topk ms", "torch.sort ms", "topk / bracket"]
    rows = [
        [
            f"{row['keys_per_rank']:.0e}",
            cell(row, "bracket"),
            cell(row, "gather"),
            f"{row['topk_ms']:.2f}",
            f"{row['sort_ms']:.2f}",
            f"{row['topk_ms'] / row['bracket']['median_ms']:.1f}",
        ]
        for row in run["keys"]
    ]
    return markdown_table(headers, rows)


def targets(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's ratios, from this run (None where a needed cell did not run)."""
    by_world = {run["world_size"]: run for run in runs}
    out: dict[str, Any] = {}
    for world_size, run in by_world.items():
        at_small = [r for r in run.get("paths", []) if r["keys_per_rank"] == SMALL_KEYS]
        if at_small:
            out[f"deferred_over_eager_w{world_size}"] = at_small[0]["deferred_over_eager"]
    if 2 in by_world and "small" in by_world[2]:
        small = by_world[2]["small"]
        out["small_over_allgather"] = small["selector_ms"] / small["all_gather_ms"]
        out["minimal_over_allgather"] = small["minimal_ms"] / small["all_gather_ms"]
        dense = next((r for r in by_world[2]["keys"] if r["keys_per_rank"] == 10**7), None)
        if dense is not None:
            out["dense_over_stream"] = dense["bracket"]["median_ms"] / dense["stream_ms"]
            out["topk_over_dense"] = dense["topk_ms"] / dense["bracket"]["median_ms"]
    return out


def target_lines(found: dict[str, Any]) -> list[str]:
    lines = []
    for key, text, limit, better in (
        (
            "deferred_over_eager_w1",
            f"K={SMALL_KEYS}/rank, W=1, deferred (read-free path) / eager (host path) call",
            PATH_TARGET,
            "<=",
        ),
        (
            "small_over_allgather",
            "K=256/rank, W=2, gather call / all-gather of 16 int64",
            SMALL_TARGET,
            "<=",
        ),
        (
            "dense_over_stream",
            "K=1e7/rank, W=2, bracket call / streaming pass",
            STREAM_TARGET,
            "<=",
        ),
        (
            "topk_over_dense",
            "single-process torch.topk / K=1e7, W=2 bracket call",
            TOPK_TARGET,
            ">=",
        ),
    ):
        if key in found:
            if key == "small_over_allgather":  # the floor of this machine, for reference
                text += f" (the minimal gather selection: {found['minimal_over_allgather']:.2f}x)"
            ok = found[key] <= limit if better == "<=" else found[key] >= limit
            verdict = "met" if ok else "NOT met"
            lines.append(f"- {text}: **{found[key]:.2f}x** (target {better} {limit:g}x: {verdict})")
    reported = [  # the other world sizes' deferred / eager, next to W=1's
        f"- K={SMALL_KEYS}/rank, W={key.removeprefix('deferred_over_eager_w')}, deferred / "
        f"eager call: **{value:.2f}x** (reported)"
        for key, value in sorted(found.items())
        if key.startswith("deferred_over_eager_w") and key != "deferred_over_eager_w1"
    ]
    at = 1 if "deferred_over_eager_w1" in found else 0
    return lines[:at] + reported + lines[at:]


def paths_table(runs: list[dict[str, Any]]) -> str:
    """The two paths side by side, per (W, K)."""
    headers = [
        "W",
        "K per rank",
        "keep",
        "eager (host path) ms",
        "deferred (read-free path) ms",
        "deferred / eager",
    ]
    rows = [
        [
            str(run["world_size"]),
            str(row["keys_per_rank"]),
            f"{row['keep']:g}",
            f"{row['eager_ms']:.3f} ({row['eager_strategy']})",
            f"{row['deferred_ms']:.3f} ({row['deferred_strategy']})",
            f"{row['deferred_over_eager']:.2f}",
        ]
        for run in runs
        for row in run.get("paths", [])
    ]
    return markdown_table(headers, rows)


def render_markdown(report: dict[str, Any]) -> str:
    """The report as markdown: setup, targets, tables, crossover."""
    meta = report["meta"]
    runs = report["runs"]
    repeats = report["config"]["repeats"]
    lines = [
        "# dist_ohem selection benchmark: gather, bracket; host and read-free paths",
        "",
        f"- command: `{meta['command']}`",
        f"- date (UTC): {meta['date']}; torch {meta['torch']}; python {meta['python']}; "
        f"{meta['cores']} cores; git {meta['git']}",
        f"- load average at start / end: {meta['load_start']} / {meta['load_end']}; "
        f"wall time {meta['wall_s']:.0f} s",
        "- **shared machine**: other jobs may run on the same cores; ratios are measured side "
        "by side in one run (bytes are exact).",
    ]
    full = all("small" in run for run in runs)
    if full:
        lines += [
            f"- rule keep={KEEP}, uniform float32 losses; gloo, one thread per rank; time = "
            f"median of {repeats} repeats (half above 1e6 keys) of the "
            "slowest rank's call (barrier to end of call), after two warm-up calls, "
            "strategies interleaved",
            "- bytes/rank: bytes of the tensors one rank hands to collectives in one "
            "steady-state call, counted by wrapping torch.distributed (largest rank); "
            "collectives = calls per selection",
        ]
    lines += [
        "",
        "## Targets",
        "",
        *target_lines(report["targets"]),
        "",
        '## Paths: read-free (`check="deferred"`) vs host (`check="eager"`)',
        "",
        paths_table(runs),
        "",
        "The same `HardExampleSelector(keep=...)` (default strategy; the result's strategy "
        "in brackets) on the same uniform float32 losses, gloo, one thread per rank; time = "
        f"median of {10 * repeats} repeats of the slowest rank's call (barrier to end of "
        "call) after three calls, the two paths interleaved; masks identical (checked). "
        'On a GPU the read-free path is the default (`check="auto"`); on CPU the host path.',
        "",
    ]
    if not full:
        return "\n".join(lines)
    small_rows = [
        [
            str(run["world_size"]),
            f"{small['selector_ms']:.3f}",
            f"{small['all_gather_ms']:.3f}",
            f"{small['minimal_ms']:.3f}",
            f"{small['selector_ms'] / small['all_gather_ms']:.2f}",
            f"{small['minimal_ms'] / small['all_gather_ms']:.2f}",
        ]
        for run in runs
        for small in [run["small"]]
    ]
    lines += [
        f"## Small batch: K={SMALL_KEYS} per rank, keep={SMALL_KEEP}, gather",
        "",
        markdown_table(
            [
                "W",
                "selector ms",
                f"all-gather of {ROW_INTS} int64 ms",
                "minimal gather selection ms",
                "selector / all-gather",
                "minimal / all-gather",
            ],
            small_rows,
        ),
        "",
        "Minimal gather selection (`minimal_gather_selection`): the same selection written "
        "for this one case, with no checks and no other features: one row of keys, one "
        "all-gather, a numpy partition. What its ratio exceeds 1 by is the cost of any host "
        "work next to a gloo collective on this machine.",
        "",
        "## Every K",
        "",
        results_table(runs),
        "",
    ]
    single = next((run for run in runs if run["world_size"] == 1), None)
    if single is not None:
        lines += ["## Single process: peers", "", peers_table(single), ""]
    lines.append(
        "Crossover (smallest K per rank from which bracket beats gather at every larger K): "
        + "; ".join(
            f"W={run['world_size']}: {run['crossover']:.0e}"
            if run["crossover"]
            else f"W={run['world_size']}: none"
            for run in runs
        )
        + f'. `strategy="auto"` picks bracket above {AUTO_BRACKET_MIN_KEYS:,} instances on '
        "the largest rank (`AUTO_BRACKET_MIN_KEYS`)."
    )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags; ``--quick`` changes the defaults, explicit flags still win."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="K up to 1e5, W 1 and 2, < 30 s")
    parser.add_argument(
        "--paths-only",
        action="store_true",
        help="only deferred vs eager (default W 1 and 2); writes selection_paths.*",
    )
    parser.add_argument(
        "--path-keys",
        type=int,
        nargs="+",
        default=list(PATH_KEYS),
        help="K per rank of the paths comparison (default 256 1000 10000)",
    )
    parser.add_argument("--repeats", type=int, help="timed repeats per strategy (default 11)")
    parser.add_argument("--world-sizes", type=int, nargs="+", help="default 1 2 4")
    parser.add_argument("--keys", type=int, nargs="+", help="K per rank (default 1e3 ... 1e7)")
    parser.add_argument(
        "--gather-max", type=int, default=10**6, help="largest K per rank timed for gather"
    )
    parser.add_argument("--output-dir", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    defaults = (
        {"repeats": 5, "world_sizes": [1, 2], "keys": [10**3, 10**4, 10**5]}
        if args.quick or args.paths_only
        else {
            "repeats": 11,
            "world_sizes": [1, 2, 4],
            "keys": [10**3, 10**4, 3 * 10**4, 10**5, 10**6, 10**7],
        }
    )
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.repeats < 1 or min(args.world_sizes) < 1 or min(args.keys + args.path_keys) < 1:
        parser.error("need --repeats, --world-sizes, --keys and --path-keys >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    """Run every world size, then print and write the report."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the spawned ranks
    config = Config(
        tuple(args.keys),
        args.repeats,
        args.gather_max,
        path_keys=tuple(args.path_keys),
        paths_only=args.paths_only,
    )
    started, load_start = time.perf_counter(), os.getloadavg()
    runs = [run_world(world_size, config, rank_main) for world_size in args.world_sizes]
    for run in runs:
        run["crossover"] = crossover(run)
    report = {"meta": run_meta(started, load_start), "config": asdict(config), "runs": runs}
    report["targets"] = targets(runs)
    stem = "selection_quick" if args.quick else "selection"
    stem = "selection_paths" if args.paths_only else stem
    write_report(report, render_markdown(report), args.output_dir, stem)


if __name__ == "__main__":
    main()
