"""Train a small classifier with online hard example mining chosen across all ranks.

One file, top to bottom: config, engine (process group), data, model, training loop with
evaluation, metrics and checkpoints, plot. Every launcher runs this same script:

    python launch/train.py                                        # 1 process, no process group
    OMP_NUM_THREADS=1 torchrun --nproc_per_node=2 launch/train.py --config configs/default.toml
    OMP_NUM_THREADS=1 ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 \
        --num_machines 1 --mixed_precision no --dynamo_backend no \
        launch/train.py --config configs/accelerate.toml
    OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu deepspeed --num_accelerators 2 \
        launch/train.py --config configs/deepspeed.toml

Settings: the ``Config`` defaults below, then a TOML file (``--config``), then
``--key=value`` overrides (a bare ``--flag`` sets a boolean key to true). ``--resume``
continues a run from its last checkpoint to the same step, data order and selection.
Outputs go to ``<out_dir>/<name>/``: ``run.json`` (config, world size), ``metrics.jsonl``
(one line per step), ``metrics.png`` and ``ckpt/``.

The task: ``num_classes`` Gaussian clusters in ``num_features`` dimensions. A rare hard
sub-population (``hard_fraction`` of the data) of each class lies ``hard_offset`` away
from the main cluster of the *next* class: a model that ignores the rare examples calls
them the next class. Plain training learns them slowly, a random subset of the batch
mostly misses them, hard example mining keeps them in every update.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import gc
import json
import logging
import math
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from dist_ohem import HardExampleSelector, OHEMLoss, SelectionResult, ohem_step
from dist_ohem.step import unwrap_model

log = logging.getLogger("train")


# ----------------------------------------------------------------------------- config


@dataclass
class Config:
    """Every setting of a run. Override in a TOML file or with --key=value."""

    name: str = "default"  # outputs go to <out_dir>/<name>/
    out_dir: str = "runs"
    seed: int = 0  # data, model init, data order and scope="random" draws
    engine: str = "ddp"  # "ddp" (torchrun or plain python), "accelerate", "deepspeed"
    device: str = "cpu"  # "cpu" (gloo) or "cuda" (nccl, one GPU per rank)
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0-3 (engine="deepspeed")
    # data: a rare hard sub-population next to another class's main cluster
    num_classes: int = 10
    num_features: int = 32
    num_train: int = 20000
    num_test: int = 4000  # same mix as training
    num_test_hard: int = 1000  # hard sub-population only: "hard_acc"
    hard_fraction: float = 0.01
    hard_offset: float = 6.0  # distance from the next class's main cluster, in noise stds
    # model: an MLP
    hidden: int = 256
    dropout: float = 0.0
    # optimization: AdamW, cosine decay from lr to min_lr over max_steps
    batch_size: int = 128  # per rank: K = batch_size * world size
    max_steps: int = 800
    lr: float = 1e-3
    min_lr: float = 1e-4
    weight_decay: float = 0.0
    # hard example mining
    mode: str = "two_pass"  # "two_pass" (ohem_step) or "mask" (OHEMLoss)
    scope: str = "global"  # "global", "local", "random" (same M, random) or "all" (no mining)
    rule: str = "keep"  # which of keep / top_k / loss_thresh sets M
    keep: float = 0.25  # rule "keep": M = ceil(keep * K)
    top_k: int = 64  # rule "top_k": M = top_k
    loss_thresh: float = 0.5  # rule "loss_thresh": every loss above it (at least min_kept)
    min_kept: int = 0
    strategy: str = "gather"  # "gather", "radix" or "auto"
    balance: bool = False  # two_pass: every rank trains floor/ceil(M/W) examples
    # evaluation, logging, checkpoints
    eval_interval: int = 50  # steps between evaluations (and always at the last step)
    log_interval: int = 100  # steps between log lines
    ckpt_interval: int = 200  # steps between checkpoints (and always at the end)
    stop_at: int = 0  # stop after this step as if interrupted (0: run to max_steps)
    resume: bool = False  # continue from <out_dir>/<name>/ckpt/last.pt
    plot: bool = True  # draw metrics.png at the end


ENGINES = ("ddp", "accelerate", "deepspeed")
DEVICES = ("cpu", "cuda")
MODES = ("two_pass", "mask")
RULES = ("keep", "top_k", "loss_thresh")
DEFAULTS = {f.name: f.default for f in dataclasses.fields(Config)}
#: Keys that may change on --resume without changing the training that follows.
HARMLESS_ON_RESUME = ("resume", "stop_at", "plot", "log_interval", "eval_interval", "ckpt_interval")
TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


class ConfigError(ValueError):
    """A setting is wrong; the message says which and how to fix it."""


def parse_args(argv: list[str] | None = None) -> Config:
    """Config from defaults, then the ``--config`` TOML file, then ``--key=value`` overrides."""
    parser = argparse.ArgumentParser(
        description="Train with distributed online hard example mining.",
        epilog="Overrides: --key=value for any key of: " + ", ".join(DEFAULTS),
    )
    parser.add_argument("--config", help="TOML file of config keys")
    # The DeepSpeed launcher appends --local_rank=N; the LOCAL_RANK variable says the same.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args(argv)
    values: dict[str, object] = {}
    if args.config:
        values.update(read_config_file(Path(args.config)))
    for arg in overrides:
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --key=value")
        key, equals, value = arg[2:].partition("=")
        values[key] = coerce(key, value if equals else "true", f"override {arg!r}")
    cfg = Config(**values)
    check_config(cfg)
    return cfg


def read_config_file(path: Path) -> dict[str, object]:
    """The keys of a flat TOML config file, type-checked against ``Config``."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the same parser, from the `train` extra
        import tomli as tomllib
    if not path.is_file():
        raise ConfigError(f"config file {path} not found; the configs are in configs/")
    with path.open("rb") as file:
        try:
            table = tomllib.load(file)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    return {key: coerce(key, value, str(path)) for key, value in table.items()}


def coerce(key: str, value: object, source: str) -> object:
    """``value`` as the type of ``Config.<key>``; strings (command line) are parsed."""
    if key not in DEFAULTS:
        close = difflib.get_close_matches(key, DEFAULTS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"unknown config key {key!r} in {source}{hint}; valid keys: {', '.join(DEFAULTS)}"
        )
    kind = type(DEFAULTS[key])
    if isinstance(value, str) and kind is bool and value.lower() in TRUE + FALSE:
        return value.lower() in TRUE
    if isinstance(value, str) and kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not kind:
        raise ConfigError(
            f"{key} must be of type {kind.__name__} (like {DEFAULTS[key]!r}), got {value!r} "
            f"in {source}"
        )
    return value


def check_config(cfg: Config) -> None:
    """Reject settings the run cannot use, before any process group exists."""
    for key, choices in (
        ("engine", ENGINES),
        ("device", DEVICES),
        ("mode", MODES),
        ("rule", RULES),
    ):
        if getattr(cfg, key) not in choices:
            raise ConfigError(f"{key} must be one of {choices}, got {getattr(cfg, key)!r}")
    for key in ("batch_size", "max_steps", "eval_interval", "log_interval", "ckpt_interval"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key} must be >= 1, got {getattr(cfg, key)}")
    if not 0 <= cfg.stop_at <= cfg.max_steps:
        raise ConfigError(f"stop_at must be in [0, max_steps={cfg.max_steps}], got {cfg.stop_at}")
    per_step = cfg.batch_size * int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.num_train < per_step:
        raise ConfigError(
            f"num_train={cfg.num_train} < batch_size * world size = {per_step}: not one batch; "
            "raise num_train or lower batch_size"
        )
    if not 0 < cfg.hard_fraction < 1:
        raise ConfigError(f"hard_fraction must be in (0, 1), got {cfg.hard_fraction}")
    if cfg.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"zero_stage must be 0, 1, 2 or 3, got {cfg.zero_stage}")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but torch sees no GPU; use device='cpu'")
    if cfg.balance and cfg.mode != "two_pass":
        raise ConfigError("balance=true needs mode='two_pass' (mask mode trains every example)")
    make_selector(cfg)  # raises on a bad rule, scope or strategy
    if cfg.resume and not checkpoint_path(cfg).is_file():
        raise ConfigError(
            f"--resume: no checkpoint at {checkpoint_path(cfg)}; run once without --resume"
        )


def make_selector(cfg: Config) -> HardExampleSelector:
    """The selector of ``cfg``: its rule, scope and strategy."""
    try:
        return HardExampleSelector(
            **{cfg.rule: getattr(cfg, cfg.rule)},
            min_kept=cfg.min_kept,
            scope=cfg.scope,
            strategy=cfg.strategy,
            seed=cfg.seed,
        )
    except ValueError as exc:
        raise ConfigError(f"selection settings: {exc}") from exc


def run_dir(cfg: Config) -> Path:
    """Where this run's outputs go."""
    return Path(cfg.out_dir) / cfg.name


def checkpoint_path(cfg: Config) -> Path:
    """The committed checkpoint: written last, atomically, so it is always complete."""
    return run_dir(cfg) / "ckpt" / "last.pt"


# ----------------------------------------------------------------------------- engine


@dataclass
class Engine:
    """The model as trained, and the few calls in which the engines differ."""

    model: nn.Module | None  # DDP, an Accelerate-prepared model, a DeepSpeed engine, a module
    optimizer: torch.optim.Optimizer | None
    backward: Callable[[torch.Tensor], object]
    step: Callable[[], object]  # optimizer step and zero_grad
    rank: int
    world_size: int
    device: torch.device
    release: Callable[[], object] = lambda: None  # drops the engine's own model references

    def close(self) -> None:
        """Drop the model, then leave the process group.

        DDP's reducer holds the gloo process group. When the reducer drops the last
        reference (at interpreter exit) the group is destroyed with the GIL held while a
        gloo worker thread may still need the GIL to free a finished collective's
        tensors: a rare hang at exit (pytorch/pytorch#56297). Dropping the model first
        leaves the last reference to ``destroy_process_group``, which releases the GIL.
        """
        if dist.is_initialized():
            dist.barrier()  # no rank leaves while another still writes a checkpoint
        self.model = self.optimizer = None
        self.release()
        gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()


def setup_engine(cfg: Config, model: nn.Module) -> Engine:
    """Join the process group the launcher describes (env vars) and wrap the model."""
    backend = "gloo" if cfg.device == "cpu" else "nccl"
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.engine == "accelerate":
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=cfg.device == "cpu")  # picks gloo on CPU
        if accelerator.state.deepspeed_plugin is not None:
            raise ConfigError("for DeepSpeed use engine='deepspeed' with the deepspeed launcher")
        model, optimizer = accelerator.prepare(model, optimizer)
        return Engine(
            model,
            optimizer,
            accelerator.backward,
            functools.partial(step_and_zero_grad, optimizer),
            accelerator.process_index,
            accelerator.num_processes,
            accelerator.device,
            release=accelerator.free_memory,
        )
    if cfg.engine == "deepspeed":
        if cfg.device == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        if "RANK" not in os.environ:  # plain python: DeepSpeed still needs a process group
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
            os.environ["MASTER_PORT"] = str(free_port())
        import deepspeed
        import deepspeed.ops

        # The shared-memory all-reduce kernel serves only DeepSpeed's inference all-reduce;
        # marked unavailable, init_distributed skips its JIT compile (over a minute on a
        # fresh 2-core machine).
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend=backend)
        ds_config = {
            "train_micro_batch_size_per_gpu": cfg.batch_size,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": cfg.zero_stage},
            "zero_allow_untested_optimizer": True,  # a torch AdamW under ZeRO 1-3
            "gradient_clipping": 0.0,  # DeepSpeed clips to norm 1.0 unless told; DDP doesn't
            "steps_per_print": 10**9,
        }
        engine, optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds_config
        )
        return Engine(
            engine,
            optimizer,
            engine.backward,
            engine.step,  # optimizer step, then zero_grad
            dist.get_rank(),
            dist.get_world_size(),
            engine.device,
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cfg.device == "cuda" else torch.device("cpu")
    model = model.to(device)
    if cfg.device == "cuda":
        torch.cuda.set_device(device)
    if "RANK" in os.environ:  # torchrun
        dist.init_process_group(backend)
        model = DistributedDataParallel(
            model, device_ids=[local_rank] if cfg.device == "cuda" else None
        )
    return Engine(
        model,
        optimizer,
        torch.Tensor.backward,
        functools.partial(step_and_zero_grad, optimizer),
        dist.get_rank() if dist.is_initialized() else 0,
        dist.get_world_size() if dist.is_initialized() else 1,
        device,
    )


def step_and_zero_grad(optimizer: torch.optim.Optimizer) -> None:
    """The optimizer step of DDP and Accelerate (DeepSpeed's engine.step does both)."""
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def free_port() -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def all_reduce_sum(values: torch.Tensor, device: torch.device) -> list[float]:
    """Sum over ranks (identity without a process group), through ``device`` (NCCL: GPU)."""
    values = values.to(device)
    if dist.is_initialized():
        dist.all_reduce(values)
    return values.tolist()


# ----------------------------------------------------------------------------- data


@dataclass
class Data:
    """The generated task; ``*_hard`` flags mark the rare hard sub-population."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    hard_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    x_test_hard: torch.Tensor
    y_test_hard: torch.Tensor


def make_data(cfg: Config) -> Data:
    """Generate the task from ``cfg.seed``: identical on every rank and every resume."""
    gen = torch.Generator().manual_seed(cfg.seed)
    centers = torch.randn(cfg.num_classes, cfg.num_features, generator=gen)
    directions = F.normalize(torch.randn(cfg.num_classes, cfg.num_features, generator=gen), dim=1)
    # Class c's hard examples sit next to the main cluster of class c + 1.
    hard_centers = centers.roll(-1, dims=0) + cfg.hard_offset * directions

    def sample(n: int, hard_fraction: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        y = torch.randint(cfg.num_classes, (n,), generator=gen)
        hard = torch.rand(n, generator=gen) < hard_fraction
        mean = torch.where(hard[:, None], hard_centers[y], centers[y])
        return mean + torch.randn(n, cfg.num_features, generator=gen), y, hard

    x_train, y_train, hard_train = sample(cfg.num_train, cfg.hard_fraction)
    x_test, y_test, _ = sample(cfg.num_test, cfg.hard_fraction)
    x_test_hard, y_test_hard, _ = sample(cfg.num_test_hard, 1.0)
    return Data(x_train, y_train, hard_train, x_test, y_test, x_test_hard, y_test_hard)


def batch_indices(cfg: Config, step: int, rank: int, world_size: int) -> torch.Tensor:
    """This rank's examples at ``step`` (1-based): a pure function of (seed, step, rank, W).

    Each epoch is a fresh permutation seeded by (seed, epoch), cut into global batches of
    ``batch_size * W`` (the last partial one dropped); rank r takes the r-th slice. No
    sampler state exists, so a resumed run sees the same data as an uninterrupted one.
    """
    per_step = cfg.batch_size * world_size
    steps_per_epoch = cfg.num_train // per_step
    epoch, position = divmod(step - 1, steps_per_epoch)
    order = torch.randperm(
        cfg.num_train, generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    )
    start = position * per_step + rank * cfg.batch_size
    return order[start : start + cfg.batch_size]


def make_model(cfg: Config) -> nn.Module:
    """A three-layer MLP."""
    return nn.Sequential(
        nn.Linear(cfg.num_features, cfg.hidden),
        nn.ReLU(),
        nn.Dropout(cfg.dropout),
        nn.Linear(cfg.hidden, cfg.hidden),
        nn.ReLU(),
        nn.Dropout(cfg.dropout),
        nn.Linear(cfg.hidden, cfg.num_classes),
    )


def lr_at(cfg: Config, step: int) -> float:
    """Cosine decay from ``lr`` at step 1 to ``min_lr`` at ``max_steps``."""
    progress = (step - 1) / max(1, cfg.max_steps - 1)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(module: nn.Module, data: Data, eng: Engine) -> dict[str, float]:
    """Accuracy and loss on the test set and on the hard sub-population, each rank a shard."""
    was_training = module.training
    module.eval()
    sums = []
    for x, y in ((data.x_test, data.y_test), (data.x_test_hard, data.y_test_hard)):
        x = x.tensor_split(eng.world_size)[eng.rank].to(eng.device)
        y = y.tensor_split(eng.world_size)[eng.rank].to(eng.device)
        logits = module(x)
        correct = (logits.argmax(dim=1) == y).sum()
        sums += [correct.item(), F.cross_entropy(logits, y, reduction="sum").item(), len(y)]
    module.train(was_training)
    correct, loss, count, hard_correct, hard_loss, hard_count = all_reduce_sum(
        torch.tensor(sums, dtype=torch.float64), eng.device
    )
    return {
        "test_acc": correct / count,
        "test_loss": loss / count,
        "hard_acc": hard_correct / hard_count,
        "hard_loss": hard_loss / hard_count,
    }


# ----------------------------------------------------------------------------- checkpoints


def atomic_torch_save(obj: object, path: Path) -> None:
    """Write ``path`` so that it is either the old or the complete new file, never partial."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as file:
        torch.save(obj, file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)


def save_checkpoint(cfg: Config, eng: Engine, selector: HardExampleSelector, step: int) -> None:
    """Checkpoint after ``step``; called on every rank, rank 0 commits ``last.pt``.

    ``last.pt`` holds the trainer state: step, the selector's call counter (scope="random"
    draws depend on it), every rank's RNG state (dropout) and, for DDP and Accelerate,
    the model and optimizer (identical on every rank, so rank 0's copy suffices). A
    DeepSpeed engine saves itself with ``engine.save_checkpoint``: under ZeRO each rank
    holds only its shard of the optimizer state, and only the engine can write and
    reload those shards. Its shards go to a per-step directory first; ``last.pt``
    names that directory, and replacing ``last.pt`` is the commit: a crash mid-save
    leaves the previous checkpoint in force.
    """
    directory = checkpoint_path(cfg).parent
    rng = [rng_state(eng.device)] * eng.world_size
    if dist.is_initialized():
        dist.all_gather_object(rng, rng_state(eng.device))
    state: dict[str, object] = {
        "step": step,
        "selector_calls": selector.num_calls,
        "rng": rng,
        "world_size": eng.world_size,
        "config": dataclasses.asdict(cfg),
    }
    if cfg.engine == "deepspeed":
        state["deepspeed_tag"] = f"step{step:08d}"
        eng.model.save_checkpoint(str(directory), tag=state["deepspeed_tag"], save_latest=False)
        dist.barrier()  # every rank's shard is on disk before the commit
    else:
        state["model"] = unwrap_model(eng.model).state_dict()
        state["optimizer"] = eng.optimizer.state_dict()
    if eng.rank == 0:
        atomic_torch_save(state, checkpoint_path(cfg))
        stale = [p for p in directory.glob("step*") if p.name != state.get("deepspeed_tag")]
        for old in stale:  # older DeepSpeed shards, superseded by the commit
            shutil.rmtree(old)
    if dist.is_initialized():
        dist.barrier()  # nobody runs ahead while the commit is being written


def load_checkpoint(cfg: Config, eng: Engine, selector: HardExampleSelector) -> int:
    """Restore the state of :func:`save_checkpoint` on every rank; returns its step."""
    state = torch.load(checkpoint_path(cfg), map_location="cpu", weights_only=True)
    if state["world_size"] != eng.world_size:
        raise ConfigError(
            f"{checkpoint_path(cfg)} was written by {state['world_size']} ranks, this run has "
            f"{eng.world_size}: the data order depends on it; resume with "
            f"{state['world_size']} ranks"
        )
    changed = [k for k, v in state["config"].items() if getattr(cfg, k, v) != v]
    changed = [k for k in changed if k not in HARMLESS_ON_RESUME]
    if changed:
        log.warning("resuming with changed config keys %s: not an exact continuation", changed)
    if cfg.engine == "deepspeed":
        loaded, _ = eng.model.load_checkpoint(
            str(checkpoint_path(cfg).parent),
            tag=state["deepspeed_tag"],
            load_lr_scheduler_states=False,
        )
        if loaded is None:
            raise RuntimeError(
                f"DeepSpeed could not load {state['deepspeed_tag']} next to "
                f"{checkpoint_path(cfg)}; were the step* directories removed?"
            )
    else:
        unwrap_model(eng.model).load_state_dict(state["model"])
        eng.optimizer.load_state_dict(state["optimizer"])
    selector.num_calls = state["selector_calls"]
    cpu_rng, cuda_rng = state["rng"][eng.rank]
    torch.set_rng_state(cpu_rng)
    if cuda_rng is not None:
        torch.cuda.set_rng_state(cuda_rng, eng.device)
    return state["step"]


def rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The generators dropout draws from on this rank: CPU, and CUDA on a GPU."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def open_metrics(path: Path, keep_through_step: int) -> TextIO:
    """Open the JSONL for appending, keeping only the lines through the resumed step.

    Lines after it (logged, then lost with the crash before their checkpoint) and a
    half-written last line are dropped: the resumed run writes those steps again.
    """
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


# ----------------------------------------------------------------------------- plot


def plot_metrics(jsonl: Path, png: Path) -> None:
    """Loss, accuracy and selected-per-rank over steps, from the metrics file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    evals = [r for r in records if "test_acc" in r]
    steps = [r["step"] for r in records]
    eval_steps = [r["step"] for r in evals]
    fig, (ax_loss, ax_acc, ax_sel) = plt.subplots(3, 1, figsize=(8, 10), sharex=True)
    ax_loss.plot(steps, [r["loss"] for r in records], lw=0.8, label="train (selected mean)")
    ax_loss.plot(eval_steps, [r["test_loss"] for r in evals], "o-", label="test")
    ax_loss.plot(eval_steps, [r["hard_loss"] for r in evals], "s-", label="test, hard subgroup")
    ax_loss.set(ylabel="cross-entropy", yscale="log", title=png.parent.name)
    ax_acc.plot(eval_steps, [r["test_acc"] for r in evals], "o-", label="test accuracy")
    ax_acc.plot(eval_steps, [r["hard_acc"] for r in evals], "s-", label="hard subgroup accuracy")
    hard_share = [r["hard_selected"] / max(r["M"], 1) for r in records]
    ax_acc.plot(steps, hard_share, lw=0.6, alpha=0.6, label="hard share of the selection")
    ax_acc.set(ylabel="fraction", ylim=(0, 1.02))
    per_rank = list(zip(*(r["selected_per_rank"] for r in records), strict=True))
    for rank, counts in enumerate(per_rank):
        ax_sel.plot(steps, counts, lw=0.8, label=f"rank {rank}")
    ax_sel.plot(steps, [r["M"] / len(per_rank) for r in records], "k--", lw=0.8, label="M / W")
    ax_sel.set(xlabel="step", ylabel="selected examples")
    for ax in (ax_loss, ax_acc, ax_sel):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- training


def main(argv: list[str] | None = None) -> None:
    """Parse the config, train, evaluate, checkpoint, plot."""
    cfg = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.ERROR,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    eng = setup_engine(cfg, make_model(cfg))
    torch.manual_seed(cfg.seed + 1 + eng.rank)  # per-rank dropout streams
    out = run_dir(cfg)
    if eng.rank == 0:  # the other ranks write here only after the first step's collectives
        if not cfg.resume and checkpoint_path(cfg).exists():
            log.warning("starting %s afresh: deleting its checkpoints (--resume continues)", out)
            shutil.rmtree(checkpoint_path(cfg).parent)
        checkpoint_path(cfg).parent.mkdir(parents=True, exist_ok=True)
    data = make_data(cfg)
    selector = make_selector(cfg)
    criterion = nn.CrossEntropyLoss()
    ohem_loss = OHEMLoss(criterion, selector=selector)

    start = load_checkpoint(cfg, eng, selector) if cfg.resume else 0
    end = cfg.stop_at or cfg.max_steps
    metrics: TextIO | None = None
    if eng.rank == 0:
        run_info = {"world_size": eng.world_size, "torch": torch.__version__}
        write_json({**run_info, "config": dataclasses.asdict(cfg)}, out / "run.json")
        metrics = open_metrics(out / "metrics.jsonl", keep_through_step=start)
        log.info(
            "%s: engine=%s W=%d K=%d/step mode=%s scope=%s %s=%s, steps %d..%d, outputs in %s",
            cfg.name,
            cfg.engine,
            eng.world_size,
            cfg.batch_size * eng.world_size,
            cfg.mode,
            cfg.scope,
            cfg.rule,
            getattr(cfg, cfg.rule),
            start + 1,
            end,
            out,
        )

    # A first SIGINT/SIGTERM finishes the current step, checkpoints and exits; a second kills.
    interrupted = []

    def request_stop(signum: int, _frame: object) -> None:
        interrupted.append(signum)
        signal.signal(signum, signal.SIG_DFL)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, request_stop)

    started, step = time.perf_counter(), start
    bar = tqdm(total=end, initial=start, disable=eng.rank != 0, unit="step", desc=cfg.name)
    with logging_redirect_tqdm():
        for step in range(start + 1, end + 1):
            for group in eng.optimizer.param_groups:
                group["lr"] = lr_at(cfg, step)
            index = batch_indices(cfg, step, eng.rank, eng.world_size)
            x, y = data.x_train[index].to(eng.device), data.y_train[index].to(eng.device)
            tick = time.perf_counter()
            selection, loss_share, trained, timings = forward_backward(
                cfg, eng, x, y, criterion, ohem_loss
            )
            eng.step()
            step_time = time.perf_counter() - tick

            # One all-reduce: loss shares, stop flags, hard-example counts, per-rank stats.
            hard = data.hard_train[index].to(eng.device)
            stats = torch.zeros(4 + 2 * eng.world_size, dtype=torch.float64)
            stats[:4] = torch.tensor(
                [
                    loss_share.item(),
                    float(bool(interrupted)),
                    hard.sum().item(),
                    (selection.mask & hard).sum().item(),
                ]
            )
            stats[4 + eng.rank] = trained
            stats[4 + eng.world_size + eng.rank] = step_time
            stats = all_reduce_sum(stats, eng.device)
            record = step_record(step, cfg, eng, selection, stats, timings)
            if step % cfg.eval_interval == 0 or step == end:
                record.update(evaluate(unwrap_model(eng.model), data, eng))
            if eng.rank == 0:  # the line first: a checkpoint never runs ahead of the log
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                report(cfg, record, bar)
            stop = stats[1] > 0  # some rank got a signal: all stop after this step
            if step % cfg.ckpt_interval == 0 or step == end or stop:
                save_checkpoint(cfg, eng, selector, step)
            if stop:
                log.warning("stopped by a signal after step %d; --resume continues", step)
                break
    bar.close()

    if eng.rank == 0:
        metrics.close()
        if cfg.plot:
            plot_metrics(out / "metrics.jsonl", out / "metrics.png")
        log.info(
            "done: steps %d..%d in %.1f s; metrics %s%s",
            start + 1,
            step,
            time.perf_counter() - started,
            out / "metrics.jsonl",
            f", plot {out / 'metrics.png'}" if cfg.plot else "",
        )
    eng.close()


def forward_backward(
    cfg: Config,
    eng: Engine,
    x: torch.Tensor,
    y: torch.Tensor,
    criterion: nn.Module,
    ohem_loss: OHEMLoss,
) -> tuple[SelectionResult, torch.Tensor, int, dict[str, float] | None]:
    """Select and back-propagate one batch in the configured mode (no optimizer step).

    Returns the selection, the loss this rank back-propagated (its share (W/M) * sum),
    the number of examples it trained on and, in two-pass mode, the phase timings.
    """
    if cfg.mode == "two_pass":
        out = ohem_step(
            eng.model,
            x,
            y,
            criterion,
            ohem_loss.selector,
            backward=eng.backward,
            balance=cfg.balance,
        )
        return out.selection, out.loss, out.num_trained_local, out.timings
    loss = ohem_loss(eng.model(x), y)
    eng.backward(loss)
    return ohem_loss.last, loss.detach(), ohem_loss.last.num_selected_local, None


def step_record(
    step: int,
    cfg: Config,
    eng: Engine,
    selection: SelectionResult,
    stats: list[float],
    timings: dict[str, float] | None,
) -> dict[str, object]:
    """One JSONL line: the step's global training loss and selection (DESIGN.md §8).

    ``trained_per_rank`` differs from ``selected_per_rank`` only with ``balance``;
    ``hard_*`` count examples of the hard sub-population in the batch and the selection;
    ``step_time_s`` is rank 0's forward, backward and optimizer step, ``step_time_max_s``
    the slowest rank's.
    """
    world = eng.world_size
    record: dict[str, object] = {
        "step": step,
        "lr": lr_at(cfg, step),
        # Each rank back-propagates its share (W/M) * sum: the global mean is sum / W.
        "loss": stats[0] / world,
        "K": selection.num_valid_global,
        "M": selection.num_selected_global,
        "selected_per_rank": list(selection.selected_per_rank),
        "trained_per_rank": [int(n) for n in stats[4 : 4 + world]],
        "threshold": None if math.isnan(selection.threshold) else selection.threshold,
        "strategy": selection.strategy,
        "scope": selection.scope,
        "hard_in_batch": int(stats[2]),
        "hard_selected": int(stats[3]),
        "step_time_s": stats[4 + world],
        "step_time_max_s": max(stats[4 + world :]),
    }
    if timings is not None:
        record["timings_rank0_s"] = timings
    return record


def report(cfg: Config, record: dict[str, object], bar: tqdm) -> None:
    """Progress bar every step, a log line every ``log_interval`` steps and at evaluations."""
    bar.update(1)
    bar.set_postfix(loss=f"{record['loss']:.3f}", M=record["M"], refresh=False)
    step = record["step"]
    if step % cfg.log_interval == 0:
        log.info(
            "step %d | loss %.4f | K %d M %d | per rank %s | threshold %s | hard %d/%d | %.1f ms",
            step,
            record["loss"],
            record["K"],
            record["M"],
            record["selected_per_rank"],
            "-" if record["threshold"] is None else f"{record['threshold']:.3f}",
            record["hard_selected"],
            record["hard_in_batch"],
            1000 * record["step_time_s"],
        )
    if "test_acc" in record:
        log.info(
            "eval step %d | test acc %.4f loss %.4f | hard subgroup acc %.4f loss %.4f",
            step,
            record["test_acc"],
            record["test_loss"],
            record["hard_acc"],
            record["hard_loss"],
        )


if __name__ == "__main__":
    try:
        main()
    except ConfigError as exc:
        sys.exit(f"config error: {exc}")
