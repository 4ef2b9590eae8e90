"""The torch-call counter of bench/host_syncs.py (:class:`bench.host_syncs.TorchCalls`).

It counts each torch call once (not what a torch function calls inside) and splits the
calls of a selector call by stage, the functions that ``__call__`` called.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from bench.host_syncs import OUTSIDE, RESULT, TorchCalls, selector_torch_calls

ROOT = Path(__file__).resolve().parents[1]


def test_three_torch_calls_count_three():
    with TorchCalls() as counter:
        x = torch.ones(4)
        y = x + 1
        y.sum()
    ops = [op for op, _, _ in counter.calls]
    assert len(counter) == 3, ops
    assert ops[0] == "torch.ones" and ops[2].endswith(".sum")
    assert all(path is None and phase == OUTSIDE for _, path, phase in counter.calls)


def test_attribute_reads_count_and_are_marked():
    x = torch.ones(4)
    with TorchCalls() as counter:
        x.shape  # noqa: B018
        x.dtype  # noqa: B018
    assert [op for op, _, _ in counter.calls] == [".shape", ".dtype"]


@torch.overrides.wrap_torch_function(lambda x: (x,))
def three_inside(x: torch.Tensor) -> torch.Tensor:
    """One torch function (it dispatches to the mode) that makes three torch calls."""
    return (x * 2).add(1).sum()


def test_calls_inside_a_torch_function_are_not_counted():
    x = torch.ones(4)
    with TorchCalls() as counter:
        three_inside(x)
        torch.norm(x)  # torch/functional.py: calls torch.linalg.vector_norm inside
    assert len(counter) == 2, counter.calls
    assert counter.calls[0][0].endswith("three_inside")


class Pipeline:
    """A toy ``__call__``: one call itself, two in a stage, one in a helper's helper."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x + 1
        self._stage_a(x)
        return stage_b(x)

    def _stage_a(self, x: torch.Tensor) -> None:
        x.abs()
        x.neg()


def stage_b(x: torch.Tensor) -> torch.Tensor:
    return inner(x)


def inner(x: torch.Tensor) -> torch.Tensor:
    return x.sum()


class Delegating:
    """``__call__`` hands everything to ``_run``: the stages are ``_run``'s callees."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        x = x * 3
        Pipeline()._stage_a(x)
        return stage_b(x)


def test_calls_are_attributed_to_the_function_that_call_called():
    x = torch.ones(4)
    with TorchCalls(root=Pipeline.__call__.__code__) as counter:
        x.exp()
        Pipeline()(x)
        counter.phase = RESULT
        x.cos()
    via, by_stage = counter.stages()
    assert via == ()
    assert {stage: len(ops) for stage, ops in by_stage.items()} == {
        OUTSIDE: 1,
        "__call__": 1,
        "_stage_a": 2,
        "stage_b": 1,
        RESULT: 1,
    }
    paths = [path for _, path, _ in counter.calls]
    assert paths == [None, (), ("_stage_a",), ("_stage_a",), ("stage_b", "inner"), None]
    assert counter.stages(depth=2)[1]["stage_b > inner"] == [counter.calls[4][0]]


def test_a_delegating_call_is_split_by_the_delegate_callees():
    x = torch.ones(4)
    with TorchCalls(root=Delegating.__call__.__code__) as counter:
        Delegating()(x)
    via, by_stage = counter.stages()
    assert via == ("_run",)
    assert {stage: len(ops) for stage, ops in by_stage.items()} == {
        "_run": 1,
        "_stage_a": 2,
        "stage_b": 1,
    }


def test_a_selector_call_is_counted_inside_call():
    counter = selector_torch_calls("deferred", torch.device("cpu"))
    _, by_stage = counter.stages()
    assert 0 < len(counter) < 1000
    assert sum(map(len, by_stage.values())) == len(counter)
    assert OUTSIDE not in by_stage  # every call of the selector is found under __call__


def test_the_script_reports_the_three_counts():
    script = (
        "import json; from bench.host_syncs import torch_call_cases; "
        "print(json.dumps({k: len(v) for k, v in torch_call_cases().items()}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(counts) == {
        "torch_calls_device_256",
        "torch_calls_host_256",
        "torch_calls_device_256_w4",
    }
    assert all(0 < n < 1000 for n in counts.values())
    # W = 4 runs the same stages with more ranks to combine: never fewer calls
    assert counts["torch_calls_device_256_w4"] >= counts["torch_calls_device_256"]
    # The device path's budget (docs/DESIGN.md §13): lighter than the host path at W = 1,
    # at most 30 calls there and 65 at W = 4 (15-30 us of host time each on a GPU).
    assert counts["torch_calls_device_256"] <= min(30, counts["torch_calls_host_256"])
    assert counts["torch_calls_device_256_w4"] <= 65
