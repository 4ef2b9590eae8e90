"""Helpers shared by the tests that start real launchers (torchrun, accelerate, deepspeed)."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import psutil  # a dependency of accelerate and of deepspeed, the launchers tested

from launch.train import free_port

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def launcher_command(launcher: str, world_size: int = 2) -> list[str]:
    """The argv prefix that starts ``world_size`` CPU ranks of a script under ``launcher``
    (``"python"``: one plain process), on a port that was free a moment ago."""
    port = str(free_port())
    ranks = str(world_size)
    return {
        "python": [sys.executable],
        "torchrun": [str(BIN / "torchrun"), f"--nproc_per_node={ranks}", "--master_port", port],
        "accelerate": [
            str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", ranks,
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", port,
        ],
        "deepspeed": [str(BIN / "deepspeed"), "--num_accelerators", ranks, "--master_port", port],
    }[launcher]  # fmt: skip


def child_env() -> dict[str, str]:
    """The environment of a launched run: CPU everywhere, one thread a rank, the repo
    importable, unbuffered output."""
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "ACCELERATE_USE_CPU": "1",
        "DS_ACCELERATOR": "cpu",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }


def kill_tree(pid: int) -> None:
    """SIGKILL a launcher and every process below it: torchrun and Accelerate start the
    ranks in sessions of their own, out of reach of a process-group kill."""
    with contextlib.suppress(psutil.NoSuchProcess):
        launcher = psutil.Process(pid)
        for process in [*launcher.children(recursive=True), launcher]:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
