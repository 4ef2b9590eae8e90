"""Checkpoints: atomic saves, which checkpoint ``resume`` picks, whether it continues the
run (also at another world size), restoring it on every rank (``CheckpointError``)."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from dist_ohem import HardExampleSelector
from dist_ohem.step import unwrap_model
from launch.config import HARMLESS_ON_RESUME, Config, ConfigError
from launch.data import data_position
from launch.engines import Engine, all_reduce_sum
from launch.tasks import Task

log = logging.getLogger("train")


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


def read_checkpoint(path: Path, cfg: Config) -> dict:
    """The trainer state that :func:`save_checkpoint` wrote to ``path``."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if "step" not in state:
            raise KeyError("it holds no 'step'")
    except Exception as exc:  # any unreadable file gets the same advice
        older = [p for p in committed_checkpoints(cfg) if p != path]
        fallback = f"resume={older[-1]}" if older else "resume=false"
        raise CheckpointError(
            f"checkpoint {path} is unreadable ({type(exc).__name__}: {exc}); it is truncated "
            f"or corrupt. Delete it, or start from another: {fallback}"
        ) from exc
    return state


def check_resumable(path: Path, state: dict, cfg: Config, world_size: int) -> None:
    """Raise unless ``state`` (read from ``path``) continues the training of ``cfg`` on
    ``world_size`` ranks of ``engine``; warn when config keys changed.

    At the world size that wrote it, any checkpoint does. At another, only when the
    global batch of every step is the same at both sizes (``global_batch_size``, equal in
    both runs). DDP and Accelerate save whole copies of model and optimizer, DeepSpeed
    ZeRO-0 too; ZeRO shards are converted (:func:`convert_to_universal`). Called before
    any process group exists, so that every rank fails alike and at once.
    """
    changed = [k for k, v in state["config"].items() if getattr(cfg, k, v) != v]
    changed = [k for k in changed if k not in HARMLESS_ON_RESUME]
    if changed:
        log.warning("resuming with changed config keys %s: not an exact continuation", changed)
    written = state["world_size"]
    if written == world_size:
        return
    if not cfg.global_batch_size:
        raise ConfigError(
            f"{path} was written by {written} ranks, this run has {world_size}: with "
            f"batch_size (per rank) the examples of a step depend on the world size. Resume "
            f"with {written} ranks, or train with global_batch_size=N instead of batch_size "
            "(N examples a step over all ranks, the same at any world size); such a run "
            "resumes at any world size"
        )
    before = state["config"].get("global_batch_size", 0)
    if before != cfg.global_batch_size:
        then = f"global_batch_size={before}" if before else "batch_size (per rank)"
        raise ConfigError(
            f"{path} was written by {written} ranks with {then}; resuming at {world_size} "
            f"ranks with global_batch_size={cfg.global_batch_size} would change the examples "
            f"of every step. Resume with {written} ranks"
            + (f", or with global_batch_size={before}" if before else "")
        )


def restore_checkpoint(
    path: Path,
    state: dict,
    cfg: Config,
    eng: Engine,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    selector: HardExampleSelector,
) -> int:
    """Restore ``state`` (read from ``path``, checked by :func:`check_resumable`) on every
    rank; returns its step.

    At another world size each rank's random stream (dropout) is derived anew from
    (seed, step, rank): the saved streams were other ranks'.
    """
    step = state["step"]
    resized = state["world_size"] != eng.world_size
    if eng.name == "deepspeed":
        tag = path.stem
        if resized and has_zero_shards(path):
            tag = convert_to_universal(path, eng)
        loaded, _ = eng.model.load_checkpoint(
            str(path.parent), tag=tag, load_lr_scheduler_states=False
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
    if resized:
        torch.manual_seed(rank_stream_seed(cfg.seed, step, eng.rank))
    else:
        cpu_rng, cuda_rng = state["rng"][eng.rank]
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, eng.device)
    resize_note = f", written by {state['world_size']} ranks" if resized else ""
    log.info("resumed from %s (step %d)%s", path, step, resize_note)
    return step


def has_zero_shards(path: Path) -> bool:
    """Whether the DeepSpeed checkpoint that ``path`` commits splits its optimizer state
    into one shard per rank (ZeRO stage >= 1; stage 0 saves it whole)."""
    return any((path.parent / path.stem).glob("*optim_states.pt"))


def needs_universal_load(state: dict, path: Path, engine: str, world_size: int) -> bool:
    """Whether resuming ``state`` (of ``path``) goes through DeepSpeed's universal
    checkpoint: ZeRO shards written by another number of ranks."""
    resized = state["world_size"] != world_size
    return engine == "deepspeed" and resized and has_zero_shards(path)


def convert_to_universal(path: Path, eng: Engine) -> str:
    """Rank 0 converts the ZeRO shards of ``path`` into DeepSpeed's universal checkpoint
    (one file per parameter and optimizer state, loadable at any world size) with
    ``deepspeed.checkpoint.ds_to_universal``; returns its tag (folder name). Every rank
    raises the same ``CheckpointError`` when the conversion fails."""
    tag = f"{path.stem}.universal"  # removed with its checkpoint (save_checkpoint)
    error = ""
    if eng.rank == 0:
        shutil.rmtree(path.parent / tag, ignore_errors=True)
        command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal"]
        command += ["--input_folder", str(path.parent / path.stem)]
        command += ["--output_folder", str(path.parent / tag), "--inject_missing_state"]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            error = (done.stdout + done.stderr).strip()[-2000:] or f"exit {done.returncode}"
    failed = all_reduce_sum(torch.tensor([float(bool(error))]), eng.device)[0]
    if failed:
        raise CheckpointError(
            f"{path} holds ZeRO shards of another world size, and DeepSpeed's conversion to "
            f"a universal checkpoint failed ({error or 'see rank 0'}). Resume with the world "
            "size that wrote it, or train with ZeRO stage 0 (configs/deepspeed/zero0.json), "
            "whose checkpoints load at any world size"
        )
    return tag


def rank_stream_seed(seed: int, step: int, rank: int) -> int:
    """The seed of ``rank``'s own random stream (dropout) from ``step`` on: at the start
    (step 0) and after a resume at another world size."""
    return seed + 1 + rank + 1_000_003 * step


def rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The generators dropout draws from on this rank: CPU, and CUDA on a GPU."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda
