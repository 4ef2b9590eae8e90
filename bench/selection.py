"""Run: ``python bench/selection.py`` (full, ~5 min on 2 cores) or add ``--quick`` (< 30 s).

Cost of one global selection, strategy ``gather`` vs ``radix`` (DESIGN.md §5), on W = 1,
2 and 4 gloo ranks (one thread each, FileStore rendezvous: no port) with K = 1e3 ... 1e7
float32 losses per rank, rule ``keep=0.1``. Writes ``selection.json`` and ``selection.md``
to ``bench/results/`` (``selection_quick.*`` with ``--quick``).

Time: one ``HardExampleSelector`` call, from a barrier to the end of the call on each
rank; a repeat counts the slowest rank; reported is the median over ``--repeats`` repeats
after one warm-up call, the two strategies interleaved (their order alternates) so that
machine noise hits both alike. Both calls must return bit-identical masks (checked).

Bytes: every ``torch.distributed`` collective the call makes is wrapped and the bytes of
the tensor this rank hands to it are added up (all-reduce: the tensor; all-gather: the
rank's input, padded to the longest rank as gloo needs; all-gather of objects: the
pickle). Counted on every rank, not estimated; the table shows the largest rank's
count. What the wire carries depends on gloo's algorithm (a ring all-gather forwards
(W-1) inputs, a ring all-reduce about 2(W-1)/W times the tensor).

Yardstick: in the same run, the median time of a plain all-reduce of a 1e6-float32
tensor (a 4 MB gradient), the per-step cost that DDP already pays.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
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

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(1, str(ROOT))  # `python bench/selection.py` puts bench/ first on sys.path

from bench.common import markdown_table, run_meta, run_world, write_report  # noqa: E402
from dist_ohem import HardExampleSelector  # noqa: E402
from dist_ohem.selector import AUTO_RADIX_MIN_KEYS  # noqa: E402

STRATEGIES = ("gather", "radix")
KEEP = 0.1
YARDSTICK_NUMEL = 10**6
#: Collectives the selector can call, and the position of the tensor a rank sends.
COLLECTIVES = {"all_reduce": 0, "all_gather_single": 1, "all_gather_into_tensor": 1}

logger = logging.getLogger("bench.selection")


@dataclass(frozen=True)
class Config:
    """Benchmark settings, identical on every rank."""

    keys_per_rank: tuple[int, ...]
    repeats: int
    seed: int = 0


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


def measure_keys(num_keys: int, repeats: int, seed: int) -> dict[str, Any]:
    """Both strategies on ``num_keys`` uniform float32 losses per rank."""
    gen = torch.Generator().manual_seed(seed * 1000 + dist.get_rank())
    losses = torch.rand(num_keys, generator=gen)
    selectors = {s: HardExampleSelector(keep=KEEP, strategy=s) for s in STRATEGIES}
    meters = {s: ByteMeter() for s in STRATEGIES}
    masks = {}
    for strategy in STRATEGIES:  # warm-up call, counted
        with meters[strategy].counting():
            masks[strategy] = selectors[strategy](losses).mask
    if not torch.equal(masks["gather"], masks["radix"]):
        raise AssertionError(f"gather and radix masks differ at K={num_keys} per rank")
    times: dict[str, list[float]] = {s: [] for s in STRATEGIES}
    for repeat in range(repeats):
        for strategy in STRATEGIES[:: 1 if repeat % 2 == 0 else -1]:
            times[strategy].append(timed(lambda s=strategy: selectors[s](losses))[0])
    per_rank_bytes = {s: all_ranks(meters[s].bytes) for s in STRATEGIES}
    return {
        "keys_per_rank": num_keys,
        **{
            strategy: {
                "median_ms": 1e3 * statistics.median(times[strategy]),
                "times_ms": [1e3 * t for t in times[strategy]],
                "bytes_per_rank": per_rank_bytes[strategy],
                "collectives": meters[strategy].calls,
            }
            for strategy in STRATEGIES
        },
    }


def all_ranks(value: int) -> list[int]:
    """``value`` of every rank, rank order."""
    values = [0] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def yardstick_ms(repeats: int) -> float:
    """Median time of an all-reduce of a 1e6-float32 gradient (0 calls on one rank)."""
    gradient = torch.randn(YARDSTICK_NUMEL)
    dist.all_reduce(gradient)  # warm-up
    return 1e3 * statistics.median(
        timed(lambda: dist.all_reduce(gradient))[0] for _ in range(repeats)
    )


def rank_main(rank: int, world_size: int, init_file: str, config: Config, out_file: str) -> None:
    """One rank: join the gloo group, measure the yardstick and every K."""
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        results = {"world_size": world_size, "allreduce_1e6_ms": yardstick_ms(config.repeats)}
        results["keys"] = []
        for num_keys in config.keys_per_rank:
            results["keys"].append(measure_keys(num_keys, config.repeats, config.seed))
            if rank == 0:
                logger.info("W=%d K=%d per rank done", world_size, num_keys)
        if rank == 0:
            Path(out_file).write_text(json.dumps(results))
    finally:
        dist.barrier()
        dist.destroy_process_group()


def crossover(run: dict[str, Any]) -> int | None:
    """Smallest K per rank from which radix is faster than gather at every larger K."""
    found = None
    for row in reversed(run["keys"]):
        if row["radix"]["median_ms"] >= row["gather"]["median_ms"]:
            break
        found = row["keys_per_rank"]
    return found


def results_table(runs: list[dict[str, Any]]) -> str:
    """One row per (W, K): both strategies' median time and bytes per rank."""
    headers = [
        "W",
        "K per rank",
        "gather ms",
        "radix ms",
        "radix / gather",
        "gather bytes/rank",
        "radix bytes/rank",
        "collectives g / r",
        "all-reduce 1e6 f32 ms",
    ]
    rows = []
    for run in runs:
        for row in run["keys"]:
            gather, radix = row["gather"], row["radix"]
            rows.append(
                [
                    str(run["world_size"]),
                    f"{row['keys_per_rank']:.0e}",
                    f"{gather['median_ms']:.2f}",
                    f"{radix['median_ms']:.2f}",
                    f"{radix['median_ms'] / gather['median_ms']:.2f}",
                    f"{max(gather['bytes_per_rank']):,}",
                    f"{max(radix['bytes_per_rank']):,}",
                    f"{gather['collectives']} / {radix['collectives']}",
                    f"{run['allreduce_1e6_ms']:.2f}",
                ]
            )
    return markdown_table(headers, rows)


def render_markdown(report: dict[str, Any]) -> str:
    """The report as markdown: setup, table, crossover."""
    meta = report["meta"]
    lines = [
        "# dist_ohem selection benchmark: gather vs radix",
        "",
        f"- command: `{meta['command']}`",
        f"- date (UTC): {meta['date']}; torch {meta['torch']}; python {meta['python']}; "
        f"{meta['cores']} cores; git {meta['git']}",
        f"- load average at start / end: {meta['load_start']} / {meta['load_end']}; "
        f"wall time {meta['wall_s']:.0f} s",
        "- **shared machine**: other jobs ran on the same cores during this run; times are "
        "noisy (bytes are exact). Rerun with the command above on a quiet machine.",
        f"- rule keep={KEEP}, uniform float32 losses; gloo, one thread per rank; time = "
        f"median of {report['config']['repeats']} repeats of the slowest rank's call "
        "(barrier to end of call), strategies interleaved",
        "- bytes/rank: bytes of the tensors one rank hands to collectives per call, counted "
        "by wrapping torch.distributed (largest rank); collectives g / r = calls per "
        "selection for gather / radix",
        "",
        results_table(report["runs"]),
        "",
        "Crossover (smallest K per rank from which radix is faster at every larger K): "
        + "; ".join(
            f"W={run['world_size']}: {run['crossover']:.0e}"
            if run["crossover"]
            else f"W={run['world_size']}: none"
            for run in report["runs"]
        )
        + f'. `strategy="auto"` picks radix above {AUTO_RADIX_MIN_KEYS:,} instances on '
        "the largest rank (`AUTO_RADIX_MIN_KEYS`).",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags; ``--quick`` changes the defaults, explicit flags still win."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="K up to 1e5, W 1 and 2, < 30 s")
    parser.add_argument("--repeats", type=int, help="timed repeats per strategy (default 11)")
    parser.add_argument("--world-sizes", type=int, nargs="+", help="default 1 2 4")
    parser.add_argument("--keys", type=int, nargs="+", help="K per rank (default 1e3 ... 1e7)")
    parser.add_argument("--output-dir", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    defaults = (
        {"repeats": 5, "world_sizes": [1, 2], "keys": [10**3, 10**4, 10**5]}
        if args.quick
        else {
            "repeats": 11,
            "world_sizes": [1, 2, 4],
            "keys": [10**3, 10**4, 3 * 10**4, 10**5, 10**6, 10**7],
        }
    )
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.repeats < 1 or min(args.world_sizes) < 1 or min(args.keys) < 1:
        parser.error("need --repeats, --world-sizes and --keys >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    """Run every world size, then print and write the report."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the spawned ranks
    config = Config(tuple(args.keys), args.repeats)
    started, load_start = time.perf_counter(), os.getloadavg()
    runs = [run_world(world_size, config, rank_main) for world_size in args.world_sizes]
    for run in runs:
        run["crossover"] = crossover(run)
    report = {"meta": run_meta(started, load_start), "config": asdict(config), "runs": runs}
    stem = "selection_quick" if args.quick else "selection"
    write_report(report, render_markdown(report), args.output_dir, stem)


if __name__ == "__main__":
    main()
