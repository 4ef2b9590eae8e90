"""Run: ``flock /tmp/bench.lock python bench/roi_quality.py`` (full, ~15 min), ``--quick``
or ``--skewed-only`` (~3 min).

RoI-level OHEM as in the paper (examples/roi_detection.py, a Fast R-CNN-style detector
on generated scenes), one image per rank (the paper's N = 1 case) on W = 2 and W = 4
gloo ranks: the standard sampler (64 RoIs per image, 25% foreground, background from
IoU [0.1, 0.5)) vs a random subset of 64 RoIs per image vs local OHEM (each rank's own
64 hardest after dedup_rois at 0.7) vs global OHEM (the 64 x W hardest of all ranks), 5
seeds each (the seed draws the training scenes and the initial weights; the test set is
fixed). W = 4 runs half the steps of W = 2, so every run sees the same images.

The skewed-shard cell (``shard=skewed`` of the example) is where a per-rank budget
should waste RoIs: W = 2 for the iid W = 2 cell's 240 steps, rank 0 trains on crowded
scenes (4-6 objects, 3-5 look-alikes: ``roi_scenes.HARD``), rank 1 on one object and no
look-alike (``EASY``), one image per rank each step; standard sampler, local and global
OHEM, the same 5 seeds. Its test set is the same fixed iid one: the question is whether
moving the budget to the hard image trains a better detector for the usual scenes, and
a test split that mirrored the skew would weight one rank's kind of scene by choice.

Reported: final COCO mAP@[.5:.95] and mAP@0.5 (pycocotools) mean ± std; global - local
paired by seed; the share of the batches' foreground RoIs and of the background RoIs
lying on look-alikes (the hard negatives) that the step trained on; rank 0's share of
the RoIs back-propagated (1/W with a per-rank budget; in the skewed cell, how far global
selection moves the budget to the hard image); the cost to reach 0.9 x the best final
mean mAP of the cell (training seconds: the slowest rank's step times summed, no
evaluation; RoIs back-propagated). Then mask-mode OHEM (every RoI through the head with
grad, the unselected weighted 0) against the read-only-head two-pass version, same
selection, alternated runs, with the example's RoI head (hidden width 128) and a heavier
one (1024): median step time. ``--timing-only`` runs just that part and
writes ``roi_timing.{json,md}``.

The ranks are started once per cell (bench/common.run_world, FileStore rendezvous) and
run every variant and seed in one process group, so no run pays a process start. Writes
``bench/results/roi_quality.{json,md,png}`` (``roi_quality_quick.*`` with ``--quick``);
``--skewed-only`` runs just the skewed cell and writes ``roi_skewed.{json,md,png}``
(``roi_skewed_quick.*`` with ``--quick``: 60 steps).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]

from bench.common import (  # noqa: E402
    VARIANT_COLORS,
    markdown_table,
    run_meta,
    run_world,
    write_report,
)
from bench.quality import fmt, mean_std, paired_difference, time_to_target  # noqa: E402

VARIANTS = {
    "sampler": "standard sampler",
    "random": "random RoIs",
    "local": "local OHEM",
    "global": "global OHEM",
}
#: The variants of the skewed-shard cell (random RoIs is known to trail; left out).
SKEWED_VARIANTS = ("sampler", "local", "global")
TARGET_FRACTION = 0.9


class Cell(NamedTuple):
    """``world_size`` ranks for ``steps`` steps, training scenes by roi_detection's ``shard``."""

    world_size: int
    steps: int
    shard: str

    @property
    def variants(self) -> tuple[str, ...]:
        """The variants the cell runs."""
        return SKEWED_VARIANTS if self.shard == "skewed" else tuple(VARIANTS)


#: The skewed-shard cell: the W = 2 iid cell's steps, rank 0 hard scenes, rank 1 easy.
SKEWED = Cell(2, 240, "skewed")
#: Every cell sees 480 training images.
FULL = (Cell(2, 240, "iid"), Cell(4, 120, "iid"), SKEWED)
QUICK = (Cell(2, 60, "iid"),)
QUICK_SKEWED = Cell(2, 60, "skewed")
MASK_TIMING_STEPS = 40
#: Hidden widths of the RoI head in the timing: the example's, and a heavier head.
TIMING_HEAD_WIDTHS = (128, 1024)


def rank_main(rank: int, world_size: int, init_file: str, plan: dict, out_file: str) -> None:
    """One rank: every (seed, variant) run of ``plan``, then the mask-mode timing."""
    import json

    import roi_detection

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    runs, timing = [], []
    base = {"max_steps": plan["steps"], "eval_every": plan["eval_every"], "plot": False}
    base |= {"test_images": plan["test_images"], "progress": False}
    shard = plan["shard"]
    for seed in plan["seeds"]:
        for variant in plan["variants"]:
            run_dir = Path(plan["runs_dir"]) / f"w{world_size}_{shard}_{variant}_s{seed}"
            cfg = roi_detection.Config(
                run_dir=str(run_dir), seed=seed, scope=variant, shard=shard, **base
            )
            summary = roi_detection.train(cfg)
            if rank == 0:
                runs.append(read_run(run_dir, summary, variant, seed, cfg))
                logging.info(
                    "W=%d %s %s seed %d: mAP %.3f, rank 0 share %.3f", world_size, shard,
                    variant, seed, summary["map"], runs[-1]["rank_share"][0],
                )  # fmt: skip
    for head_hidden in plan["timing_widths"]:
        for repeat in range(plan["mask_repeats"]):
            for mode in ("two_pass", "mask"):
                name = f"w{world_size}_timing_h{head_hidden}_{mode}_{repeat}"
                cfg = roi_detection.Config(
                    run_dir=str(Path(plan["runs_dir"]) / name), seed=repeat, mode=mode,
                    head_hidden=head_hidden, **(base | plan["timing"]),
                )  # fmt: skip
                summary = roi_detection.train(cfg)
                if rank == 0:
                    timing.append(timing_record(cfg, summary, repeat))
    if rank == 0:
        Path(out_file).write_text(json.dumps({"runs": runs, "timing": timing}))
    dist.barrier()
    dist.destroy_process_group()


def timing_record(cfg: Any, summary: dict, repeat: int) -> dict:
    """Median step time of one timing run (the first 5 steps left out) and RoIs with grad."""
    import json

    lines = (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()
    step_s = [r["step_s_max"] for r in map(json.loads, lines) if r["kind"] == "train"][5:]
    with_grad = summary["rois_in_batch" if cfg.mode == "mask" else "rois_backpropagated"]
    return {
        "mode": cfg.mode,
        "head_hidden": cfg.head_hidden,
        "repeat": repeat,
        "median_step_s": statistics.median(step_s),
        "rois_with_grad_per_step": with_grad / cfg.max_steps,
    }


def read_run(run_dir: Path, summary: dict, variant: str, seed: int, cfg: Any) -> dict:
    """One run's final metrics, hard-RoI shares, each rank's share of the back-propagated
    RoIs (over all steps) and its cost curve (per evaluation)."""
    import json

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_s = rois = 0.0
    cost = {}
    for record in records:
        if record["kind"] == "train":
            train_s += record["step_s_max"]
            rois += record["rois_backpropagated"]
            cost[record["step"]] = (train_s, rois)
    curve = [
        {"step": r["step"], "train_s": cost[r["step"]][0], "examples": int(cost[r["step"]][1]),
         "map": r["map"], "map50": r["map50"]}
        for r in records if r["kind"] == "eval"
    ]  # fmt: skip
    by_rank = summary["rois_backpropagated_by_rank"]
    return {
        "world_size": len(by_rank),
        "shard": cfg.shard,
        "variant": variant,
        "seed": seed,
        "final": {"map": summary["map"], "map50": summary["map50"]},
        "fg_kept": summary["fg_kept"],
        "lookalike_kept": summary["lookalike_kept"],
        "train_s": summary["train_s"],
        "rois_backpropagated": summary["rois_backpropagated"],
        "rank_share": [n / summary["rois_backpropagated"] for n in by_rank],
        "curve": curve,
    }


def in_cell(runs: list[dict], cell: Cell) -> list[dict]:
    """The runs of ``cell``."""
    # Results written before the skewed cell existed name no shard: they are iid.
    return [
        r for r in runs if (r["world_size"], r.get("shard", "iid")) == (cell.world_size, cell.shard)
    ]


def aggregate(runs: list[dict], cells: tuple[Cell, ...]) -> list[dict[str, Any]]:
    """Per (cell, variant): mean ± std over seeds, global - local paired, rank 0's share of
    the back-propagated RoIs, cost to target."""
    rows = []
    for cell in cells:
        cell_runs = in_cell(runs, cell)
        best = max(
            statistics.fmean(r["final"]["map"] for r in cell_runs if r["variant"] == v)
            for v in cell.variants
        )
        target = TARGET_FRACTION * best
        for variant in cell.variants:
            mine = [r for r in cell_runs if r["variant"] == variant]
            reached = [time_to_target(r["curve"], "map", target) for r in mine]
            reached = [point for point in reached if point is not None]
            local = [r for r in cell_runs if r["variant"] == "local"]
            rows.append(
                {
                    "world_size": cell.world_size,
                    "shard": cell.shard,
                    "variant": variant,
                    "map": mean_std([r["final"]["map"] for r in mine]),
                    "map50": mean_std([r["final"]["map50"] for r in mine]),
                    "fg_kept": mean_std([r["fg_kept"] for r in mine]),
                    "lookalike_kept": mean_std([r["lookalike_kept"] for r in mine]),
                    "train_s": mean_std([r["train_s"] for r in mine]),
                    # paired_difference gives (others - global): negated, global - local.
                    "global_minus_local": _negated(paired_difference(local, cell_runs, "map"))
                    if variant == "global"
                    else None,
                    "rank0_share": mean_std([r["rank_share"][0] for r in mine]),
                    "target": target,
                    "reached": len(reached),
                    "seeds": len(mine),
                    "to_target_s": mean_std([p["train_s"] for p in reached]),
                    "to_target_rois": mean_std([p["examples"] for p in reached]),
                }
            )
    return rows


def _negated(difference: dict[str, Any]) -> dict[str, Any]:
    flip = {k: (None if v is None else -v) for k, v in difference.items() if k in ("mean",)}
    return {**difference, **flip, "above": difference["below"], "below": difference["above"]}


def render_markdown(report: dict[str, Any], title: str) -> str:
    """The report: setup, quality table, cost table, mask vs two-pass timing (if run)."""
    meta = report["meta"]
    rows = report["rows"]
    quality = markdown_table(
        ["W", "shard", "variant", "mAP@[.5:.95]", "mAP@0.5", "global - local (paired)",
         "fg RoIs trained", "look-alike RoIs trained", "rank 0 share of trained RoIs"],
        [
            [str(r["world_size"]), r["shard"], VARIANTS[r["variant"]], fmt(r["map"]),
             fmt(r["map50"]),
             "-" if r["global_minus_local"] is None
             else f"{fmt(r['global_minus_local'], '+.3f')} (ahead in "
             f"{r['global_minus_local']['above']}/{r['seeds']})",
             fmt(r["fg_kept"], ".3f"), fmt(r["lookalike_kept"], ".3f"),
             fmt(r["rank0_share"], ".3f")]
            for r in rows
        ],
    )  # fmt: skip
    cost = markdown_table(
        ["W", "shard", "variant", "target mAP", "reached", "train s to target",
         "RoIs to target", "train s (all steps)"],
        [
            [str(r["world_size"]), r["shard"], VARIANTS[r["variant"]], f"{r['target']:.3f}",
             f"{r['reached']}/{r['seeds']}", fmt(r["to_target_s"], ".1f"),
             fmt(r["to_target_rois"], ".0f"), fmt(r["train_s"], ".1f")]
            for r in rows
        ],
    )  # fmt: skip
    plan = report["plan"]
    scenes = plan["scenes"]
    parts = [
        f"# {title}",
        "",
        f"- command: `{meta['command']}`",
        f"- date (UTC): {meta['date']}; torch {meta['torch']}; python {meta['python']}; "
        f"{meta['cores']} cores; git {meta['git']}; one thread per rank",
        f"- machine: {meta['machine']}; load average (1 min, the study's own ranks included) "
        f"{meta['load_start'][0]} at start, {meta['load_end'][0]} at end; wall time "
        f"{meta['wall_s'] / 60:.1f} min",
        f"- examples/roi_detection.py, 1 image per rank, {plan['rois_per_image']} RoIs per "
        f"image back-propagated, {plan['proposals']} proposals per image; (W, steps, shard) "
        f"= {report['cells']}; seeds {report['seeds']}; test set {plan['test_images']} fixed "
        f"iid scenes, evaluated every {report['eval_every']}",
        f"- shard iid: every rank's training scenes have {scenes['iid']['objects']} objects "
        f"and {scenes['iid']['lookalikes']} look-alikes (inclusive ranges); skewed: rank 0's "
        f"have {scenes['hard']['objects']} and {scenes['hard']['lookalikes']} (fewer where "
        f"a box finds no free place), rank 1's {scenes['easy']['objects']} and "
        f"{scenes['easy']['lookalikes']}. The test set is iid in every cell.",
        "- global - local: mAP of global OHEM minus local OHEM's with the same seed.",
        "- fg / look-alike RoIs trained: the share of the batches' foreground RoIs (IoU >= 0.5 "
        "with an object), and of the background RoIs lying on a look-alike (IoU >= 0.5 with "
        "one: the hard negatives), that the steps back-propagated, over all steps.",
        "- rank 0 share of trained RoIs: the share of the back-propagated RoIs that came from "
        "rank 0's image, over all steps (1/W with a per-rank budget).",
        f"- target: {TARGET_FRACTION} x the best final mean mAP of the cell; train s = sum over "
        "steps of the slowest rank's step time (no evaluation); RoIs = RoIs back-propagated "
        "up to the first evaluation at or above the target; means over the seeds that "
        "reached it.",
        "",
        "## Final test mAP",
        "",
        quality,
        "",
        "## Cost to the target",
        "",
        cost,
        "",
        *([timing_markdown(report)] if report["timing"] else []),
    ]
    return "\n".join(parts)


def timing_markdown(report: dict[str, Any]) -> str:
    """Mask mode vs the read-only head: median step time per head width and mode."""
    plan = report["plan"]
    rows = []
    for head_hidden in sorted({t["head_hidden"] for t in report["timing"]}):
        medians = {}
        for mode in ("two_pass", "mask"):
            mine = [
                t for t in report["timing"] if (t["mode"], t["head_hidden"]) == (mode, head_hidden)
            ]
            medians[mode] = statistics.median(t["median_step_s"] for t in mine)
            rows.append(
                [str(head_hidden), mode, f"{medians[mode] * 1000:.1f}",
                 f"{statistics.fmean(t['rois_with_grad_per_step'] for t in mine):.0f}",
                 ", ".join(f"{t['median_step_s'] * 1000:.1f}" for t in mine),
                 f"{medians['mask'] / medians['two_pass']:.2f}x" if mode == "mask" else ""]
            )  # fmt: skip
    return "\n".join(
        [
            "## Mask mode vs the read-only head (two-pass)",
            "",
            f"W={plan['timing_world_size']}, global OHEM, {plan['timing']['max_steps']} steps "
            "a run, the two modes alternated; per run the median over its steps after the "
            "first 5 of the slowest rank's step time (backbone forward and backward, scoring, "
            "dedup, selection, head, optimizer). Head width: the RoI head's hidden layer "
            "(the example's default 128; Fast R-CNN's fc layers have 4096).",
            "",
            markdown_table(
                [
                    "head width",
                    "mode",
                    "step ms (median of runs)",
                    "RoIs with grad per step",
                    "per run",
                    "mask / two-pass",
                ],
                rows,
            ),
            "",
        ]
    )


def plot(report: dict[str, Any], path: Path) -> None:
    """Mean test mAP (± std band) against the RoIs back-propagated, one panel per cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # (W, steps) in results written before the skewed cell existed: iid cells.
    cells = [Cell._make(cell if len(cell) == 3 else [*cell, "iid"]) for cell in report["cells"]]
    figure, axes = plt.subplots(1, len(cells), figsize=(5 * len(cells), 3.8), squeeze=False)
    for ax, cell in zip(axes[0], cells, strict=True):
        for variant in cell.variants:
            runs = [r for r in in_cell(report["runs"], cell) if r["variant"] == variant]
            points = list(zip(*(r["curve"] for r in runs), strict=True))
            x = [statistics.fmean(q["examples"] for q in p) for p in points]
            mean = [statistics.fmean(q["map"] for q in p) for p in points]
            std = [statistics.stdev(q["map"] for q in p) if len(p) > 1 else 0 for p in points]
            color = VARIANT_COLORS[variant]
            ax.plot(x, mean, marker=".", label=VARIANTS[variant], color=color)
            ax.fill_between(
                x, [m - s for m, s in zip(mean, std, strict=True)],
                [m + s for m, s in zip(mean, std, strict=True)], color=color, alpha=0.2,
            )  # fmt: skip
        ax.set(title=f"W={cell.world_size}, {cell.shard} shard, 1 image per rank",
               xlabel="RoIs back-propagated", ylabel="test mAP@[.5:.95]")  # fmt: skip
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


# ----------------------------------------------------------------------------- diagnosis
#
# ``--diagnose``: why does global OHEM trail local OHEM in the skewed cell? The skewed
# cell's local and global runs again (more seeds), each final model also evaluated on
# test scenes of the two training kinds (EASY: one object, no look-alike; HARD: crowded,
# many look-alikes); global selection with per-image weighting; and the local/global pair
# again at half and twice the learning rate.

#: (variant, learning-rate factor) pairs of the diagnosis; seeds 0-9 at factor 1, 0-4 else.
#: ``global_per_image``: global OHEM's choice of RoIs, but every image's selected RoIs
#: weigh as much in the gradient as under local OHEM (each rank back-propagates the mean
#: of its own selected losses; DDP averages the ranks), not in proportion to their count.
DIAGNOSIS = (("local", 1.0), ("global", 1.0), ("global_per_image", 1.0))
DIAGNOSIS += (("local", 0.5), ("global", 0.5), ("local", 2.0), ("global", 2.0))
DIAGNOSIS_SEEDS = {1.0: 10, 0.5: 5, 2.0: 5}
#: Test sets of the diagnosis: the usual iid one, and one per training kind.
DIAGNOSIS_TESTS = ("iid", "easy", "hard")


def diagnose_rank_main(
    rank: int, world_size: int, init_file: str, plan: dict, out_file: str
) -> None:
    """One rank of the diagnosis: the runs of ``plan``, each final model evaluated on the
    iid, EASY and HARD test scenes (``roi_detection.evaluate`` wrapped, nothing else
    changed)."""
    import json

    import roi_detection
    import roi_scenes

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    evaluate = roi_detection.evaluate
    tests = {
        name: [
            roi_scenes.make_scene(roi_detection.TEST_SEED, i, mix)
            for i in range(plan["test_images"])
        ]
        for name, mix in (("easy", roi_scenes.EASY), ("hard", roi_scenes.HARD))
    }

    def evaluate_all(backbone: Any, head: Any, test: list) -> dict[str, float]:
        result = evaluate(backbone, head, test)
        for name, scenes in tests.items():
            other = evaluate(backbone, head, scenes)
            result[f"map_{name}"], result[f"map50_{name}"] = other["map"], other["map50"]
        return result

    roi_detection.evaluate = evaluate_all
    from dist_ohem.detection import RoISelection

    per_roi = RoISelection.loss_of_selected

    def per_image(self: Any, selected_losses: torch.Tensor) -> torch.Tensor:
        return selected_losses.sum() / max(selected_losses.numel(), 1)

    base_lr = roi_detection.Config.lr
    runs = []
    for variant, factor, seed in plan["runs"]:
        run_dir = Path(plan["runs_dir"]) / f"diag_{variant}_lr{factor}_s{seed}"
        RoISelection.loss_of_selected = per_image if variant == "global_per_image" else per_roi
        cfg = roi_detection.Config(
            run_dir=str(run_dir), seed=seed, scope=variant.removesuffix("_per_image"),
            shard="skewed",
            max_steps=plan["steps"], eval_every=plan["steps"], plot=False,
            test_images=plan["test_images"], progress=False, lr=base_lr * factor,
        )  # fmt: skip
        summary = roi_detection.train(cfg)
        if rank == 0:
            record = read_run(run_dir, summary, variant, seed, cfg)
            record["lr_factor"] = factor
            record["final"] |= {
                key: summary[key] for key in summary if key.startswith(("map_", "map50_"))
            }
            runs.append(record)
            logging.info(
                "diagnosis %s lr x%s seed %d: mAP %.3f (easy %.3f, hard %.3f), rank 0 %.3f",
                variant, factor, seed, summary["map"], summary["map_easy"],
                summary["map_hard"], record["rank_share"][0],
            )  # fmt: skip
    if rank == 0:
        Path(out_file).write_text(json.dumps({"runs": runs}))
    dist.barrier()
    dist.destroy_process_group()


def diagnosis_rows(runs: list[dict]) -> list[dict[str, Any]]:
    """Per learning-rate factor and test set: each variant's mAP, and each variant minus
    local OHEM paired by seed."""
    rows = []
    for factor in sorted({r["lr_factor"] for r in runs}):
        mine = [r for r in runs if r["lr_factor"] == factor]
        variants = [v for v, f in DIAGNOSIS if f == factor and any(r["variant"] == v for r in mine)]
        by = {v: {r["seed"]: r for r in mine if r["variant"] == v} for v in variants}
        for test in DIAGNOSIS_TESTS:
            key = "map" if test == "iid" else f"map_{test}"
            row: dict[str, Any] = {"lr_factor": factor, "test": test, "variants": {}}
            for v in variants:
                seeds = sorted(set(by[v]) & set(by["local"]))
                diff = [by[v][s]["final"][key] - by["local"][s]["final"][key] for s in seeds]
                row["variants"][v] = {
                    "map": mean_std([by[v][s]["final"][key] for s in by[v]]),
                    "minus_local": {**mean_std(diff), "ahead": sum(d > 0 for d in diff)},
                    "rank0_share": mean_std([r["rank_share"][0] for r in by[v].values()]),
                    "lookalike_kept": mean_std([r["lookalike_kept"] for r in by[v].values()]),
                    "fg_kept": mean_std([r["fg_kept"] for r in by[v].values()]),
                }
            rows.append(row)
    return rows


def diagnosis_markdown(report: dict[str, Any]) -> str:
    """roi_skewed_diagnosis.md."""
    meta = report["meta"]
    lines = [
        "# Why global OHEM trails local OHEM on the skewed RoI shard: a measurement",
        "",
        f"- command: `{meta['command']}`",
        f"- date (UTC): {meta['date']}; torch {meta['torch']}; {meta['cores']} cores; git "
        f"{meta['git']}; load average (1 min) {meta['load_start'][0]} at start, "
        f"{meta['load_end'][0]} at end; wall time {meta['wall_s'] / 60:.1f} min",
        f"- the skewed cell of roi_skewed.md (W=2, {report['steps']} steps, rank 0 HARD "
        "scenes, rank 1 EASY, one image per rank, 64 RoIs per image), local and global "
        "OHEM; seeds 0-9 at the example's learning rate (3e-3), 0-4 at half and twice it",
        "- global_per_image (seeds 0-9): global OHEM's choice of RoIs, but each image's "
        "selected RoIs weigh as under local OHEM (each rank back-propagates the mean of its "
        "own selected losses, DDP averages the ranks) instead of 1/M per RoI: it separates "
        "*which* RoIs global picks from *how much* the hard image then weighs",
        f"- every final model is evaluated on three fixed test sets of {report['test_images']} "
        "scenes: iid (the study's), easy (one object, no look-alike: rank 1's kind) and "
        "hard (4-6 objects, 3-5 look-alikes: rank 0's kind); COCO mAP@[.5:.95]",
        "- global - local: paired by seed, mean ± std, (seeds where global was ahead / seeds)",
        "",
        markdown_table(
            [
                "lr",
                "test set",
                "variant",
                "mAP",
                "minus local OHEM (paired)",
                "rank 0 share",
                "fg RoIs kept",
                "look-alike RoIs kept",
            ],
            [
                [
                    f"x{r['lr_factor']:g}",
                    r["test"],
                    v,
                    fmt(stat["map"]),
                    "-"
                    if v == "local"
                    else f"{fmt(stat['minus_local'], '+.3f')} "
                    f"({stat['minus_local']['ahead']}/{stat['minus_local']['n']})",
                    fmt(stat["rank0_share"]),
                    fmt(stat["fg_kept"]),
                    fmt(stat["lookalike_kept"]),
                ]
                for r in report["rows"]
                for v, stat in r["variants"].items()
            ],
        ),
        "",
    ]
    return "\n".join(lines)


def diagnose(args: argparse.Namespace) -> None:
    """Run the diagnosis; write roi_skewed_diagnosis.{json,md}."""
    started, load_start = time.perf_counter(), os.getloadavg()
    steps = SKEWED.steps
    planned = [
        (variant, factor, seed)
        for variant, factor in DIAGNOSIS
        for seed in range(DIAGNOSIS_SEEDS[factor])
    ]
    plan = {"steps": steps, "test_images": 100, "runs_dir": str(args.runs_dir), "runs": planned}
    result = run_world(SKEWED.world_size, plan, diagnose_rank_main)
    meta = run_meta(started, load_start, ("dist_ohem", "examples", "bench/roi_quality.py"))
    meta["machine"] = args.machine
    report = {
        "meta": meta,
        "steps": steps,
        "test_images": 100,
        "rows": diagnosis_rows(result["runs"]),
        "runs": result["runs"],
    }
    write_report(report, diagnosis_markdown(report), args.output_dir, "roi_skewed_diagnosis")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="W=2, 2 seeds, 60 steps")
    parser.add_argument(
        "--timing-only", action="store_true", help="only mask vs two-pass: roi_timing.{json,md}"
    )
    parser.add_argument(
        "--skewed-only",
        action="store_true",
        help="only the skewed-shard cell: roi_skewed.{json,md,png} (--quick: 60 steps)",
    )
    parser.add_argument(
        "--diagnose",
        action="store_true",
        help="why global trails local on the skewed shard: roi_skewed_diagnosis.{json,md}",
    )
    parser.add_argument(
        "--replot",
        action="store_true",
        help="redraw the figure (roi_quality.png; --skewed-only: roi_skewed.png) from the "
        "committed JSON in --output-dir, training nothing",
    )
    parser.add_argument("--seeds", type=int, help="seeds per variant (default 5; --quick 2)")
    parser.add_argument("--machine", default="not stated", help="a note: quiet or shared?")
    parser.add_argument("--output-dir", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "roi_quality")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.replot:
        stem = ("roi_skewed" if args.skewed_only else "roi_quality") + (
            "_quick" if args.quick else ""
        )
        report = json.loads((args.output_dir / f"{stem}.json").read_text())
        plot(report, args.output_dir / f"{stem}.png")
        return
    import roi_detection
    import roi_scenes

    if args.diagnose:
        diagnose(args)
        return
    cells = QUICK if args.quick else FULL
    seeds = list(range(args.seeds or (2 if args.quick else 5)))
    if args.timing_only:
        cells, seeds = (Cell(2, 0, "iid"),), []
    if args.skewed_only:
        cells = (QUICK_SKEWED if args.quick else SKEWED,)
    test_images = 50 if args.quick else 100
    started, load_start = time.perf_counter(), os.getloadavg()
    runs, timing = [], []
    for index, cell in enumerate(cells):
        timed = index == 0 and not args.skewed_only  # the timing runs with the first cell
        plan = {
            "steps": cell.steps,
            "shard": cell.shard,
            "variants": cell.variants,
            "eval_every": cell.steps // 3,
            "seeds": seeds,
            "test_images": test_images,
            "runs_dir": str(args.runs_dir),
            "mask_repeats": (1 if args.quick else 3) if timed else 0,
            "timing_widths": TIMING_HEAD_WIDTHS,
            "timing": {"max_steps": 10 if args.quick else MASK_TIMING_STEPS, "eval_every": 10**6},
        }
        result = run_world(cell.world_size, plan, rank_main)
        runs += result["runs"]
        timing += result["timing"]
    meta = run_meta(started, load_start, ("dist_ohem", "examples", "bench/roi_quality.py"))
    meta["machine"] = args.machine
    report = {
        "meta": meta,
        "cells": [list(c) for c in cells],
        "seeds": seeds,
        "eval_every": [cell.steps // 3 for cell in cells],
        "plan": {
            "rois_per_image": roi_detection.Config.rois_per_image,
            "proposals": roi_scenes.NUM_PROPOSALS,
            "test_images": test_images,
            "scenes": {
                "iid": dataclasses.asdict(roi_scenes.IID),
                "hard": dataclasses.asdict(roi_scenes.HARD),
                "easy": dataclasses.asdict(roi_scenes.EASY),
            },
            "timing": {"max_steps": 10 if args.quick else MASK_TIMING_STEPS},
            "timing_world_size": cells[0].world_size,
        },
        "rows": aggregate(runs, cells) if runs else [],
        "runs": runs,
        "timing": timing,
    }
    if args.timing_only:
        write_report(report, timing_markdown(report), args.output_dir, "roi_timing")
        return
    stem = ("roi_skewed" if args.skewed_only else "roi_quality") + ("_quick" if args.quick else "")
    title = "RoI-level OHEM: standard sampler vs random vs local vs global OHEM"
    if args.skewed_only:
        title = "RoI-level OHEM on a skewed shard: standard sampler vs local vs global OHEM"
    write_report(report, render_markdown(report, title), args.output_dir, stem)
    plot(report, args.output_dir / f"{stem}.png")


if __name__ == "__main__":
    main()
