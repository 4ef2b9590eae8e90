"""Global OHEM under FSDP2 (``fully_shard``), FSDP1 (``FullyShardedDataParallel``) and
DDP of a ``torch.compile``d model.

One ``torchrun`` launch of 2 CPU ranks (``tests/framework_scripts/torch_step.py``):
FSDP2 and FSDP1 (CPU, each Linear a nested unit, ``use_orig_params=True`` and, on a few
cases, flat parameters) in mask mode and two-pass (balance, a rank training nothing,
accumulation, ``micro_batch_size``), and DDP around a model compiled with the
``aot_eager`` backend in mask and two-pass mode. Each run is one SGD step compared with
the single-process reference.
"""

from __future__ import annotations

import pytest

from tests.framework_scripts.launch_checks import check_run, launch_script
from tests.framework_scripts.parity_cases import Run
from tests.framework_scripts.torch_step import RUNS

FSDP2_RUNS = tuple(run for run in RUNS if run.engine == "fsdp2")
FSDP1_RUNS = tuple(run for run in RUNS if run.engine in ("fsdp1", "fsdp1-flat"))
COMPILED_RUNS = tuple(run for run in RUNS if run.engine == "compile")


@pytest.fixture(scope="module")
def torch_results(tmp_path_factory) -> dict:
    """One torchrun of 2 CPU ranks running every FSDP2, FSDP1 and compiled run."""
    return launch_script(tmp_path_factory, "torchrun", "torch_step.py")


@pytest.mark.parametrize("run", FSDP2_RUNS, ids=lambda run: run.name)
def test_fsdp2_matches_single_process(torch_results, run):
    # fully_shard swaps the module's class for an FSDP subclass of it.
    check_run(torch_results, run, "FSDPSequential")


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def expected_root_forwards(run: Run, trained_per_rank: list[list[int]]) -> int:
    """Forwards of the FSDP root on each rank over the run's micro-batches.

    Mask mode: one per micro-batch. Two-pass: the scoring chunks, padded to the most of
    any rank (FSDP gathers parameters in every forward), then the training chunks, the
    same number on every rank.
    """
    case = run.case
    if run.mode == "mask":
        return case.accumulation_steps
    size = case.micro_batch_size
    total = 0
    for sizes, trained in zip(case.micro_batches, trained_per_rank, strict=True):
        scoring = max(ceil_div(n, size) for n in sizes) if size else 1
        training = max(1, *(ceil_div(n, size) for n in trained)) if size else 1
        total += scoring + training
    return total


@pytest.mark.parametrize("run", FSDP1_RUNS, ids=lambda run: run.name)
def test_fsdp1_matches_single_process(torch_results, run):
    check_run(torch_results, run, "FullyShardedDataParallel")
    # Every forward, the no_grad scoring ones included, went through the FSDP root,
    # whose forward gathers the sharded parameters.
    result = torch_results[run.name]
    forwards = expected_root_forwards(run, result["trained_per_rank"])
    assert result["root_forwards"] == [forwards] * len(result["root_forwards"])


@pytest.mark.parametrize("run", COMPILED_RUNS, ids=lambda run: run.name)
def test_ddp_of_compiled_model_matches_single_process(torch_results, run):
    check_run(torch_results, run, "DDP(OptimizedModule)")
    # Every forward ran compiled graphs: per micro-batch, the training forward and, in
    # two-pass mode, the no_grad scoring forward.
    forwards = (2 if run.mode == "two_pass" else 1) * run.case.accumulation_steps
    assert torch_results[run.name]["compiled_calls"] >= forwards
