"""Run: ``python bench/presets.py`` (about two minutes on 2 cores); ``--small`` for a smoke run.

Cost of each ``dist_ohem.compat`` preset against the plain-torch reference of the peer it
replaces (``tests/peers.py``, the peer's code re-stated in torch), on the same input, in
one process with one thread (CPU): what switching to the preset costs at W = 1, before
any exchange between ranks.

Inputs (float32 logits; seed 0):

- segmentation (mmseg, PaddleSeg, HRNet, BiSeNet): 4 x 19 x 128 x 256 logits, labels
  with ~10% ignored; 70% of the pixels confident in their label (target logit + 5), so
  that the thresholds and floors all bind;
- SSD: 8 images x 8732 anchors x 21 classes, ~0.5% foreground anchors (~44 an image);
- mmdet: 2 images x 2000 RoIs x 81 classes, ~10% foreground, ``num=512``.

Timed: the loss call (forward) and the loss call plus ``backward()`` to the logits
(forward + backward); for mmdet's reference (a sampler) the call is the sampling plus
the mean cross-entropy of the sampled RoIs. Each repeat runs both implementations, the
order alternating (preset first on even repeats), after one warm-up call each;
reported: medians over the repeats and their ratio preset / peer. The machine's load
average is recorded at the start and the end. Writes ``presets.json`` and
``presets.md`` to ``bench/results/`` (``--output-dir`` to change).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(1, str(ROOT))  # `python bench/presets.py` puts bench/ first on sys.path

from bench.common import markdown_table, run_meta, write_report  # noqa: E402
from dist_ohem import compat  # noqa: E402
from tests.peers import (  # noqa: E402
    bisenet_ohem_reference,
    hrnet_ohem_reference,
    mmdet_ohem_reference,
    mmseg_ohem_reference,
    paddleseg_ohem_reference,
    ssd_hard_negatives_reference,
)

logger = logging.getLogger("bench")

FULL = {"seg": (4, 19, 128, 256), "ssd": (8, 8732, 21), "mmdet": (2, 2000, 81)}
SMALL = {"seg": (2, 19, 16, 32), "ssd": (2, 200, 21), "mmdet": (2, 100, 81)}


def segmentation(shape: tuple[int, ...], ignore: int) -> tuple[torch.Tensor, torch.Tensor]:
    n, c, h, w = shape
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, c, (n, h, w), generator=gen)
    logits = torch.randn(n, c, h, w, generator=gen)
    confident = (torch.rand(n, h, w, generator=gen) < 0.7).float().unsqueeze(1)
    logits += 5 * confident * F.one_hot(labels, c).movedim(-1, 1)
    labels[torch.rand(n, h, w, generator=gen) < 0.1] = ignore
    return logits, labels


def ssd(shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    n, anchors, c = shape
    gen = torch.Generator().manual_seed(0)
    targets = torch.randint(1, c, (n, anchors), generator=gen)
    targets[torch.rand(n, anchors, generator=gen) >= 0.005] = 0
    return torch.randn(n, anchors, c, generator=gen) * 2, targets


def rois(shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    images, per_image, c = shape
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, c - 1, (images * per_image,), generator=gen)
    labels[torch.rand(images * per_image, generator=gen) >= 0.1] = c - 1  # background
    scores = torch.randn(images * per_image, c, generator=gen) * 2
    return scores, labels, torch.arange(images).repeat_interleave(per_image)


def mmdet_peer(scores, labels, image_index, num=512, pos_fraction=0.25):
    """The peer's sampling, then the bbox head's mean CE over the sampled RoIs."""
    sampled = mmdet_ohem_reference(scores, labels, image_index, num, pos_fraction)
    return F.cross_entropy(scores[sampled], labels[sampled])


def cases(sizes: dict[str, tuple[int, ...]]) -> list[dict[str, Any]]:
    """(name, input description, preset call, peer call, logits) for every preset."""
    seg_255, seg_hrnet = segmentation(sizes["seg"], 255), segmentation(sizes["seg"], -1)
    anchors, roi_batch = ssd(sizes["ssd"]), rois(sizes["mmdet"])
    seg_text = "x".join(map(str, sizes["seg"]))
    mmseg, paddle = compat.mmseg_ohem(0.7, 100000), compat.paddleseg_ohem(0.7, 10000)
    hrnet, bisenet = compat.hrnet_ohem(0.7, 100000), compat.bisenet_ohem(0.7)
    ssd_preset, mmdet = compat.ssd_hard_negatives(3.0), compat.mmdet_ohem(512, 0.25)
    return [
        {
            "preset": "mmseg_ohem(0.7, 100000)",
            "input": seg_text,
            "ours": lambda x: mmseg(x, seg_255[1]),
            "peer": lambda x: mmseg_ohem_reference(x, seg_255[1], 0.7, 100000)[0],
            "logits": seg_255[0],
        },
        {
            "preset": "paddleseg_ohem(0.7, 10000)",
            "input": seg_text,
            "ours": lambda x: paddle(x, seg_255[1]),
            "peer": lambda x: paddleseg_ohem_reference(x, seg_255[1], 0.7, 10000)[0],
            "logits": seg_255[0],
        },
        {
            "preset": "hrnet_ohem(0.7, 100000)",
            "input": seg_text,
            "ours": lambda x: hrnet(x, seg_hrnet[1]),
            "peer": lambda x: hrnet_ohem_reference(x, seg_hrnet[1], 0.7, 100000)[0],
            "logits": seg_hrnet[0],
        },
        {
            "preset": "bisenet_ohem(0.7)",
            "input": seg_text,
            "ours": lambda x: bisenet(x, seg_255[1]),
            "peer": lambda x: bisenet_ohem_reference(x, seg_255[1], 0.7)[0],
            "logits": seg_255[0],
        },
        {
            "preset": "ssd_hard_negatives(3.0)",
            "input": "x".join(map(str, sizes["ssd"])),
            "ours": lambda x: ssd_preset(x, anchors[1]),
            "peer": lambda x: ssd_hard_negatives_reference(x, anchors[1], 3.0)[0],
            "logits": anchors[0],
        },
        {
            "preset": "mmdet_ohem(512, 0.25)",
            "input": "x".join(map(str, sizes["mmdet"])),
            "ours": lambda x: mmdet(x, roi_batch[1], roi_batch[2]),
            "peer": lambda x: mmdet_peer(x, roi_batch[1], roi_batch[2]),
            "logits": roi_batch[0],
        },
    ]


def seconds(fn: Callable[[torch.Tensor], torch.Tensor], logits: torch.Tensor, backward: bool):
    x = logits.detach().requires_grad_(backward)
    start = time.perf_counter()
    loss = fn(x)
    if backward:
        loss.backward()
    return time.perf_counter() - start


def measure(case: dict[str, Any], repeats: int) -> dict[str, Any]:
    """Medians (ms) of the preset and the peer, forward and forward + backward."""
    row: dict[str, Any] = {"preset": case["preset"], "input": case["input"]}
    for backward in (False, True):
        times: dict[str, list[float]] = {"ours": [], "peer": []}
        for which in times:  # warm-up
            seconds(case[which], case["logits"], backward)
        for repeat in range(repeats):
            order = ("ours", "peer") if repeat % 2 == 0 else ("peer", "ours")
            for which in order:
                times[which].append(seconds(case[which], case["logits"], backward))
        key = "fwd_bwd" if backward else "fwd"
        for which, values in times.items():
            row[f"{key}_{which}_ms"] = 1e3 * statistics.median(values)
        row[f"{key}_ratio"] = row[f"{key}_ours_ms"] / row[f"{key}_peer_ms"]
    logger.info("%s: %s", case["preset"], row)
    return row


def render_markdown(report: dict[str, Any]) -> str:
    meta = report["meta"]
    rows = [
        [
            f"`{r['preset']}`",
            r["input"],
            f"{r['fwd_ours_ms']:.1f}",
            f"{r['fwd_peer_ms']:.1f}",
            f"{r['fwd_ratio']:.2f}",
            f"{r['fwd_bwd_ours_ms']:.1f}",
            f"{r['fwd_bwd_peer_ms']:.1f}",
            f"{r['fwd_bwd_ratio']:.2f}",
        ]
        for r in report["rows"]
    ]
    headers = [
        "preset",
        "input",
        "fwd preset ms",
        "fwd peer ms",
        "preset / peer",
        "fwd+bwd preset ms",
        "fwd+bwd peer ms",
        "preset / peer",
    ]
    return "\n".join(
        [
            "# Presets against the peers' references (CPU, one process, one thread)",
            "",
            f"`{meta['command']}`, {meta['date']}, torch {meta['torch']}, "
            f"{meta['cores']} cores, git {meta['git']}; load average at start "
            f"{meta['load_start']}, at end {meta['load_end']}; medians of "
            f"{report['config']['repeats']} repeats, the two interleaved.",
            "",
            markdown_table(headers, rows),
            "",
            "Peer: the plain-torch restatement of its code in `tests/peers.py` (mmdet: the "
            "sampler, then the mean CE of the sampled RoIs). Ratio < 1: the preset is faster.",
            "",
        ]
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny inputs (a smoke run)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--output-dir", type=Path, default=ROOT / "bench" / "results")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    started, load_start = time.perf_counter(), os.getloadavg()
    sizes = SMALL if args.small else FULL
    rows = [measure(case, args.repeats) for case in cases(sizes)]
    report = {
        "meta": run_meta(started, load_start),
        "config": {"repeats": args.repeats, "sizes": sizes, "threads": 1},
        "rows": rows,
    }
    write_report(report, render_markdown(report), args.output_dir, "presets")


if __name__ == "__main__":
    main()
