"""Run: ``flock /tmp/bench.lock python bench/roi_dedup.py`` (~1 min) or ``--quick``.

Times :func:`dist_ohem.detection.dedup_rois` (blocked greedy NMS in hardness order) at
~2,000 RoIs per image, 1 to 4 images, with and without per-label groups, on one CPU
thread, against the textbook sequential greedy NMS in plain PyTorch (one IoU row per
kept RoI, a Python loop), measured alternately in the same run; both masks must agree.
RoIs imitate proposals: 40% jittered around 20 objects per image (they overlap, many
are suppressed), 60% random boxes on an 800 x 600 image; losses drawn from 50 values
(ties). Writes ``bench/results/roi_dedup.{json,md}`` (``roi_dedup_quick.*`` with
``--quick``).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import markdown_table, run_meta, write_report  # noqa: E402
from dist_ohem.detection import box_iou, dedup_rois  # noqa: E402
from dist_ohem.selection import hardness_order  # noqa: E402

ROIS_PER_IMAGE = 2000
NUM_LABELS = 4
IOU_THRESHOLD = 0.7


def make_rois(seed: int, images: int) -> dict[str, torch.Tensor]:
    """``images`` x ROIS_PER_IMAGE proposal-like boxes, losses with ties, labels, image ids."""
    gen = torch.Generator().manual_seed(seed)
    parts = []
    for image in range(images):
        centres = torch.rand(20, 2, generator=gen) * torch.tensor([800.0, 600.0])
        sizes = 30 + 200 * torch.rand(20, 2, generator=gen)
        n_jitter = int(0.4 * ROIS_PER_IMAGE)
        pick = torch.randint(0, 20, (n_jitter,), generator=gen)
        size = sizes[pick] * torch.exp(0.2 * torch.randn(n_jitter, 2, generator=gen))
        centre = centres[pick] + 0.15 * sizes[pick] * torch.randn(n_jitter, 2, generator=gen)
        jittered = torch.cat([centre - size / 2, centre + size / 2], 1)
        n_random = ROIS_PER_IMAGE - n_jitter
        top_left = torch.rand(n_random, 2, generator=gen) * torch.tensor([700.0, 500.0])
        random = torch.cat(
            [top_left, top_left + 10 + 250 * torch.rand(n_random, 2, generator=gen)], 1
        )
        parts.append(
            {
                "boxes": torch.cat([jittered, random]),
                "image_ids": torch.full((ROIS_PER_IMAGE,), image),
                "labels": torch.randint(0, NUM_LABELS, (ROIS_PER_IMAGE,), generator=gen),
                "losses": torch.randint(0, 50, (ROIS_PER_IMAGE,), generator=gen).float() / 10,
            }
        )
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


def sequential_nms(rois: dict[str, torch.Tensor], per_label: bool) -> torch.Tensor:
    """The textbook greedy NMS: hardest remaining RoI kept, its overlaps > t dropped."""
    kept = torch.zeros(len(rois["losses"]), dtype=torch.bool)
    groups = rois["image_ids"] * NUM_LABELS + rois["labels"] if per_label else rois["image_ids"]
    for group in groups.unique():
        members = (groups == group).nonzero().squeeze(1)
        remaining = members[hardness_order(rois["losses"][members])]
        while remaining.numel():
            best, remaining = remaining[0], remaining[1:]
            kept[best] = True
            iou = box_iou(rois["boxes"][best][None], rois["boxes"][remaining])[0]
            remaining = remaining[iou <= IOU_THRESHOLD]
    return kept


def time_call(fn, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 and 2 images, 3 repeats")
    parser.add_argument("--machine", default="not stated", help="a note: quiet or shared?")
    parser.add_argument("--output-dir", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started, load_start = time.perf_counter(), os.getloadavg()
    repeats = 3 if args.quick else 9
    rows = []
    for images in (1, 2) if args.quick else (1, 2, 4):
        rois = make_rois(images, images)
        for per_label in (False, True):
            labels = rois["labels"] if per_label else None
            fast = functools.partial(
                dedup_rois, rois["boxes"], rois["losses"], rois["image_ids"], IOU_THRESHOLD, labels
            )
            slow = functools.partial(sequential_nms, rois, per_label)
            assert torch.equal(fast(), slow()), "dedup_rois disagrees with the sequential NMS"
            # Alternate the two so that a change of machine load hits both alike.
            fast_s, slow_s = [], []
            for _ in range(repeats):
                fast_s += time_call(fast, 1)
                slow_s += time_call(slow, 1)
            rows.append(
                {
                    "images": images,
                    "rois": len(rois["losses"]),
                    "per_label": per_label,
                    "kept": int(fast().sum()),
                    "dedup_rois_ms": 1000 * statistics.median(fast_s),
                    "sequential_ms": 1000 * statistics.median(slow_s),
                }
            )
    meta = run_meta(started, load_start, ("dist_ohem",))
    meta["machine"] = args.machine
    table = markdown_table(
        ["images", "RoIs", "groups", "kept", "dedup_rois ms", "sequential NMS ms", "speedup"],
        [
            [str(r["images"]), str(r["rois"]), "image x label" if r["per_label"] else "image",
             str(r["kept"]), f"{r['dedup_rois_ms']:.1f}", f"{r['sequential_ms']:.1f}",
             f"{r['sequential_ms'] / r['dedup_rois_ms']:.1f}x"]
            for r in rows
        ],
    )  # fmt: skip
    markdown = "\n".join(
        [
            "# dedup_rois: greedy NMS in hardness order at ~2,000 RoIs per image",
            "",
            f"- command: `{meta['command']}`",
            f"- date (UTC): {meta['date']}; torch {meta['torch']}; {meta['cores']} cores, one "
            f"thread; git {meta['git']}; machine: {meta['machine']}; load average (1 min) "
            f"{meta['load_start'][0]} at start, {meta['load_end'][0]} at end",
            f"- IoU threshold {IOU_THRESHOLD}; medians of {repeats} calls each, the two methods "
            "alternated; identical masks checked",
            "",
            table,
            "",
        ]
    )
    stem = "roi_dedup_quick" if args.quick else "roi_dedup"
    write_report({"meta": meta, "rows": rows}, markdown, args.output_dir, stem)


if __name__ == "__main__":
    main()
