"""FSDP2 (``fully_shard``) and ``torch.compile`` on 2 CPU ranks (gloo), one launch.

Launched by tests/test_integration_torch.py as
``torchrun --nproc_per_node=2 ... torch_step.py --out result.json``.

- FSDP2: the MLP sharded with ``fully_shard`` over a 2-rank CPU mesh; mask mode
  (:class:`OHEMLoss`) and two-pass (:func:`ohem_step`, with and without balance, a rank
  training nothing, accumulation). The updated parameters are DTensor shards:
  ``full_tensor()`` gathers them for the comparison.
- torch.compile: DDP of a model compiled with the ``aot_eager`` backend, mask mode and
  two-pass (the scoring pass goes through the compiled module under ``no_grad``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch._dynamo.backends.registry import lookup_backend
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from dist_ohem import HardExampleSelector
from tests.framework_scripts.parity_cases import (
    CASES,
    LR,
    Run,
    leave_process_group,
    local_micro_batches,
    make_model,
    run_cases,
    runs_for,
    train_micro_batch,
)

#: The compiled runs: one plain, one with an idle rank and balance, one accumulated.
COMPILE_CASES = tuple(case for case in CASES if case.name in ("keep", "top1-balance", "accumulate"))
#: Calls of compiled graphs so far (dynamo may reuse graphs across the runs' models).
compiled_calls = 0


def counting_aot_eager(graph: torch.fx.GraphModule, example_inputs: list):
    """The ``aot_eager`` backend, counting every call of the graphs it compiles."""
    compiled = lookup_backend("aot_eager")(graph, example_inputs)

    def run(*args):
        global compiled_calls
        compiled_calls += 1
        return compiled(*args)

    return run


RUNS = (
    *runs_for("fsdp2", "mask"),
    *runs_for("fsdp2", "two_pass"),
    *runs_for("compile", "mask", COMPILE_CASES),
    *runs_for("compile", "two_pass", COMPILE_CASES),
)


def accumulating_backward(accumulation_steps: int):
    """Plain accumulation: each micro-batch's loss divided by the number of them."""
    return lambda loss: (loss / accumulation_steps).backward()


def one_optimizer_step(run: Run, model, params_of):
    """Every micro-batch of the case through ``model``, then one SGD step."""
    case = run.case
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    backward = accumulating_backward(case.accumulation_steps)
    selector = HardExampleSelector(**case.rule)
    outputs = [
        train_micro_batch(model, batch, run, selector, backward)
        for batch in local_micro_batches(case, dist.get_rank())
    ]
    optimizer.step()
    return params_of(model), outputs


def train_fsdp2(run: Run):
    """The MLP under FSDP2 on a CPU mesh of every rank."""
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = fully_shard(make_model(), mesh=mesh)
    params, outputs = one_optimizer_step(
        run, model, lambda m: [p.full_tensor() for p in m.parameters()]
    )
    return params, outputs, {"wrapper": type(model).__name__}


def train_compiled(run: Run):
    """DDP around the MLP compiled with ``aot_eager``; records the compiled-graph calls."""
    model = DistributedDataParallel(torch.compile(make_model(), backend=counting_aot_eager))
    calls_before = compiled_calls
    params, outputs = one_optimizer_step(run, model, lambda m: list(m.module.parameters()))
    facts = {
        "wrapper": f"DDP({type(model.module).__name__})",
        "compiled_calls": compiled_calls - calls_before,
    }
    return params, outputs, facts


def main() -> None:
    """Run every FSDP2 and compiled run, then leave the process group."""
    dist.init_process_group("gloo")
    engines = {"fsdp2": train_fsdp2, "compile": train_compiled}
    run_cases(RUNS, lambda run: engines[run.engine](run))
    leave_process_group()


if __name__ == "__main__":
    main()
