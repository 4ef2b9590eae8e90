"""Run: ``python bench/throughput.py`` (full, ~5 min on 2 cores) or add ``--quick`` (< 60 s).

Throughput and activation memory of plain training, mask mode (``OHEMLoss``), two-pass
mode (``ohem_step``) and two-pass with ``balance=True``, at keep 1/2, 1/4 and 1/8, on 1
and 2 data-parallel CPU ranks (gloo + DDP, one thread per rank), plus a skewed case on
2 ranks where rank 0 holds every hard example; and a tiny GPT-2 under the Hugging Face
``Trainer`` on 2 ranks (``bench/trainer_lm.py`` under torchrun: plain, token mask mode,
``OHEMTrainer`` two-pass at keep 1/4 and 1/8, and two-pass with a reference model;
``--lm-only`` reruns just these rows into the existing report). Writes
``throughput.json`` and ``throughput.md`` to ``bench/results/`` (``throughput_quick.*``
with ``--quick``).

Setup: an all-convolutional CNN on synthetic 32x32 images with random labels (no
downloads); strided convolutions instead of max-pooling, so the convolutions, whose
backward costs about twice their forward, dominate the step. Every method does the same
``zero_grad`` + forward/backward + ``SGD.step``. A step is timed from a barrier to a
barrier, so it is the time of the slowest rank; each method runs ``--steps`` steps per
repeat, the methods are interleaved (their order rotates every repeat) so machine noise
hits all of them alike, and the reported step time is the median over ``--repeats``
repeats after ``--warmup`` untimed steps per method.

Speedup = plain step time / method step time in the same run; examples/s counts the
K = W x batch examples consumed per step. The ideal of docs/DESIGN.md §6 is 3K / (K + 3M)
for the two-pass methods (cost K*F + M*(F + B) with B = 2F) and 1 for mask mode; the
column "ideal (B/F)" puts this model's backward/forward ratio r in place of 2:
K(1 + r) / (K + M(1 + r)), with r the median CPU time of plain training's backward over
its forward on 1 rank (on 2 ranks backward also runs the gradient all-reduce).

CPU time: next to the wall clock, each step's process CPU time (``time.process_time``:
user + system, all threads) is recorded on every rank; "CPU ms" is the median over
repeats of the slowest rank's. It leaves out blocked waits in collectives and time
slices lost to other processes, so it stays meaningful on a shared, loaded machine,
where wall times swing by 2x; a straggler still shows as the slowest rank's CPU time.

Memory: the bytes autograd saves for backward in one step (distinct storages, model
parameters excluded), summed by a ``torch.autograd.graph.saved_tensors_hooks`` pack hook.
These saved activations are what stays alive from the forward to the backward, so
their total is the activation part of the peak, the part that OHEM's two-pass mode
claims to shrink from K to M examples. Chosen over RSS because CPU PyTorch has no
allocator peak counter (there is no CPU ``max_memory_allocated``) and RSS growth mixes
in glibc caching, library pages and the optimizer, so it is coarse and noisy; the
saved bytes are exact and deterministic. Not counted: the scoring pass's transient
layer outputs (freed layer by layer under ``no_grad``) and the parameters, gradients and
optimizer state, which are the same for every method.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(1, str(ROOT))  # `python bench/throughput.py` puts bench/ first on sys.path

from bench.common import markdown_table, run_meta, run_world, write_report  # noqa: E402
from dist_ohem import HardExampleSelector, OHEMLoss, ohem_step  # noqa: E402
from launch.engines import free_port  # noqa: E402

KEEPS = (1 / 2, 1 / 4, 1 / 8)
#: Methods besides plain per case: the skewed case only compares two-pass balancing.
CASES = {
    "uniform": ("mask", "two-pass", "two-pass+balance"),
    "skewed": ("two-pass", "two-pass+balance"),
}
WORLD_SIZES = (1, 2)
NUM_CLASSES = 10
NUM_BATCHES = 4  # distinct synthetic batches per rank, cycled
MIB = 2**20
#: The issue's target for two-pass: measured speedup >= 0.9 of the ideal.
TARGET_RATIO = 0.9
PHASES = (
    "forward",
    "backward",
    "scoring",
    "selection",
    "communication",
    "training",
    "optimizer",
)

logger = logging.getLogger("bench.throughput")


@dataclass(frozen=True)
class Config:
    """Benchmark settings, identical on every rank."""

    batch_size: int
    width: int
    repeats: int
    steps: int
    warmup: int
    seed: int = 0


@dataclass(frozen=True)
class Method:
    """One way to train a step: ``plain``, ``mask``, ``two-pass`` or ``two-pass+balance``."""

    name: str
    keep: float | None = None

    @property
    def label(self) -> str:
        """``name`` plus the keep fraction, e.g. ``two-pass 1/4``."""
        return self.name if self.keep is None else f"{self.name} {keep_text(self.keep)}"

    @property
    def two_pass(self) -> bool:
        """Whether the step goes through ``ohem_step``."""
        return self.name.startswith("two-pass")


@dataclass
class StepRecord:
    """What one step did on this rank."""

    phases: dict[str, float]
    trained: int  # examples forwarded and back-propagated here
    owned: int  # selected examples owned here before any balancing


def make_model(width: int) -> nn.Module:
    """All-convolutional CNN for 3x32x32 inputs; strided convolutions downsample."""
    channels = [3, width, width, 2 * width, 2 * width, 4 * width, 4 * width]
    strides = [1, 1, 2, 1, 2, 1]
    layers: list[nn.Module] = []
    for c_in, c_out, stride in zip(channels[:-1], channels[1:], strides, strict=True):
        layers += [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.ReLU(inplace=True)]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels[-1], NUM_CLASSES)]
    return nn.Sequential(*layers)


def methods_for(case: str) -> list[Method]:
    """Plain, then every method of ``case`` at every keep."""
    return [Method("plain")] + [Method(name, keep) for keep in KEEPS for name in CASES[case]]


class Trainer:
    """A DDP model, its SGD optimizer and one loss or selector per method, on one rank."""

    def __init__(self, config: Config, methods: list[Method]) -> None:
        torch.manual_seed(config.seed)
        self.model = DistributedDataParallel(make_model(config.width))
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9)
        self.criterion = nn.CrossEntropyLoss()
        self.objectives: dict[Method, Any] = {m: self._objective(m) for m in methods}

    def _objective(self, method: Method) -> Any:
        if method.name == "plain":
            return self.criterion
        if method.name == "mask":
            return OHEMLoss(nn.CrossEntropyLoss(), keep=method.keep)
        return HardExampleSelector(keep=method.keep)

    def step(self, method: Method, inputs: torch.Tensor, targets: torch.Tensor) -> StepRecord:
        """zero_grad, the method's forward/backward, SGD step; phases in seconds."""
        self.optimizer.zero_grad(set_to_none=True)
        objective = self.objectives[method]
        if method.two_pass:
            out = ohem_step(
                self.model,
                inputs,
                targets,
                self.criterion,
                objective,
                balance=method.name.endswith("balance"),
            )
            record = StepRecord(
                dict(out.timings), out.num_trained_local, out.selection.num_selected_local
            )
        else:
            started = clocks()
            loss = objective(self.model(inputs), targets)
            forward_done = clocks()
            loss.backward()
            done = clocks()
            phases = {
                "forward": forward_done[0] - started[0],
                "backward": done[0] - forward_done[0],
                "forward_cpu": forward_done[1] - started[1],
                "backward_cpu": done[1] - forward_done[1],
            }
            owned = objective.last.num_selected_local if method.name == "mask" else len(inputs)
            record = StepRecord(phases, len(inputs), owned)
        started = time.perf_counter()
        self.optimizer.step()
        record.phases["optimizer"] = time.perf_counter() - started
        return record


def clocks() -> tuple[float, float]:
    """``(wall, process CPU)`` seconds now."""
    return time.perf_counter(), time.process_time()


@contextmanager
def saved_activation_bytes(model: nn.Module) -> Iterator[dict[int, int]]:
    """Collect ``{storage address: bytes}`` of every tensor autograd saves, parameters excluded."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield saved


class Feed:
    """Cycles this rank's synthetic batches (random images, random labels).

    ``skewed``: just before each step, outside the timing, every batch is relabelled
    with the current model's least likely class on rank 0 (loss >= log C) and its most
    likely class on the other ranks (loss <= log C). The scoring pass sees the same
    logits, so rank 0 owns the hardest min(M, batch) examples of every step.
    """

    def __init__(self, config: Config, rank: int, case: str, model: nn.Module) -> None:
        generator = torch.Generator().manual_seed(config.seed * 1000 + rank)
        shape = (config.batch_size, 3, 32, 32)
        batches = [
            (
                torch.randn(shape, generator=generator),
                torch.randint(0, NUM_CLASSES, shape[:1], generator=generator),
            )
            for _ in range(NUM_BATCHES)
        ]
        self._batches = itertools.cycle(batches)
        self._skewed = case == "skewed"
        self._rank = rank
        self._model = model

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next ``(inputs, targets)``."""
        inputs, targets = next(self._batches)
        if self._skewed:
            with torch.no_grad():
                logits = self._model(inputs)
            targets = logits.argmin(1) if self._rank == 0 else logits.argmax(1)
        return inputs, targets


def timed_step(trainer: Trainer, method: Method, feed: Feed) -> tuple[float, float, StepRecord]:
    """One step: ``(wall seconds, CPU seconds, record)``.

    Wall time runs from a barrier to a barrier, so the slowest rank sets it. CPU time is
    this process's own (``time.process_time``, all threads, user + system) during the step:
    blocked waits in collectives don't count, nor do slices lost to other processes.
    """
    batch = feed.next()
    dist.barrier()
    wall, cpu = clocks()
    record = trainer.step(method, *batch)
    cpu = time.process_time() - cpu
    dist.barrier()
    return time.perf_counter() - wall, cpu, record


def measure_case(config: Config, case: str) -> dict[str, Any] | None:
    """Warm up, measure memory, then time all methods of ``case`` interleaved.

    Returns on rank 0 the per-rank summaries of every method (None on other ranks).
    """
    rank, world_size = dist.get_rank(), dist.get_world_size()
    methods = methods_for(case)
    trainer = Trainer(config, methods)
    feed = Feed(config, rank, case, trainer.model.module)
    saved_bytes: dict[Method, int] = {}
    for method in methods:
        for _ in range(config.warmup):
            trainer.step(method, *feed.next())
        with saved_activation_bytes(trainer.model) as saved:
            trainer.step(method, *feed.next())
        saved_bytes[method] = sum(saved.values())

    times: dict[Method, list[float]] = {m: [] for m in methods}
    cpu_times: dict[Method, list[float]] = {m: [] for m in methods}
    records: dict[Method, list[StepRecord]] = {m: [] for m in methods}
    for repeat in range(config.repeats):
        if rank == 0:
            logger.info("W=%d %s: repeat %d/%d", world_size, case, repeat + 1, config.repeats)
        shift = repeat % len(methods)
        for method in methods[shift:] + methods[:shift]:
            timed = [timed_step(trainer, method, feed) for _ in range(config.steps)]
            times[method].append(statistics.mean(wall for wall, _, _ in timed))
            cpu_times[method].append(statistics.mean(cpu for _, cpu, _ in timed))
            records[method] += [record for _, _, record in timed]

    summary = {
        m.label: {
            "times": times[m],
            "cpu_times": cpu_times[m],
            "phases": {
                phase: statistics.median(r.phases[phase] for r in records[m])
                for phase in records[m][0].phases
            },
            "trained": statistics.mean(r.trained for r in records[m]),
            "owned": statistics.mean(r.owned for r in records[m]),
            "saved_bytes": saved_bytes[m],
        }
        for m in methods
    }
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, summary)
    if rank != 0:
        return None
    return {"methods": [asdict(m) for m in methods], "per_rank": gathered}


def rank_main(rank: int, world_size: int, init_file: str, config: Config, out_file: str) -> None:
    """One rank: join the gloo group, run the uniform (and on 2 ranks the skewed) case."""
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        cases = ["uniform", "skewed"] if world_size == 2 else ["uniform"]
        results = {case: measure_case(config, case) for case in cases}
        if rank == 0:
            Path(out_file).write_text(json.dumps(results))
    finally:
        dist.barrier()
        dist.destroy_process_group()


def backward_over_forward(per_rank: list[dict[str, Any]]) -> float:
    """Backward / forward CPU time of plain training, averaged over ranks."""
    phases = [summary["plain"]["phases"] for summary in per_rank]
    return statistics.mean(p["backward_cpu"] / p["forward_cpu"] for p in phases)


def summarize(
    world_size: int, case: str, config: Config, raw: dict[str, Any], bf_ratio: float
) -> dict[str, Any]:
    """Turn the ranks' raw summaries of one case into one JSON-ready result per method.

    ``bf_ratio`` is the model's backward/forward ratio for the "ideal (B/F)" column.
    """
    per_rank = raw["per_rank"]
    num_examples = world_size * config.batch_size

    def step_times(label: str, clock: str) -> list[float]:
        """Per repeat, the slowest rank's mean step time on ``clock``."""
        ranks = [summary[label][clock] for summary in per_rank]
        return [max(repeat) for repeat in zip(*ranks, strict=True)]

    plain = statistics.median(step_times("plain", "times"))
    plain_cpu = statistics.median(step_times("plain", "cpu_times"))
    rows = []
    for method in (Method(**m) for m in raw["methods"]):
        label = method.label
        repeats = step_times(label, "times")
        step = statistics.median(repeats)
        cpu_step = statistics.median(step_times(label, "cpu_times"))
        selected = round(sum(summary[label]["owned"] for summary in per_rank))  # M (K if plain)
        speedup, cpu_speedup = plain / step, plain_cpu / cpu_step
        ideal, ideal_bf = 1.0, 1.0
        if method.two_pass:
            ideal = 3 * num_examples / (num_examples + 3 * selected)
            ideal_bf = num_examples * (1 + bf_ratio) / (num_examples + selected * (1 + bf_ratio))
        rows.append(
            {
                "method": method.name,
                "keep": method.keep,
                "label": label,
                "step_ms": 1e3 * step,
                "step_ms_repeats": [1e3 * t for t in repeats],
                "examples_per_s": num_examples / step,
                "speedup": speedup,
                "ideal": ideal,
                "ratio_to_ideal": speedup / ideal,
                "ideal_measured_bf": ideal_bf,
                "ratio_to_ideal_measured_bf": speedup / ideal_bf,
                "cpu_step_ms": 1e3 * cpu_step,
                "cpu_step_ms_per_rank": [
                    1e3 * statistics.median(summary[label]["cpu_times"]) for summary in per_rank
                ],
                "cpu_speedup": cpu_speedup,
                "cpu_ratio_to_ideal": cpu_speedup / ideal,
                "cpu_ratio_to_ideal_measured_bf": cpu_speedup / ideal_bf,
                "num_examples_K": num_examples,
                "num_selected_M": selected,
                "saved_activation_mib_per_rank": [
                    summary[label]["saved_bytes"] / MIB for summary in per_rank
                ],
                "owned_per_rank": [summary[label]["owned"] for summary in per_rank],
                "trained_per_rank": [summary[label]["trained"] for summary in per_rank],
                "phases_ms_per_rank": [
                    {k: 1e3 * v for k, v in summary[label]["phases"].items()}
                    for summary in per_rank
                ],
            }
        )
    return {
        "world_size": world_size,
        "case": case,
        "backward_over_forward": backward_over_forward(per_rank),
        "backward_over_forward_for_ideal": bf_ratio,
        "plain_step_ms": 1e3 * plain,
        "methods": rows,
    }


def fmt_ranks(values: list[float], spec: str = ".1f") -> str:
    """``a / b`` for per-rank values."""
    return " / ".join(format(v, spec) for v in values)


def throughput_table(runs: list[dict[str, Any]]) -> str:
    """Main table: every method of the uniform runs."""
    headers = [
        "W",
        "method",
        "keep",
        "step ms",
        "examples/s",
        "speedup",
        "ideal 3K/(K+3M)",
        "measured/ideal",
        "CPU ms",
        "CPU speedup",
        "CPU/ideal",
        "ideal (B/F)",
        "saved act. MiB (max rank)",
    ]
    rows = [
        [
            str(run["world_size"]),
            m["method"],
            keep_text(m["keep"]),
            f"{m['step_ms']:.1f}",
            f"{m['examples_per_s']:.0f}",
            f"{m['speedup']:.2f}x",
            f"{m['ideal']:.2f}x",
            f"{m['ratio_to_ideal']:.2f}",
            f"{m['cpu_step_ms']:.1f}",
            f"{m['cpu_speedup']:.2f}x",
            f"{m['cpu_ratio_to_ideal']:.2f}",
            f"{m['ideal_measured_bf']:.2f}x",
            f"{max(m['saved_activation_mib_per_rank']):.1f}",
        ]
        for run in runs
        for m in run["methods"]
    ]
    return markdown_table(headers, rows)


def phase_table(runs: list[dict[str, Any]]) -> str:
    """Median phase times (ms, slowest rank) of every method of the uniform runs."""
    rows = []
    for run in runs:
        for m in run["methods"]:
            cells = []
            for phase in PHASES:
                values = [p[phase] for p in m["phases_ms_per_rank"] if phase in p]
                cells.append(f"{max(values):.1f}" if values else "")
            rows.append([str(run["world_size"]), m["method"], keep_text(m["keep"]), *cells])
    return markdown_table(["W", "method", "keep", *PHASES], rows)


def skew_table(run: dict[str, Any]) -> str:
    """Skewed case: step time with and without balance, per-rank counts and phases."""
    headers = [
        "method",
        "keep",
        "step ms",
        "speedup",
        "CPU speedup",
        "ideal",
        "selected owned r0 / r1",
        "trained r0 / r1",
        "CPU ms r0 / r1",
        "saved act. MiB r0 / r1",
    ]
    rows = [
        [
            m["method"],
            keep_text(m["keep"]),
            f"{m['step_ms']:.1f}",
            f"{m['speedup']:.2f}x",
            f"{m['cpu_speedup']:.2f}x",
            f"{m['ideal']:.2f}x",
            fmt_ranks(m["owned_per_rank"]),
            fmt_ranks(m["trained_per_rank"]),
            fmt_ranks(m["cpu_step_ms_per_rank"]),
            fmt_ranks(m["saved_activation_mib_per_rank"], ".2f"),
        ]
        for m in run["methods"]
    ]
    return markdown_table(headers, rows)


def keep_text(keep: float | None) -> str:
    """``1/4`` for 0.25, ``-`` for no keep."""
    return "-" if keep is None else f"1/{round(1 / keep)}"


def target_summary(runs: list[dict[str, Any]]) -> str:
    """One line per two-pass result: measured/ideal (wall and CPU) against the 0.9 target."""
    lines = []
    for run in runs:
        for m in run["methods"]:
            if Method(m["method"]).two_pass:
                verdicts = [
                    f"{clock} {ratio:.2f} ({'meets' if ratio >= TARGET_RATIO else 'BELOW'})"
                    for clock, ratio in (
                        ("wall", m["ratio_to_ideal"]),
                        ("CPU", m["cpu_ratio_to_ideal"]),
                    )
                ]
                lines.append(
                    f"- W={run['world_size']} {m['label']}: ideal {m['ideal']:.2f}x; "
                    + "; ".join(verdicts)
                    + f"; CPU vs ideal (B/F) {m['ideal_measured_bf']:.2f}x: "
                    f"{m['cpu_ratio_to_ideal_measured_bf']:.2f}"
                )
    return "\n".join(lines)


def measure_trainer_lm(world_size: int, quick: bool) -> dict[str, Any]:
    """The language-model rows: ``bench/trainer_lm.py`` under torchrun on ``world_size``
    CPU ranks, summarized by :func:`summarize_trainer_lm`."""
    with tempfile.TemporaryDirectory(prefix="dist_ohem_lm_") as tmp:
        out = Path(tmp) / "trainer_lm.json"
        command = [
            sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world_size}",
            f"--master_port={free_port()}", str(ROOT / "bench" / "trainer_lm.py"),
            "--out", str(out), *(["--quick"] if quick else []),
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
        return summarize_trainer_lm(json.loads(out.read_text()))


def summarize_trainer_lm(raw: dict[str, Any]) -> dict[str, Any]:
    """Per method: median over steps of the slowest rank's wall and CPU ms, speedups
    against plain, and the ideal: 1 for plain and mask, 3K/(K+3M) for two-pass, and
    3K/(2K+3M) with a reference model (its forward over the K sequences)."""
    config, world_size = raw["config"], raw["world_size"]
    sequences = world_size * config["batch_size"] * config["accumulation"]
    rows = []
    for method in raw["methods"]:
        per_step = list(zip(*method["per_rank"], strict=True))
        wall = statistics.median(max(wall for wall, _ in step) for step in per_step) * 1e3
        cpu = statistics.median(max(cpu for _, cpu in step) for step in per_step) * 1e3
        selected = math.ceil(method["keep"] * sequences - 1e-9) if method["keep"] else sequences
        forwards = 2 * sequences if method["reference"] else sequences
        two_pass = method["name"].startswith("two-pass")
        ideal = 3 * sequences / (forwards + 3 * selected) if two_pass else 1.0
        rows.append({**method, "step_ms": wall, "cpu_step_ms": cpu, "ideal": ideal})
    plain = rows[0]
    for row in rows:
        row["speedup"] = plain["step_ms"] / row["step_ms"]
        row["cpu_speedup"] = plain["cpu_step_ms"] / row["cpu_step_ms"]
        row.pop("per_rank")
    return {
        "world_size": world_size,
        "config": config,
        "parameters": raw["parameters"],
        "sequences_per_step": sequences,
        "rows": rows,
    }


def trainer_lm_table(lm: dict[str, Any]) -> str:
    """The language-model rows as a markdown table (also rendered by the docs' hook)."""
    rows = [
        [
            row["name"],
            keep_text(row["keep"]),
            f"{row['step_ms']:.1f}",
            f"{lm['sequences_per_step'] / row['step_ms'] * 1e3:.0f}",
            f"{row['speedup']:.2f}x",
            f"{row['ideal']:.2f}x",
            f"{row['cpu_step_ms']:.1f}",
            f"{row['cpu_speedup']:.2f}x",
        ]
        for row in lm["rows"]
    ]
    headers = ["method", "keep", "step ms", "sequences/s", "speedup", "ideal", "CPU ms",
               "CPU speedup"]  # fmt: skip
    return markdown_table(headers, rows)


def trainer_lm_section(lm: dict[str, Any]) -> list[str]:
    """The markdown section of the language-model rows."""
    config, meta = lm["config"], lm["meta"]
    return [
        f"## Language model under the Hugging Face Trainer, W={lm['world_size']}",
        "",
        f"GPT-2 built from a config: {config['layers']} layers, width {config['width']}, "
        f"vocabulary {config['vocab']} ({lm['parameters']} parameters); sequences of "
        f"{config['length']} random tokens, {config['batch_size']} per micro-batch, "
        f"{config['accumulation']} micro-batches per optimizer step, so K = "
        f"{lm['sequences_per_step']} sequences per step over the ranks. Plain `Trainer`; "
        "mask = `ohem_loss_func` (token mask mode); two-pass = `OHEMTrainer`; "
        "+reference = ranked by excess loss against a model of the same size, whose "
        "forward over the K sequences is in the step. A step runs from one optimizer "
        "step's end to the next (fetch, scoring, training, optimizer), median over "
        f"{config['rounds']} rounds x {config['steps']} steps of the slowest rank, the "
        "methods' order rotating each round; the ideal is 3K/(K+3M) for two-pass, "
        "3K/(2K+3M) with the reference (B = 2F), 1 for plain and mask.",
        "",
        f"Run {meta['date']}, git {meta['git']}, load average at start / end "
        f"{meta['load_start']} / {meta['load_end']}, wall time {meta['wall_s']:.0f} s.",
        "",
        trainer_lm_table(lm),
    ]


def trainer_lm_report(quick: bool) -> dict[str, Any]:
    """The language-model rows at W = 2 with their own run metadata."""
    started, load_start = time.perf_counter(), os.getloadavg()
    lm = measure_trainer_lm(2, quick)
    return {**lm, "meta": run_meta(started, load_start)}


def render_markdown(report: dict[str, Any]) -> str:
    """The markdown report: metadata, throughput, phases, skewed case."""
    meta, config = report["meta"], report["config"]
    uniform = [run for run in report["runs"] if run["case"] == "uniform"]
    skewed = [run for run in report["runs"] if run["case"] == "skewed"]
    bf = ", ".join(f"W={r['world_size']}: {r['backward_over_forward']:.2f}" for r in uniform)
    plain = ", ".join(f"W={r['world_size']}: {r['plain_step_ms']:.0f} ms" for r in uniform)
    parts = [
        "# dist_ohem throughput benchmark",
        "",
        f"- command: `{meta['command']}`",
        f"- date (UTC): {meta['date']}; torch {meta['torch']}; python {meta['python']}; "
        f"{meta['cores']} cores ({meta['usable_cores']} usable); git {meta['git']}",
        f"- load average at start / end: {meta['load_start']} / {meta['load_end']}; "
        f"wall time {meta['wall_s']:.0f} s",
        f"- model: all-conv CNN, width {config['width']} "
        f"({meta['parameters']} parameters), batch {config['batch_size']} per rank, "
        "3x32x32 synthetic images, 10 classes, SGD(lr=1e-3, momentum=0.9) every step",
        f"- timing: median of {config['repeats']} repeats x {config['steps']} steps, "
        f"{config['warmup']} warm-up steps per method, methods interleaved; "
        "step = slowest rank, barrier to barrier",
        f"- plain step: {plain}; backward/forward CPU time of plain: {bf} "
        "(W=1's is the model's r; W=2's backward also runs the gradient all-reduce)",
        "- speedup = plain step / method step (same run); examples/s = K / step, "
        "K = W x batch; ideal = 3K/(K+3M) (docs/DESIGN.md §6, B = 2F), 1 for plain and mask; "
        "ideal (B/F) = K(1+r)/(K+M(1+r)) with r = backward/forward CPU time of plain at W=1",
        "- CPU ms: median of the slowest rank's process CPU time per step (user + system, "
        "all threads; blocked waits and slices lost to other processes excluded), CPU "
        "speedup = plain CPU ms / method CPU ms: robust to other jobs' load on the machine",
        "- memory: bytes autograd saves for backward in one step (distinct storages, "
        "parameters excluded) via `torch.autograd.graph.saved_tensors_hooks`; CPU torch "
        "has no allocator peak counter and RSS is too coarse",
        "",
        "## Throughput (uniform data: hard examples spread over the ranks)",
        "",
        throughput_table(uniform),
        "",
        "## Two-pass against the target (measured/ideal >= 0.9)",
        "",
        target_summary(uniform),
        "",
        "## Median phase times, ms (slowest rank)",
        "",
        "plain/mask: forward (incl. loss and selection), backward; two-pass: "
        "`StepOutput.timings` (scoring, selection, communication = balance all-to-all, "
        "training = forward + backward); optimizer = `SGD.step` for all. On 2 ranks a "
        "collective phase also holds the wait for the slower rank: selection waits for "
        "its scoring pass, backward/training for its gradients (DDP all-reduce).",
        "",
        phase_table(uniform),
    ]
    if "trainer_lm" in report:
        parts += ["", *trainer_lm_section(report["trainer_lm"])]
    for run in skewed:
        parts += [
            "",
            "## Skewed case, W=2: rank 0's batch is all mislabelled (hard), rank 1's easy",
            "",
            f"plain step {run['plain_step_ms']:.1f} ms. Owned = selected examples on the "
            "rank before balancing; trained = examples the rank forwarded and "
            "back-propagated (a rank with none trains 2 examples at weight 0); CPU ms "
            "per rank shows who computes and who waits.",
            "",
            skew_table(run),
        ]
    return "\n".join(parts) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags; ``--quick`` changes the defaults, explicit flags still win."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke check, < 60 s")
    parser.add_argument("--repeats", type=int, help="timed repeats per method (default 20)")
    parser.add_argument("--steps", type=int, help="steps per timed repeat (default 2)")
    parser.add_argument("--warmup", type=int, help="untimed steps per method (default 2)")
    parser.add_argument("--batch-size", type=int, help="examples per rank (default 32)")
    parser.add_argument("--width", type=int, help="CNN base channels (default 32)")
    parser.add_argument("--output-dir", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument(
        "--lm-only",
        action="store_true",
        help="run only the language-model rows and put them into the existing report",
    )
    args = parser.parse_args(argv)
    defaults = (
        {"repeats": 5, "steps": 1, "warmup": 1, "batch_size": 8, "width": 16}
        if args.quick
        else {"repeats": 20, "steps": 2, "warmup": 2, "batch_size": 32, "width": 32}
    )
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.repeats < 1 or args.steps < 1 or args.warmup < 0 or args.batch_size < 2:
        parser.error("need --repeats >= 1, --steps >= 1, --warmup >= 0, --batch-size >= 2")
    return args


def main(argv: list[str] | None = None) -> None:
    """Run every world size and the language-model rows, then print and write the report."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the spawned ranks
    stem = "throughput_quick" if args.quick else "throughput"
    if args.lm_only:
        report = json.loads((args.output_dir / f"{stem}.json").read_text())
        report["trainer_lm"] = trainer_lm_report(args.quick)
        write_report(report, render_markdown(report), args.output_dir, stem)
        return
    config = Config(args.batch_size, args.width, args.repeats, args.steps, args.warmup)
    started, load_start = time.perf_counter(), os.getloadavg()
    raw = {world_size: run_world(world_size, config, rank_main) for world_size in WORLD_SIZES}
    # The model's B/F from 1 rank: on 2 ranks backward also waits in the gradient all-reduce.
    bf_ratio = backward_over_forward(raw[1]["uniform"]["per_rank"])
    runs = [
        summarize(world_size, case, config, cases[case], bf_ratio)
        for world_size, cases in raw.items()
        for case in cases
    ]
    meta = {
        **run_meta(started, load_start),
        "usable_cores": len(os.sched_getaffinity(0)),
        "threads_per_rank": 1,
        "parameters": sum(p.numel() for p in make_model(config.width).parameters()),
    }
    report = {"meta": meta, "config": asdict(config), "runs": runs}
    low = [r for r in runs if r["methods"][0]["cpu_step_ms"] < 50]  # methods[0] is plain
    if low and not args.quick:
        logger.warning("plain step < 50 ms CPU in %d run(s): raise --batch-size", len(low))
    report["trainer_lm"] = trainer_lm_report(args.quick)
    write_report(report, render_markdown(report), args.output_dir, stem)


if __name__ == "__main__":
    main()
