"""Test-side helpers shared by the framework test modules: launch a script of this
package under a real launcher on 2 CPU ranks and check its JSON records."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.framework_scripts.parity_cases import WORLD_SIZE, Run
from tests.launching import launch, launcher_command

SCRIPTS = Path(__file__).resolve().parent
#: Parameters after one SGD step (LR 1) vs the single-process reference, fp32. The two
#: sides differ only in summation order (per-rank partial sums averaged by the engine vs
#: one backward over the concatenated batch): a few ulps of O(0.1-1) gradients.
TOLERANCE = 1e-6


def require(module: str) -> None:
    """Skip when ``module`` is not installed (CI installs every extra)."""
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed")


def launch_script(tmp_path_factory, launcher: str, script: str) -> dict:
    """Launch ``script`` on 2 CPU ranks under ``launcher``; return its rank 0's results."""
    out = tmp_path_factory.mktemp(Path(script).stem) / "result.json"
    command = [*launcher_command(launcher, WORLD_SIZE), str(SCRIPTS / script)]
    return launch(launcher, command, out)


def record(results: dict, name: str) -> dict:
    """The record of run ``name``, which ran on 2 ranks."""
    assert name in results, f"no result for {name}; got {sorted(results)}"
    result = results[name]
    assert result["world_size"] == WORLD_SIZE
    return result


def check_parity(result: dict, name: str) -> None:
    """Global selection (per-rank counts of every micro-batch equal the reference's split
    of the concatenated batch) and the update within :data:`TOLERANCE`."""
    assert result["selected_per_rank"] == result["reference_selected_per_rank"]
    assert result["max_abs_diff"] <= TOLERANCE, (
        f"{name}: max |param - reference| {result['max_abs_diff']:.3e} > {TOLERANCE}"
    )


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
