"""The fault matrix of launch/train.py: each fault ends cleanly or is survived, never hangs.

A killed worker under ``torchrun --max-restarts``, two "nodes" on loopback, a rank that
stalls past the process-group timeout, a corrupt checkpoint, a bad config: each run has
a timeout (tests/training.py) and kills its processes at the end.
"""

from __future__ import annotations

import json
import pickle
import re
import signal
import time
from pathlib import Path

import psutil
import pytest
import torch

from launch.checkpoints import atomic_torch_save
from launch.engines import free_port
from tests.training import (
    LONG,
    SMALL,
    check_one_error_from_rank_0,
    comparable,
    finish,
    read_run,
    running,
    train,
)


def wait_for_steps(run_dir: Path, steps: int, launches: list, timeout_s: float = 60) -> None:
    """Wait until ``metrics.jsonl`` has ``steps`` train lines, failing if a run ends first."""
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout_s
    while not metrics.is_file() or metrics.read_text().count('"kind": "train"') < steps:
        assert all(launch.proc.poll() is None for launch in launches), "a run ended early"
        assert time.monotonic() < deadline, f"no step {steps} within {timeout_s} s"
        time.sleep(0.05)


def train_process(launcher_pid: int, rank: int) -> psutil.Process:
    """The train.py process of ``rank`` below a launcher."""
    for child in psutil.Process(launcher_pid).children(recursive=True):
        try:
            if "train.py" in " ".join(child.cmdline()) and child.environ().get("RANK") == str(rank):
                return child
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no train.py process of rank {rank} below pid {launcher_pid}")


def test_sigkilled_worker_restarts_from_the_last_checkpoint_and_loses_no_step(
    tmp_path: Path, reference_runs: dict[str, Path]
) -> None:
    """SIGKILL rank 1 after step 30 (checkpoint at 20) under launch/torchrun.sh with
    MAX_RESTARTS=1 (``--max-restarts=1``, c10d rendezvous): torchrun restarts both ranks,
    resume=auto continues from step 20, and the finished run has every step once and
    equals the uninterrupted run."""
    run_dir = tmp_path / "killed"
    env = {"MAX_RESTARTS": "1"}
    with running("torchrun.sh", run_dir, *LONG, "resume=auto", env=env) as launch:
        wait_for_steps(run_dir, 30, [launch])
        train_process(launch.proc.pid, rank=1).send_signal(signal.SIGKILL)
        output = finish(launch)
    assert "resumed from" in output and "step_00000020.pt (step 20)" in output
    restarted, _ = read_run(run_dir)  # every step once, in order
    uninterrupted, _ = read_run(reference_runs["torchrun"])
    assert comparable(restarted) == comparable(uninterrupted)


def test_two_nodes_on_loopback_train_like_one(
    tmp_path: Path, reference_runs: dict[str, Path]
) -> None:
    """launch/torchrun.sh twice, NNODES=2 NODE_RANK=0/1 with one rank each, c10d
    rendezvous on 127.0.0.1: one job of 2 ranks, equal to the single-node run."""
    run_dir = tmp_path / "two_nodes"
    env = {"NNODES": "2", "NPROC": "1", "MASTER_PORT": str(free_port()), "RDZV_ID": "two-nodes"}
    with (
        running("torchrun.sh", run_dir, *LONG, env={**env, "NODE_RANK": "0"}) as node0,
        running("torchrun.sh", run_dir, *LONG, env={**env, "NODE_RANK": "1"}) as node1,
    ):
        finish(node0)
        finish(node1)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["world_size"], summary["launcher"]) == (2, "torchrun")
    assert len(set(summary["parameter_sha256_per_rank"])) == 1
    two_nodes, _ = read_run(run_dir)
    one_node, _ = read_run(reference_runs["torchrun"])
    assert comparable(two_nodes) == comparable(one_node)


def test_a_stalled_rank_ends_every_rank_with_an_error_naming_the_stall(tmp_path: Path) -> None:
    """Two ranks started by hand (no launcher to clean up), timeout_s=5. Rank 1 is
    stopped (SIGSTOP) mid-run: rank 0 times out and says so. Rank 1, continued after
    rank 0 is gone, finds its peer gone (or its own wait timed out) and says that. Both
    exit 1, no traceback."""
    run_dir = tmp_path / "stall"
    env = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    args = ["max_steps=100000", "timeout_s=5", "log_every=1000", "plot=false"]
    with (
        running("python", run_dir, *args, env={**env, "RANK": "0", "LOCAL_RANK": "0"}) as rank0,
        running("python", run_dir, *args, env={**env, "RANK": "1", "LOCAL_RANK": "1"}) as rank1,
    ):
        wait_for_steps(run_dir, 5, [rank0, rank1])
        rank1.proc.send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        output0 = finish(rank0, expect_ok=False)
        waited = time.monotonic() - stopped_at
        rank1.proc.send_signal(signal.SIGCONT)
        output1 = finish(rank1, expect_ok=False)
    assert 4 <= waited <= 30, f"rank 0 gave up after {waited:.1f} s, timeout_s=5"
    assert "error on rank 0: a collective timed out" in output0
    # Rank 1's own receive may also have run past timeout_s while it was stopped.
    assert re.search(r"error on rank 1: (lost the connection|a collective timed out)", output1)
    assert "Traceback" not in output0 + output1
    assert rank0.proc.returncode == rank1.proc.returncode == 1


def test_corrupt_checkpoint_is_a_clear_error_and_the_previous_one_still_resumes(
    tmp_path: Path,
) -> None:
    """A truncated newest checkpoint: resume=auto stops with an error naming the file and
    the previous checkpoint; resuming from that one repeats the original run."""
    run_dir = tmp_path / "corrupt"
    args = [*SMALL, "plot=false"]
    train("python", run_dir, *args)
    original, _ = read_run(run_dir)
    newest, previous = run_dir / "checkpoints" / "step_00000008.pt", "step_00000006.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    output = train("python", run_dir, *args, "resume=auto", expect_ok=False)
    assert f"checkpoint {newest} is unreadable" in output
    assert f"resume={run_dir / 'checkpoints' / previous}" in output
    assert "Traceback" not in output
    train("python", run_dir, *args, f"resume={run_dir / 'checkpoints' / previous}")
    repeated, _ = read_run(run_dir)
    assert comparable(repeated) == comparable(original)


class Unpicklable:
    def __reduce__(self):
        raise pickle.PicklingError("the disk filled up")


def test_a_checkpoint_write_that_fails_midway_leaves_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "step_00000001.pt"
    atomic_torch_save({"step": 1}, path)
    with pytest.raises(pickle.PicklingError):
        atomic_torch_save({"weights": torch.zeros(10_000), "broken": Unpicklable()}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["lrr=0.1"], "error: unknown config key 'lrr'"),
        (["deepspeed_config=missing.json"], "error: deepspeed_config missing.json not found"),
        (
            ["global_batch_size=64", "batch_size=32"],
            "error: batch_size=32 and global_batch_size=64 are both set; keep one",
        ),
        (
            ["global_batch_size=1"],
            "error: global_batch_size=1 is smaller than the world size 2: every rank needs",
        ),
    ],
)
def test_bad_config_is_one_message_from_rank_0(
    tmp_path: Path, args: list[str], message: str
) -> None:
    """Under torchrun with 2 ranks: exit code != 0, the message once, no traceback from
    train.py (torchrun adds its own failure report, naming rank 0 as the root cause)."""
    output = train("torchrun", tmp_path / "run", *args, expect_ok=False)
    check_one_error_from_rank_0(output, message)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
