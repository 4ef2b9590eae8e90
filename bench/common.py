"""Helpers the benchmarks share: start W ranks, markdown tables, run metadata, reports."""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as torch_mp

logger = logging.getLogger("bench")

#: One colour per variant in every results plot (quality.png, roi_quality.png,
#: roi_skewed.png): no mining, the standard RoI sampler, a random subset, local and
#: global OHEM. The keys are the variant names the benchmarks use.
VARIANT_COLORS = {
    "all": "tab:gray",  # no mining
    "sampler": "tab:purple",  # the standard RoI sampler (no mining of RoIs)
    "random": "tab:green",
    "local": "tab:blue",
    "global": "tab:red",
}
#: Sharding colours (budget.png plots global - local per sharding): none of the
#: variants' colours, so that a colour never means two things across the plots.
SHARD_COLORS = {"iid": "tab:olive", "skewed": "tab:brown", "sources": "tab:cyan"}


def run_world(world_size: int, config: Any, rank_fn: Callable[..., None]) -> Any:
    """Start ``world_size`` ranks (FileStore rendezvous in a temp dir); their raw results.

    ``rank_fn(rank, world_size, init_file, config, out_file)`` runs on every rank; rank 0
    writes its results as JSON to ``out_file``.
    """
    with tempfile.TemporaryDirectory(prefix="dist_ohem_bench_") as tmp:
        out_file = os.path.join(tmp, "results.json")
        torch_mp.spawn(
            rank_fn,
            args=(world_size, os.path.join(tmp, "rendezvous"), config, out_file),
            nprocs=world_size,
            join=True,
        )
        return json.loads(Path(out_file).read_text())


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def run_meta(
    started: float, load_start: tuple[float, ...], git_paths: tuple[str, ...] = ("dist_ohem",)
) -> dict[str, Any]:
    """How a benchmark report came about: command, versions, cores, git revision (dirty if
    ``git_paths`` have local changes), load average at start (``load_start``) and end,
    and the wall time since ``started`` (``time.perf_counter()``)."""
    return {
        "command": shlex.join(["python", *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cores": os.cpu_count(),
        "git": git_revision(git_paths),
        "load_start": [round(x, 2) for x in load_start],
        "load_end": [round(x, 2) for x in os.getloadavg()],
        "wall_s": time.perf_counter() - started,
    }


def write_report(report: dict[str, Any], markdown: str, output_dir: Path, stem: str) -> None:
    """Print ``markdown``; write it and ``report`` to ``output_dir/stem.{md,json}``."""
    print(markdown)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (output_dir / f"{stem}.md").write_text(markdown)
    logger.info("wrote %s/%s.{json,md}", output_dir, stem)


def git_revision(paths: tuple[str, ...] = ("dist_ohem",)) -> str:
    """Short commit hash, with ``+dirty`` when ``paths`` have local changes."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", *paths], capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")
