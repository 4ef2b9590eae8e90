"""Helpers shared by the tests that start real launchers (torchrun, accelerate, deepspeed)."""

from __future__ import annotations

import contextlib

import psutil  # a dependency of accelerate and of deepspeed, the launchers tested


def kill_tree(pid: int) -> None:
    """SIGKILL a launcher and every process below it: torchrun and Accelerate start the
    ranks in sessions of their own, out of reach of a process-group kill."""
    with contextlib.suppress(psutil.NoSuchProcess):
        launcher = psutil.Process(pid)
        for process in [*launcher.children(recursive=True), launcher]:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
