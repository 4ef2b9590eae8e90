"""Train a detector with online hard example mining chosen across all ranks.

One file, top to bottom: config, launcher and engine, data, training loop with
evaluation, metrics, checkpoints, summary and plot. Every launcher runs this script:

    python launch/train.py                                      # 1 process, no process group
    OMP_NUM_THREADS=1 torchrun --nproc_per_node=2 launch/train.py
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \
        --mixed_precision no --dynamo_backend no launch/train.py --config configs/accelerate.yaml
    DS_ACCELERATOR=cpu deepspeed --num_accelerators 2 launch/train.py \
        --config configs/deepspeed.yaml --deepspeed_config configs/deepspeed/zero2.json

(``launch/*.sh`` wrap these with a free port and multi-node variables.)

Settings: the ``Config`` defaults below (they equal configs/default.yaml), then a YAML
file (``--config``), then ``key=value`` overrides. An unknown key or a wrong type is an
error. Outputs go to ``run_dir``: ``metrics.jsonl`` (one line per optimizer step, plus
eval lines), ``summary.json``, ``metrics.png``, ``checkpoints/step_*.pt``. ``resume=auto``
continues from the newest checkpoint: same step, data order and selection.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import difflib
import functools
import gc
import hashlib
import json
import logging
import math
import os
import re
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
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

# `python launch/train.py` puts launch/ first on sys.path; the tasks live in launch.tasks.
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from dist_ohem import (
    DistributedInputError,
    HardExampleSelector,
    OHEMLoss,
    SelectionResult,
    ohem_step,
)
from dist_ohem.comm import all_gather_uneven
from dist_ohem.step import unwrap_model
from launch.tasks import TASKS, Task, make_task

log = logging.getLogger("train")


# ----------------------------------------------------------------------------- config


@dataclass
class Config:
    """Every setting of a run; configs/*.yaml and ``key=value`` override these."""

    run_dir: str = "runs/default"  # metrics, summary, plot and checkpoints go here
    seed: int = 0  # data, model init, data order and scope="random" draws
    task: str = "detection"  # "detection" (generated) or "digits" (scikit-learn, long-tailed)
    shard: str = "iid"  # "iid" or "skewed": the hard groups' examples all on rank 0
    # optimization: AdamW, cosine decay from lr to min_lr over max_steps
    max_steps: int = 600
    batch_size: int = 128  # per rank: K = batch_size * world size
    lr: float = 2e-3
    min_lr: float = 1e-4
    weight_decay: float = 0.0
    # hard example mining (dist_ohem)
    mode: str = "two_pass"  # "two_pass" (ohem_step) or "mask" (OHEMLoss)
    scope: str = "global"  # "global", "local", "random" (same M, random) or "all" (no mining)
    rule: str = "keep"  # which of keep / top_k / loss_thresh / neg_pos_ratio sets M
    keep: float = 0.25  # rule "keep": M = ceil(keep * K)
    top_k: int = 64  # rule "top_k": M = top_k
    loss_thresh: float = 0.5  # rule "loss_thresh": every loss above it, at least min_kept
    neg_pos_ratio: float = 3.0  # rule "neg_pos_ratio": positives (class != 0) + r x negatives
    min_kept: int = 0
    strategy: str = "gather"  # "gather", "radix" or "auto"
    nan: str = "raise"  # a NaN loss: "raise" on every rank, or "ignore" the instance
    balance: bool = False  # two_pass: every rank trains floor/ceil(M/W) examples
    score_mode: str = "no_grad_train"  # two_pass scoring pass: "no_grad_train" or "eval"
    # engine
    engine: str = "auto"  # "auto" (from the launcher), "ddp", "accelerate", "deepspeed"
    device: str = "auto"  # "auto" (cuda if present), "cpu" (gloo) or "cuda" (nccl)
    deepspeed_config: str = ""  # DeepSpeed JSON; also --deepspeed_config PATH
    zero_stage: int = 0  # DeepSpeed ZeRO stage when no deepspeed_config is given
    timeout_s: float = 600.0  # a collective that waits longer fails the run on every rank
    # evaluation, logging, checkpoints
    eval_every: int = 100  # steps between evaluations (also before step 1 and at the end)
    log_every: int = 100  # steps between log lines
    checkpoint_every: int = 200  # steps between checkpoints (also at the end)
    keep_checkpoints: int = 2  # the newest this many checkpoints are kept
    resume: str = "false"  # "false", "true" (newest checkpoint, must exist), "auto", or a path
    stop_at: int = 0  # stop after this step as if interrupted (0: run to max_steps)
    plot: bool = True  # draw metrics.png at the end (needs matplotlib)


CHOICES = {
    "task": TASKS,
    "shard": ("iid", "skewed"),
    "mode": ("two_pass", "mask"),
    "rule": ("keep", "top_k", "loss_thresh", "neg_pos_ratio"),
    "engine": ("auto", "ddp", "accelerate", "deepspeed"),
    "device": ("auto", "cpu", "cuda"),
    "score_mode": ("no_grad_train", "eval"),
}
DEFAULTS = {f.name: f.default for f in dataclasses.fields(Config)}
#: Keys that may change on resume without changing the training that follows.
HARMLESS_ON_RESUME = ("resume", "stop_at", "plot", "log_every", "eval_every", "checkpoint_every")
HARMLESS_ON_RESUME += ("keep_checkpoints", "timeout_s")
TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


class ConfigError(ValueError):
    """A setting is wrong; the message says which and how to fix it."""


def parse_args(argv: list[str] | None = None) -> Config:
    """Config from the defaults, then ``--config`` YAML, then ``key=value`` overrides."""
    parser = argparse.ArgumentParser(
        description="Train with distributed online hard example mining.",
        epilog="Overrides: key=value for any key of: " + ", ".join(DEFAULTS),
    )
    parser.add_argument("--config", help="YAML file of config keys")
    parser.add_argument("--deepspeed_config", "--deepspeed-config", help="DeepSpeed JSON")
    # The DeepSpeed launcher appends --local_rank=N; the LOCAL_RANK variable says the same.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args(argv)
    values: dict[str, object] = {}
    if args.config:
        values.update(read_config_file(Path(args.config)))
    if args.deepspeed_config:
        values["deepspeed_config"] = args.deepspeed_config
    for arg in overrides:
        key, equals, value = arg.removeprefix("--").partition("=")
        if not equals:
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like key=value")
        values[key] = coerce(key, value, f"override {arg!r}")
    cfg = Config(**values)
    check_config(cfg)
    return cfg


def read_config_file(path: Path) -> dict[str, object]:
    """The keys of a flat YAML config file, type-checked against ``Config``."""
    import yaml

    if not path.is_file():
        raise ConfigError(f"config file {path} not found; the configs are in configs/")
    try:
        table = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(table, dict):
        raise ConfigError(f"{path} must be a mapping of config keys, got {type(table).__name__}")
    return {key: coerce(key, value, str(path)) for key, value in table.items()}


def coerce(key: str, value: object, source: str) -> object:
    """``value`` as the type of ``Config.<key>``; strings (command line) are parsed."""
    if key not in DEFAULTS:
        close = difflib.get_close_matches(str(key), DEFAULTS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"unknown config key {key!r} in {source}{hint}; valid keys: {', '.join(DEFAULTS)}"
        )
    kind = type(DEFAULTS[key])
    if key == "resume" and isinstance(value, bool):  # YAML `resume: true`
        return str(value).lower()
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
    for key, choices in CHOICES.items():
        if getattr(cfg, key) not in choices:
            raise ConfigError(f"{key} must be one of {choices}, got {getattr(cfg, key)!r}")
    for key in ("batch_size", "max_steps", "eval_every", "log_every", "checkpoint_every"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key} must be >= 1, got {getattr(cfg, key)}")
    if cfg.keep_checkpoints < 1:
        raise ConfigError(f"keep_checkpoints must be >= 1, got {cfg.keep_checkpoints}")
    if cfg.timeout_s <= 0:
        raise ConfigError(f"timeout_s must be > 0, got {cfg.timeout_s}")
    if not 0 <= cfg.stop_at <= cfg.max_steps:
        raise ConfigError(f"stop_at must be in [0, max_steps={cfg.max_steps}], got {cfg.stop_at}")
    if cfg.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"zero_stage must be 0, 1, 2 or 3, got {cfg.zero_stage}")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but torch sees no GPU; use device=cpu")
    if cfg.balance and cfg.mode != "two_pass":
        raise ConfigError("balance=true needs mode=two_pass (mask mode trains every example)")
    run_dir = Path(cfg.run_dir).absolute()
    existing = next(p for p in (run_dir, *run_dir.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise ConfigError(
            f"run_dir={cfg.run_dir} cannot be created or written: {existing} is "
            f"{'not a directory' if not existing.is_dir() else 'not writable'}"
        )
    if cfg.deepspeed_config and not Path(cfg.deepspeed_config).is_file():
        raise ConfigError(
            f"deepspeed_config {cfg.deepspeed_config} not found; see configs/deepspeed/"
        )
    make_selector(cfg)  # raises on a bad rule, scope or strategy
    resume_checkpoint(cfg)  # raises when resume names no usable checkpoint


def make_selector(cfg: Config) -> HardExampleSelector:
    """The selector of ``cfg``: its rule, scope and strategy."""
    try:
        return HardExampleSelector(
            **{cfg.rule: getattr(cfg, cfg.rule)},
            min_kept=cfg.min_kept,
            scope=cfg.scope,
            strategy=cfg.strategy,
            nan=cfg.nan,
            seed=cfg.seed,
        )
    except ValueError as exc:
        raise ConfigError(f"selection settings: {exc}") from exc


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_dir(cfg: Config) -> Path:
    """``run_dir/checkpoints``: ``step_XXXXXXXX.pt`` files (and DeepSpeed shard folders)."""
    return Path(cfg.run_dir) / "checkpoints"


def committed_checkpoints(cfg: Config) -> list[Path]:
    """The complete checkpoints of the run, oldest first (``*.pt.tmp`` are unfinished)."""
    found = checkpoint_dir(cfg).glob("step_*.pt")
    return sorted(p for p in found if re.fullmatch(r"step_\d{8}\.pt", p.name))


def resume_checkpoint(cfg: Config) -> Path | None:
    """The checkpoint ``cfg.resume`` asks for: None (fresh start), or an existing file."""
    if cfg.resume == "false":
        return None
    if cfg.resume in ("true", "auto"):
        found = committed_checkpoints(cfg)
        if found:
            return found[-1]
        if cfg.resume == "auto":
            return None
        raise ConfigError(
            f"resume=true but {checkpoint_dir(cfg)} holds no checkpoint; run with resume=false "
            "(or resume=auto, which starts afresh when there is none)"
        )
    path = Path(cfg.resume)
    if not path.is_file():
        raise ConfigError(f"resume={cfg.resume}: no such checkpoint file")
    return path


class CheckpointError(RuntimeError):
    """A checkpoint cannot be loaded; the message names the file and the way out."""


def atomic_torch_save(obj: object, path: Path) -> None:
    """Write ``path`` so that it is either absent or complete, never partial."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as file:
        torch.save(obj, file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- engine


def detect_launcher(argv: list[str]) -> str:
    """Which launcher started this process: its arguments and environment tell."""
    if any(a.startswith(("--local_rank", "--local-rank")) for a in argv):
        return "deepspeed"
    if "ACCELERATE_DYNAMO_BACKEND" in os.environ:  # set by `accelerate launch`, any mode
        return "accelerate"
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return "torchrun"
    return "env" if "RANK" in os.environ else "python"


@dataclass
class Engine:
    """The model as trained, and the few calls in which the engines differ."""

    name: str  # "ddp", "accelerate" or "deepspeed"
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


def setup_engine(
    cfg: Config, launcher: str, model: nn.Module, optimizer: torch.optim.Optimizer
) -> Engine:
    """Join the process group the launcher describes (env vars) and wrap the model."""
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    backend = "nccl" if use_cuda else "gloo"
    timeout = datetime.timedelta(seconds=cfg.timeout_s)
    engine = cfg.engine
    if engine == "auto":
        deepspeed = launcher == "deepspeed" or cfg.deepspeed_config
        engine = "deepspeed" if deepspeed else "accelerate" if launcher == "accelerate" else "ddp"
    if engine == "accelerate":
        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs

        accelerator = Accelerator(
            cpu=not use_cuda, kwargs_handlers=[InitProcessGroupKwargs(timeout=timeout)]
        )
        if accelerator.state.deepspeed_plugin is not None:
            raise ConfigError("for DeepSpeed use the deepspeed launcher (engine=deepspeed)")
        model, optimizer = accelerator.prepare(model, optimizer)
        return Engine(
            engine,
            model,
            optimizer,
            accelerator.backward,
            functools.partial(step_and_zero_grad, optimizer),
            accelerator.process_index,
            accelerator.num_processes,
            accelerator.device,
            release=accelerator.free_memory,
        )
    if engine == "deepspeed":
        if not use_cuda:
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
        deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
        ds_engine, optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_settings(cfg)
        )
        return Engine(
            engine,
            ds_engine,
            optimizer,
            ds_engine.backward,
            ds_engine.step,  # optimizer step, then zero_grad
            dist.get_rank(),
            dist.get_world_size(),
            ds_engine.device,
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    model = model.to(device)
    if "RANK" in os.environ:  # torchrun (or any launcher that sets the env:// variables)
        init_process_group(backend, timeout)
        model = DistributedDataParallel(model, device_ids=[local_rank] if use_cuda else None)
    return Engine(
        engine,
        model,
        optimizer,
        torch.Tensor.backward,
        functools.partial(step_and_zero_grad, optimizer),
        dist.get_rank() if dist.is_initialized() else 0,
        dist.get_world_size() if dist.is_initialized() else 1,
        device,
    )


def init_process_group(backend: str, timeout: datetime.timedelta) -> None:
    """``init_process_group`` from the env:// variables, under a fresh store prefix for
    each torchrun restart: the restarted ranks reuse the store of the failed attempt, and
    without the prefix they would read the dead ranks' addresses and fail to connect."""
    store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(
        backend,
        store=dist.PrefixStore(f"attempt_{attempt}", store),
        rank=rank,
        world_size=world_size,
        timeout=timeout,
    )


def deepspeed_settings(cfg: Config) -> dict[str, object]:
    """The DeepSpeed config: ``cfg.deepspeed_config`` (or ``zero_stage``) plus the batch.

    The batch size, optimizer and schedule come from the train config; a JSON that sets
    them differently is an error rather than a silent override.
    """
    settings: dict[str, object] = {"zero_optimization": {"stage": cfg.zero_stage}}
    if cfg.deepspeed_config:
        import hjson  # DeepSpeed's own parser: JSON that may carry # comments

        settings = dict(hjson.loads(Path(cfg.deepspeed_config).read_text()))
    for section in ("optimizer", "scheduler"):
        if section in settings:
            raise ConfigError(
                f"{cfg.deepspeed_config} defines {section!r}; remove it: train.py builds AdamW "
                "and its cosine schedule from lr, min_lr and weight_decay"
            )
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    required = {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": cfg.batch_size * world_size,
    }
    for key, value in required.items():
        if settings.setdefault(key, value) != value:
            raise ConfigError(
                f"{cfg.deepspeed_config} sets {key}={settings[key]}, but batch_size="
                f"{cfg.batch_size} on {world_size} ranks needs {value}; remove the key"
            )
    settings.setdefault("zero_allow_untested_optimizer", True)  # a torch AdamW under ZeRO
    settings.setdefault("gradient_clipping", 0.0)  # DeepSpeed clips to 1.0 unless told
    settings.setdefault("steps_per_print", 10**9)
    return settings


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


def batch_indices(cfg: Config, task: Task, step: int, rank: int, world_size: int) -> torch.Tensor:
    """This rank's examples at ``step`` (1-based): a pure function of (seed, step, rank, W).

    ``shard="iid"``: each epoch is a fresh permutation of the training set, cut into global
    batches of ``batch_size * W`` (the last partial one dropped); rank r takes the r-th
    slice. ``shard="skewed"``: each rank draws ``batch_size`` examples a step from its own
    shard (:func:`rank_pool`), in epochs of that shard. No sampler state exists: the data
    position is the step, so a resumed run sees the same data as an uninterrupted one.
    """
    pool, ranks_drawing, slot = rank_pool(cfg, task, rank, world_size)
    epoch, position = pool_position(cfg, len(pool), ranks_drawing, step, rank)
    pool_id = 0 if cfg.shard == "iid" else 1 + rank
    generator = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch * 1_009 + pool_id)
    order = torch.randperm(len(pool), generator=generator)
    start = (position * ranks_drawing + slot) * cfg.batch_size
    return pool[order[start : start + cfg.batch_size]]


def rank_pool(cfg: Config, task: Task, rank: int, world_size: int) -> tuple[torch.Tensor, int, int]:
    """The training examples ``rank`` draws from, how many ranks share them, its slot.

    "iid": every example, shared by all W ranks. "skewed" (non-iid, the case where global
    and local selection differ most): every example of the task's hard groups (detection:
    positives and hard negatives; digits: the tail classes) is on rank 0; the other
    examples are split evenly over the W ranks.
    """
    every = torch.arange(len(task.y_train))
    if cfg.shard == "iid":
        return every, world_size, rank
    hard = torch.isin(task.group_train, torch.tensor(task.hard_groups))
    easy = every[~hard][
        torch.randperm(int((~hard).sum()), generator=torch.Generator().manual_seed(cfg.seed))
    ]
    own = easy.tensor_split(world_size)[rank]
    return (torch.cat([every[hard], own]) if rank == 0 else own), 1, 0


def data_position(
    cfg: Config, task: Task, step: int, rank: int, world_size: int
) -> tuple[int, int]:
    """(epoch, batch within the epoch) of ``step`` on ``rank``, both 0-based."""
    pool, ranks_drawing, _ = rank_pool(cfg, task, rank, world_size)
    return pool_position(cfg, len(pool), ranks_drawing, step, rank)


def pool_position(
    cfg: Config, pool_size: int, ranks_drawing: int, step: int, rank: int
) -> tuple[int, int]:
    """(epoch, batch within the epoch) of ``step`` in a pool of ``pool_size`` examples
    that ``ranks_drawing`` ranks draw ``batch_size`` each from per step."""
    steps_per_epoch = pool_size // (cfg.batch_size * ranks_drawing)
    if steps_per_epoch == 0:
        raise ConfigError(
            f"rank {rank} draws from {pool_size} training examples of task {cfg.task} "
            f"(shard={cfg.shard}), fewer than {cfg.batch_size * ranks_drawing} a step; "
            "lower batch_size"
        )
    return divmod(step - 1, steps_per_epoch)


def lr_factor(cfg: Config, steps_done: int) -> float:
    """Cosine decay from ``lr`` (first step) to ``min_lr`` (last step), as a factor of lr."""
    progress = min(steps_done, cfg.max_steps - 1) / max(1, cfg.max_steps - 1)
    return (cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))) / cfg.lr


@torch.no_grad()
def evaluate(module: nn.Module, task: Task, eng: Engine) -> dict[str, float]:
    """The task's test metrics; each rank scores a shard, the logits are gathered."""
    was_training = module.training
    module.eval()
    shard = task.x_test.tensor_split(eng.world_size)[eng.rank].to(eng.device)
    logits = torch.cat(all_gather_uneven(module(shard).float())).cpu()
    module.train(was_training)
    return task.metrics(logits)


# ----------------------------------------------------------------------------- training


def main(argv: list[str] | None = None) -> None:
    """Parse the config, train, evaluate, checkpoint, summarize, plot."""
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse_args(argv)
    launcher = detect_launcher(argv)
    logging.basicConfig(
        level=logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.ERROR,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)

    task = make_task(cfg.task, cfg.seed)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = task.make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    # On the torch optimizer, before an engine wraps it: every engine steps these groups.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(lr_factor, cfg))
    eng = setup_engine(cfg, launcher, model, optimizer)
    torch.manual_seed(cfg.seed + 1 + eng.rank)  # per-rank dropout streams
    selector = make_selector(cfg)
    criterion = nn.CrossEntropyLoss()
    ohem_loss = OHEMLoss(criterion, selector=selector)

    out = Path(cfg.run_dir)
    resume_from = resume_checkpoint(cfg)
    if eng.rank == 0:  # the other ranks write here only after the first step's collectives
        if resume_from is None and checkpoint_dir(cfg).exists():
            log.warning("starting %s afresh: deleting its checkpoints (resume=auto continues)", out)
            shutil.rmtree(checkpoint_dir(cfg))
        checkpoint_dir(cfg).mkdir(parents=True, exist_ok=True)
    start = 0
    if resume_from is not None:
        start = load_checkpoint(resume_from, cfg, eng, scheduler, selector)
    end = cfg.stop_at or cfg.max_steps
    metrics: TextIO | None = None
    if eng.rank == 0:
        metrics = open_metrics(out / "metrics.jsonl", keep_through_step=start)
        log.info(
            "%s: launcher=%s engine=%s W=%d task=%s K=%d/step mode=%s scope=%s %s=%s, steps %d..%d",
            out,
            launcher,
            eng.name,
            eng.world_size,
            cfg.task,
            cfg.batch_size * eng.world_size,
            cfg.mode,
            cfg.scope,
            cfg.rule,
            getattr(cfg, cfg.rule),
            start + 1,
            end,
        )
    if start == 0:
        write_eval(metrics, 0, evaluate(unwrap_model(eng.model), task, eng), eng)

    # A first SIGINT/SIGTERM finishes the current step, checkpoints and exits; a second kills.
    interrupted = []

    def request_stop(signum: int, _frame: object) -> None:
        interrupted.append(signum)
        signal.signal(signum, signal.SIG_DFL)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, request_stop)

    started, step = time.perf_counter(), start
    bar = tqdm(total=end, initial=start, disable=eng.rank != 0, unit="step", desc=out.name)
    with logging_redirect_tqdm():
        for step in range(start + 1, end + 1):
            index = batch_indices(cfg, task, step, eng.rank, eng.world_size)
            x, y = task.x_train[index].to(eng.device), task.y_train[index].to(eng.device)
            tick = time.perf_counter()
            selection, loss_share, trained, phase_s = forward_backward(
                cfg, eng, x, y, criterion, ohem_loss
            )
            tock = time.perf_counter()
            eng.step()
            scheduler.step()
            phase_s["optimizer"] = time.perf_counter() - tock
            step_time = time.perf_counter() - tick

            # One all-reduce: loss shares, stop flags, hard-example counts, per-rank stats.
            hard = torch.isin(task.group_train[index], torch.tensor(task.hard_groups))
            stats = torch.zeros(4 + 2 * eng.world_size, dtype=torch.float64)
            stats[:4] = torch.tensor(
                [
                    loss_share.item(),
                    float(bool(interrupted)),
                    hard.sum().item(),
                    (selection.mask.cpu() & hard).sum().item(),
                ]
            )
            stats[4 + eng.rank] = trained
            stats[4 + eng.world_size + eng.rank] = step_time
            stats = all_reduce_sum(stats, eng.device)
            record = train_record(step, scheduler, eng, selection, stats, phase_s)
            if eng.rank == 0:  # the line first: a checkpoint never runs ahead of the log
                metrics.write(json.dumps(record) + "\n")
                report(cfg, record, bar)
            if step % cfg.eval_every == 0 or step == end:
                write_eval(metrics, step, evaluate(unwrap_model(eng.model), task, eng), eng)
            if eng.rank == 0:
                metrics.flush()
            stop = stats[1] > 0  # some rank got a signal: all stop after this step
            if step % cfg.checkpoint_every == 0 or step == end or stop:
                save_checkpoint(cfg, eng, scheduler, selector, task, step)
            if stop:
                log.warning("stopped by a signal after step %d; resume=auto continues", step)
                break
    bar.close()

    digests = [parameter_digest(unwrap_model(eng.model))] * eng.world_size
    if dist.is_initialized():
        dist.all_gather_object(digests, digests[0])
    if eng.rank == 0:
        metrics.close()
        summary = summarize(out / "metrics.jsonl", cfg, task, launcher, eng)
        summary["wall_s_this_launch"] = time.perf_counter() - started
        summary["parameter_sha256_per_rank"] = digests
        if len(set(digests)) > 1:
            log.error("the ranks ended with different parameters: %s", digests)
        write_json(summary, out / "summary.json")
        print_summary(summary)
        if cfg.plot:
            plot_metrics(out / "metrics.jsonl", out / "metrics.png", task)
        log.info("outputs in %s: metrics.jsonl, summary.json%s", out, ", metrics.png" * cfg.plot)
    eng.close()


def forward_backward(
    cfg: Config,
    eng: Engine,
    x: torch.Tensor,
    y: torch.Tensor,
    criterion: nn.Module,
    ohem_loss: OHEMLoss,
) -> tuple[SelectionResult, torch.Tensor, int, dict[str, float]]:
    """Select and back-propagate one batch in the configured mode (no optimizer step).

    Returns the selection, the loss this rank back-propagated (its share (W/M) * sum),
    the number of examples it trained on and the seconds of each phase.
    """
    positive = y != 0 if cfg.rule == "neg_pos_ratio" else None
    if cfg.mode == "two_pass":
        out = ohem_step(
            eng.model,
            x,
            y,
            criterion,
            ohem_loss.selector,
            backward=eng.backward,
            balance=cfg.balance,
            score_mode=cfg.score_mode,
            positive=positive,
        )
        return out.selection, out.loss, out.num_trained_local, dict(out.timings)
    started = time.perf_counter()
    logits = eng.model(x)
    forwarded = time.perf_counter()
    loss = ohem_loss(logits, y, positive)
    selected = time.perf_counter()
    eng.backward(loss)
    phase_s = {
        "forward": forwarded - started,
        "selection": selected - forwarded,
        "backward": time.perf_counter() - selected,
    }
    return ohem_loss.last, loss.detach(), ohem_loss.last.num_selected_local, phase_s


def train_record(
    step: int,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    eng: Engine,
    selection: SelectionResult,
    stats: list[float],
    phase_s: dict[str, float],
) -> dict[str, object]:
    """One JSONL line for an optimizer step: global loss and selection (DESIGN.md §8).

    ``loss`` is the mean loss of the selected examples (before the step);
    ``trained_per_rank`` differs from ``selected_per_rank`` only with ``balance``;
    ``hard_*`` count the task's hard groups in the batch and in the selection;
    ``phase_s`` are rank 0's seconds per phase, ``step_s_max`` the slowest rank's step.
    """
    world = eng.world_size
    return {
        "kind": "train",
        "step": step,
        "lr": scheduler.get_last_lr()[0],  # the lr of the next step
        # Each rank back-propagates its share (W/M) * sum: the global mean is sum / W.
        "loss": stats[0] / world,
        "num_valid_global": selection.num_valid_global,
        "num_selected_global": selection.num_selected_global,
        "selected_per_rank": list(selection.selected_per_rank),
        "trained_per_rank": [int(n) for n in stats[4 : 4 + world]],
        "threshold": None if math.isnan(selection.threshold) else selection.threshold,
        "strategy": selection.strategy,
        "scope": selection.scope,
        "hard_in_batch": int(stats[2]),
        "hard_selected": int(stats[3]),
        "phase_s": phase_s,
        "step_s": stats[4 + world],
        "step_s_max": max(stats[4 + world :]),
    }


def write_eval(metrics: TextIO | None, step: int, values: dict[str, float], eng: Engine) -> None:
    """Rank 0 appends an eval line (``"kind": "eval"``) and logs it."""
    if eng.rank != 0:
        return
    metrics.write(json.dumps({"kind": "eval", "step": step, **values}) + "\n")
    log.info("eval after step %d | %s", step, " ".join(f"{k} {v:.4f}" for k, v in values.items()))


def report(cfg: Config, record: dict[str, object], bar: tqdm) -> None:
    """Progress bar every step, a log line every ``log_every`` steps."""
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


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(
    cfg: Config,
    eng: Engine,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    selector: HardExampleSelector,
    task: Task,
    step: int,
) -> None:
    """Checkpoint after ``step``; called on every rank, rank 0 commits ``step_*.pt``.

    The file holds the trainer state: step and data position, the scheduler, the
    selector's call counter (scope="random" draws depend on it), every rank's RNG state
    (dropout) and, for DDP and Accelerate, the model and optimizer (identical on every
    rank, so rank 0's copy suffices). A DeepSpeed engine saves itself with
    ``engine.save_checkpoint``: under ZeRO each rank holds only its shard of the
    optimizer state. Its shards go to the folder ``step_*`` first; writing ``step_*.pt``
    (atomically) is the commit, so a crash mid-save leaves the previous checkpoint in
    force. The newest ``keep_checkpoints`` are kept.
    """
    directory = checkpoint_dir(cfg)
    name = f"step_{step:08d}"
    rng = [rng_state(eng.device)] * eng.world_size
    if dist.is_initialized():
        dist.all_gather_object(rng, rng_state(eng.device))
    state: dict[str, object] = {
        "step": step,
        # (epoch, batch in epoch) of each rank's next step: a function of the step, kept
        # for people reading the checkpoint.
        "data_position": [
            data_position(cfg, task, step + 1, r, eng.world_size) for r in range(eng.world_size)
        ],
        "scheduler": scheduler.state_dict(),
        "selector_calls": selector.num_calls,
        "rng": rng,
        "world_size": eng.world_size,
        "config": dataclasses.asdict(cfg),
    }
    if eng.name == "deepspeed":
        eng.model.save_checkpoint(str(directory), tag=name, save_latest=False)
        dist.barrier()  # every rank's shard is on disk before the commit
    else:
        state["model"] = unwrap_model(eng.model).state_dict()
        state["optimizer"] = eng.optimizer.state_dict()
    if eng.rank == 0:
        atomic_torch_save(state, directory / f"{name}.pt")
        kept = {p.stem for p in committed_checkpoints(cfg)[-cfg.keep_checkpoints :]}
        for path in directory.iterdir():  # older checkpoints and uncommitted shard folders
            if path.name.split(".")[0] not in kept:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    if dist.is_initialized():
        dist.barrier()  # nobody runs ahead while the commit is being written


def load_checkpoint(
    path: Path,
    cfg: Config,
    eng: Engine,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    selector: HardExampleSelector,
) -> int:
    """Restore the state of :func:`save_checkpoint` on every rank; returns its step."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        step = state["step"]
    except Exception as exc:  # any unreadable file gets the same advice
        older = [p for p in committed_checkpoints(cfg) if p != path]
        fallback = f"resume={older[-1]}" if older else "resume=false"
        raise CheckpointError(
            f"checkpoint {path} is unreadable ({type(exc).__name__}: {exc}); it is truncated "
            f"or corrupt. Delete it, or start from another: {fallback}"
        ) from exc
    if state["world_size"] != eng.world_size:
        raise ConfigError(
            f"{path} was written by {state['world_size']} ranks, this run has "
            f"{eng.world_size}: the data order depends on it; resume with "
            f"{state['world_size']} ranks"
        )
    changed = [k for k, v in state["config"].items() if getattr(cfg, k, v) != v]
    changed = [k for k in changed if k not in HARMLESS_ON_RESUME]
    if changed:
        log.warning("resuming with changed config keys %s: not an exact continuation", changed)
    if eng.name == "deepspeed":
        loaded, _ = eng.model.load_checkpoint(
            str(path.parent), tag=path.stem, load_lr_scheduler_states=False
        )
        if loaded is None:
            raise CheckpointError(
                f"DeepSpeed could not load the shards {path.parent / path.stem} that {path} "
                f"commits; was that folder removed? Start from another checkpoint: "
                f"resume=<path> or resume=false"
            )
    else:
        unwrap_model(eng.model).load_state_dict(state["model"])
        eng.optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    selector.num_calls = state["selector_calls"]
    cpu_rng, cuda_rng = state["rng"][eng.rank]
    torch.set_rng_state(cpu_rng)
    if cuda_rng is not None:
        torch.cuda.set_rng_state(cuda_rng, eng.device)
    log.info("resumed from %s (step %d)", path, step)
    return step


def parameter_digest(module: nn.Module) -> str:
    """SHA-256 of every parameter's bytes: equal on all ranks when they agree exactly."""
    digest = hashlib.sha256()
    for parameter in module.parameters():
        digest.update(parameter.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The generators dropout draws from on this rank: CPU, and CUDA on a GPU."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


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


# ----------------------------------------------------------------------------- summary, plot


def read_metrics(jsonl: Path) -> tuple[list[dict], list[dict]]:
    """The train and the eval records of a metrics file."""
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    return [r for r in records if r["kind"] == "train"], [r for r in records if r["kind"] == "eval"]


def summarize(jsonl: Path, cfg: Config, task: Task, launcher: str, eng: Engine) -> dict:
    """``summary.json``: the run's shape, first and last eval, and training throughput.

    Throughput counts the forward/backward/optimizer time of the steps (the slowest
    rank's), not evaluation or checkpoints; over every launch of a resumed run.
    """
    train, evals = read_metrics(jsonl)
    train_s = sum(r["step_s_max"] for r in train)
    trained = sum(r["num_selected_global"] for r in train)
    return {
        "world_size": eng.world_size,
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
            "examples_per_s": cfg.batch_size * eng.world_size * len(train) / max(train_s, 1e-9),
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
    for key in evals[0] if evals else ():
        if key not in ("kind", "step", "loss"):
            style = "s-" if key == task.headline else "o-"
            ax_metric.plot(eval_steps, [r[key] for r in evals], style, ms=3, label=key)
    ax_metric.set(ylabel="test metric", ylim=(0, 1.02))
    hard_share = [r["hard_selected"] / max(r["num_selected_global"], 1) for r in train]
    batch_share = [r["hard_in_batch"] / max(r["num_valid_global"], 1) for r in train]
    ax_sel.plot(steps, hard_share, lw=0.6, label="hard groups' share of the selection")
    ax_sel.plot(steps, batch_share, lw=0.6, label="hard groups' share of the batch")
    ax_sel.set(ylabel="fraction", ylim=(0, 1.02))
    threshold = [r["threshold"] for r in train]
    if any(t is not None for t in threshold):
        ax_threshold = ax_sel.twinx()
        ax_threshold.plot(steps, threshold, "k", lw=0.5, alpha=0.5)
        ax_threshold.set(ylabel="threshold loss (black)", yscale="log")
    per_rank = list(zip(*(r["selected_per_rank"] for r in train), strict=True))
    for rank, counts in enumerate(per_rank):
        ax_rank.plot(steps, counts, lw=0.8, label=f"rank {rank}")
    mean_share = [r["num_selected_global"] / max(len(per_rank), 1) for r in train]
    ax_rank.plot(steps, mean_share, "k--", lw=0.8, label="M / W")
    ax_rank.set(xlabel="step", ylabel="selected examples")
    for ax in (ax_loss, ax_metric, ax_sel, ax_rank):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def run() -> int:
    """``main`` with errors a person can act on, no traceback spam, exit code 1.

    An error every rank raises alike (config, checkpoint, a selector's collective input
    check) is printed once, by rank 0. A failed collective differs per rank (the rank
    that waited timed out, the others lost their peer): each rank says what it saw.
    """
    rank = int(os.environ.get("RANK", "0"))
    try:
        main()
    except (ConfigError, CheckpointError, DistributedInputError) as exc:
        if rank == 0:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        else:  # a launcher stops every rank once one exits: let rank 0 print first
            time.sleep(2)
        return 1
    except RuntimeError as exc:
        hint = collective_failure_hint(str(exc))
        if hint is None:
            raise
        first_line = str(exc).strip().splitlines()[0]
        print(f"error on rank {rank}: {hint}\n  ({first_line})", file=sys.stderr, flush=True)
        return 1
    return 0


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


if __name__ == "__main__":
    sys.exit(run())
