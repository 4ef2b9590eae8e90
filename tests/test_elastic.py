"""Elastic training: with ``global_batch_size`` a run resumes at another world size and
follows the uninterrupted run (same K and M every step, loss within float rounding).

One uninterrupted W=4 run (DDP under torchrun) is the reference of every comparison. Its
step-10 checkpoint is the "W=4 for 10 steps" state (a run's state after step 10 does not
depend on whether it goes on); W=2 continues from it, W=3 from the W=2 run's step 15.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from launch.checkpoints import (
    CheckpointError,
    check_resumable,
    convert_to_universal,
    read_checkpoint,
)
from launch.config import ConfigError, parse_args
from launch.data import batch_indices
from launch.engines import Engine, free_port
from launch.tasks import Task, make_task
from tests.launching import kill_tree
from tests.training import (
    TIMEOUT_S,
    finish,
    read_run,
    running,
    train,
)

#: 20 steps of one global batch of 64 (16 a rank at W=4, 22/21/21 at W=3), a checkpoint
#: every 5 steps, all of them kept.
ELASTIC = ["global_batch_size=64", "max_steps=20", "checkpoint_every=5", "keep_checkpoints=4"]
ELASTIC += ["eval_every=10", "log_every=5", "plot=false"]
ZERO1 = [*ELASTIC, "engine=deepspeed", "zero_stage=1"]


@functools.cache
def detection_task() -> Task:
    return make_task("detection", 0)


@settings(max_examples=60)
@given(
    world_size=st.integers(1, 4),
    size=st.integers(4, 300),
    step=st.integers(1, 2000),
    shard=st.sampled_from(["iid", "skewed", "sources"]),
)
def test_global_batch_is_the_same_at_every_world_size(
    world_size: int, size: int, step: int, shard: str
) -> None:
    """With global_batch_size the ranks' batches, concatenated in rank order, are one
    global batch that depends on (seed, step) alone; ranks hold contiguous slices of
    floor or ceil N/W, the larger ones first. "skewed" puts the hard groups first;
    "sources" deals the same global batch out by source, so only the set is invariant."""
    task = detection_task()
    cfg = parse_args([f"global_batch_size={size}", f"shard={shard}", "seed=1"])
    parts = [batch_indices(cfg, task, step, r, world_size) for r in range(world_size)]
    alone = batch_indices(cfg, task, step, 0, 1)
    together = torch.cat(parts)
    if shard == "sources":
        together, alone = together.sort().values, alone.sort().values
    assert torch.equal(together, alone) and len(alone) == size
    sizes = [len(p) for p in parts]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] - sizes[-1] <= 1
    hard = torch.isin(task.group_train[alone], torch.tensor(task.hard_groups)).int()
    if shard == "skewed":
        assert torch.equal(hard, hard.sort(descending=True, stable=True)[0])


def test_64_at_3_ranks_is_22_21_21() -> None:
    cfg = parse_args(["global_batch_size=64"])
    assert [len(batch_indices(cfg, detection_task(), 1, r, 3)) for r in range(3)] == [22, 21, 21]


def train_records(run_dir: Path) -> dict[int, dict]:
    """The train lines of a run by step (a run resumed into a fresh run_dir starts late)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return {r["step"]: r for r in records if r["kind"] == "train"}


def checkpoint(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}.pt"


def assert_follows(resumed: dict[int, dict], reference: dict[int, dict], world_size: int) -> None:
    """Each resumed step has the reference's K and M and its loss within 1e-4 relative,
    selected at ``world_size`` ranks."""
    for step, record in resumed.items():
        expected = reference[step]
        assert record["num_valid_global"] == expected["num_valid_global"], step
        assert record["num_selected_global"] == expected["num_selected_global"], step
        assert math.isclose(record["loss"], expected["loss"], rel_tol=1e-4), (step, record)
        assert len(record["selected_per_rank"]) == world_size == record["world_size"]
        assert sum(record["selected_per_rank"]) == record["num_selected_global"]


@pytest.fixture(scope="module")
def w4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted reference: 20 steps at W=4."""
    run_dir = tmp_path_factory.mktemp("elastic") / "w4"
    train("torchrun", run_dir, *ELASTIC, world_size=4)
    return run_dir


@pytest.fixture(scope="module")
def w2_from_w4(w4: Path) -> tuple[Path, str]:
    """W=2 from the reference's step-10 checkpoint to step 20; its output."""
    run_dir = w4.parent / "w2_from_w4"
    output = train("torchrun", run_dir, *ELASTIC, f"resume={checkpoint(w4, 10)}")
    return run_dir, output


def test_the_w4_reference_trains_on_the_global_batch(w4: Path) -> None:
    records, _ = read_run(w4)
    assert len(records) == 20
    assert all(len(r["selected_per_rank"]) == 4 == r["world_size"] for r in records)
    assert all(r["num_valid_global"] == 64 and r["num_selected_global"] == 16 for r in records)
    summary = json.loads((w4 / "summary.json").read_text())
    assert summary["world_size_from_step"] == [[1, 4]]
    assert summary["config"]["batch_size"] == 0  # global_batch_size replaces it


def test_w4_checkpoint_resumed_at_w2_equals_the_uninterrupted_w4_run(
    w4: Path, w2_from_w4: tuple[Path, str]
) -> None:
    run_dir, output = w2_from_w4
    assert f"resumed from {checkpoint(w4, 10)} (step 10), written by 4 ranks" in output
    resumed = train_records(run_dir)
    assert sorted(resumed) == list(range(11, 21))
    assert_follows(resumed, train_records(w4), world_size=2)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["world_size"], summary["world_size_from_step"]) == (2, [[11, 2]])


def test_w2_checkpoint_resumed_at_w3_under_accelerate_equals_the_w4_run(
    w4: Path, w2_from_w4: tuple[Path, str]
) -> None:
    """Uneven split (22/21/21), and Accelerate loading what DDP saved."""
    run_dir = w4.parent / "w3_from_w2"
    resume = f"resume={checkpoint(w2_from_w4[0], 15)}"
    train("accelerate", run_dir, *ELASTIC, resume, world_size=3)
    resumed = train_records(run_dir)
    assert sorted(resumed) == list(range(16, 21))
    assert_follows(resumed, train_records(w4), world_size=3)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["engine"], summary["world_size"]) == ("accelerate", 3)


@pytest.fixture(scope="module")
def zero1_w1(w4: Path) -> Path:
    """DeepSpeed ZeRO-1 on 1 rank (plain python) for 10 steps: a checkpoint with shards."""
    run_dir = w4.parent / "zero1_w1"
    train("python", run_dir, *ZERO1, "stop_at=10")
    return run_dir


def copy_run(run_dir: Path, to: Path) -> Path:
    shutil.copytree(run_dir, to)
    return to


def test_deepspeed_zero1_shards_resume_at_another_world_size(
    tmp_path: Path, w4: Path, zero1_w1: Path
) -> None:
    """ZeRO-1 optimizer shards of 1 rank load at W=2 through DeepSpeed's universal
    checkpoint; the run follows the DDP reference (ZeRO-1 trains like DDP)."""
    run_dir = copy_run(zero1_w1, tmp_path / "zero1")
    output = train("torchrun", run_dir, *ZERO1, "resume=auto")
    assert "(step 10), written by 1 ranks" in output
    assert (run_dir / "checkpoints" / "step_00000010.universal").is_dir()
    records, _ = read_run(run_dir)  # every step once
    assert_follows({r["step"]: r for r in records[10:]}, train_records(w4), world_size=2)


def convert_on_every_rank(path: Path) -> str:
    """On a gloo rank: convert ``path`` as train.py does; the error message raised."""
    import torch.distributed as dist

    rank, world_size = dist.get_rank(), dist.get_world_size()
    eng = Engine("deepspeed", None, None, print, print, rank, world_size, torch.device("cpu"))
    with pytest.raises(CheckpointError) as error:
        convert_to_universal(path, eng)
    return str(error.value)


def test_deepspeed_shards_that_cannot_be_converted_stop_every_rank(
    tmp_path: Path, zero1_w1: Path, ranks
) -> None:
    """A damaged ZeRO shard on 2 gloo ranks: the conversion on rank 0 fails, and both
    ranks raise (rank 1 does not wait for a conversion that never comes)."""
    run_dir = copy_run(zero1_w1, tmp_path / "zero1")
    shard = next((run_dir / "checkpoints" / "step_00000010").glob("*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[:100])
    messages = ranks.run(2, convert_on_every_rank, checkpoint(run_dir, 10), timeout=60)
    prefix = (
        f"{checkpoint(run_dir, 10)} holds ZeRO shards of another world size, and DeepSpeed's "
        "conversion to a universal checkpoint failed ("
    )
    assert all(message.startswith(prefix) for message in messages)
    assert "see rank 0" in messages[1] and "see rank 0" not in messages[0]  # its output


def test_resume_at_another_world_size_without_global_batch_size_is_refused(
    tmp_path: Path, w4: Path
) -> None:
    """One process (the message path is the one every rank takes before any process
    group, as for bad configs under torchrun in test_train_faults.py)."""
    path = checkpoint(w4, 10)
    args = [*ELASTIC, "global_batch_size=0", "batch_size=32", f"resume={path}"]
    with running("python", tmp_path / "run", *args) as launch:
        output = finish(launch, expect_ok=False)
    message = (
        f"error: {path} was written by 4 ranks, this run has 1: with batch_size (per rank) "
        "the examples of a step depend on the world size. Resume with 4 ranks, or train "
        "with global_batch_size=N instead of batch_size"
    )
    assert output.count(message) == 1 and "Traceback" not in output, output
    assert launch.proc.returncode == 1


def test_a_changed_global_batch_size_at_another_world_size_is_refused(w4: Path) -> None:
    path = checkpoint(w4, 10)
    cfg = parse_args([*ELASTIC, "global_batch_size=32", f"run_dir={w4.parent / 'other'}"])
    with pytest.raises(ConfigError) as error:
        check_resumable(path, read_checkpoint(path, cfg), cfg, world_size=2)
    assert str(error.value) == (
        f"{path} was written by 4 ranks with global_batch_size=64; resuming at 2 ranks with "
        "global_batch_size=32 would change the examples of every step. Resume with 4 "
        "ranks, or with global_batch_size=64"
    )


def test_losing_a_node_re_forms_with_fewer_ranks_and_continues(tmp_path: Path) -> None:
    """Two "nodes" of one rank each on loopback (``NNODES=1:2 launch/torchrun.sh``, c10d
    rendezvous): node b (every process of it) is killed after step 60; node a's worker
    loses its peer, its agent re-forms the job at W=1, which resumes from the step-50
    checkpoint and runs to the end. Node a hosts the rendezvous store (is_host), as the
    node at MASTER_ADDR does on real machines; node b starts first so that both join the
    first round."""
    run_dir = tmp_path / "run"
    args = ["global_batch_size=64", "max_steps=200", "checkpoint_every=50", "eval_every=100"]
    args += ["log_every=50", "resume=auto"]  # the plot too: its per-rank lines change W
    env = {"NNODES": "1:2", "NPROC": "1", "MASTER_PORT": str(free_port()), "MAX_RESTARTS": "1"}
    # A dead node leaves the rendezvous after keep_alive_interval x keep_alive_max_attempt
    # seconds (default 15); then the survivor waits last_call_timeout for late joiners.
    conf = "keep_alive_interval=1,keep_alive_max_attempt=2,last_call_timeout=3,is_host="
    metrics = run_dir / "metrics.jsonl"
    with (
        running("torchrun.sh", run_dir, *args, env={**env, "RDZV_CONF": conf + "false"}) as b,
        running("torchrun.sh", run_dir, *args, env={**env, "RDZV_CONF": conf + "true"}) as a,
    ):
        deadline = time.monotonic() + TIMEOUT_S["torchrun"]
        while not metrics.is_file() or metrics.read_text().count('"kind": "train"') < 60:
            assert a.proc.poll() is None and b.proc.poll() is None, "a node ended early"
            assert time.monotonic() < deadline, "no step 60 before the timeout"
            time.sleep(0.02)
        kill_tree(b.proc.pid)
        output = finish(a)
    records, _ = read_run(run_dir)  # every step once, in order
    assert len(records) == 200
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 1
    resumed_at = summary["world_size_from_step"][1][0]
    assert summary["world_size_from_step"] == [[1, 2], [resumed_at, 1]]
    assert resumed_at - 1 in (50, 100), "resumed from the checkpoint before the kill"
    assert f"(step {resumed_at - 1}), written by 2 ranks" in output
    assert all(r["num_selected_global"] == 16 for r in records)
    assert (run_dir / "metrics.png").stat().st_size > 0


def test_checkpoint_parameters_agree_across_world_sizes(
    w4: Path, w2_from_w4: tuple[Path, str]
) -> None:
    """The final weights of W=4 and of W=4 -> W=2 agree to float rounding."""
    final = [torch.load(checkpoint(d, 20), weights_only=True)["model"] for d in (w4, w2_from_w4[0])]
    for name, value in final[0].items():
        torch.testing.assert_close(final[1][name], value, rtol=1e-4, atol=1e-6)
