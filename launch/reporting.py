"""Reporting: the metrics.jsonl lines, progress and log lines, summary.json, the final
table and metrics.png, and what a failed collective means for the user."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import torch
from torch import nn
from tqdm import tqdm

from dist_ohem import SelectionResult
from launch.config import Config
from launch.data import examples_per_step
from launch.engines import Engine
from launch.tasks import Task

log = logging.getLogger("train")


def train_record(
    step: int,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    eng: Engine,
    selection: SelectionResult,
    mean_loss: float,
    stats: list[float],
    phase_s: dict[str, float],
) -> dict[str, object]:
    """One JSONL line for an optimizer step: global loss and selection (docs/DESIGN.md §8).

    ``stats``: the all-reduced [stop flags, hard examples in the batch, hard examples
    selected, examples trained per rank (W), step seconds per rank (W)].
    ``loss`` is the mean loss of the selected examples over all ranks (before the step);
    ``trained_per_rank`` differs from ``selected_per_rank`` only with ``balance``;
    ``hard_*`` count the task's hard groups in the batch and in the selection;
    ``phase_s`` are rank 0's seconds per phase, ``step_s_max`` the slowest rank's step.
    """
    world = eng.world_size
    return {
        "kind": "train",
        "step": step,
        "world_size": world,
        "lr": scheduler.get_last_lr()[0],  # the lr of the next step
        "loss": mean_loss,
        "num_valid_global": selection.num_valid_global,
        "num_selected_global": selection.num_selected_global,
        "selected_per_rank": list(selection.selected_per_rank),
        "trained_per_rank": [int(n) for n in stats[3 : 3 + world]],
        "threshold": None if math.isnan(selection.threshold) else selection.threshold,
        "strategy": selection.strategy,
        "scope": selection.scope,
        "hard_in_batch": int(stats[1]),
        "hard_selected": int(stats[2]),
        "phase_s": phase_s,
        "step_s": stats[3 + world],
        "step_s_max": max(stats[3 + world :]),
    }


def write_eval(metrics: TextIO | None, step: int, values: dict[str, float], eng: Engine) -> None:
    """Rank 0 appends an eval line (``"kind": "eval"``) and logs it."""
    if eng.rank != 0:
        return
    metrics.write(json.dumps({"kind": "eval", "step": step, **values}) + "\n")
    log.info("eval after step %d | %s", step, " ".join(f"{k} {v:.4f}" for k, v in values.items()))


#: Seconds between the plain progress lines written when stderr is not a terminal.
PLAIN_PROGRESS_INTERVAL_S = 10.0


class PlainProgress:
    """The progress bar where stderr is not a terminal (a file, a pipe, a job log).

    A live bar redraws itself with carriage returns, which a file keeps: one line of
    thousands of segments. This writes a plain log line instead, at most one every
    ``interval_s`` seconds and one at the end, with tqdm's ``update``, ``set_postfix`` and
    ``close``. ``clock`` is for tests.
    """

    def __init__(
        self,
        total: int,
        initial: int = 0,
        desc: str = "",
        interval_s: float = PLAIN_PROGRESS_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total, self.initial, self.n, self.desc = total, initial, initial, desc
        self.interval_s, self.clock = interval_s, clock
        self.postfix: dict[str, object] = {}
        self.started = self.last_line = clock()
        self.n_written = initial

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.clock() - self.last_line >= self.interval_s:
            self.write_line()

    def set_postfix(self, refresh: bool = False, **values: object) -> None:
        del refresh  # a plain line shows the values it has when it is written
        self.postfix = values

    def close(self) -> None:
        if self.n != self.n_written:
            self.write_line()

    def write_line(self) -> None:
        """``desc: step n/total (p%), r steps/s, elapsed, left | postfix``."""
        now = self.clock()
        elapsed = now - self.started
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
        left = tqdm.format_interval((self.total - self.n) / rate) if rate > 0 else "?"
        values = " ".join(f"{key} {value}" for key, value in self.postfix.items())
        log.info(
            "%sstep %d/%d (%.0f%%), %.1f steps/s, %s elapsed, %s left%s",
            f"{self.desc}: " if self.desc else "",
            self.n,
            self.total,
            100 * self.n / max(self.total, 1),
            rate,
            tqdm.format_interval(elapsed),
            left,
            f" | {values}" if values else "",
        )
        self.last_line, self.n_written = now, self.n


def progress_bar(total: int, initial: int, desc: str, show: bool) -> tqdm | PlainProgress:
    """Rank 0's progress: tqdm's live bar on a terminal, plain lines elsewhere."""
    if show and not sys.stderr.isatty():
        return PlainProgress(total, initial, desc)
    return tqdm(total=total, initial=initial, disable=not show, unit="step", desc=desc)


def report(cfg: Config, record: dict[str, object], bar: tqdm | PlainProgress) -> None:
    """Progress every step (as :func:`progress_bar` shows it), a log line every
    ``log_every`` steps."""
    bar.update(1)
    examples_per_s = sum(record["selected_per_rank"]) / max(record["step_s_max"], 1e-9)
    bar.set_postfix(
        loss=f"{record['loss']:.3f}",
        M=f"{record['num_selected_global']}/{record['num_valid_global']}",
        hard=f"{record['hard_selected']}/{record['hard_in_batch']}",
        trained_per_s=f"{examples_per_s:.0f}",
        refresh=False,
    )
    if record["step"] % cfg.log_every == 0:
        log.info(
            "step %d | loss %.4f | K %d M %d | per rank %s | threshold %s | hard %d/%d | %.1f ms",
            record["step"],
            record["loss"],
            record["num_valid_global"],
            record["num_selected_global"],
            record["selected_per_rank"],
            "-" if record["threshold"] is None else f"{record['threshold']:.3f}",
            record["hard_selected"],
            record["hard_in_batch"],
            1000 * record["step_s"],
        )


def open_metrics(path: Path, keep_through_step: int) -> TextIO:
    """Open the JSONL for appending, keeping only the lines through the resumed step.

    Lines after it (logged, then lost with the crash before their checkpoint) and a
    half-written last line are dropped: the resumed run writes those steps again.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = []
    for line in path.read_text().splitlines() if keep_through_step and path.is_file() else []:
        try:
            if json.loads(line)["step"] <= keep_through_step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError):
            break
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
    return path.open("a")


def write_json(obj: object, path: Path) -> None:
    """Atomically write ``obj`` as indented JSON."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def read_metrics(jsonl: Path) -> tuple[list[dict], list[dict]]:
    """The train and the eval records of a metrics file."""
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    return [r for r in records if r["kind"] == "train"], [r for r in records if r["kind"] == "eval"]


def summarize(jsonl: Path, cfg: Config, task: Task, launcher: str, eng: Engine) -> dict:
    """``summary.json``: the run's shape, first and last eval, and training throughput.

    Throughput counts the forward/backward/optimizer time of the steps (the slowest
    rank's), not evaluation or checkpoints; over every launch of a resumed run.
    ``world_size`` is this launch's; ``world_size_from_step`` lists [first step, W] for
    each world size the run trained at, in order.
    """
    train, evals = read_metrics(jsonl)
    train_s = sum(r["step_s_max"] for r in train)
    trained = sum(r["num_selected_global"] for r in train)
    examples = examples_per_step(cfg, eng.world_size) * len(train)
    world_sizes: list[list[int]] = []  # [first step, W] at each change of the world size
    for record in train:
        if not world_sizes or world_sizes[-1][1] != len(record["selected_per_rank"]):
            world_sizes.append([record["step"], len(record["selected_per_rank"])])
    return {
        "world_size": eng.world_size,
        "world_size_from_step": world_sizes,
        "launcher": launcher,
        "engine": eng.name,
        "task": cfg.task,
        "headline_metric": task.headline,
        "steps": train[-1]["step"] if train else 0,
        "max_steps": cfg.max_steps,
        "initial_eval": evals[0] if evals else None,
        "final_eval": evals[-1] if evals else None,
        "examples_scored": sum(r["num_valid_global"] for r in train),
        "examples_backpropagated": trained,
        "throughput": {
            "train_s": train_s,
            "steps_per_s": len(train) / max(train_s, 1e-9),
            "examples_per_s": examples / max(train_s, 1e-9),
        },
        "config": dataclasses.asdict(cfg),
    }


def print_summary(summary: dict) -> None:
    """The final table on rank 0: every eval metric at the start and the end."""
    first, last = summary["initial_eval"] or {}, summary["final_eval"] or {}
    rows = [(k, first.get(k), v) for k, v in last.items() if k not in ("kind", "step")]
    width = max(len(k) for k, _, _ in rows) + 2
    lines = [
        f"{summary['task']} | launcher {summary['launcher']} | engine {summary['engine']} | "
        f"W={summary['world_size']} | {summary['steps']} steps",
        f"{'metric':<{width}}{'step ' + str(first.get('step', '-')):>12}"
        f"{'step ' + str(last.get('step', '-')):>12}",
    ]
    for key, before, after in rows:
        mark = "  <- headline" if key == summary["headline_metric"] else ""
        before_text = "-" if before is None else f"{before:.4f}"
        lines.append(f"{key:<{width}}{before_text:>12}{after:>12.4f}{mark}")
    speed = summary["throughput"]
    lines.append(
        f"throughput: {speed['steps_per_s']:.1f} steps/s, {speed['examples_per_s']:.0f} "
        f"examples/s scored; {summary['examples_backpropagated']} examples back-propagated"
    )
    print("\n".join(lines), flush=True)


def plot_metrics(jsonl: Path, png: Path, task: Task) -> None:
    """Training curves and selection telemetry, from the metrics file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = read_metrics(jsonl)
    steps = [r["step"] for r in train]
    eval_steps = [r["step"] for r in evals]
    fig, (ax_loss, ax_metric, ax_sel, ax_rank) = plt.subplots(4, 1, figsize=(8, 12), sharex=True)
    ax_loss.plot(steps, [r["loss"] for r in train], lw=0.8, label="train (selected mean)")
    if evals and "loss" in evals[0]:
        ax_loss.plot(eval_steps, [r["loss"] for r in evals], "o-", label="test")
    ax_loss.set(ylabel="cross-entropy", yscale="log", title=str(png.parent))
    # Metrics often coincide (several at 1.0 at step 0): each has its own marker and dash,
    # and each is drawn thinner than the one before, so an earlier line shows around a later
    # one. The headline is black, thick, with star markers, on top of the others.
    others = [key for key in (evals[0] if evals else ()) if key not in ("kind", "step", "loss")]
    others = [key for key in others if key != task.headline]
    styles = [("o", "-"), ("^", "--"), ("v", "-."), ("D", ":"), ("x", "-"), ("+", "--")]
    for index, key in enumerate(others):
        marker, dash = styles[index % len(styles)]
        width = 3.0 - 2.4 * index / max(len(others) - 1, 1)
        values = [r[key] for r in evals]
        ax_metric.plot(eval_steps, values, marker=marker, ls=dash, lw=width, ms=4, label=key)
    if evals and task.headline in evals[0]:
        values = [r[task.headline] for r in evals]
        label = f"{task.headline} (headline)"
        ax_metric.plot(eval_steps, values, "k*-", lw=2.5, ms=10, zorder=5, label=label)
    ax_metric.set(ylabel="test metric", ylim=(0, 1.1))
    hard_share = [r["hard_selected"] / max(r["num_selected_global"], 1) for r in train]
    batch_share = [r["hard_in_batch"] / max(r["num_valid_global"], 1) for r in train]
    ax_sel.plot(steps, hard_share, lw=0.6, label="hard groups' share of the selection")
    ax_sel.plot(steps, batch_share, lw=0.6, label="hard groups' share of the batch")
    ax_sel.set(ylabel="fraction", ylim=(0, 1.02))
    threshold = [r["threshold"] for r in train]
    if any(t is not None for t in threshold):
        ax_threshold = ax_sel.twinx()
        label = "threshold loss (right axis)"
        ax_threshold.plot(steps, threshold, color="black", lw=0.8, label=label)
        ax_threshold.set(ylabel="threshold loss (black)", yscale="log")
        ax_sel.plot([], [], color="black", lw=0.8, label=label)  # in ax_sel's legend
    most_ranks = max((len(r["selected_per_rank"]) for r in train), default=0)
    for rank in range(most_ranks):  # NaN (a gap) at the steps of a smaller world
        counts = [
            r["selected_per_rank"][rank] if rank < len(r["selected_per_rank"]) else math.nan
            for r in train
        ]
        ax_rank.plot(steps, counts, lw=0.8, label=f"rank {rank}")
    mean_share = [r["num_selected_global"] / len(r["selected_per_rank"]) for r in train]
    ax_rank.plot(steps, mean_share, "k--", lw=0.8, label="M / W")
    ax_rank.set(xlabel="step", ylabel="selected examples")
    for ax in (ax_loss, ax_metric, ax_sel, ax_rank):
        ax.grid(alpha=0.3)
        if ax is ax_metric:  # above the panel: its lines span the whole height
            ax.legend(fontsize=8, ncol=4, loc="lower center", bbox_to_anchor=(0.5, 1.0))
        else:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def parameter_digest(module: nn.Module) -> str:
    """SHA-256 of every parameter's bytes: equal on all ranks when they agree exactly."""
    digest = hashlib.sha256()
    for parameter in module.parameters():
        digest.update(parameter.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def collective_failure_hint(message: str) -> str | None:
    """What a failed collective's message means for the user (None: not a collective)."""
    if re.search(r"Timed out|timeout|Timeout", message):
        return (
            "a collective timed out: this rank waited longer than timeout_s for another rank, "
            "which stalled (hung I/O, a debugger, an overloaded node) or died. Check the other "
            "ranks' logs; raise timeout_s if such stalls are expected"
        )
    if re.search(r"Connection (closed|reset)|Broken pipe|peer", message):
        return (
            "lost the connection to another rank, which exited, crashed or timed out first; "
            "its log says why"
        )
    return None
