# OMP_NUM_THREADS=1 torchrun --nproc_per_node=2 examples/roi_detection.py
"""A Fast R-CNN-style detector trained with RoI-level OHEM, as in the OHEM paper.

Shrivastava, Gupta, Girshick (CVPR 2016) train Fast R-CNN on the hardest RoIs: a
read-only copy of the RoI network scores every proposal of the image (no grad), NMS at
IoU 0.7 with the loss as the score removes near-duplicates, and only the hardest B RoIs
go through the RoI network again, with grad, into the shared conv feature map. The
backbone runs once per image; that is the saving beyond example-level two-pass mining.
Here the hardest RoIs are chosen over the whole distributed batch (``scope=global``):
with one image per rank (the paper's N = 1 case) each rank's image gets the share of the
budget its hard RoIs earn, not a fixed 64.

Everything is plain PyTorch under torchrun (DDP, gloo on CPU): generated scenes
(examples/roi_scenes.py: cars, persons, signs, look-alikes, clutter), fixed proposals,
a small conv backbone, RoIAlign by ``grid_sample``, class logits and class-specific box
deltas. ``scope`` is one of:

- ``sampler``: the standard Fast R-CNN minibatch: 64 RoIs per image, up to 25%
  foreground (IoU >= 0.5), the rest background from IoU [0.1, 0.5).
- ``global`` / ``local``: OHEM, the top ``rois_per_image x images`` RoIs of all ranks /
  of each rank, after ``dedup_rois`` per image and label at IoU 0.7 (bg_lo = 0: every
  proposal is a candidate). ``mode=mask`` instead runs every RoI through the head with
  grad and weights the unselected ones 0 (the same update, no saving; for timing).
- ``random``: as many RoIs as ``global``, uniformly at random over all ranks.

``shard=skewed`` trains rank 0 on crowded scenes with many look-alikes and the other
ranks on one-object scenes (``roi_scenes.HARD`` / ``EASY``) instead of iid ones.

COCO mAP@[.5:.95] and mAP@0.5 (pycocotools) on a fixed iid test set, on rank 0. Outputs
in ``run_dir``: ``summary.json``, ``metrics.jsonl`` (one line per step, with the RoIs
back-propagated in total and per rank, and per evaluation), ``metrics.png``. Arguments
are ``key=value`` (see ``Config``), e.g. ``scope=local max_steps=100 run_dir=runs/roi_local``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parent))
from roi_scenes import CLASSES, EASY, HARD, IID, IMAGE_SIZE, Scene, SceneMix, make_scene

from dist_ohem.detection import RoISelector, box_iou, dedup_rois

log = logging.getLogger("roi_detection")

SCOPES = ("sampler", "global", "local", "random")
SHARDS = ("iid", "skewed")
BOX_STDS = torch.tensor([0.1, 0.1, 0.2, 0.2])  # Fast R-CNN's box-target normalization
TEST_SEED = 1_000_000  # the test scenes do not depend on the run's seed


@dataclasses.dataclass
class Config:
    """Every setting; override with ``key=value`` arguments."""

    run_dir: str = "runs/roi_detection"
    seed: int = 0  # training scenes and initial weights
    scope: str = "global"  # sampler, global, local or random
    mode: str = "two_pass"  # two_pass (read-only head scores, selected RoIs trained) or mask
    max_steps: int = 300
    images_per_rank: int = 1
    shard: str = "iid"  # iid, or skewed: rank 0 trains on HARD scenes, the others on EASY
    rois_per_image: int = 64  # B: RoIs back-propagated per image
    iou_threshold: float = 0.7  # dedup_rois before the selection (OHEM scopes)
    head_hidden: int = 128  # width of the RoI head's hidden layer (Fast R-CNN's fc: 4096)
    lr: float = 3e-3  # AdamW, cosine decay to lr / 20
    warmup_steps: int = 50  # linear warm-up of the learning rate
    test_images: int = 100
    eval_every: int = 100  # also at the end
    plot: bool = True
    progress: bool = True  # tqdm bar on rank 0
    out: str = ""  # also write summary.json here (``--out PATH`` works too)


def parse_config(argv: list[str]) -> Config:
    """``Config`` with ``key=value`` overrides, converted to each field's type."""
    fields = {field.name: field for field in dataclasses.fields(Config)}
    values: dict[str, object] = {}
    for arg in " ".join(argv).replace("--out ", "out=").split():
        key, equals, value = arg.partition("=")
        if not equals or key not in fields:
            raise SystemExit(
                f"unexpected argument {arg!r}; use key=value with key in {list(fields)}"
            )
        kind = type(fields[key].default)
        values[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    cfg = Config(**values)
    if cfg.scope not in SCOPES or cfg.mode not in ("two_pass", "mask") or cfg.shard not in SHARDS:
        raise SystemExit(
            f"scope must be one of {SCOPES}, mode two_pass or mask and shard one of {SHARDS}, "
            f"got {cfg}"
        )
    return cfg


# ------------------------------------------------------------------------------ model


class Backbone(nn.Module):
    """Conv feature map at stride 4: ``(N, 3, 64, 64) -> (N, 32, 16, 16)``."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.GroupNorm(8, 32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.GroupNorm(8, 32), nn.ReLU(),
        )  # fmt: skip

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images - 0.5)


def roi_align(
    features: torch.Tensor, boxes: torch.Tensor, image_ids: torch.Tensor, size: int = 5
) -> torch.Tensor:
    """RoIAlign by bilinear sampling, one sample at each bin centre: ``(R, C, size, size)``.

    ``features`` is ``(N, C, h, w)`` for images of ``IMAGE_SIZE`` pixels; ``boxes`` are
    ``(R, 4)`` xyxy pixels of image ``image_ids[r]`` (an index into ``features``).
    ``grid_sample`` with ``align_corners=False`` maps [-1, 1] to the image's outer edges,
    whatever the stride of the feature map.
    """
    steps = (torch.arange(size, dtype=boxes.dtype) + 0.5) / size
    x = boxes[:, 0:1] + (boxes[:, 2:3] - boxes[:, 0:1]) * steps  # (R, size)
    y = boxes[:, 1:2] + (boxes[:, 3:4] - boxes[:, 1:2]) * steps
    grid = torch.stack(torch.broadcast_tensors(x[:, None, :], y[:, :, None]), -1)
    grid = grid / IMAGE_SIZE * 2 - 1  # (R, size, size, 2) as (x, y) in [-1, 1]
    pooled = features.new_empty(len(boxes), features.shape[1], size, size)
    for image in image_ids.unique().tolist():
        rows = (image_ids == image).nonzero().squeeze(1)
        # One call per image, its RoIs' grids side by side: the backward scatters into
        # this image's (C, h, w) gradient once, as RoIAlign's does.
        grids = grid[rows].flatten(0, 1)[None]  # (1, rows x size, size, 2)
        sampled = F.grid_sample(features[image : image + 1], grids, align_corners=False)
        pooled[rows] = sampled[0].unflatten(1, (len(rows), size)).transpose(0, 1)
    return pooled


class RoIHead(nn.Module):
    """``(R, C, 5, 5)`` pooled features -> class logits ``(R, K+1)``, deltas ``(R, K+1, 4)``."""

    def __init__(self, channels: int = 32, hidden: int = 128) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(channels * 25, hidden), nn.ReLU())
        self.cls = nn.Linear(hidden, len(CLASSES) + 1)
        self.box = nn.Linear(hidden, 4 * (len(CLASSES) + 1))
        for layer, std in ((self.cls, 0.01), (self.box, 0.001)):  # as Fast R-CNN starts
            nn.init.normal_(layer.weight, std=std)
            nn.init.zeros_(layer.bias)

    def forward(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.fc(pooled)
        return self.cls(hidden), self.box(hidden).view(-1, len(CLASSES) + 1, 4)


def encode(proposals: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Fast R-CNN box targets ``(dx, dy, dw, dh) / BOX_STDS`` of ``gt`` w.r.t. ``proposals``."""
    size_p, size_g = proposals[:, 2:] - proposals[:, :2], gt[:, 2:] - gt[:, :2]
    centre_p, centre_g = proposals[:, :2] + size_p / 2, gt[:, :2] + size_g / 2
    deltas = torch.cat([(centre_g - centre_p) / size_p, torch.log(size_g / size_p)], 1)
    return deltas / BOX_STDS


def decode(proposals: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`encode`, clipped to the image: ``(R, K, 4)`` deltas -> boxes."""
    deltas = deltas * BOX_STDS
    size_p = (proposals[:, 2:] - proposals[:, :2])[:, None]
    centre = proposals[:, None, :2] + size_p / 2 + deltas[..., :2] * size_p
    size = size_p * torch.exp(deltas[..., 2:].clamp(max=4.0))
    return torch.cat([centre - size / 2, centre + size / 2], -1).clamp(0, IMAGE_SIZE)


def roi_losses(head_out, labels: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-RoI loss: cross-entropy + smooth-L1 of the labelled class's deltas (fg only)."""
    logits, deltas = head_out
    own = deltas[torch.arange(len(labels)), labels]
    box = F.smooth_l1_loss(own, targets, reduction="none").sum(1)
    return F.cross_entropy(logits, labels, reduction="none") + torch.where(labels > 0, box, 0)


# ------------------------------------------------------------------------------- data


def assign(scenes: list[Scene]) -> dict[str, torch.Tensor]:
    """Proposals of ``scenes`` with labels (IoU >= 0.5 with a GT box), box targets, the
    max IoU with any GT, and whether a background RoI lies on a look-alike (IoU >= 0.5)."""
    parts = []
    for i, scene in enumerate(scenes):
        boxes = scene.proposals
        best_iou, best = box_iou(boxes, scene.gt_boxes).max(1)  # every scene has an object
        labels = torch.where(best_iou >= 0.5, scene.gt_labels[best], 0)
        gt = scene.gt_boxes[best]
        on_lookalike = torch.zeros(len(boxes), dtype=torch.bool)
        if len(scene.lookalike_boxes):
            on_lookalike = box_iou(boxes, scene.lookalike_boxes).max(1).values >= 0.5
        parts.append(
            {
                "boxes": boxes,
                "image_ids": torch.full((len(boxes),), i),
                "labels": labels,
                "targets": encode(boxes, gt),
                "max_iou": best_iou,
                "lookalike": on_lookalike & (labels == 0),
            }
        )
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


def sample_minibatch(rois: dict[str, torch.Tensor], cfg: Config, gen: torch.Generator):
    """Fast R-CNN's sampler: per image up to 25% fg (IoU >= 0.5), bg from IoU [0.1, 0.5)
    (topped up from [0, 0.1) when short); ``(R,)`` bool."""
    mask = torch.zeros_like(rois["labels"], dtype=torch.bool)
    for image in rois["image_ids"].unique():
        mine = rois["image_ids"] == image
        fg = (mine & (rois["labels"] > 0)).nonzero().squeeze(1)
        bg_hi = (mine & (rois["labels"] == 0) & (rois["max_iou"] >= 0.1)).nonzero().squeeze(1)
        bg_lo = (mine & (rois["labels"] == 0) & (rois["max_iou"] < 0.1)).nonzero().squeeze(1)
        num_fg = min(len(fg), cfg.rois_per_image // 4)
        picked = [fg[torch.randperm(len(fg), generator=gen)[:num_fg]]]
        for pool in (bg_hi, bg_lo):
            room = cfg.rois_per_image - sum(len(p) for p in picked)
            picked.append(pool[torch.randperm(len(pool), generator=gen)[:room]])
        mask[torch.cat(picked)] = True
    return mask


def training_mix(shard: str, rank: int) -> SceneMix:
    """The scenes ``rank`` trains on: ``IID`` everywhere, or (``skewed``) ``HARD`` on rank 0
    and ``EASY`` on the others. The test set is always ``IID``."""
    if shard == "iid":
        return IID
    return HARD if rank == 0 else EASY


# ----------------------------------------------------------------------- train / eval


def train_step(backbone, head, selector, optimizer, scenes, cfg, gen) -> dict[str, float]:
    """One step on this rank's scenes: backbone once with grad, RoIs chosen by ``cfg.scope``,
    head with grad on the chosen RoIs. Returns this rank's counts for the log."""
    rois = assign(scenes)
    features = backbone(torch.stack([scene.image for scene in scenes]))
    everything = torch.arange(len(rois["labels"]))

    def pool(feats: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return roi_align(feats, rois["boxes"][index], rois["image_ids"][index])

    if cfg.scope == "sampler":
        index = sample_minibatch(rois, cfg, gen).nonzero().squeeze(1)
        losses = roi_losses(
            head(pool(features, index)), rois["labels"][index], rois["targets"][index]
        )
        loss, chosen = losses.mean(), index
    elif cfg.mode == "mask":
        losses = roi_losses(head(pool(features, everything)), rois["labels"], rois["targets"])
        selection = selector(losses.detach(), rois["boxes"], rois["image_ids"], rois["labels"])
        loss, chosen = selection.loss(losses), selection.indices
    else:
        with torch.no_grad():  # the read-only RoI network scores every proposal
            scores = roi_losses(
                head.module(pool(features.detach(), everything)), rois["labels"], rois["targets"]
            )
        selection = selector(scores, rois["boxes"], rois["image_ids"], rois["labels"])
        index = selection.train_indices
        losses = roi_losses(
            head(pool(features, index)), rois["labels"][index], rois["targets"][index]
        )
        loss, chosen = selection.loss_of_selected(losses), selection.indices
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return {
        "loss": float(loss.detach()) / dist.get_world_size(),  # summed over ranks: the mean
        "rois_backpropagated": len(chosen),
        "rois_in_batch": len(rois["labels"]),
        "fg_in_batch": int((rois["labels"] > 0).sum()),
        "fg_selected": int((rois["labels"][chosen] > 0).sum()),
        "lookalike_in_batch": int(rois["lookalike"].sum()),
        "lookalike_selected": int(rois["lookalike"][chosen].sum()),
    }


@torch.no_grad()
def evaluate(backbone: nn.Module, head: nn.Module, test: list[Scene]) -> dict[str, float]:
    """COCO mAP@[.5:.95] and mAP@0.5 (pycocotools) on ``test``: per class, boxes decoded from
    that class's deltas, scores above 0.05, the top 300 of those, NMS at 0.5 (``dedup_rois``
    by score, per class), the top 100 per image."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, annotations, detections = [], [], []
    for start in range(0, len(test), 20):
        scenes = test[start : start + 20]
        features = backbone(torch.stack([scene.image for scene in scenes]))
        for i, scene in enumerate(scenes):
            image_id = start + i + 1
            images.append({"id": image_id, "width": IMAGE_SIZE, "height": IMAGE_SIZE})
            for box, label in zip(scene.gt_boxes.tolist(), scene.gt_labels.tolist(), strict=True):
                w, h = box[2] - box[0], box[3] - box[1]
                annotations.append(
                    {"id": len(annotations) + 1, "image_id": image_id, "category_id": label,
                     "bbox": [box[0], box[1], w, h], "area": w * h, "iscrowd": 0}
                )  # fmt: skip
            ids = torch.full((len(scene.proposals),), i)
            logits, deltas = head(roi_align(features, scene.proposals, ids))
            scores = logits.softmax(1)[:, 1:].flatten()  # (R * K,) class-major within RoI
            boxes = decode(scene.proposals, deltas[:, 1:]).flatten(0, 1)
            labels = torch.arange(1, len(CLASSES) + 1).repeat(len(scene.proposals))
            keep = (scores > 0.05).nonzero().squeeze(1)
            keep = keep[scores[keep].argsort(descending=True)[:300]]  # before NMS
            keep = keep[dedup_rois(boxes[keep], scores[keep], labels[keep] * 0, 0.5, labels[keep])]
            keep = keep[scores[keep].argsort(descending=True)[:100]]
            for box, score, label in zip(
                boxes[keep].tolist(), scores[keep].tolist(), labels[keep].tolist(), strict=True
            ):
                detections.append(
                    {"image_id": image_id, "category_id": label, "score": score,
                     "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]}
                )  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
    gt.dataset = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": k + 1, "name": name} for k, name in enumerate(CLASSES)],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    if not detections:
        return {"map": 0.0, "map50": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco_eval = COCOeval(gt, gt.loadRes(detections), "bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return {
        "map": max(0.0, float(coco_eval.stats[0])),
        "map50": max(0.0, float(coco_eval.stats[1])),
    }


# ------------------------------------------------------------------------------- main


def main(argv: list[str]) -> None:
    cfg = parse_config(argv)
    dist.init_process_group("gloo")  # torchrun sets the rank, world size and address
    torch.set_num_threads(1)
    level = logging.INFO if dist.get_rank() == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(message)s")
    train(cfg)
    dist.barrier()
    dist.destroy_process_group()


def train(cfg: Config) -> dict | None:
    """Train and evaluate in the current process group; the summary on rank 0, else None."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    backbone, head = DDP(Backbone()), DDP(RoIHead(hidden=cfg.head_hidden))
    params = [*backbone.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: (
            min(1.0, (step + 1) / cfg.warmup_steps)
            * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / cfg.max_steps)))
        ),
    )
    selector = RoISelector(
        cfg.rois_per_image,
        cfg.images_per_rank,
        iou_threshold=None if cfg.scope == "random" else cfg.iou_threshold,
        scope="global" if cfg.scope == "sampler" else cfg.scope,
        seed=cfg.seed,
    )
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank)  # the sampler's draws
    mix = training_mix(cfg.shard, rank)
    test = [make_scene(TEST_SEED, i) for i in range(cfg.test_images)] if rank == 0 else []
    log.info(
        "roi_detection | W=%d | scope=%s | mode=%s | %d steps",
        world_size,
        cfg.scope,
        cfg.mode,
        cfg.max_steps,
    )

    from tqdm import tqdm

    bar = tqdm(total=cfg.max_steps, disable=rank != 0 or not cfg.progress, desc=cfg.scope)
    with open(run_dir / "metrics.jsonl", "w") as metrics:
        for step in range(1, cfg.max_steps + 1):
            first = ((step - 1) * world_size + rank) * cfg.images_per_rank
            scenes = [make_scene(cfg.seed, first + i, mix) for i in range(cfg.images_per_rank)]
            started = time.perf_counter()
            counts = train_step(
                backbone.train(), head.train(), selector, optimizer, scenes, cfg, gen
            )
            step_s = time.perf_counter() - started
            schedule.step()
            by_rank = [0.0] * world_size  # this rank's RoI count in its slot, summed: all
            by_rank[rank] = counts["rois_backpropagated"]
            totals = torch.tensor([*counts.values(), step_s, *by_rank], dtype=torch.float64)
            dist.all_reduce(totals)
            longest = torch.tensor([step_s])
            dist.all_reduce(longest, op=dist.ReduceOp.MAX)
            sums = totals.tolist()
            record = dict(zip([*counts, "step_s_sum"], sums[:-world_size], strict=True))
            record = {"kind": "train", "step": step, **record, "step_s_max": float(longest)}
            record["rois_backpropagated_by_rank"] = sums[-world_size:]
            if rank == 0:
                metrics.write(json.dumps(record) + "\n")
                bar.update()
                bar.set_postfix(loss=f"{record['loss']:.3f}")
            if step % cfg.eval_every == 0 or step == cfg.max_steps:
                if rank == 0:
                    result = evaluate(backbone.module.eval(), head.module.eval(), test)
                    metrics.write(json.dumps({"kind": "eval", "step": step, **result}) + "\n")
                    metrics.flush()
                    bar.write(
                        f"step {step}: mAP {result['map']:.3f}, mAP@0.5 {result['map50']:.3f}"
                    )
                dist.barrier()
    bar.close()
    selector.selector.check()  # on GPUs, raises what the last step's deferred checks hold
    if rank == 0:
        records = [
            json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        ]
        train = [r for r in records if r["kind"] == "train"]
        summary = {
            **result,
            "world_size": world_size,
            "steps": cfg.max_steps,
            "rois_backpropagated": sum(r["rois_backpropagated"] for r in train),
            "rois_backpropagated_by_rank": [
                sum(r["rois_backpropagated_by_rank"][k] for r in train) for k in range(world_size)
            ],
            "rois_in_batch": sum(r["rois_in_batch"] for r in train),
            "train_s": sum(r["step_s_max"] for r in train),
            "fg_kept": sum(r["fg_selected"] for r in train)
            / max(1, sum(r["fg_in_batch"] for r in train)),
            "lookalike_kept": sum(r["lookalike_selected"] for r in train)
            / max(1, sum(r["lookalike_in_batch"] for r in train)),
            "config": dataclasses.asdict(cfg),
        }
        for path in [run_dir / "summary.json", *([Path(cfg.out)] if cfg.out else [])]:
            path.write_text(json.dumps(summary, indent=2) + "\n")
        log.info("final: mAP %.3f, mAP@0.5 %.3f -> %s", result["map"], result["map50"], run_dir)
        if cfg.plot:
            plot(records, run_dir / "metrics.png")
        return summary
    return None


def plot(records: list[dict], path: Path) -> None:
    """Training loss, test mAP, and the share of fg / look-alike RoIs the step trained on."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    steps = [r["step"] for r in train]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    axes[0].plot(steps, [r["loss"] for r in train], lw=0.8)
    axes[0].set(title="training loss (selected RoIs)", xlabel="step", yscale="log")
    for key, label in (("map", "mAP@[.5:.95]"), ("map50", "mAP@0.5")):
        axes[1].plot([r["step"] for r in evals], [r[key] for r in evals], "o-", label=label)
    axes[1].set(title="test mAP (pycocotools)", xlabel="step", ylim=(0, 1))
    axes[1].legend()
    for (key, label), color in zip(
        (("fg", "foreground"), ("lookalike", "on a look-alike")), ("C0", "C3"), strict=True
    ):
        trained = [r[f"{key}_selected"] / max(1, r["rois_backpropagated"]) for r in train]
        batch = [r[f"{key}_in_batch"] / r["rois_in_batch"] for r in train]
        axes[2].plot(steps, trained, color=color, lw=0.8, label=f"{label}: share of trained RoIs")
        axes[2].plot(steps, batch, color=color, ls=":", label=f"{label}: share of all RoIs")
    axes[2].set(title="what the steps trained on", xlabel="step", ylim=(0, 1))
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main(sys.argv[1:])
