# OMP_NUM_THREADS=1 torchrun --nproc_per_node=2 examples/dense_segmentation.py
"""Per-pixel OHEM across ranks, the way mmseg's OHEMPixelSampler / PaddleSeg's
OhemCrossEntropyLoss use it: every pixel whose true-class probability is below ``thresh``
(loss above ``-ln(thresh)``), but at least ``min_kept`` pixels; ``ignore_index=255``
pixels never count. Here ``min_kept`` counts over the whole distributed batch, so the
per-image budget of mmseg is multiplied by images per rank and ranks (README, "Dense
mining"). Selection strategy ``bracket``: a sample of every rank bounds the threshold and
only the losses inside the bracket are resolved; the ranks never exchange the per-pixel
losses.

A tiny fully convolutional net on generated images: a noisy background (class 0) with a
few random rectangles of classes 1..C-1, a 2-pixel ignore band around each rectangle.
Runs under torchrun (any number of ranks) or as a plain single process. ``--out FILE``
also writes the per-step selection counts and the final accuracy as JSON (rank 0).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dist_ohem import OHEMLoss

IGNORE_INDEX = 255
NUM_CLASSES = 4
#: Mean RGB of each class; pixels are these plus Gaussian noise.
COLORS = torch.randn(NUM_CLASSES, 3, generator=torch.Generator().manual_seed(0))

log = logging.getLogger("dense_segmentation")


def make_batch(
    gen: torch.Generator, images: int, size: int, noise: float = 0.8
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, 3, size, size)`` inputs and ``(images, size, size)`` int64 labels."""
    labels = torch.zeros(images, size, size, dtype=torch.int64)
    for i in range(images):
        for _ in range(3):
            cls = int(torch.randint(1, NUM_CLASSES, (1,), generator=gen))
            top, left = torch.randint(0, size - 6, (2,), generator=gen).tolist()
            height, width = torch.randint(4, size // 2, (2,), generator=gen).tolist()
            rows, cols = slice(top, top + height), slice(left, left + width)
            labels[i, max(top - 2, 0) : top + height + 2, max(left - 2, 0) : left + width + 2] = (
                IGNORE_INDEX
            )
            labels[i, rows, cols] = cls
    color_of = COLORS[labels.clamp(max=NUM_CLASSES - 1)]  # ignore band: like class 3
    inputs = color_of.permute(0, 3, 1, 2) + noise * torch.randn(
        images, 3, size, size, generator=gen
    )
    return inputs, labels


def make_model() -> nn.Module:
    """A small fully convolutional net: (N, 3, H, W) -> (N, NUM_CLASSES, H, W) logits."""
    torch.manual_seed(0)  # identical initial weights on every rank
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=2, dilation=2),
        nn.ReLU(),
        nn.Conv2d(16, NUM_CLASSES, 1),
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--images-per-rank", type=int, default=4)
    parser.add_argument("--size", type=int, default=32, help="image height = width")
    parser.add_argument("--thresh", type=float, default=0.7, help="mmseg/PaddleSeg probability")
    parser.add_argument(
        "--min-kept-per-image", type=int, default=64, help="mmseg's per-image min_kept"
    )
    parser.add_argument("--out", type=Path, help="write a JSON summary here (rank 0)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    if "WORLD_SIZE" in os.environ:  # under torchrun
        dist.init_process_group("gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s")

    model = make_model()
    ddp = DDP(model) if world_size > 1 else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    # mmseg counts min_kept per image on each GPU; here it counts over the whole step.
    min_kept = args.min_kept_per_image * args.images_per_rank * world_size
    criterion = OHEMLoss(
        nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX),
        loss_thresh=-math.log(args.thresh),
        min_kept=min_kept,
        strategy="bracket",
    )
    log.info(
        "world size %d, %d images of %dx%d per rank, loss_thresh %.4f, min_kept %d (global)",
        world_size,
        args.images_per_rank,
        args.size,
        args.size,
        -math.log(args.thresh),
        min_kept,
    )
    gen = torch.Generator().manual_seed(1000 + rank)  # each rank its own shard
    records = []
    for step in range(args.steps):
        inputs, labels = make_batch(gen, args.images_per_rank, args.size)
        loss = criterion(ddp(inputs), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        result = criterion.last
        records.append(
            {
                "num_valid_global": result.num_valid_global,
                "num_selected_global": result.num_selected_global,
                "selected_per_rank": list(result.selected_per_rank),
                "threshold": result.threshold,
                "strategy": result.strategy,
            }
        )
        if step % 5 == 0 or step == args.steps - 1:
            log.info(
                "step %3d  valid pixels K=%d  selected M=%d  per rank %s  threshold loss %.3f",
                step,
                result.num_valid_global,
                result.num_selected_global,
                list(result.selected_per_rank),
                result.threshold,
            )

    with torch.no_grad():
        inputs, labels = make_batch(torch.Generator().manual_seed(7), 8, args.size)
        predicted = model(inputs).argmax(1)
        valid = labels != IGNORE_INDEX
        objects = valid & (labels > 0)
        accuracy = (predicted == labels)[valid].float().mean().item()
        object_accuracy = (predicted == labels)[objects].float().mean().item()
    log.info(
        "held-out pixel accuracy %.3f, on object pixels %.3f (strategy %s)",
        accuracy,
        object_accuracy,
        result.strategy,
    )
    if args.out is not None and rank == 0:
        summary = {
            "world_size": world_size,
            "min_kept": min_kept,
            "steps": records,
            "accuracy": accuracy,
            "object_accuracy": object_accuracy,
        }
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    criterion.selector.check()  # on GPUs, raises what the last step's deferred checks hold
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
