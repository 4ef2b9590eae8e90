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

``--budget`` runs the per-rank budget study instead (when does global selection pay?):
W=4 with per-rank batch n in {4, 8, 16, 64} and W=8 with n in {4, 8}, shardings iid,
skewed and sources (launch/data.py), the four variants, ``--seeds`` seeds, both tasks,
300 steps, final metrics. Its default runner replays launch/train.py's training in one
process (``simulate``; ``--validate`` checks it against torchrun); each finished run is
appended to ``runs/budget/budget.jsonl``, so an interrupted grid resumes where it stopped
(``--report-only`` just reports). ``--shards`` / ``--variants`` / ``--tasks`` train part
of the grid (more seeds of some cells). Writes ``budget.{json,md,png}``. About 30 min for
the 720-run grid on 2 shared cores; docs/when_global_pays.md reads it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
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

from bench.common import (  # noqa: E402
    SHARD_COLORS,
    VARIANT_COLORS,
    markdown_table,
    run_meta,
    write_report,
)
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
                color = VARIANT_COLORS[variant]
                ax.plot(x, mean, label=label, marker=".", color=color)
                low = [m - s for m, s in zip(mean, std, strict=True)]
                high = [m + s for m, s in zip(mean, std, strict=True)]
                ax.fill_between(x, low, high, color=color, alpha=0.2)
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


# ----------------------------------------------------------------------------- budget study
#
# ``--budget``: when does global selection pay? The per-rank batch n is the axis: each
# rank's local budget is keep x n examples, and local OHEM can keep no more of its own hard
# examples than that. Every cell trains on ``global_batch_size = W x n``, so the three
# shardings split the same global batch (launch/data.py): ``iid``, ``skewed`` (every hard
# example on rank 0, spilling to rank 1 when rank 0 is full) and ``sources`` (rank r reads
# source r mod 4, the sources holding the hard examples 4:2:1:0).
#
# The default runner replays launch/train.py's training in one process (``simulate``): the
# same task, initial weights, global batches and rank slices (launch/data.py), the same
# selector (dist_ohem, W=1 on each rank's slice for local, on the rank-major concatenation
# for global and random: the same keys and global order), the same loss normalization
# (DESIGN §4: the gradient of the mean over the M selected), AdamW and cosine schedule. It
# leaves out only the process group: torchrun's start-up (18-31 s a run on 2 cores against
# 0.2-3 s of training) would make this 700-run grid ~5 h. ``--runner torchrun`` trains the
# same grid with launch/train.py; ``--validate`` runs a few cells both ways and records the
# agreement in budget.json.

#: (W, per-rank batch n) of the budget axis.
BUDGET_RANKS = ((4, 4), (4, 8), (4, 16), (4, 64), (8, 4), (8, 8))
BUDGET_SHARDS = ("iid", "skewed", "sources")
BUDGET_STEPS = 300
#: Cells trained both ways (simulated and under torchrun) by ``--validate``: (task, W, n,
#: shard, variant), seed 0.
VALIDATE = (
    ("digits", 4, 4, "skewed", "local"),
    ("digits", 4, 4, "skewed", "global"),
    ("digits", 4, 8, "sources", "local"),
    ("detection", 4, 16, "sources", "local"),
    ("digits", 8, 4, "skewed", "local"),
)


@dataclass(frozen=True)
class BudgetCell:
    """One (task, W, per-rank batch, sharding) setting of the budget study."""

    task: str
    world_size: int
    per_rank: int
    shard: str
    max_steps: int = BUDGET_STEPS

    @property
    def name(self) -> str:
        """``digits W=4 n=8 skewed``."""
        return f"{self.task} W={self.world_size} n={self.per_rank} {self.shard}"

    @property
    def budget(self) -> int:
        """Examples each rank keeps under local OHEM: ceil(keep x n)."""
        return math.ceil(KEEP * self.per_rank - 1e-9)

    def overrides(self, variant: str, seed: int) -> list[str]:
        """launch/train.py's ``key=value`` settings of one run."""
        return [
            f"task={self.task}",
            f"shard={self.shard}",
            f"seed={seed}",
            f"max_steps={self.max_steps}",
            f"global_batch_size={self.world_size * self.per_rank}",
            "mode=two_pass",
            f"scope={variant}",
            "rule=keep",
            f"keep={KEEP}",
            f"eval_every={self.max_steps}",
            f"checkpoint_every={self.max_steps}",
            "log_every=100000",
            "plot=false",
        ]


def budget_cells(tasks: tuple[str, ...], steps: int) -> list[BudgetCell]:
    """Every (task, W, n, shard) of the study."""
    return [
        BudgetCell(task, world_size, per_rank, shard, steps)
        for task in tasks
        for world_size, per_rank in BUDGET_RANKS
        for shard in BUDGET_SHARDS
    ]


_TASKS: dict[tuple[str, int], Any] = {}


def _task(name: str, seed: int) -> Any:
    from launch.tasks import make_task

    if (name, seed) not in _TASKS:
        _TASKS.clear()
        _TASKS[name, seed] = make_task(name, seed)
    return _TASKS[name, seed]


def simulate(cell: BudgetCell, variant: str, seed: int) -> dict[str, Any]:
    """launch/train.py's two-pass training of one (cell, variant, seed), W ranks replayed
    in this process; its final test metrics and per-step selection telemetry."""
    import functools

    import torch
    from torch import nn

    from dist_ohem import HardExampleSelector
    from launch.config import parse_args
    from launch.data import batch_indices
    from launch.train import lr_factor

    cfg = parse_args(cell.overrides(variant, seed))
    task = _task(cell.task, seed)
    world = cell.world_size
    torch.manual_seed(cfg.seed)
    model = task.make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(lr_factor, cfg))
    selector = HardExampleSelector(keep=KEEP, scope=variant, seed=cfg.seed)
    criterion = nn.CrossEntropyLoss(reduction="none")
    hard_groups = torch.tensor(task.hard_groups)
    hard_in = hard_kept = over_budget = 0
    max_hard_rank = 0.0
    selected_by_rank = [0] * world
    started = time.perf_counter()
    for step in range(1, cfg.max_steps + 1):
        slices = [batch_indices(cfg, task, step, rank, world) for rank in range(world)]
        index = torch.cat(slices)
        x, y = task.x_train[index], task.y_train[index]
        with torch.no_grad():  # the scoring pass, rank by rank as on W ranks
            losses = torch.cat(
                [
                    criterion(model(x[i]), y[i])
                    for i in torch.arange(len(index)).split([len(s) for s in slices])
                ]
            )
        if variant == "local":
            mask = torch.cat(
                [selector(part).mask for part in losses.split([len(s) for s in slices])]
            )
        else:
            mask = selector(losses).mask
        chosen = mask.nonzero().flatten()
        loss = criterion(model(x[chosen]), y[chosen]).sum() / max(len(chosen), 1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()

        hard = torch.isin(task.group_train[index], hard_groups)
        hard_in += int(hard.sum())
        hard_kept += int((hard & mask).sum())
        per_rank_hard = [int(h.sum()) for h in hard.split([len(s) for s in slices])]
        over_budget += sum(max(0, h - cell.budget) for h in per_rank_hard)
        max_hard_rank += max(per_rank_hard)
        for rank, part in enumerate(mask.split([len(s) for s in slices])):
            selected_by_rank[rank] += int(part.sum())
    train_s = time.perf_counter() - started
    model.eval()
    with torch.no_grad():
        final = task.metrics(model(task.x_test))
    steps = cfg.max_steps
    return {
        "final": {key: final[key] for key in METRICS[cell.task]},
        "train_s": train_s,
        "hard_kept": hard_kept / max(1, hard_in),
        "hard_per_step": hard_in / steps,
        "hard_on_fullest_rank": max_hard_rank / steps,
        # Share of the batches' hard examples beyond their own rank's local budget: the
        # least local OHEM must drop, whatever their losses.
        "hard_over_budget": over_budget / max(1, hard_in),
        "selected_share_by_rank": [n / max(1, sum(selected_by_rank)) for n in selected_by_rank],
    }


def run_torchrun(cell: BudgetCell, variant: str, seed: int, runs_dir: Path) -> dict[str, Any]:
    """The same run under torchrun with launch/train.py (slow: start-up dominates)."""
    run_dir = runs_dir / f"{cell.name.replace(' ', '_').replace('=', '')}_{variant}_s{seed}"
    command = [
        "torchrun",
        f"--nproc_per_node={cell.world_size}",
        f"--master_port={free_port()}",
        "launch/train.py",
        f"run_dir={run_dir}",
        *cell.overrides(variant, seed),
    ]
    started = time.perf_counter()
    done = subprocess.run(
        command,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} failed:\n{done.stderr[-4000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    return {
        "final": {key: summary["final_eval"][key] for key in METRICS[cell.task]},
        "train_s": summary["throughput"]["train_s"],
        "launch_wall_s": time.perf_counter() - started,
        "hard_kept": sum(r["hard_selected"] for r in train)
        / max(1, sum(r["hard_in_batch"] for r in train)),
        "command": "OMP_NUM_THREADS=1 " + shlex.join(command),
    }


def run_key(cell: BudgetCell, variant: str, seed: int) -> str:
    """The key of one run in the results file."""
    return f"{cell.name} {variant} s{seed}"


def run_budget(args: argparse.Namespace) -> None:
    """Train (or resume) the budget grid one run at a time, appending each finished run to
    ``runs_dir/budget.jsonl``; then write budget.{json,md,png}."""
    import torch

    torch.set_num_threads(1)
    started, load_start = time.perf_counter(), os.getloadavg()
    cells = budget_cells(tuple(args.tasks), args.steps)
    seeds = list(range(args.seeds))
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    store = args.runs_dir / "budget.jsonl"
    done = {}
    if store.exists():
        for line in store.read_text().splitlines():
            record = json.loads(line)
            done[record["key"]] = record
    total = len(cells) * len(VARIANTS) * len(seeds)
    loads = []
    with store.open("a") as out:
        # Task by task, seed by seed: a partial grid holds whole seeds of the first task.
        order = [
            (c, s)
            for t in args.tasks
            for s in seeds
            for c in cells
            if c.task == t and c.shard in args.shards
        ]
        for cell, seed in order:
            for variant in args.variants:
                key = run_key(cell, variant, seed)
                if key in done or args.report_only:
                    continue
                if args.runner == "sim":
                    result = simulate(cell, variant, seed)
                else:
                    result = run_torchrun(cell, variant, seed, args.runs_dir)
                record = {
                    "key": key,
                    "cell": asdict(cell),
                    "variant": variant,
                    "seed": seed,
                    "runner": args.runner,
                    **result,
                }
                done[key] = record
                out.write(json.dumps(record) + "\n")
                out.flush()
                loads.append(os.getloadavg()[0])
                logger.info(
                    "[%d/%d] %s: %s %.3f (%.1f s)",
                    len(done),
                    total,
                    key,
                    METRICS[cell.task][0],
                    result["final"][METRICS[cell.task][0]],
                    result["train_s"],
                )
    validation = validate(args) if args.validate else None
    if validation is None and (args.output_dir / "budget.json").exists():
        validation = json.loads((args.output_dir / "budget.json").read_text()).get("validation")
    in_grid = [r for r in done.values() if BudgetCell(**r["cell"]) in cells]
    runs = [r for r in in_grid if r["seed"] in seeds]
    meta = {
        **run_meta(started, load_start, ("dist_ohem", "launch", "bench")),
        "machine": args.machine,
        "load_1min_during": [min(loads), max(loads)] if loads else None,
        "runner": args.runner,
        "runs_trained": len(loads),
        "validated": bool(validation) and args.validate,
    }
    # Every invocation that trained part of the grid (or validated it), with its load.
    history = args.runs_dir / "invocations.jsonl"
    if loads or meta["validated"]:
        with history.open("a") as out:
            out.write(json.dumps(meta) + "\n")
    invocations = []
    if history.exists():
        invocations = [json.loads(line) for line in history.read_text().splitlines()]
    report = {
        "meta": meta,
        "invocations": invocations,
        "keep": KEEP,
        "steps": args.steps,
        "seeds": seeds,
        "cells": [asdict(c) for c in cells],
        "rows": budget_rows(cells, runs),
        # Cells where more seeds of global and local were trained (``--seeds`` larger with
        # ``--variants local global``): global - local paired over all of them.
        "more_seeds": more_seeds_rows(cells, in_grid, len(seeds)),
        "validation": validation,
        "runs": sorted(in_grid, key=lambda r: r["key"]),
    }
    write_report(report, render_budget(report), args.output_dir, "budget")
    plot_budget(report, args.output_dir / "budget.png")
    logger.info("wrote %s/budget.png", args.output_dir)


def validate(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The ``VALIDATE`` runs both simulated and under torchrun: final metrics side by
    side."""
    rows = []
    for task, world_size, per_rank, shard, variant in VALIDATE:
        cell = BudgetCell(task, world_size, per_rank, shard, args.steps)
        sim = simulate(cell, variant, 0)
        real = run_torchrun(cell, variant, 0, args.runs_dir / "validate")
        rows.append(
            {
                "cell": cell.name,
                "variant": variant,
                "seed": 0,
                "simulated": sim["final"],
                "torchrun": real["final"],
                "hard_kept": [sim["hard_kept"], real["hard_kept"]],
                "command": real["command"],
                "launch_wall_s": real["launch_wall_s"],
                "simulated_train_s": sim["train_s"],
            }
        )
        logger.info("validate %s %s: %s vs %s", cell.name, variant, sim["final"], real["final"])
    return rows


def budget_rows(cells: list[BudgetCell], runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per cell: every variant's metrics (mean ± std), hard kept, and global - local paired
    by seed on each metric."""
    rows = []
    for cell in cells:
        mine = [r for r in runs if BudgetCell(**r["cell"]) == cell]
        if not mine:
            continue
        by = {v: {r["seed"]: r for r in mine if r["variant"] == v} for v in VARIANTS}
        paired = sorted(set(by["global"]) & set(by["local"]))
        diff = {}
        for metric in METRICS[cell.task]:
            d = [by["global"][s]["final"][metric] - by["local"][s]["final"][metric] for s in paired]
            diff[metric] = {
                **mean_std(d),
                "ahead": sum(x > 0 for x in d),
                "behind": sum(x < 0 for x in d),
                "values": d,
            }
        rows.append(
            {
                "cell": cell.name,
                **asdict(cell),
                "budget": cell.budget,
                "hard_per_rank_mean": statistics.fmean(r["hard_per_step"] for r in mine)
                / cell.world_size,
                "hard_on_fullest_rank": statistics.fmean(r["hard_on_fullest_rank"] for r in mine),
                "hard_over_budget": mean_std([r["hard_over_budget"] for r in mine]),
                "variants": {
                    v: {
                        "seeds": sorted(by[v]),
                        "final": {
                            m: mean_std([r["final"][m] for r in by[v].values()])
                            for m in METRICS[cell.task]
                        },
                        "hard_kept": mean_std([r["hard_kept"] for r in by[v].values()]),
                        "train_s": mean_std([r["train_s"] for r in by[v].values()]),
                    }
                    for v in VARIANTS
                },
                "global_minus_local": diff,
            }
        )
    return rows


def more_seeds_rows(
    cells: list[BudgetCell], runs: list[dict[str, Any]], base_seeds: int
) -> list[dict[str, Any]]:
    """Per cell with more than ``base_seeds`` seeds of both global and local: global -
    local paired over every such seed, on each metric."""
    rows = []
    for cell in cells:
        by = {
            v: {r["seed"]: r for r in runs if BudgetCell(**r["cell"]) == cell and r["variant"] == v}
            for v in ("global", "local")
        }
        paired = sorted(set(by["global"]) & set(by["local"]))
        if len(paired) <= base_seeds:
            continue
        diff = {}
        for metric in METRICS[cell.task]:
            d = [by["global"][s]["final"][metric] - by["local"][s]["final"][metric] for s in paired]
            diff[metric] = {
                **mean_std(d),
                "ahead": sum(x > 0 for x in d),
                "behind": sum(x < 0 for x in d),
                "sem": statistics.stdev(d) / math.sqrt(len(d)),
                "values": d,
            }
        rows.append(
            {"cell": cell.name, **asdict(cell), "seeds": paired, "global_minus_local": diff}
        )
    return rows


def _signed(stat: dict[str, Any]) -> str:
    if stat["mean"] is None:
        return "-"
    return f"{fmt(stat, '+.3f')} ({stat['ahead']}/{stat['n']})"


def render_budget(report: dict[str, Any]) -> str:
    """budget.md: setup, then per task the headline table and the hard-case table."""
    meta = report["meta"]
    parts = [
        "# When does global selection pay? The per-rank budget study",
        "",
        f"- command: `{meta['command']}`",
        f"- date (UTC): {meta['date']}; torch {meta['torch']}; python {meta['python']}; "
        f"{meta['cores']} cores; git {meta['git']}; one thread",
        f"- machine: {meta['machine']}; the grid is resumable: the invocations that trained "
        "it, with their load, are listed at the end",
        f"- runner: `{meta['runner']}`"
        + (
            " (launch/train.py's training replayed in one process, W ranks' slices, selector "
            "calls and normalization as on W ranks; see the validation table at the end)"
            if meta["runner"] == "sim"
            else " (launch/train.py under torchrun)"
        ),
        f"- grid: W=4 with per-rank batch n ∈ {{4, 8, 16, 64}}, W=8 with n ∈ {{4, 8}}; "
        f"shardings {', '.join(BUDGET_SHARDS)}; keep = {report['keep']} (local budget "
        f"ceil(keep·n) per rank); {report['steps']} steps; seeds {report['seeds']}; every "
        "cell trains on global_batch_size = W·n, so the shardings split the same global "
        "batches and global OHEM and no mining see the same data in all three",
        "- shardings: iid (each rank a random slice); skewed (every hard example of the "
        "global batch on rank 0, the overflow on rank 1, ...); sources (rank r reads "
        "source r mod 4; the sources hold the hard examples 4:2:1:0, so about 32/16/8/0% of "
        "a digits rank's examples are hard)",
        "- hard examples: digits: the 5 tail digits (~14% of the training set); detection: "
        "positives and hard negatives (8%)",
        "- global - local: final metric of global OHEM minus local OHEM's with the same seed "
        "(same data, same initial weights): mean ± sample std over seeds, (seeds where "
        "global was ahead / seeds)",
        "- hard/rank: mean hard examples per rank per step, and on the fullest rank; over "
        "budget: the share of the batches' hard examples beyond their own rank's local "
        "budget (what local OHEM must drop, whatever the losses); hard kept: the share of "
        "the batches' hard examples each variant trained on",
        "",
    ]
    for task in METRICS:
        rows = [r for r in report["rows"] if r["task"] == task]
        if not rows:
            continue
        headline = METRICS[task][0]
        parts += [
            f"## {task}: {LABELS[headline]} (final, test)",
            "",
            markdown_table(
                [
                    "W",
                    "n",
                    "shard",
                    "budget keep·n",
                    "hard/rank (fullest)",
                    "over budget",
                    *(VARIANTS[v] for v in VARIANTS),
                    "global - local",
                    "hard kept local / global",
                ],
                [
                    [
                        str(r["world_size"]),
                        str(r["per_rank"]),
                        r["shard"],
                        str(r["budget"]),
                        f"{r['hard_per_rank_mean']:.2f} ({r['hard_on_fullest_rank']:.2f})",
                        fmt(r["hard_over_budget"], ".2f"),
                        *(fmt(r["variants"][v]["final"][headline]) for v in VARIANTS),
                        f"**{_signed(r['global_minus_local'][headline])}**",
                        f"{fmt(r['variants']['local']['hard_kept'], '.2f')} / "
                        f"{fmt(r['variants']['global']['hard_kept'], '.2f')}",
                    ]
                    for r in rows
                ],
            ),
            "",
            f"### {task}: every hard-case metric, global - local (paired)",
            "",
            markdown_table(
                ["W", "n", "shard", *(LABELS[m] for m in METRICS[task])],
                [
                    [
                        str(r["world_size"]),
                        str(r["per_rank"]),
                        r["shard"],
                        *(_signed(r["global_minus_local"][m]) for m in METRICS[task]),
                    ]
                    for r in rows
                ],
            ),
            "",
            f"### {task}: hard examples kept by each variant",
            "",
            markdown_table(
                ["W", "n", "shard", *(VARIANTS[v] for v in VARIANTS)],
                [
                    [
                        str(r["world_size"]),
                        str(r["per_rank"]),
                        r["shard"],
                        *(fmt(r["variants"][v]["hard_kept"], ".2f") for v in VARIANTS),
                    ]
                    for r in rows
                ],
            ),
            "",
        ]
    if report.get("more_seeds"):
        parts += [
            "## More seeds: global - local, paired over every seed trained",
            "",
            "Mean ± std over seeds, the standard error of that mean, and (seeds where global "
            "was ahead / seeds); ties (the same final metric) count for neither side.",
            "",
            markdown_table(
                ["cell", "seeds", "metric", "global - local", "standard error", "behind"],
                [
                    [
                        r["cell"],
                        str(len(r["seeds"])),
                        LABELS[m],
                        _signed(r["global_minus_local"][m]),
                        f"{r['global_minus_local'][m]['sem']:.3f}",
                        str(r["global_minus_local"][m]["behind"]),
                    ]
                    for r in report["more_seeds"]
                    for m in METRICS[r["task"]]
                ],
            ),
            "",
        ]
    if report.get("invocations"):
        parts += [
            "## Invocations",
            "",
            "Every invocation of `--budget` that wrote to this grid's run store, in order; load "
            "average (1 min) at start, at end, and min-max after each of its runs (- where not "
            "recorded). Wall-clock numbers in the tables (train s) depend on that load; the "
            "quality numbers do not (the runs are deterministic).",
            "",
            markdown_table(
                [
                    "date (UTC, end)",
                    "command",
                    "git",
                    "runs trained",
                    "load start / end",
                    "load during",
                    "wall min",
                ],
                [
                    [
                        inv["date"],
                        f"`{inv['command']}`",
                        inv["git"],
                        str(inv.get("runs_trained", "-")),
                        "-"
                        if inv.get("load_start") is None
                        else f"{inv['load_start'][0]} / {inv['load_end'][0]}",
                        "-"
                        if not inv.get("load_1min_during")
                        else "{:.2f}-{:.2f}".format(*inv["load_1min_during"]),
                        f"{inv['wall_s'] / 60:.1f}",
                    ]
                    for inv in report["invocations"]
                ],
            ),
            "",
        ]
    if report.get("validation"):
        parts += [
            "## Validation: the in-process replay against launch/train.py under torchrun",
            "",
            "Seed 0, the same settings; final test metrics and the share of hard examples "
            "kept. Both are deterministic; they differ only by the floating-point order of "
            "the gradient sum (one process against W partial sums all-reduced), which can "
            "flip a near-tie of the selection and then the trajectories drift apart.",
            "",
            markdown_table(
                [
                    "cell",
                    "variant",
                    "metric",
                    "replayed",
                    "torchrun",
                    "hard kept replayed / torchrun",
                ],
                [
                    [
                        v["cell"],
                        VARIANTS[v["variant"]],
                        LABELS[m],
                        f"{v['simulated'][m]:.3f}",
                        f"{v['torchrun'][m]:.3f}",
                        f"{v['hard_kept'][0]:.3f} / {v['hard_kept'][1]:.3f}",
                    ]
                    for v in report["validation"]
                    for m in METRICS[v["cell"].split()[0]]
                ],
            ),
            "",
        ]
    return "\n".join(parts)


def plot_budget(report: dict[str, Any], path: Path) -> None:
    """Per task: global - local headline (paired, mean ± std, seeds as dots) against the
    per-rank budget keep·n, one line per sharding (W=4 solid, W=8 dashed); below it the
    same against the share of hard examples over their rank's budget (points labelled
    with n)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in METRICS if any(r["task"] == t for r in report["rows"])]
    figure, axes = plt.subplots(
        2, len(tasks), figsize=(6.4 * len(tasks), 9), squeeze=False, constrained_layout=True
    )
    colors = SHARD_COLORS
    world_sizes = sorted({r["world_size"] for r in report["rows"]})
    for column, task in enumerate(tasks):
        headline = METRICS[task][0]
        for row_index, xkey in enumerate(("budget", "over")):
            ax = axes[row_index][column]
            for shard in BUDGET_SHARDS:
                styles = zip(world_sizes, ("-", "--", ":"), ("o", "s", "^"), strict=False)
                for world_size, style, marker in styles:
                    rows = sorted(
                        (
                            r
                            for r in report["rows"]
                            if r["task"] == task
                            and r["shard"] == shard
                            and r["world_size"] == world_size
                        ),
                        key=lambda r: r["per_rank"],
                    )
                    if not rows:
                        continue
                    x = [
                        r["budget"] if xkey == "budget" else r["hard_over_budget"]["mean"]
                        for r in rows
                    ]
                    stats = [r["global_minus_local"][headline] for r in rows]
                    mean = [s["mean"] for s in stats]
                    std = [s["std"] or 0 for s in stats]
                    ax.errorbar(
                        x,
                        mean,
                        yerr=std,
                        color=colors[shard],
                        # Below, the x order is not the n order: points, no lines.
                        linestyle=style if xkey == "budget" else "none",
                        marker=marker,
                        capsize=3,
                        label=f"{shard}, W={world_size}",
                    )
                    if xkey == "over":
                        for xi, yi, r in zip(x, mean, rows, strict=True):
                            ax.annotate(
                                f"n={r['per_rank']}",
                                (xi, yi),
                                textcoords="offset points",
                                xytext=(5, 3),
                                fontsize=7,
                                color=colors[shard],
                            )
                    for xi, s in zip(x, stats, strict=True):
                        ax.scatter(
                            [xi] * len(s["values"]),
                            s["values"],
                            color=colors[shard],
                            alpha=0.25,
                            s=10,
                        )
            ax.axhline(0, color="gray", linewidth=1)
            if xkey == "budget":
                ax.set_xscale("log", base=2)
                ax.set_xticks([1, 2, 4, 16])
                ax.set_xticklabels(["1 (n=4)", "2 (n=8)", "4 (n=16)", "16 (n=64)"])
                ax.set_xlabel("per-rank budget keep·n (examples each rank keeps, keep = 1/4)")
            else:
                ax.set_xlabel("share of the batch's hard examples beyond their rank's budget")
            ax.set_ylabel(f"global - local, test {LABELS[headline]} (paired by seed)")
            ax.set_title(f"{task}: global - local OHEM, mean ± std over seeds (dots: seeds)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    figure.suptitle("When does global selection pay? Small per-rank batches on uneven shards")
    figure.savefig(path, dpi=100)
    plt.close(figure)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one cell, 2 seeds, short: < 3 min")
    parser.add_argument(
        "--budget",
        action="store_true",
        help="the per-rank budget study instead (resumable; writes budget.{json,md,png})",
    )
    parser.add_argument(
        "--runner",
        choices=("sim", "torchrun"),
        default="sim",
        help="--budget: replay the W ranks in one process (default) or run torchrun",
    )
    parser.add_argument("--tasks", nargs="+", default=list(METRICS), choices=list(METRICS))
    parser.add_argument("--steps", type=int, default=BUDGET_STEPS, help="--budget: steps a run")
    parser.add_argument(
        "--shards", nargs="+", default=list(BUDGET_SHARDS), help="--budget: train only these"
    )
    parser.add_argument(
        "--variants", nargs="+", default=list(VARIANTS), help="--budget: train only these"
    )
    parser.add_argument(
        "--validate", action="store_true", help="--budget: also check a few cells under torchrun"
    )
    parser.add_argument(
        "--report-only", action="store_true", help="--budget: report the runs already done"
    )
    parser.add_argument(
        "--replot",
        action="store_true",
        help="redraw quality.png (with --budget: budget.png) from the committed JSON in "
        "--output-dir, training nothing",
    )
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
    if args.replot:
        stem = "budget" if args.budget else ("quality_quick" if args.quick else "quality")
        report = json.loads((args.output_dir / f"{stem}.json").read_text())
        (plot_budget if args.budget else plot)(report, args.output_dir / f"{stem}.png")
        logger.info("redrew %s/%s.png from %s.json", args.output_dir, stem, stem)
        return
    if args.budget:
        if args.runs_dir == ROOT / "runs" / "quality":
            args.runs_dir = ROOT / "runs" / "budget"
        run_budget(args)
        return
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
