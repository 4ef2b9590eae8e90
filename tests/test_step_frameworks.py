"""DESIGN.md §4 invariant for ohem_step under real Accelerate and DeepSpeed launches.

Each framework is launched once, as a real launcher subprocess on 2 CPU ranks (gloo),
and runs every case of ``tests/framework_scripts/parity_cases.py`` (balance off and on,
an idle rank, gradient accumulation over 2 uneven micro-batches; DeepSpeed under ZeRO
stages 0 and 2). A case takes one plain SGD step with LR = 1, so the parameters after
the step differ from the single-process reference ``p - LR * g`` by exactly the
gradient difference; the script records that difference per case in a JSON file.

Tolerance 1e-6 in fp32: the gradients here are O(0.1-1) and the two sides differ only
in summation order (per-rank partial sums averaged by the engine vs. one backward over
the concatenated batch), a few ulps (observed <= 1e-7).
"""

from __future__ import annotations

import pytest

from tests.framework_scripts.launch_checks import check_parity, launch_script, record, require
from tests.framework_scripts.parity_cases import ACCELERATE_RUNS, DEEPSPEED_RUNS, Run


@pytest.fixture(scope="module")
def accelerate_results(tmp_path_factory) -> dict:
    """One ``accelerate launch --multi_gpu`` of 2 CPU ranks running every Accelerate case."""
    require("accelerate")
    return launch_script(tmp_path_factory, "accelerate", "accelerate_step.py")


@pytest.fixture(scope="module")
def deepspeed_results(tmp_path_factory) -> dict:
    """One ``torchrun`` of 2 CPU ranks running every DeepSpeed case (ZeRO 0 and 2)."""
    require("deepspeed")
    return launch_script(tmp_path_factory, "torchrun", "deepspeed_step.py")


def check_run(results: dict, run: Run, wrapper: str) -> None:
    """The recorded run used 2 ranks and the framework, selected like the reference,
    balanced when asked, and updated the parameters like the reference (<= TOLERANCE)."""
    result = record(results, run.name)
    assert result["wrapper"] == wrapper
    assert result.get("zero_stage") == run.zero_stage
    selected, trained = result["selected_per_rank"], result["trained_per_rank"]
    if run.case.balance:
        for counts, owned in zip(trained, selected, strict=True):
            assert sum(counts) == sum(owned), f"examples lost or duplicated: {trained}"
            assert max(counts) - min(counts) <= 1, f"not floor/ceil(M/W): {trained}"
        # The cases' selections are uneven, so balancing must have moved examples.
        assert trained != selected
    else:
        assert trained == selected
    check_parity(result, run.name)


@pytest.mark.parametrize("run", ACCELERATE_RUNS, ids=lambda run: run.name)
def test_accelerate_ohem_step_matches_single_process(accelerate_results, run):
    check_run(accelerate_results, run, "DistributedDataParallel")


@pytest.mark.parametrize("run", DEEPSPEED_RUNS, ids=lambda run: run.name)
def test_deepspeed_ohem_step_matches_single_process(deepspeed_results, run):
    check_run(deepspeed_results, run, "DeepSpeedEngine")
