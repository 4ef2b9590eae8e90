"""Helpers shared by the tests that start real launchers (torchrun, accelerate, deepspeed)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import psutil  # a dependency of accelerate and of deepspeed, the launchers tested
import pytest

from launch.engines import free_port

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

#: A launch takes ~7 s (Accelerate) or ~12 s (DeepSpeed) on 2 cores; kill it long before
#: pytest-timeout's 300 s so that the failure shows the launcher's output.
LAUNCH_TIMEOUT_S = 180
#: Launcher output shown on failure (DeepSpeed is verbose): the last this many characters.
OUTPUT_TAIL = 20000


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


def launch(what: str, command: list[str], out: Path) -> dict:
    """Run a launcher to completion; return the JSON that its rank 0 wrote to ``out``.

    Fails the test, with the launcher's output, on a non-zero exit, a missing result or a
    timeout. On a timeout the launcher and every process below it are killed: the ranks
    run in sessions of their own (torch elastic starts them so), out of reach of a
    process-group kill. The output goes to a file, not a pipe, so that nothing left
    holding it can block the test.
    """
    log_path = out.with_suffix(".log")
    with (
        open(log_path, "w") as log,
        subprocess.Popen(
            [*command, "--out", str(out)], cwd=REPO, env=child_env(), stdout=log, stderr=log
        ) as proc,
    ):
        try:
            proc.wait(timeout=LAUNCH_TIMEOUT_S)
            problem = None
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)
            proc.wait()
            problem = f"did not finish within {LAUNCH_TIMEOUT_S} s and was killed"
    if problem is None and (proc.returncode != 0 or not out.exists()):
        problem = f"exited with code {proc.returncode} (result written: {out.exists()})"
    if problem is not None:
        pytest.fail(f"{what} {problem}; its output:\n{log_path.read_text()[-OUTPUT_TAIL:]}")
    return json.loads(out.read_text())


def run_example(name: str, args: list[str], out: Path) -> dict:
    """Run ``examples/<name>`` under torchrun on 2 CPU ranks with ``args``; rank 0's JSON.

    First checks that the script's first line is the documented command that runs it.
    """
    script = REPO / "examples" / name
    assert script.read_text().splitlines()[0] == (
        f"# OMP_NUM_THREADS=1 torchrun --nproc_per_node=2 examples/{name}"
    )
    command = [*launcher_command("torchrun", 2), str(script), *args]
    return launch(f"torchrun examples/{name} {' '.join(args)}", command, out)
