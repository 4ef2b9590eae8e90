"""Run: ``python bench/gpu.py`` on a machine with one CUDA GPU (under 5 minutes).

One script for every GPU figure, run once whenever a GPU is lent. Writes
``bench/results/gpu.{json,md}``:

- ``syncs``: host reads per steady-state call (``bench/host_syncs.py``'s cases, counted
  by ``torch.cuda.set_sync_debug_mode``);
- ``select``: one selector call (``keep=0.1``, W = 1, deferred checks) against
  ``torch.topk`` of the same M, a full sort and one streaming pass, at K = 256 ... 1e8,
  device-synchronized and timed with CUDA events; ``host_us_256`` is the host time per
  call of calls run back to back at K = 256;
- ``mask_vs_plain``: plain step time over mask-mode step time (``OHEMLoss``, keep 1/4);
- ``two_pass``: plain training, the hand-written no-read two-pass (no-grad scoring in the
  same score mode, ``topk(M)`` on the device, train those M: the ceiling), ``ohem_step``
  with its defaults, with ``capacity_factor=1.25`` and with ``capacity_factor=None`` (the
  selected rows, one read between the passes), at keep 1/2, 1/4 and 1/8.

Models: torchvision ResNet-50 (channels_last) and ViT-B/16, a batch of 256, bf16
autocast, SGD, DDP over NCCL with one rank. Every step is timed with CUDA events; the
methods of a model are interleaved (round robin) and the median of ``--steps`` steps is
reported. ``--device cpu`` runs the same code with tiny models and sizes (gloo): the
suite's smoke test.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(1, str(ROOT))  # `python bench/gpu.py` puts bench/ first on sys.path

from bench import host_syncs  # noqa: E402
from bench.common import markdown_table, run_meta  # noqa: E402
from dist_ohem import HardExampleSelector, OHEMLoss, ohem_step  # noqa: E402
from dist_ohem.wrappers import frozen_norm_statistics  # noqa: E402

SELECT_SIZES = {"cuda": [256, 4096, 1 << 16, 1 << 20, 10**7, 10**8], "cpu": [256, 4096]}
KEEPS = (0.5, 0.25, 0.125)


class Timer:
    """Times a callable on the device: CUDA events on a GPU, the host clock on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], object]) -> float:
        """Milliseconds of one ``fn()``, with the device idle before and after."""
        if not self.cuda:
            started = time.perf_counter()
            fn()
            return 1e3 * (time.perf_counter() - started)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)


def median_ms(timer: Timer, fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: allocations, kernels, the selector's eager first call
    return statistics.median(timer(fn) for _ in range(repeats))


def select_rows(device: torch.device, repeats: int) -> tuple[list[dict], float]:
    """One selector call against topk, sort and a streaming pass, for every K."""
    timer, rows = Timer(device), []
    for size in SELECT_SIZES[device.type]:
        losses = torch.rand(size, device=device)
        selector = HardExampleSelector(keep=0.1, strategy="auto", check="deferred")
        m = math.ceil(0.1 * size)
        calls = {
            "call_ms": lambda s=selector, x=losses: s(x),
            "topk_ms": lambda x=losses, m=m: x.topk(m),
            "sort_ms": lambda x=losses: x.sort(),
            "pass_ms": lambda x=losses: (x > 0.5).sum(),
        }
        rows.append({"K": size} | {key: median_ms(timer, fn, repeats) for key, fn in calls.items()})
        del losses
    losses = torch.rand(256, device=device)
    selector = HardExampleSelector(keep=0.1, check="deferred")
    selector(losses)
    calls = 200
    started = time.perf_counter()
    for _ in range(calls):
        selector(losses)
    host_us = 1e6 * (time.perf_counter() - started) / calls
    if device.type == "cuda":
        torch.cuda.synchronize()
    return rows, host_us


def build_models(device: torch.device, batch: int) -> dict[str, tuple[nn.Module, torch.Tensor]]:
    """name -> (model, inputs): torchvision's on a GPU, tiny stand-ins on CPU."""
    if device.type == "cuda":
        import torchvision

        resnet = torchvision.models.resnet50().to(device, memory_format=torch.channels_last)
        images = torch.randn(batch, 3, 224, 224, device=device)
        vit = torchvision.models.vit_b_16().to(device)
        return {
            "resnet50": (resnet, images.contiguous(memory_format=torch.channels_last)),
            "vit_b_16": (vit, images),
        }
    cnn = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10)
    )
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 32), nn.GELU(), nn.Linear(32, 10))
    images = torch.randn(batch, 3, 16, 16)
    cnn(images)  # materializes the lazy layer
    return {"tiny_cnn": (cnn, images), "tiny_mlp": (mlp, images)}


def step_methods(
    ddp: DDP, inputs: torch.Tensor, targets: torch.Tensor, keep: float, device: torch.device
) -> dict[str, Callable[[], None]]:
    """The training steps to compare, each zero_grad + forward/backward + SGD step."""
    optimizer = torch.optim.SGD(ddp.parameters(), lr=1e-3)
    criterion = nn.CrossEntropyLoss()
    per_example = nn.CrossEntropyLoss(reduction="none")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    mask_loss = OHEMLoss(nn.CrossEntropyLoss(), keep=keep, sync_mean_loss=False)
    selectors = {name: HardExampleSelector(keep=keep) for name in ("default", "cap", "rows")}
    m = math.ceil(keep * len(targets))

    def optimize(step: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                step()
            optimizer.step()

        return run

    def ceiling() -> None:
        with torch.no_grad(), frozen_norm_statistics(ddp.module):
            scores = per_example(ddp.module(inputs), targets)
        chosen = scores.topk(m).indices
        criterion(ddp(inputs[chosen]), targets[chosen]).backward()

    def two_pass(name: str, capacity: object) -> Callable[[], None]:
        return lambda: ohem_step(
            ddp,
            inputs,
            targets,
            criterion,
            selectors[name],
            sync_mean_loss=False,
            capacity_factor=capacity,
        )

    return {
        "plain": optimize(lambda: criterion(ddp(inputs), targets).backward()),
        "mask": optimize(lambda: mask_loss(ddp(inputs), targets).backward()),
        "ceiling": optimize(ceiling),
        "default": optimize(two_pass("default", "auto")),
        "capacity": optimize(two_pass("cap", 1.25)),
        "selected_rows": optimize(two_pass("rows", None)),
    }


def training_rows(device: torch.device, batch: int, steps: int) -> tuple[list[dict], dict]:
    """Median step times of every method, interleaved, for every model and keep."""
    timer, two_pass, mask_vs_plain = Timer(device), [], {}
    for name, (model, inputs) in build_models(device, batch).items():
        ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        targets = torch.randint(10, (batch,), device=device)
        methods = {}
        for keep in KEEPS:
            for method, run in step_methods(ddp, inputs, targets, keep, device).items():
                if method in ("plain", "mask") and keep != 0.25:
                    continue  # these do not depend on keep
                methods[(method, keep)] = run
        for run in methods.values():
            run()  # warm-up
        times: dict[tuple[str, float], list[float]] = {key: [] for key in methods}
        for _ in range(steps):
            for key, run in methods.items():
                times[key].append(timer(run))
        ms = {key: statistics.median(values) for key, values in times.items()}
        plain = ms[("plain", 0.25)]
        mask_vs_plain[name] = plain / ms[("mask", 0.25)]
        for keep in KEEPS:
            two_pass.append(
                {
                    "model": name,
                    "keep": keep,
                    "plain_ms": plain,
                    "ceiling_ms": ms[("ceiling", keep)],
                    "default_ms": ms[("default", keep)],
                    "capacity_ms": ms[("capacity", keep)],
                    "selected_rows_ms": ms[("selected_rows", keep)],
                }
            )
        del ddp, model, inputs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return two_pass, mask_vs_plain


def report_markdown(report: dict) -> str:
    select = markdown_table(
        ["K", "selector ms", "topk ms", "selector / topk", "sort ms", "one pass ms"],
        [
            [
                f"{row['K']:,}",
                f"{row['call_ms']:.3f}",
                f"{row['topk_ms']:.3f}",
                f"{row['call_ms'] / row['topk_ms']:.2f}x",
                f"{row['sort_ms']:.3f}",
                f"{row['pass_ms']:.3f}",
            ]
            for row in report["select"]
        ],
    )
    two_pass = markdown_table(
        ["model", "keep", "plain ms", "ceiling", "default", "capacity 1.25", "selected rows"],
        [
            [row["model"], f"1/{round(1 / row['keep'])}", f"{row['plain_ms']:.1f}"]
            + [
                f"{row['plain_ms'] / row[key]:.2f}x"
                for key in ("ceiling_ms", "default_ms", "capacity_ms", "selected_rows_ms")
            ]
            for row in report["two_pass"]
        ],
    )
    syncs = markdown_table(
        ["case", "host reads per call"], [[k, str(v)] for k, v in report["syncs"].items()]
    )
    mask = ", ".join(f"{name} {ratio:.3f}x" for name, ratio in report["mask_vs_plain"].items())
    return (
        "\n\n".join(
            [
                f"# GPU figures ({report['device']}, torch {report['torch']}, "
                f"{report['meta']['date']})",
                "## Host reads per steady-state call\n\n" + syncs,
                "## One selector call vs torch.topk (W = 1, keep 0.1, CUDA events)\n\n"
                + select
                + f"\n\nHost time per call at K = 256, back to back: {report['host_us_256']:.0f} us"
                ".",
                "## Two-pass speed-up over plain training (same run, interleaved)\n\n" + two_pass,
                f"## Mask mode (keep 1/4): plain / mask step time\n\n{mask}",
            ]
        )
        + "\n"
    )


def init_one_rank_group(device: torch.device, store_dir: str) -> None:
    """DDP over NCCL (gloo on CPU) with one rank: what one GPU measures."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    store = dist.FileStore(os.path.join(store_dir, "store"), 1)
    dist.init_process_group(backend, store=store, rank=0, world_size=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per method")
    parser.add_argument("--repeats", type=int, default=20, help="timed selector calls per K")
    parser.add_argument("--output-dir", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: bench/gpu.py needs one (or --device cpu for a smoke run)")
        return
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    started, load = time.perf_counter(), os.getloadavg()
    with tempfile.TemporaryDirectory() as store_dir:
        init_one_rank_group(device, store_dir)
        try:
            syncs = host_syncs.all_cases(device if device.type == "cuda" else torch.device("meta"))
            select, host_us = select_rows(device, args.repeats)
            two_pass, mask_vs_plain = training_rows(device, args.batch, args.steps)
        finally:
            dist.destroy_process_group()
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "syncs": syncs,
        "select": select,
        "host_us_256": host_us,
        "mask_vs_plain": mask_vs_plain,
        "two_pass": two_pass,
        "meta": run_meta(started, load),
    }
    markdown = report_markdown(report)
    print(markdown)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "gpu.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.output_dir / "gpu.md").write_text(markdown)


if __name__ == "__main__":
    main()
