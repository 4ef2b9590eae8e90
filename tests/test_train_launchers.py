"""launch/train.py under the real launchers: torchrun, accelerate launch, deepspeed.

Each run is a launcher subprocess with 2 CPU ranks, a free port and a timeout: a hang
fails the test, and the launcher and every rank below it are killed. Run outputs go to
pytest's tmp dirs.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from launch.train import ConfigError, parse_args
from tests.launching import REPO, child_env, kill_tree, launcher_command

TRAIN = str(REPO / "launch" / "train.py")
#: A small task: 2 x 64 examples a step, a log line every step.
TASK = ["--batch_size=64", "--num_train=2048", "--num_test=256", "--num_test_hard=64"]
TASK += ["--log_interval=1"]
#: A short run: 8 steps, evaluations and checkpoints every 3.
SMALL = [*TASK, "--max_steps=8", "--eval_interval=3", "--ckpt_interval=3"]
#: The reference runs that resumed runs must repeat: long enough to interrupt by a signal.
#: scope=random and dropout make the selector's call counter and the RNG states matter.
LONG = [*TASK, "--max_steps=200", "--eval_interval=50", "--ckpt_interval=50"]
LONG += ["--scope=random", "--dropout=0.1", "--balance"]
ENGINE_ARGS = {"torchrun": [], "deepspeed": ["--config", "configs/deepspeed.toml"]}
#: The first DeepSpeed run on a machine compiles its CPU comm op (35-80 s, then cached).
TIMEOUT_S = {"python": 60, "torchrun": 90, "accelerate": 120, "deepspeed": 300}


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
def running(launcher: str, out_dir: Path, *args: str) -> Iterator[Launch]:
    """train.py under ``launcher``; it and its ranks are killed if still running at exit.

    The output goes to a file, not a pipe: a rank left behind cannot block the test.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, log = tempfile.mkstemp(dir=out_dir, prefix=f"{launcher}-", suffix=".log")
    with os.fdopen(fd, "w") as log_file:
        proc = subprocess.Popen(
            [*launcher_command(launcher), TRAIN, f"--out_dir={out_dir}", *args],
            cwd=REPO,
            env=child_env(),
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
        launch.proc.wait(timeout=TIMEOUT_S[launch.launcher])
    except subprocess.TimeoutExpired:
        kill_tree(launch.proc.pid)
        pytest.fail(f"{launch.launcher} timed out:\n{launch.output()[-4000:]}")
    output, code = launch.output(), launch.proc.returncode
    if expect_ok:
        assert code == 0, f"{launch.launcher} exited {code}:\n{output[-4000:]}"
    else:
        assert code != 0, output[-4000:]
    return output


def train(launcher: str, out_dir: Path, *args: str, expect_ok: bool = True) -> str:
    """Run train.py under ``launcher`` to the end; returns its combined output."""
    with running(launcher, out_dir, *args) as launch:
        return finish(launch, expect_ok)


def read_run(run_dir: Path) -> tuple[dict, list[dict]]:
    """``run.json`` and the JSONL records of a finished run, checked for completeness."""
    info = json.loads((run_dir / "run.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, len(records) + 1))
    return info, records


def check_smoke(run_dir: Path, world_size: int, steps: int = 8, every: int = 3) -> list[dict]:
    """The outputs every run must have: W recorded, one finite line per step, the plot."""
    info, records = read_run(run_dir)
    assert info["world_size"] == world_size
    assert len(records) == steps
    assert (run_dir / "metrics.png").stat().st_size > 0
    for record in records:
        assert math.isfinite(record["loss"])
        assert len(record["selected_per_rank"]) == world_size
        assert sum(record["selected_per_rank"]) == record["M"]
    evaluated = [r for r in records if "test_acc" in r]
    assert [r["step"] for r in evaluated] == sorted({*range(every, steps + 1, every), steps})
    assert all(0 <= r["test_acc"] <= 1 and 0 <= r["hard_acc"] <= 1 for r in evaluated)
    return records


def comparable(records: list[dict]) -> list[tuple]:
    """What must repeat exactly: the loss and the selection of every step."""
    keys = ("step", "loss", "M", "selected_per_rank", "trained_per_rank", "hard_selected")
    return [tuple(r[k] for k in keys) for r in records]


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Uninterrupted LONG runs: DDP under torchrun and DeepSpeed ZeRO-1 (deepspeed.toml)."""
    runs = {}
    for launcher, engine_args in ENGINE_ARGS.items():
        out = tmp_path_factory.mktemp(launcher)
        train(launcher, out, *engine_args, "--name=full", *LONG)
        runs[launcher] = out / "full"
    return runs


def test_torchrun_ddp(reference_runs: dict[str, Path]) -> None:
    records = check_smoke(reference_runs["torchrun"], world_size=2, steps=200, every=50)
    assert {r["scope"] for r in records} == {"random"}
    assert all(sum(r["trained_per_rank"]) == r["M"] for r in records)


def test_deepspeed_launcher(reference_runs: dict[str, Path]) -> None:
    records = check_smoke(reference_runs["deepspeed"], world_size=2, steps=200, every=50)
    info, _ = read_run(reference_runs["deepspeed"])
    assert info["config"]["engine"] == "deepspeed" and info["config"]["zero_stage"] == 1
    # balance: every rank trains floor or ceil of M / W.
    assert all(max(r["trained_per_rank"]) - min(r["trained_per_rank"]) <= 1 for r in records)


def test_deepspeed_zero1_trains_exactly_like_ddp(reference_runs: dict[str, Path]) -> None:
    _, ddp = read_run(reference_runs["torchrun"])
    _, deepspeed = read_run(reference_runs["deepspeed"])
    assert comparable(deepspeed) == comparable(ddp)


def test_accelerate_launch(tmp_path: Path) -> None:
    train("accelerate", tmp_path, "--config", "configs/accelerate.toml", *SMALL)
    records = check_smoke(tmp_path / "accelerate", world_size=2)
    assert all(r["M"] == math.ceil(0.25 * r["K"]) and r["strategy"] == "gather" for r in records)


def test_plain_python_single_process(tmp_path: Path) -> None:
    train("python", tmp_path, "--name=single", *SMALL)
    check_smoke(tmp_path / "single", world_size=1)


def test_ctrl_c_stops_after_a_finished_step_and_resume_repeats_it(
    tmp_path: Path, reference_runs: dict[str, Path]
) -> None:
    """Ctrl-C (SIGINT to torchrun, which passes SIGTERM to the ranks): every rank finishes
    its step, checkpoints and exits; --resume then repeats the uninterrupted run."""
    args = ["--name=full", *LONG]
    metrics = tmp_path / "full" / "metrics.jsonl"
    deadline = time.monotonic() + TIMEOUT_S["torchrun"]
    with running("torchrun", tmp_path, *args) as launch:
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 20):
            assert launch.proc.poll() is None, "the run ended before step 20"
            assert time.monotonic() < deadline, "no step 20 before the timeout"
            time.sleep(0.05)
        launch.proc.send_signal(signal.SIGINT)
        output = finish(launch, expect_ok=False)  # torchrun exits 1 on a signal
    _, stopped = read_run(tmp_path / "full")
    assert len(stopped) < 200, "the run finished before the signal arrived"
    assert f"stopped by a signal after step {len(stopped)}" in output
    train("torchrun", tmp_path, *args, "--resume")
    _, resumed = read_run(tmp_path / "full")
    _, uninterrupted = read_run(reference_runs["torchrun"])
    assert comparable(resumed) == comparable(uninterrupted)


def test_deepspeed_resume_drops_unsaved_steps_and_repeats_them(
    tmp_path: Path, reference_runs: dict[str, Path]
) -> None:
    """Stop after step 120 (checkpoints at 50, 100, 120); a later line was logged but never
    checkpointed (as in a crash); --resume replaces it and repeats the uninterrupted run."""
    args = [*ENGINE_ARGS["deepspeed"], "--name=full", *LONG]
    train("deepspeed", tmp_path, *args, "--stop_at=120")
    metrics = tmp_path / "full" / "metrics.jsonl"
    assert len(metrics.read_text().splitlines()) == 120
    with metrics.open("a") as file:
        file.write(json.dumps({"step": 121, "loss": -1.0}) + "\n")
    train("deepspeed", tmp_path, *args, "--resume")
    _, resumed = read_run(tmp_path / "full")
    _, uninterrupted = read_run(reference_runs["deepspeed"])
    assert comparable(resumed) == comparable(uninterrupted)


def test_config_errors_name_the_fix(tmp_path: Path) -> None:
    output = train("python", tmp_path, "--lrr=0.1", expect_ok=False)
    assert "config error: unknown config key 'lrr'" in output and "did you mean 'lr'" in output
    assert "valid keys: name, out_dir" in output and "Traceback" not in output
    for args, message in (
        (["--keep=lots"], "keep must be of type float"),
        (["--scope=globl"], "scope must be one of"),
        (["--mode=mask", "--balance"], "balance=true needs mode='two_pass'"),
        (["--config", "configs/missing.toml"], "configs/missing.toml not found"),
        (["--resume"], "no checkpoint at"),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)):
            parse_args([f"--out_dir={tmp_path}", *args])
