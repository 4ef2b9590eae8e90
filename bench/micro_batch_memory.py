"""Run: ``flock /tmp/bench.lock python bench/micro_batch_memory.py`` (~1 min on 2 cores).

Peak activation memory of ``ohem_step`` against ``micro_batch_size`` (docs/DESIGN.md §9), next
to plain training and ``ohem_step`` without micro-batches, on 1 and 2 CPU ranks (gloo +
DDP, one thread a rank). Writes ``micro_batch_memory.json`` and ``.md`` to
``bench/results/``.

Setup: a token model (embedding 128, a 512-wide MLP per token, 1000-way output) on
``(N, T)`` sequences, N = 64 per rank, T = 64, padded at random lengths
(``ignore_index=-100``); ``keep=0.25`` selects M = 16 x W sequences; ``balance=True``,
so every rank trains M / W = 16 of them.

Memory: the *peak* of the bytes autograd holds saved for backward (distinct storages,
parameters excluded), tracked live: a ``saved_tensors_hooks`` pack hook wraps each saved
tensor in a holder whose release (when the backward frees the graph) subtracts its
storage. This is the activation part of the peak; it is exact and deterministic, unlike
RSS on CPU (no allocator peak counter). "largest layer output" is the biggest tensor any
leaf module returned during the step (either pass): the scoring pass keeps no saved
tensors, its transient peak follows its chunk size, and this column shows it.
Time: the median step (forward + backward + SGD step, barrier to barrier) over
``--repeats`` repeats, all methods interleaved in one run, load average recorded.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

# `python bench/micro_batch_memory.py` puts bench/ first on sys.path; add the repo.
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from bench.common import markdown_table, run_meta, run_world, write_report
from dist_ohem import HardExampleSelector, ohem_step

logger = logging.getLogger("bench")

VOCAB = 1000
IGNORE = -100
WORLD_SIZES = (1, 2)
#: Method label -> micro_batch_size (None: one chunk); "plain" trains every example.
METHODS: dict[str, int | None] = {
    "plain": None,
    "ohem_step": None,
    "ohem_step m=32": 32,
    "ohem_step m=16": 16,
    "ohem_step m=8": 8,
    "ohem_step m=4": 4,
    "ohem_step m=2": 2,
}


@dataclass(frozen=True)
class Config:
    batch: int
    length: int
    keep: float
    repeats: int
    warmup: int


class TokenMLP(nn.Module):
    """``(N, T)`` tokens -> ``(N, VOCAB, T)`` logits: embedding, 512-wide MLP, output."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embedding = nn.Embedding(VOCAB, 128)
        self.hidden = nn.Sequential(nn.Linear(128, 512), nn.GELU(), nn.Linear(512, 128), nn.GELU())
        self.output = nn.Linear(128, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.output(self.hidden(self.embedding(tokens))).transpose(1, 2)


def token_batch(gen: torch.Generator, n: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(1, VOCAB, (n, length), generator=gen)
    targets = torch.randint(0, VOCAB, (n, length), generator=gen)
    lengths = torch.randint(length // 4, length + 1, (n,), generator=gen)
    padding = torch.arange(length).unsqueeze(0) >= lengths.unsqueeze(1)
    tokens[padding] = 0
    targets[padding] = IGNORE
    return tokens, targets


class _Saved:
    """A saved tensor; its release (the graph freed by backward) updates the tracker."""

    __slots__ = ("key", "tensor", "tracker")

    def __init__(self, tensor: torch.Tensor, key: int | None, tracker: ActivationTracker):
        self.tensor, self.key, self.tracker = tensor, key, tracker

    def __del__(self) -> None:
        if self.key is not None:
            self.tracker.release(self.key)


class ActivationTracker:
    """Live bytes of saved activations (per distinct storage), their peak, and the
    largest output of any leaf module."""

    def __init__(self, model: nn.Module) -> None:
        self.parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.live: dict[int, list[int]] = {}  # storage -> [references, bytes]
        self.live_bytes = 0
        self.peak_bytes = 0
        self.largest_output = 0
        self.leaves = [m for m in model.modules() if not list(m.children())]

    def pack(self, tensor: torch.Tensor) -> _Saved:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self.parameters:
            return _Saved(tensor, None, self)
        entry = self.live.setdefault(key, [0, storage.nbytes()])
        if entry[0] == 0:
            self.live_bytes += entry[1]
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        entry[0] += 1
        return _Saved(tensor, key, self)

    def release(self, key: int) -> None:
        entry = self.live[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.live_bytes -= entry[1]
            del self.live[key]

    def output_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            self.largest_output = max(self.largest_output, output.untyped_storage().nbytes())

    @contextmanager
    def tracking(self) -> Iterator[ActivationTracker]:
        handles = [leaf.register_forward_hook(self.output_hook) for leaf in self.leaves]
        try:
            with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda saved: saved.tensor):
                yield self
        finally:
            for handle in handles:
                handle.remove()


def train_step(method: str, ddp: nn.Module, batch, config: Config) -> None:
    tokens, targets = batch
    if method == "plain":
        # The same objective as ohem_step's: the mean over sequences of the per-token mean.
        losses = nn.functional.cross_entropy(ddp(tokens), targets, reduction="none")
        kept = targets != IGNORE
        (((losses * kept).sum(1) / kept.sum(1)).mean()).backward()
        return
    ohem_step(
        ddp,
        tokens,
        targets,
        nn.CrossEntropyLoss(),
        HardExampleSelector(keep=config.keep),
        balance=True,
        micro_batch_size=METHODS[method],
    )


def rank_main(rank: int, world_size: int, init_file: str, config: Config, out_file: str) -> None:
    """One rank: every method's peak memory (one tracked step) and median step time."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        model = TokenMLP()
        ddp = DDP(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        gen = torch.Generator().manual_seed(100 + rank)
        batch = token_batch(gen, config.batch, config.length)
        memory, times = {}, {method: [] for method in METHODS}
        for method in METHODS:
            tracker = ActivationTracker(model)
            with tracker.tracking():
                train_step(method, ddp, batch, config)
            optimizer.zero_grad()
            memory[method] = {"peak": tracker.peak_bytes, "largest": tracker.largest_output}
        for repeat in range(config.warmup + config.repeats):
            order = list(METHODS)
            shift = repeat % len(order)
            for method in order[shift:] + order[:shift]:
                dist.barrier()
                started = time.perf_counter()
                train_step(method, ddp, batch, config)
                optimizer.step()
                optimizer.zero_grad()
                dist.barrier()
                if repeat >= config.warmup:
                    times[method].append(time.perf_counter() - started)
        gathered: list[Any] = [None] * world_size
        dist.all_gather_object(gathered, {"memory": memory, "times": times})
        if rank == 0:
            Path(out_file).write_text(json.dumps(gathered))
    finally:
        dist.barrier()
        dist.destroy_process_group()


def summarize(world_size: int, per_rank: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for method, micro_batch_size in METHODS.items():
        peaks = [rank["memory"][method]["peak"] for rank in per_rank]
        rows.append(
            {
                "world_size": world_size,
                "method": method,
                "micro_batch_size": micro_batch_size,
                "peak_saved_mib_per_rank": [p / 2**20 for p in peaks],
                "largest_output_mib": max(r["memory"][method]["largest"] for r in per_rank) / 2**20,
                # a step is barrier to barrier: every rank measures the same span
                "step_ms": 1000 * statistics.median(per_rank[0]["times"][method]),
            }
        )
    return rows


def render_markdown(report: dict[str, Any]) -> str:
    meta, config = report["meta"], report["config"]
    parts = [
        "# ohem_step peak activation memory vs micro_batch_size",
        "",
        f"`{meta['command']}` at {meta['git']}, {meta['date']}, torch {meta['torch']}, "
        f"{meta['cores']} cores, load average {meta['load_start'][0]:.2f} at start, "
        f"{meta['load_end'][0]:.2f} at end, {meta['wall_s']:.0f} s.",
        "",
        f"Token MLP, N = {config['batch']} sequences of T = {config['length']} per rank, "
        f"keep = {config['keep']} (M = {round(config['keep'] * config['batch'])} x W, "
        "balance=True). Peak saved = the peak of live saved activations in one step; "
        "step ms = median of "
        f"{config['repeats']} interleaved repeats.",
        "",
    ]
    for world_size in WORLD_SIZES:
        rows = [row for row in report["rows"] if row["world_size"] == world_size]
        plain = rows[0]["peak_saved_mib_per_rank"][0]
        table = [
            [
                row["method"],
                " / ".join(f"{p:.2f}" for p in row["peak_saved_mib_per_rank"]),
                f"{row['peak_saved_mib_per_rank'][0] / plain:.3f}",
                f"{row['largest_output_mib']:.2f}",
                f"{row['step_ms']:.1f}",
            ]
            for row in rows
        ]
        parts += [
            f"## W = {world_size}",
            "",
            markdown_table(
                [
                    "method",
                    "peak saved MiB (per rank)",
                    "vs plain",
                    "largest layer output MiB",
                    "step ms",
                ],
                table,
            ),
            "",
        ]
    return "\n".join(parts)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64, help="sequences per rank")
    parser.add_argument("--length", type=int, default=64, help="tokens per sequence")
    parser.add_argument("--keep", type=float, default=0.25)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--output-dir", type=Path, default=Path(__file__).parent / "results")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the spawned ranks
    config = Config(args.batch, args.length, args.keep, args.repeats, args.warmup)
    started, load_start = time.perf_counter(), os.getloadavg()
    rows = [
        row
        for world_size in WORLD_SIZES
        for row in summarize(world_size, run_world(world_size, config, rank_main))
    ]
    report = {"meta": run_meta(started, load_start), "config": asdict(config), "rows": rows}
    write_report(report, render_markdown(report), args.output_dir, "micro_batch_memory")


if __name__ == "__main__":
    main()
