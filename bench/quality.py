"""Run: ``python bench/quality.py`` (full study, <= 30 min on 2 cores) or add ``--quick`` (< 3 min).

Does global selection help training? ``launch/train.py`` is run under torchrun (one
thread per rank, ranks on one machine) for every (cell, variant, seed), one run after
another. A cell is a task, a world size W and a sharding of the training data:

- ``detection``: rare plus signs (positives) among clutter, plus signs missing an arm
  (hard negatives). Hard-case metrics: positive-class AP (headline), recall at 1% false
  positive rate, hard-negative accuracy, and positive accuracy next to it (calling
  everything negative scores 1.0 on hard negatives).
- ``digits``: scikit-learn's 8x8 digits with a long-tailed train split (25:1). Hard-case
  metrics: tail-class accuracy (headline), balanced accuracy, and head-class accuracy.
- ``shard=iid``: every rank draws from the whole training set. ``shard=skewed``
  (non-iid): every example of the task's hard groups is on rank 0, the rest split evenly.

Variants, all in two-pass mode (``ohem_step``) at the same keep = 1/4: ``scope=all`` (no
mining: every example is trained on, after a scoring pass it does not need), ``random``
(the same M = K/4 examples, uniformly at random), ``local`` (each rank's own top 1/4) and
``global`` (the top 1/4 of the whole distributed batch). At W=4 the per-rank batch is
halved, so every cell of a task has the same global batch K and global OHEM makes the same
kind of update at W=2 and W=4, while local OHEM chooses from smaller shards.

Time to target: per cell the target is ``TARGET_FRACTION`` x the best final mean headline
metric over the variants. A run reaches it at its first evaluation whose headline metric is
>= the target; the cost up to there is the training time (the sum over steps of the
slowest rank's step time: forward, selection, backward and optimizer; evaluation and
startup excluded) and the examples back-propagated (sum of M over the steps). Means are
over the seeds that reached it, and how many did is reported.

Writes ``quality.json`` (every run's raw numbers and command line), ``quality.md`` and
``quality.png`` to ``bench/results/`` (``quality_quick.*`` with ``--quick``). Wall-clock
numbers depend on the machine's load; the md records the load average.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(1, str(ROOT))  # `python bench/quality.py` puts bench/ first on sys.path

from bench.common import markdown_table, run_meta, write_report  # noqa: E402
from launch.engines import free_port  # noqa: E402

VARIANTS = {
    "all": "no mining",
    "random": "random subset",
    "local": "local OHEM",
    "global": "global OHEM",
}
#: The hard-case metrics of each task; the first is the task's headline metric.
METRICS = {
    "detection": ("ap", "recall_at_1pct_fpr", "hard_negative_acc", "positive_acc"),
    "digits": ("tail_acc", "balanced_acc", "head_acc"),
}
LABELS = {
    "ap": "AP",
    "recall_at_1pct_fpr": "recall@1%FPR",
    "hard_negative_acc": "hard-neg acc",
    "positive_acc": "positive acc",
    "tail_acc": "tail acc",
    "balanced_acc": "balanced acc",
    "head_acc": "head acc",
}
TARGET_FRACTION = 0.9
KEEP = 0.25

logger = logging.getLogger("bench.quality")


@dataclass(frozen=True)
class Cell:
    """One (task, W, sharding) setting, trained with every variant and seed."""

    task: str
    world_size: int
    shard: str
    batch_size: int  # per rank
    max_steps: int
    eval_every: int

    @property
    def name(self) -> str:
        """``detection W=2 skewed``."""
        return f"{self.task} W={self.world_size} {self.shard}"

    @property
    def headline(self) -> str:
        """The task's headline metric."""
        return METRICS[self.task][0]


#: The full study: global batch K = 256 (detection) and 128 (digits) in every cell.
FULL = (
    Cell("detection", 2, "iid", 128, 300, 25),
    Cell("detection", 2, "skewed", 128, 300, 25),
    Cell("detection", 4, "skewed", 64, 300, 25),
    Cell("digits", 2, "skewed", 64, 300, 25),
    Cell("digits", 4, "skewed", 32, 300, 25),
)
QUICK = (Cell("detection", 2, "skewed", 128, 120, 20),)


def train_command(cell: Cell, variant: str, seed: int, run_dir: Path) -> list[str]:
    """The torchrun command line of one run (needs ``OMP_NUM_THREADS=1``)."""
    return [
        "torchrun",
        f"--nproc_per_node={cell.world_size}",
        f"--master_port={free_port()}",
        "launch/train.py",
        f"run_dir={run_dir}",
        f"task={cell.task}",
        f"shard={cell.shard}",
        f"seed={seed}",
        f"max_steps={cell.max_steps}",
        f"batch_size={cell.batch_size}",
        "mode=two_pass",
        f"scope={variant}",
        "rule=keep",
        f"keep={KEEP}",
        f"eval_every={cell.eval_every}",
        f"checkpoint_every={cell.max_steps}",
        "log_every=100000",
        "plot=false",
    ]


def read_run(run_dir: Path, cell: Cell) -> dict[str, Any]:
    """A finished run's final metrics and its learning curve from ``run_dir``.

    Each curve point is an evaluation: its step, the training seconds and examples
    back-propagated through that step (cumulative), and the cell's task metrics.
    """
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_s = examples = 0.0
    step_cost: dict[int, tuple[float, float]] = {0: (0.0, 0.0)}
    train = [r for r in records if r["kind"] == "train"]
    for record in train:
        train_s += record["step_s_max"]
        examples += record["num_selected_global"]
        step_cost[record["step"]] = (train_s, examples)
    metrics = METRICS[cell.task]
    curve = [
        {
            "step": r["step"],
            "train_s": step_cost[r["step"]][0],
            "examples": int(step_cost[r["step"]][1]),
            **{key: r[key] for key in metrics},
        }
        for r in records
        if r["kind"] == "eval"
    ]
    return {
        "final": {key: summary["final_eval"][key] for key in metrics},
        "train_s": summary["throughput"]["train_s"],
        "examples_backpropagated": summary["examples_backpropagated"],
        "curve": curve,
        # Share of the batches' hard-group examples (positives and hard negatives; tail
        # digits) that the selection kept, over all steps.
        "hard_kept": sum(r["hard_selected"] for r in train)
        / max(1, sum(r["hard_in_batch"] for r in train)),
        "parameter_sha256_agree": len(set(summary["parameter_sha256_per_rank"])) == 1,
    }


def run_one(cell: Cell, variant: str, seed: int, runs_dir: Path) -> dict[str, Any]:
    """Train one (cell, variant, seed) under torchrun; its raw record."""
    run_dir = runs_dir / f"{cell.task}_w{cell.world_size}_{cell.shard}_{variant}_s{seed}"
    command = train_command(cell, variant, seed, run_dir)
    started = time.perf_counter()
    done = subprocess.run(
        command,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
    )
    wall_s = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(
            f"{shlex.join(command)} failed (exit {done.returncode}):\n{done.stderr[-4000:]}"
        )
    return {
        "cell": cell.name,
        "variant": variant,
        "seed": seed,
        "command": "OMP_NUM_THREADS=1 " + shlex.join(command),
        "launch_wall_s": wall_s,
        **read_run(run_dir, cell),
    }


def time_to_target(curve: list[dict[str, Any]], metric: str, target: float) -> dict | None:
    """The first curve point whose ``metric`` is >= ``target`` (None if none is)."""
    for point in curve:
        if point[metric] >= target:
            return {key: point[key] for key in ("step", "train_s", "examples")}
    return None


def mean_std(values: list[float]) -> dict[str, float | int | None]:
    """Mean, sample standard deviation (None below two values) and count."""
    if not values:
        return {"mean": None, "std": None, "n": 0}
    std = statistics.stdev(values) if len(values) > 1 else None
    return {"mean": statistics.fmean(values), "std": std, "n": len(values)}


def aggregate(cells: list[Cell], runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (cell, variant): mean ± std over seeds of the final metrics and of the cost to
    the cell's target; every run's time to target is written into its record."""
    rows = []
    for cell in cells:
        in_cell = [r for r in runs if r["cell"] == cell.name]
        best = max(
            statistics.fmean(r["final"][cell.headline] for r in in_cell if r["variant"] == v)
            for v in VARIANTS
        )
        target = TARGET_FRACTION * best
        for run in in_cell:
            run["target"] = target
            run["to_target"] = time_to_target(run["curve"], cell.headline, target)
        for variant in VARIANTS:
            mine = [r for r in in_cell if r["variant"] == variant]
            reached = [r["to_target"] for r in mine if r["to_target"] is not None]
            rows.append(
                {
                    "cell": cell.name,
                    "task": cell.task,
                    "world_size": cell.world_size,
                    "shard": cell.shard,
                    "variant": variant,
                    "seeds": [r["seed"] for r in mine],
                    "final": {
                        key: mean_std([r["final"][key] for r in mine]) for key in METRICS[cell.task]
                    },
                    "train_s": mean_std([r["train_s"] for r in mine]),
                    "examples_backpropagated": mean_std(
                        [r["examples_backpropagated"] for r in mine]
                    ),
                    "hard_kept": mean_std([r["hard_kept"] for r in mine]),
                    "target": {"metric": cell.headline, "value": target},
                    "reached": len(reached),
                    "not_reached": len(mine) - len(reached),
                    "to_target": {
                        key: mean_std([point[key] for point in reached])
                        for key in ("step", "train_s", "examples")
                    },
                    "headline_minus_global": paired_difference(mine, in_cell, cell.headline),
                }
            )
    return rows


def paired_difference(
    mine: list[dict[str, Any]], in_cell: list[dict[str, Any]], metric: str
) -> dict[str, Any]:
    """Final ``metric`` of each of ``mine`` minus global OHEM's of the same seed (same data
    and initial weights): mean ± std, and the seeds where it is above and below."""
    by_seed = {r["seed"]: r["final"][metric] for r in in_cell if r["variant"] == "global"}
    differences = [r["final"][metric] - by_seed[r["seed"]] for r in mine if r["seed"] in by_seed]
    return {
        **mean_std(differences),
        "above": sum(d > 0 for d in differences),
        "below": sum(d < 0 for d in differences),
    }


def fmt(stat: dict[str, Any], spec: str = ".3f") -> str:
    """``mean ± std`` (``-`` when empty)."""
    if stat["mean"] is None:
        return "-"
    std = "" if stat["std"] is None else f" ± {stat['std']:{spec.lstrip('+')}}"
    return f"{stat['mean']:{spec}}{std}"


def metrics_table(rows: list[dict[str, Any]], task: str) -> str:
    """Final hard-case metrics of ``task``'s cells, mean ± std over seeds."""
    metrics = METRICS[task]
    headers = ["W", "shard", "variant", *(LABELS[m] for m in metrics), "Δ headline vs global"]
    body = [
        [
            str(row["world_size"]),
            row["shard"],
            VARIANTS[row["variant"]],
            *(fmt(row["final"][m]) for m in metrics),
            "-"
            if row["variant"] == "global"
            else f"{fmt(row['headline_minus_global'], '+.3f')} "
            f"({row['headline_minus_global']['above']} above, "
            f"{row['headline_minus_global']['below']} below)",
        ]
        for row in rows
        if row["task"] == task
    ]
    return markdown_table(headers, body)


def cost_table(rows: list[dict[str, Any]]) -> str:
    """Cost to reach each cell's target, and the cost of the whole run."""
    headers = [
        "cell",
        "variant",
        "target",
        "reached",
        "steps to target",
        "train s to target",
        "examples to target",
        "train s (all steps)",
        "examples (all steps)",
        "hard kept",
    ]
    body = [
        [
            row["cell"],
            VARIANTS[row["variant"]],
            f"{LABELS[row['target']['metric']]} ≥ {row['target']['value']:.3f}",
            f"{row['reached']}/{row['reached'] + row['not_reached']}",
            fmt(row["to_target"]["step"], ".0f"),
            fmt(row["to_target"]["train_s"], ".1f"),
            fmt(row["to_target"]["examples"], ".0f"),
            fmt(row["train_s"], ".1f"),
            fmt(row["examples_backpropagated"], ".0f"),
            fmt(row["hard_kept"], ".2f"),
        ]
        for row in rows
    ]
    return markdown_table(headers, body)


def render_markdown(report: dict[str, Any]) -> str:
    """The markdown report: setup, hard-case metrics per task, cost to target."""
    meta = report["meta"]
    cells = ", ".join(
        f"{c['task']} W={c['world_size']} {c['shard']} (batch {c['batch_size']}/rank, "
        f"{c['max_steps']} steps, eval every {c['eval_every']})"
        for c in report["cells"]
    )
    parts = [
        "# Does global selection help? Training quality of global vs local OHEM",
        "",
        f"- command: `{meta['command']}`",
        f"- date (UTC): {meta['date']}; torch {meta['torch']}; python {meta['python']}; "
        f"{meta['cores']} cores; git {meta['git']}; one thread per rank",
        f"- machine: {meta['machine']}; load average (1 min, this study's own ranks "
        f"included) {meta['load_start'][0]} at start, {meta['load_end'][0]} at end; "
        "wall time of the study "
        f"{meta['wall_s'] / 60:.1f} min, sum of launch wall times "
        f"{meta['launch_wall_s'] / 60:.1f} min",
        f"- cells: {cells}; seeds {report['seeds']}",
        f"- variants, all two-pass (`ohem_step`) with keep = {KEEP}: no mining (`scope=all`), "
        "random subset of the same M (`scope=random`), local OHEM (`scope=local`), global "
        "OHEM (`scope=global`). `scope=all` still runs the scoring pass, so its training time "
        "carries one extra forward over K that plain training would not.",
        "- metrics: the final evaluation (after the last step) on the held-out test split; "
        "mean ± sample std over seeds. Δ headline vs global: the variant's final headline "
        "metric minus global OHEM's with the same seed (same data and initial weights); "
        "above/below count the seeds where the variant beat or trailed global OHEM.",
        f"- target: {TARGET_FRACTION} x the best final mean headline metric over the cell's "
        "variants; a run reaches it at its first evaluation at or above it. Train s = sum "
        "over steps of the slowest rank's step time (training only: no evaluation, no "
        "startup); examples = sum of M over the steps; means over the seeds that reached it.",
        "- hard kept: the share of the batches' hard-group examples (detection: positives and "
        "hard negatives; digits: the 5 tail digits) that the selection kept, over all steps "
        f"(1 for no mining, about {KEEP} for a random subset).",
        "",
    ]
    for task in METRICS:
        if any(row["task"] == task for row in report["rows"]):
            parts += [
                f"## {task}: final hard-case metrics",
                "",
                metrics_table(report["rows"], task),
                "",
            ]
    parts += ["## Cost to reach the target", "", cost_table(report["rows"]), ""]
    return "\n".join(parts)


def plot(report: dict[str, Any], path: Path) -> None:
    """Mean headline metric (± std band) per cell against the examples back-propagated
    (top row) and the training seconds (bottom row), both cumulative, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = report["cells"]
    figure, axes = plt.subplots(
        2, len(cells), figsize=(4.2 * len(cells), 6.6), squeeze=False, constrained_layout=True
    )
    for column, cell in enumerate(cells):
        name = Cell(**cell).name
        headline = METRICS[cell["task"]][0]
        target = next(r["target"]["value"] for r in report["rows"] if r["cell"] == name)
        for row, (cost, cost_label) in enumerate(
            [("examples", "examples back-propagated"), ("train_s", "training seconds")]
        ):
            ax = axes[row][column]
            for variant, label in VARIANTS.items():
                runs = [r for r in report["runs"] if r["cell"] == name and r["variant"] == variant]
                # The evaluations after step 0, at the same steps in every seed's run.
                points = list(zip(*(r["curve"][1:] for r in runs), strict=True))
                x = [statistics.fmean(q[cost] for q in p) for p in points]
                mean = [statistics.fmean(q[headline] for q in p) for p in points]
                std = [
                    statistics.stdev(q[headline] for q in p) if len(p) > 1 else 0 for p in points
                ]
                (line,) = ax.plot(x, mean, label=label, marker=".")
                low = [m - s for m, s in zip(mean, std, strict=True)]
                high = [m + s for m, s in zip(mean, std, strict=True)]
                ax.fill_between(x, low, high, color=line.get_color(), alpha=0.2)
            ax.axhline(target, color="gray", linestyle="--", linewidth=1, label="target")
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xlabel(cost_label + " (mean over seeds)")
            ax.set_ylabel(f"test {LABELS[headline]}")
            ax.set_title(name)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one cell, 2 seeds, short: < 3 min")
    parser.add_argument("--seeds", type=int, help="seeds per variant (default 5; --quick 2)")
    parser.add_argument(
        "--machine",
        default="not stated",
        help="a note for the report: was the machine quiet or shared with other jobs?",
    )
    parser.add_argument("--output-dir", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument(
        "--runs-dir", type=Path, default=ROOT / "runs" / "quality", help="run directories"
    )
    args = parser.parse_args(argv)
    if args.seeds is None:
        args.seeds = 2 if args.quick else 5
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    """Train every cell x variant x seed, then print and write the report."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cells = list(QUICK if args.quick else FULL)
    seeds = list(range(args.seeds))
    started, load_start = time.perf_counter(), os.getloadavg()
    runs = []
    total = len(cells) * len(VARIANTS) * len(seeds)
    for cell in cells:
        for seed in seeds:
            for variant in VARIANTS:
                run = run_one(cell, variant, seed, args.runs_dir)
                runs.append(run)
                logger.info(
                    "[%d/%d] %s %s seed %d: %s %.3f, %.0f s",
                    len(runs),
                    total,
                    cell.name,
                    variant,
                    seed,
                    cell.headline,
                    run["final"][cell.headline],
                    run["launch_wall_s"],
                )
    rows = aggregate(cells, runs)
    meta = {
        **run_meta(started, load_start, ("dist_ohem", "launch")),
        "machine": args.machine,
        "launch_wall_s": sum(r["launch_wall_s"] for r in runs),
    }
    report = {
        "meta": meta,
        "keep": KEEP,
        "target_fraction": TARGET_FRACTION,
        "seeds": seeds,
        "cells": [asdict(c) for c in cells],
        "rows": rows,
        "runs": runs,
    }
    stem = "quality_quick" if args.quick else "quality"
    write_report(report, render_markdown(report), args.output_dir, stem)
    plot(report, args.output_dir / f"{stem}.png")
    logger.info("wrote %s/%s.png", args.output_dir, stem)


if __name__ == "__main__":
    main()
