import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch
from hypothesis import settings

from tests.distributed import RankPools
from tests.training import ENGINE_ARGS, LONG, SMALL, train

torch.set_num_threads(1)
# Hypothesis profiles, chosen by HYPOTHESIS_PROFILE (default "ci"):
# ci: 300 examples, derandomized (the same examples every run: a CI failure reproduces);
# explore: 1000 random examples per run (new ones each time: hunts for unseen failures);
# heavy: 5000 random examples (before a release, or after changing the selection core).
settings.register_profile("ci", max_examples=300, deadline=None, derandomize=True)
settings.register_profile("explore", max_examples=1000, deadline=None, derandomize=False)
settings.register_profile("heavy", max_examples=5000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def ranks():
    """``ranks.run(world_size, fn, *args, timeout=60)``: fn on W gloo ranks, results by rank."""
    pools = RankPools()
    yield pools
    pools.close()


@pytest.fixture(scope="session")
def mask_mode_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A SMALL run of configs/mask.yaml under torchrun: its directory and its output."""
    run_dir = tmp_path_factory.mktemp("mask") / "run"
    return run_dir, train("torchrun", run_dir, "--config", "configs/mask.yaml", *SMALL)


@pytest.fixture(scope="session")
def reference_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Uninterrupted LONG runs: DDP under torchrun and DeepSpeed ZeRO-1 (deepspeed launcher)."""
    runs = {}
    for launcher, engine_args in ENGINE_ARGS.items():
        runs[launcher] = tmp_path_factory.mktemp(launcher) / "full"
        train(launcher, runs[launcher], *engine_args, *LONG)
    return runs
