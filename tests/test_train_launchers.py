"""launch/train.py under the real launchers: torchrun, accelerate launch, deepspeed.

Each run is a launcher subprocess with 2 CPU ranks, a free port and a timeout: a hang
fails the test, and the launcher and every rank below it are killed. Run outputs go to
pytest's tmp dirs. Every run checks the world size it really got (summary.json) and that
all ranks ended with bit-identical parameters.
"""

from __future__ import annotations

import dataclasses
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

from launch.train import Config, ConfigError, free_port, parse_args, read_config_file
from tests.launching import REPO, child_env, kill_tree, launcher_command

#: A short run: 8 steps of 2 x 64 examples, evaluations and checkpoints every 3.
SMALL = ["batch_size=64", "log_every=1", "max_steps=8", "eval_every=3", "checkpoint_every=3"]
#: The reference runs that resumed runs must repeat: long enough to interrupt by a signal.
#: scope=random makes the selector's call counter part of the state; balance moves data.
LONG = ["batch_size=64", "max_steps=120", "eval_every=40", "checkpoint_every=40"]
LONG += ["scope=random", "balance=true", "plot=false"]
ZERO1 = ["--config", "configs/deepspeed.yaml", "--deepspeed_config", "configs/deepspeed/zero1.json"]
ENGINE_ARGS = {"torchrun": [], "deepspeed": ZERO1}
#: The first DeepSpeed run on a machine may compile its CPU comm op (then cached).
TIMEOUT_S = {"python": 60, "torchrun": 90, "accelerate": 120, "deepspeed": 300}


def train_command(launcher: str) -> list[str]:
    """argv that starts train.py on 2 CPU ranks: a launch/*.sh wrapper, ``accelerate`` with
    the shipped configs/accelerate/multi_gpu.yaml, or a launcher of tests/launching.py."""
    if launcher.endswith(".sh"):
        return ["bash", str(REPO / "launch" / launcher)]
    if launcher == "accelerate":
        return [
            *launcher_command("accelerate")[:2],  # accelerate launch
            "--config_file", str(REPO / "configs" / "accelerate" / "multi_gpu.yaml"),
            "--num_processes", "2", "--main_process_port", str(free_port()),
            str(REPO / "launch" / "train.py"),
        ]  # fmt: skip
    return [*launcher_command(launcher), str(REPO / "launch" / "train.py")]


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
def running(launcher: str, run_dir: Path, *args: str, env: dict | None = None) -> Iterator[Launch]:
    """train.py under ``launcher``; it and its ranks are killed if still running at exit.

    The output goes to a file, not a pipe: a rank left behind cannot block the test.
    """
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    fd, log = tempfile.mkstemp(dir=run_dir.parent, prefix=f"{launcher}-", suffix=".log")
    with os.fdopen(fd, "w") as log_file:
        proc = subprocess.Popen(
            [*train_command(launcher), *args, f"run_dir={run_dir}"],
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


def train(launcher: str, run_dir: Path, *args: str, expect_ok: bool = True) -> str:
    """Run train.py under ``launcher`` to the end; returns its combined output."""
    with running(launcher, run_dir, *args) as launch:
        return finish(launch, expect_ok)


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


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Uninterrupted LONG runs: DDP under torchrun and DeepSpeed ZeRO-1 (deepspeed launcher)."""
    runs = {}
    for launcher, engine_args in ENGINE_ARGS.items():
        runs[launcher] = tmp_path_factory.mktemp(launcher) / "full"
        train(launcher, runs[launcher], *engine_args, *LONG)
    return runs


def test_torchrun_two_pass(reference_runs: dict[str, Path]) -> None:
    records = check_run(reference_runs["torchrun"], "torchrun", steps=120, every=40)
    assert {r["scope"] for r in records} == {"random"}
    assert all(sum(r["trained_per_rank"]) == r["num_selected_global"] for r in records)


def test_torchrun_mask_mode(tmp_path: Path) -> None:
    train("torchrun", tmp_path / "mask", "--config", "configs/mask.yaml", *SMALL)
    records = check_run(tmp_path / "mask", "torchrun")
    assert all(
        set(r["phase_s"]) == {"forward", "selection", "backward", "optimizer"} for r in records
    )
    assert all(r["num_selected_global"] == math.ceil(0.25 * r["num_valid_global"]) for r in records)


def test_deepspeed_launcher_zero1(reference_runs: dict[str, Path]) -> None:
    records = check_run(reference_runs["deepspeed"], "deepspeed", steps=120, every=40)
    summary = json.loads((reference_runs["deepspeed"] / "summary.json").read_text())
    assert summary["engine"] == "deepspeed"
    assert summary["config"]["deepspeed_config"] == "configs/deepspeed/zero1.json"
    # balance: every rank trains floor or ceil of M / W.
    assert all(max(r["trained_per_rank"]) - min(r["trained_per_rank"]) <= 1 for r in records)


def test_deepspeed_zero1_trains_exactly_like_ddp(reference_runs: dict[str, Path]) -> None:
    ddp, _ = read_run(reference_runs["torchrun"])
    deepspeed, _ = read_run(reference_runs["deepspeed"])
    assert comparable(deepspeed) == comparable(ddp)


def test_deepspeed_wrapper_zero2(tmp_path: Path) -> None:
    """launch/deepspeed.sh (the deepspeed launcher, free port) with configs/deepspeed.yaml,
    whose deepspeed_config is zero2.json; a ZeRO-2 shard folder is part of the checkpoint."""
    train("deepspeed.sh", tmp_path / "zero2", "--config", "configs/deepspeed.yaml", *SMALL)
    check_run(tmp_path / "zero2", "deepspeed")
    summary = json.loads((tmp_path / "zero2" / "summary.json").read_text())
    assert summary["config"]["deepspeed_config"] == "configs/deepspeed/zero2.json"
    assert (tmp_path / "zero2" / "checkpoints" / "step_00000008").is_dir()


def test_accelerate_launch_with_the_shipped_config_file(tmp_path: Path) -> None:
    train("accelerate", tmp_path / "acc", "--config", "configs/accelerate.yaml", *SMALL)
    records = check_run(tmp_path / "acc", "accelerate")
    assert all(r["strategy"] == "gather" for r in records)


def test_plain_python_single_process(tmp_path: Path) -> None:
    train("python", tmp_path / "single", *SMALL)
    summary = json.loads((tmp_path / "single" / "summary.json").read_text())
    assert (summary["world_size"], summary["launcher"], summary["steps"]) == (1, "python", 8)


def test_ctrl_c_stops_after_a_finished_step_and_resume_repeats_it(
    tmp_path: Path, reference_runs: dict[str, Path]
) -> None:
    """Ctrl-C (SIGINT to torchrun, which passes SIGTERM to the ranks): every rank finishes
    its step, checkpoints and exits; resume=auto then repeats the uninterrupted run."""
    run_dir = tmp_path / "full"
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + TIMEOUT_S["torchrun"]
    with running("torchrun", run_dir, *LONG) as launch:
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 20):
            assert launch.proc.poll() is None, "the run ended before step 20"
            assert time.monotonic() < deadline, "no step 20 before the timeout"
            time.sleep(0.05)
        launch.proc.send_signal(signal.SIGINT)
        output = finish(launch, expect_ok=False)  # torchrun exits 1 on a signal
    stopped, _ = read_run(run_dir)
    assert len(stopped) < 120, "the run finished before the signal arrived"
    assert f"stopped by a signal after step {len(stopped)}" in output
    train("torchrun", run_dir, *LONG, "resume=auto")
    resumed, _ = read_run(run_dir)
    uninterrupted, _ = read_run(reference_runs["torchrun"])
    assert comparable(resumed) == comparable(uninterrupted)


def test_deepspeed_resume_drops_unsaved_steps_and_repeats_them(
    tmp_path: Path, reference_runs: dict[str, Path]
) -> None:
    """Stop after step 100 (checkpoints at 40, 80, 100); a later line was logged but never
    checkpointed (as in a crash); resume=true replaces it and repeats the uninterrupted
    run. Only the newest two checkpoints are kept."""
    run_dir = tmp_path / "full"
    train("deepspeed", run_dir, *ZERO1, *LONG, "stop_at=100")
    kept = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert kept == ["step_00000080", "step_00000080.pt", "step_00000100", "step_00000100.pt"]
    with (run_dir / "metrics.jsonl").open("a") as file:
        file.write(json.dumps({"kind": "train", "step": 101, "loss": -1.0}) + "\n")
    train("deepspeed", run_dir, *ZERO1, *LONG, "resume=true")
    resumed, _ = read_run(run_dir)
    uninterrupted, _ = read_run(reference_runs["deepspeed"])
    assert comparable(resumed) == comparable(uninterrupted)


def test_default_yaml_is_the_default_config() -> None:
    """`launch/train.py` with no arguments runs what configs/default.yaml says."""
    file_values = read_config_file(REPO / "configs" / "default.yaml")
    assert dataclasses.replace(Config(), **file_values) == Config()


def test_every_config_file_parses_and_names_its_command() -> None:
    for path in sorted((REPO / "configs").rglob("*.*")):
        first_line = path.read_text().splitlines()[0]
        assert first_line.startswith("# ") and "launch/train.py" in first_line, path
        if path.suffix == ".yaml" and path.parent.name == "configs":
            parse_args(["--config", str(path)])


def test_config_errors_name_the_fix(tmp_path: Path) -> None:
    for args, message in (
        (["lrr=0.1"], "unknown config key 'lrr' in override 'lrr=0.1' (did you mean 'lr'?)"),
        (["keep=lots"], "keep must be of type float (like 0.25), got 'lots'"),
        (["scope=globl"], "scope must be one of"),
        (["max_steps"], "overrides look like key=value"),
        (["mode=mask", "balance=true"], "balance=true needs mode=two_pass"),
        (["--config", "configs/missing.yaml"], "configs/missing.yaml not found"),
        (["resume=true"], "holds no checkpoint"),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)):
            parse_args([f"run_dir={tmp_path}", *args])
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("max_steps: many\n")
    with pytest.raises(
        ConfigError,
        match=re.escape(f"max_steps must be of type int (like 600), got 'many' in {bad_yaml}"),
    ):
        parse_args(["--config", str(bad_yaml)])
