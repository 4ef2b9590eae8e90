"""Global OHEM under FSDP2 (``fully_shard``) and DDP of a ``torch.compile``d model.

One ``torchrun`` launch of 2 CPU ranks (``tests/framework_scripts/torch_step.py``):
FSDP2 in mask mode and two-pass (balance, a rank training nothing, accumulation,
``micro_batch_size``), and DDP around a model compiled with the ``aot_eager`` backend in
mask and two-pass mode. Each run is one SGD step compared with the single-process reference.
"""

from __future__ import annotations

import pytest

from tests.framework_scripts.launch_checks import check_run, launch_script
from tests.framework_scripts.torch_step import RUNS

FSDP2_RUNS = tuple(run for run in RUNS if run.engine == "fsdp2")
COMPILED_RUNS = tuple(run for run in RUNS if run.engine == "compile")


@pytest.fixture(scope="module")
def torch_results(tmp_path_factory) -> dict:
    """One torchrun of 2 CPU ranks running every FSDP2 and compiled run."""
    return launch_script(tmp_path_factory, "torchrun", "torch_step.py")


@pytest.mark.parametrize("run", FSDP2_RUNS, ids=lambda run: run.name)
def test_fsdp2_matches_single_process(torch_results, run):
    # fully_shard swaps the module's class for an FSDP subclass of it.
    check_run(torch_results, run, "FSDPSequential")


@pytest.mark.parametrize("run", COMPILED_RUNS, ids=lambda run: run.name)
def test_ddp_of_compiled_model_matches_single_process(torch_results, run):
    check_run(torch_results, run, "DDP(OptimizedModule)")
    # Every forward ran compiled graphs: per micro-batch, the training forward and, in
    # two-pass mode, the no_grad scoring forward.
    forwards = (2 if run.mode == "two_pass" else 1) * run.case.accumulation_steps
    assert torch_results[run.name]["compiled_calls"] >= forwards
