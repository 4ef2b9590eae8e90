"""FSDP2 (``fully_shard``), FSDP1 and ``torch.compile`` on 2 CPU ranks (gloo), one launch.

Launched by tests/test_integration_torch.py as
``torchrun --nproc_per_node=2 ... torch_step.py --out result.json``.

- FSDP2: the MLP sharded with ``fully_shard`` over a 2-rank CPU mesh; mask mode
  (:class:`OHEMLoss`) and two-pass (:func:`ohem_step`, with and without balance, a rank
  training nothing, accumulation). The updated parameters are DTensor shards:
  ``full_tensor()`` gathers them for the comparison.
- FSDP1: ``FullyShardedDataParallel`` on CPU (``device_id=torch.device("cpu")``), each
  Linear its own nested FSDP unit; the runs of FSDP2 with ``use_orig_params=True``, and
  a few with the default flat parameters (``use_orig_params=False``, engine
  ``fsdp1-flat``). ``summon_full_params`` gathers the updated parameters; a forward
  pre-hook on the root counts its forwards, so the test sees that the scoring pass ran
  through the FSDP root (whose forward gathers the parameters), not the inner module.
- torch.compile: DDP of a model compiled with the ``aot_eager`` backend, mask mode and
  two-pass (the scoring pass goes through the compiled module under ``no_grad``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch._dynamo.backends.registry import lookup_backend
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
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
#: FSDP1 with flat parameters: an idle rank, and micro_batch_size with and without balance.
FLAT_CASE_NAMES = ("top1", "chunked", "chunked-balance")
FSDP1_FLAT_CASES = tuple(case for case in CASES if case.name in FLAT_CASE_NAMES)
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
    *runs_for("fsdp1", "mask"),
    *runs_for("fsdp1", "two_pass"),
    *runs_for("fsdp1-flat", "mask", FSDP1_FLAT_CASES),
    *runs_for("fsdp1-flat", "two_pass", FSDP1_FLAT_CASES),
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


def train_fsdp1(run: Run, use_orig_params: bool = True):
    """The MLP under FSDP1 on CPU, each Linear a nested unit; records each rank's forwards
    of the root."""
    model = FullyShardedDataParallel(
        make_model(),
        device_id=torch.device("cpu"),
        use_orig_params=use_orig_params,
        auto_wrap_policy=ModuleWrapPolicy({nn.Linear}),
    )
    forwards = 0

    def count_forward(*_):
        nonlocal forwards
        forwards += 1

    model.register_forward_pre_hook(count_forward)

    def full_params(m):
        with FullyShardedDataParallel.summon_full_params(m):
            return [p.detach().clone() for p in m.parameters()]

    params, outputs = one_optimizer_step(run, model, full_params)
    forwards_per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(forwards_per_rank, forwards)
    return params, outputs, {"wrapper": type(model).__name__, "root_forwards": forwards_per_rank}


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
    """Run every FSDP2, FSDP1 and compiled run, then leave the process group."""
    dist.init_process_group("gloo")
    engines = {
        "fsdp2": train_fsdp2,
        "fsdp1": train_fsdp1,
        "fsdp1-flat": lambda run: train_fsdp1(run, use_orig_params=False),
        "compile": train_compiled,
    }
    run_cases(RUNS, lambda run: engines[run.engine](run))
    leave_process_group()


if __name__ == "__main__":
    main()
