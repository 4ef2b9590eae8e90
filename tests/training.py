"""Running launch/train.py under real launchers in tests: commands, waiting, reading runs.

Each run is a launcher subprocess with 2 CPU ranks, a free port and a timeout: a hang
fails the test, and the launcher and every rank below it are killed.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from launch.engines import free_port
from tests.launching import BIN, REPO, child_env, kill_tree, launcher_command

#: A short run: 8 steps of 2 x 64 examples, evaluations and checkpoints every 3.
SMALL = ["batch_size=64", "log_every=1", "max_steps=8", "eval_every=3", "checkpoint_every=3"]
#: The reference runs that resumed runs must repeat: long enough to interrupt by a signal.
#: scope=random makes the selector's call counter part of the state; balance moves data.
LONG_STEPS, LONG_EVERY = 60, 20
LONG = ["batch_size=64", f"max_steps={LONG_STEPS}"]
LONG += [f"eval_every={LONG_EVERY}", f"checkpoint_every={LONG_EVERY}"]
LONG += ["scope=random", "balance=true", "plot=false"]
ZERO1 = ["--config", "configs/deepspeed.yaml", "--deepspeed_config", "configs/deepspeed/zero1.json"]
ENGINE_ARGS = {"torchrun": [], "deepspeed": ZERO1}
#: The first DeepSpeed run on a machine may compile its CPU comm op (then cached).
TIMEOUT_S = {"python": 60, "torchrun": 90, "accelerate": 120, "deepspeed": 300}


def train_command(
    launcher: str, launcher_args: tuple[str, ...] = (), world_size: int = 2
) -> list[str]:
    """argv that starts train.py on ``world_size`` CPU ranks: a launch/*.sh wrapper (its
    ranks come from the environment), ``accelerate`` with the shipped
    configs/accelerate/multi_gpu.yaml, or a launcher of tests/launching.py."""
    if launcher.endswith(".sh"):
        return ["bash", str(REPO / "launch" / launcher)]
    if launcher == "accelerate":
        return [
            str(BIN / "accelerate"), "launch",
            "--config_file", str(REPO / "configs" / "accelerate" / "multi_gpu.yaml"),
            "--num_processes", str(world_size), "--main_process_port", str(free_port()),
            str(REPO / "launch" / "train.py"),
        ]  # fmt: skip
    command = launcher_command(launcher, world_size)
    return [*command, *launcher_args, str(REPO / "launch" / "train.py")]


@dataclass
class Launch:
    """A started run: the launcher process and the file its output goes to."""

    launcher: str
    proc: subprocess.Popen
    log: Path

    def output(self) -> str:
        """Everything the launcher and its ranks printed so far."""
        return self.log.read_text(errors="replace")


@contextmanager
def running(
    launcher: str,
    run_dir: Path,
    *args: str,
    env: dict[str, str] | None = None,
    launcher_args: tuple[str, ...] = (),
    world_size: int = 2,
) -> Iterator[Launch]:
    """train.py under ``launcher`` (plus ``launcher_args``) on ``world_size`` ranks with
    train ``args`` and ``env``; it and its ranks are killed if still running at exit.

    The output goes to a file, not a pipe: a rank left behind cannot block the test.
    """
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    fd, log = tempfile.mkstemp(dir=run_dir.parent, prefix=f"{launcher}-", suffix=".log")
    with os.fdopen(fd, "w") as log_file:
        proc = subprocess.Popen(
            [*train_command(launcher, launcher_args, world_size), *args, f"run_dir={run_dir}"],
            cwd=REPO,
            env={**child_env(), "NPROC": "2", **(env or {})},
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # signals to the test's group do not reach it
        )
    try:
        yield Launch(launcher, proc, Path(log))
    finally:
        kill_tree(proc.pid)
        proc.wait()


def finish(launch: Launch, expect_ok: bool = True) -> str:
    """Wait for a run (failing on a timeout); returns its output."""
    try:
        launch.proc.wait(timeout=TIMEOUT_S[launch.launcher.removesuffix(".sh")])
    except subprocess.TimeoutExpired:
        kill_tree(launch.proc.pid)
        pytest.fail(f"{launch.launcher} timed out:\n{launch.output()[-4000:]}")
    output, code = launch.output(), launch.proc.returncode
    if expect_ok:
        assert code == 0, f"{launch.launcher} exited {code}:\n{output[-4000:]}"
    else:
        assert code != 0, output[-4000:]
    return output


def train(launcher: str, run_dir: Path, *args: str, expect_ok: bool = True, **kwargs) -> str:
    """Run train.py under ``launcher`` to the end (``kwargs`` as :func:`running`); returns
    its combined output."""
    with running(launcher, run_dir, *args, **kwargs) as launch:
        return finish(launch, expect_ok)


def check_one_error_from_rank_0(output: str, message: str) -> None:
    """A torchrun job that stopped on an error all ranks raise alike: the message printed
    once, no traceback from train.py, rank 0 exited 1 as the root cause."""
    assert output.count(message) == 1, output
    assert 'launch/train.py", line' not in output
    assert "rank      : 0 (local_rank: 0)\n  exitcode  : 1" in output.split("Root Cause")[1]


def read_run(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """The train and eval records of a run, checked for completeness: one train line per
    step from 1, an eval line before step 1."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["kind"] == "train"]
    eval_records = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in train_records] == list(range(1, len(train_records) + 1))
    assert eval_records[0]["step"] == 0
    return train_records, eval_records


def check_run(run_dir: Path, launcher: str, steps: int = 8, every: int = 3) -> list[dict]:
    """What every finished run must have: summary with the real world size, ranks in
    agreement, one finite line per step, evals on schedule, checkpoints, the plot."""
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["world_size"], summary["launcher"], summary["steps"]) == (2, launcher, steps)
    assert len(set(summary["parameter_sha256_per_rank"])) == 1, "ranks disagree"
    assert summary["final_eval"]["step"] == steps
    records, evals = read_run(run_dir)
    assert len(records) == steps
    for record in records:
        assert math.isfinite(record["loss"])
        assert len(record["selected_per_rank"]) == 2
        assert sum(record["selected_per_rank"]) == record["num_selected_global"]
        assert record["phase_s"]["optimizer"] >= 0
    assert [r["step"] for r in evals] == sorted({0, *range(every, steps + 1, every), steps})
    assert all(0 <= r["ap"] <= 1 and math.isfinite(r["loss"]) for r in evals)
    assert (run_dir / "checkpoints" / f"step_{steps:08d}.pt").is_file()
    if summary["config"]["plot"]:
        assert (run_dir / "metrics.png").stat().st_size > 0
    return records


def comparable(records: list[dict]) -> list[tuple]:
    """What must repeat exactly: the loss and the selection of every step."""
    keys = ("step", "loss", "num_selected_global", "selected_per_rank", "trained_per_rank")
    keys += ("hard_selected",)
    return [tuple(r[k] for k in keys) for r in records]
