"""Engines: which launcher started the process, the process group, and DDP, Accelerate
or DeepSpeed wrapped behind one small ``Engine`` (backward, step, close)."""

from __future__ import annotations

import datetime
import functools
import gc
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from launch.config import Config, ConfigError
from launch.data import examples_per_step


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


def engine_name(cfg: Config, launcher: str) -> str:
    """The engine of the run: ``cfg.engine``, or with "auto" the launcher's."""
    if cfg.engine != "auto":
        return cfg.engine
    if launcher == "deepspeed" or cfg.deepspeed_config:
        return "deepspeed"
    return "accelerate" if launcher == "accelerate" else "ddp"


def launcher_world_size() -> int:
    """The world size the launcher announces (``WORLD_SIZE``; 1 without a launcher), known
    before any process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup_engine(
    cfg: Config,
    launcher: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    load_universal: bool = False,
) -> Engine:
    """Join the process group the launcher describes (env vars) and wrap the model.

    ``load_universal``: DeepSpeed is to load a universal checkpoint (ZeRO shards of
    another world size, converted)."""
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    backend = "nccl" if use_cuda else "gloo"
    timeout = datetime.timedelta(seconds=cfg.timeout_s)
    engine = engine_name(cfg, launcher)
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
            model=model, optimizer=optimizer, config=deepspeed_settings(cfg, load_universal)
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
    without the prefix they would read the dead ranks' addresses and fail to connect.
    The world size is part of the prefix because an elastic job that grows restarts its
    workers without counting a restart."""
    store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(
        backend,
        store=dist.PrefixStore(f"attempt_{attempt}_of_{world_size}", store),
        rank=rank,
        world_size=world_size,
        timeout=timeout,
    )


def deepspeed_settings(cfg: Config, load_universal: bool = False) -> dict[str, object]:
    """The DeepSpeed config: ``cfg.deepspeed_config`` (or ``zero_stage``) plus the batch
    (and ``checkpoint.load_universal`` when asked).

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
    world_size = launcher_world_size()
    examples = examples_per_step(cfg, world_size)
    # DeepSpeed sizes only its own data loader (unused here) by these; with an uneven
    # global_batch_size the micro batch is the largest rank's share.
    micro_batch = -(-examples // world_size)
    required = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch * world_size,
    }
    for key, value in required.items():
        if settings.setdefault(key, value) != value:
            raise ConfigError(
                f"{cfg.deepspeed_config} sets {key}={settings[key]}, but {examples} examples "
                f"a step on {world_size} ranks need {value}; remove the key"
            )
    if load_universal:
        settings["checkpoint"] = {**settings.get("checkpoint", {}), "load_universal": True}
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
