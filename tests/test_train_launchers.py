"""launch/train.py under the real launchers: torchrun, accelerate launch, deepspeed.

Every run checks the world size it really got (summary.json) and that all ranks ended
with bit-identical parameters. ``reference_runs`` (conftest.py) are the uninterrupted
runs that resumed runs must repeat.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import signal
import time
from pathlib import Path

import pytest
import torch

from launch.checkpoints import resume_checkpoint
from launch.config import Config, ConfigError, parse_args, read_config_file
from launch.data import batch_indices, data_position, rank_pool
from launch.tasks import make_task
from tests.launching import REPO
from tests.training import (
    LONG,
    LONG_EVERY,
    LONG_STEPS,
    SMALL,
    TIMEOUT_S,
    ZERO1,
    check_run,
    comparable,
    finish,
    read_run,
    running,
    train,
)


def test_torchrun_two_pass(reference_runs: dict[str, Path]) -> None:
    records = check_run(reference_runs["torchrun"], "torchrun", LONG_STEPS, LONG_EVERY)
    assert {r["scope"] for r in records} == {"random"}
    assert all(sum(r["trained_per_rank"]) == r["num_selected_global"] for r in records)


def test_torchrun_mask_mode(mask_mode_run: tuple[Path, str]) -> None:
    records = check_run(mask_mode_run[0], "torchrun")
    assert all(
        set(r["phase_s"]) == {"forward", "selection", "backward", "optimizer"} for r in records
    )
    assert all(r["num_selected_global"] == math.ceil(0.25 * r["num_valid_global"]) for r in records)


def test_deepspeed_launcher_zero1(reference_runs: dict[str, Path]) -> None:
    records = check_run(reference_runs["deepspeed"], "deepspeed", LONG_STEPS, LONG_EVERY)
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


def test_accelerate_wrapper(tmp_path: Path) -> None:
    """launch/accelerate.sh: `accelerate launch --multi_gpu`, a free port, NPROC=2."""
    train("accelerate.sh", tmp_path / "acc_sh", *SMALL, "plot=false")
    check_run(tmp_path / "acc_sh", "accelerate")


def test_plain_python_single_process_with_the_neg_pos_rule(tmp_path: Path) -> None:
    """One process, no process group; rule=neg_pos_ratio (positives = class != 0, about
    3%): every positive plus up to 3 negatives each (min_kept=8 when a batch has none)."""
    train("python", tmp_path / "single", *SMALL, "rule=neg_pos_ratio", "min_kept=8")
    summary = json.loads((tmp_path / "single" / "summary.json").read_text())
    assert (summary["world_size"], summary["launcher"], summary["steps"]) == (1, "python", 8)
    records, _ = read_run(tmp_path / "single")
    for record in records:
        assert record["scope"] == "global" and 0 < record["num_selected_global"] <= 32


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
    assert len(stopped) < LONG_STEPS, "the run finished before the signal arrived"
    assert f"stopped by a signal after step {len(stopped)}" in output
    train("torchrun", run_dir, *LONG, "resume=auto")
    resumed, _ = read_run(run_dir)
    uninterrupted, _ = read_run(reference_runs["torchrun"])
    assert comparable(resumed) == comparable(uninterrupted)


def test_deepspeed_resume_drops_unsaved_steps_and_repeats_them(
    tmp_path: Path, reference_runs: dict[str, Path]
) -> None:
    """Stop after step 50 (checkpoints at 20, 40, 50); a later line was logged but never
    checkpointed (as in a crash); resume=true replaces it and repeats the uninterrupted
    run. Only the newest two checkpoints are kept."""
    run_dir = tmp_path / "full"
    train("deepspeed", run_dir, *ZERO1, *LONG, "stop_at=50")
    kept = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert kept == ["step_00000040", "step_00000040.pt", "step_00000050", "step_00000050.pt"]
    with (run_dir / "metrics.jsonl").open("a") as file:
        file.write(json.dumps({"kind": "train", "step": 51, "loss": -1.0}) + "\n")
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
        (["run_dir=/dev/null/run"], "run_dir=/dev/null/run cannot be created or written"),
        (["batch_size=0"], "batch_size must be >= 1 (or set global_batch_size), got 0"),
        (["global_batch_size=-1"], "global_batch_size must be >= 0 (0: off), got -1"),
        (  # configs/digits.yaml sets batch_size: 64
            ["--config", "configs/digits.yaml", "global_batch_size=256"],
            "batch_size=64 and global_batch_size=256 are both set",
        ),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)):
            resume_checkpoint(parse_args([f"run_dir={tmp_path}", *args]))  # a later run_dir= wins
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("max_steps: many\n")
    with pytest.raises(
        ConfigError,
        match=re.escape(f"max_steps must be of type int (like 600), got 'many' in {bad_yaml}"),
    ):
        parse_args(["--config", str(bad_yaml)])


@pytest.mark.parametrize("shard", ["iid", "skewed"])
def test_batches_cover_each_pool_once_per_epoch_and_skewed_puts_hard_groups_on_rank_0(
    shard: str,
) -> None:
    """Within an epoch no example repeats; "skewed" rank pools are disjoint, cover the
    training set, and rank 0 alone holds the hard groups."""
    cfg = parse_args([f"shard={shard}", "batch_size=100"])
    task = make_task(cfg.task, cfg.seed)
    world_size = 3
    hard = torch.isin(task.group_train, torch.tensor(task.hard_groups))
    pools = [rank_pool(cfg, task, rank, world_size) for rank in range(world_size)]
    if shard == "skewed":
        assert sorted(torch.cat(pools).tolist()) == list(range(len(task.y_train)))
        assert hard[pools[0]].sum() == hard.sum() and not hard[torch.cat(pools[1:])].any()
    for rank in range(world_size):
        steps = [s for s in range(1, 200) if data_position(cfg, task, s, rank, world_size)[0] == 0]
        drawn = torch.cat([batch_indices(cfg, task, s, rank, world_size) for s in steps])
        assert len(drawn) == len(steps) * 100 and len(set(drawn.tolist())) == len(drawn)
        assert set(drawn.tolist()) <= set(pools[rank].tolist())
    step_1 = [batch_indices(cfg, task, 1, rank, world_size) for rank in range(world_size)]
    assert len(set(torch.cat(step_1).tolist())) == 300  # ranks never share an example
