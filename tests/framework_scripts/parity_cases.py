"""Cases, data and single-process references shared by the framework parity scripts.

``accelerate_step.py``, ``deepspeed_step.py``, ``torch_step.py`` (FSDP2, FSDP1, torch.compile)
and ``lightning_step.py`` run under a real launcher on 2 CPU ranks. Each trains cases of
:data:`CASES` in two-pass (:func:`dist_ohem.ohem_step`) or mask mode
(:class:`dist_ohem.OHEMLoss`) and one plain SGD step (no momentum, no weight decay, no
clipping), so that the parameters after the step are ``p - LR * g`` with ``g`` the
gradient the framework averaged over ranks. :func:`run_cases` compares them with the
update a single process makes on the concatenated batch (selected by an independent
sort, :func:`hardest_mask`) and rank 0 writes one JSON record per run (case x framework
setup), which the ``tests/test_step_frameworks.py`` and ``tests/test_integration_*.py``
modules check.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from dist_ohem import HardExampleSelector, OHEMLoss, SelectionResult, StepOutput, ohem_step
from tests.parity import rank_slice

WORLD_SIZE = 2
#: SGD learning rate: 1 makes the parameter difference equal the gradient difference.
LR = 1.0
FEATURES = 8
NUM_CLASSES = 4
CRITERION = nn.CrossEntropyLoss()


@dataclass(frozen=True)
class Case:
    """One optimizer step: a selection rule and the per-rank sizes of each micro-batch.

    ``micro_batches[b][r]`` examples of micro-batch ``b`` belong to rank ``r``; all
    micro-batches of a case are accumulated into one optimizer step.
    """

    name: str
    rule: dict
    micro_batches: tuple[tuple[int, ...], ...]
    balance: bool = False
    seed: int = 0
    #: ohem_step's micro_batch_size: one selection, training in chunks of this many.
    micro_batch_size: int | None = None

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per optimizer step."""
        return len(self.micro_batches)

    def batch_seed(self, micro_batch: int) -> int:
        """Seed of the global batch of one micro-batch."""
        return 1000 * self.seed + micro_batch


CASES = (
    Case("keep", {"keep": 0.3}, ((9, 4),), seed=2),
    Case("keep-balance", {"keep": 0.3}, ((9, 4),), balance=True, seed=2),
    # M = 1: one rank trains nothing and back-propagates the zero-weight loss.
    Case("top1", {"top_k": 1}, ((6, 7),), seed=2),
    Case("top1-balance", {"top_k": 1}, ((6, 7),), balance=True, seed=2),
    Case("accumulate", {"keep": 0.5}, ((9, 4), (3, 10)), seed=3),
    Case("accumulate-balance", {"keep": 0.5}, ((9, 4), (3, 10)), balance=True, seed=3),
    # One selection over 13 examples, trained in chunks of 2: rank 0 runs 3 chunks, rank 1
    # pads to 3 with zero-weight chunks; gradients synchronise once, on the last.
    Case("chunked", {"keep": 0.6}, ((9, 4),), seed=4, micro_batch_size=2),
    Case("chunked-balance", {"keep": 0.6}, ((9, 4),), balance=True, seed=4, micro_batch_size=2),
)


@dataclass(frozen=True)
class Run:
    """One case under one framework configuration, named in the JSON results."""

    name: str
    case: Case
    zero_stage: int | None = None
    #: ``"two_pass"`` (:func:`ohem_step`) or ``"mask"`` (:class:`OHEMLoss`).
    mode: str = "two_pass"
    #: Which of a script's framework setups runs it (scripts with more than one).
    engine: str = ""


def runs_for(engine: str, mode: str, cases: tuple[Case, ...] = CASES) -> tuple[Run, ...]:
    """One run per case, named ``engine-mode-case``; mask mode skips the balance cases
    (balance is a two-pass option)."""
    return tuple(
        Run(f"{engine}-{mode}-{case.name}", case, mode=mode, engine=engine)
        for case in cases
        if mode == "two_pass" or not case.balance
    )


def mask_runs(prefix: str, zero_stage: int | None = None, engine: str = "") -> tuple[Run, ...]:
    """The mask-mode runs (no balance cases), named ``prefix-mask-case``."""
    return tuple(
        Run(f"{prefix}-mask-{case.name}", case, zero_stage, mode="mask", engine=engine)
        for case in CASES
        if not case.balance
    )


ACCELERATE_RUNS = (*(Run(case.name, case) for case in CASES), *mask_runs("accelerate"))
#: Two-pass at ZeRO 0, 2, 3; mask mode at 1 and 3 (each engine init costs ~0.5 s).
DEEPSPEED_RUNS = (
    *(Run(f"zero{stage}-{case.name}", case, stage) for stage in (0, 2, 3) for case in CASES),
    *(run for stage in (1, 3) for run in mask_runs(f"zero{stage}", stage)),
)
#: Accelerate with its DeepSpeed plugin (ZeRO-2), in the DeepSpeed launch.
ACCELERATE_DEEPSPEED_RUNS = (
    *(Run(f"accelerate-zero2-{case.name}", case, 2, engine="accelerate") for case in CASES),
    *mask_runs("accelerate-zero2", 2, engine="accelerate"),
)


def make_model() -> nn.Module:
    """The same small MLP (no BatchNorm, no dropout) on every rank and in the reference."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, 16), nn.Tanh(), nn.Linear(16, NUM_CLASSES))


def global_batch(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The concatenated batch of all ranks (rank-major), generated from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, FEATURES, generator=gen)
    targets = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
    return inputs, targets


def local_micro_batches(case: Case, rank: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's slice of every micro-batch of ``case``."""
    for index, sizes in enumerate(case.micro_batches):
        inputs, targets = global_batch(case.batch_seed(index), sum(sizes))
        yield rank_slice(inputs, list(sizes), rank), rank_slice(targets, list(sizes), rank)


@dataclass(frozen=True)
class MaskStep:
    """What one mask-mode micro-step did, with the fields of :class:`StepOutput` that
    :func:`run_cases` records."""

    selection: SelectionResult

    @property
    def num_trained_local(self) -> int:
        """Examples back-propagated with non-zero weight: the selected ones."""
        return self.selection.num_selected_local


def mask_step(
    model: nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor],
    criterion: OHEMLoss,
    backward: Callable[[torch.Tensor], object],
) -> MaskStep:
    """One mask-mode micro-step: ``backward(criterion(model(inputs), targets))``."""
    inputs, targets = batch
    backward(criterion(model(inputs), targets))
    return MaskStep(criterion.last)


def train_micro_batch(
    model: nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor],
    run: Run,
    selector: HardExampleSelector,
    backward: Callable[[torch.Tensor], object],
) -> StepOutput | MaskStep:
    """One micro-batch in the run's mode: :func:`ohem_step` with the case's settings, or
    :class:`OHEMLoss` on the model's output and ``backward``."""
    if run.mode == "mask":
        return mask_step(model, batch, OHEMLoss(CRITERION, selector=selector), backward)
    inputs, targets = batch
    return ohem_step(
        model,
        inputs,
        targets,
        CRITERION,
        selector,
        backward=backward,
        balance=run.case.balance,
        micro_batch_size=run.case.micro_batch_size,
    )


def num_to_select(rule: dict, num_valid: int) -> int:
    """M of docs/DESIGN.md §3 for the ``keep`` and ``top_k`` rules (with ``min_kept``), written
    out here, independently of ``dist_ohem.selection``."""
    if "keep" in rule:
        # docs/DESIGN.md §3: a product within 1e-9 of an integer counts as that integer.
        wanted = math.ceil(rule["keep"] * num_valid - 1e-9)
    else:
        wanted = rule["top_k"]
    return min(num_valid, max(rule.get("min_kept", 0), wanted))


def hardest_mask(losses: torch.Tensor, valid: torch.Tensor, rule: dict) -> torch.Tensor:
    """The reference selection on a concatenated batch: sort the valid ``(K,)`` losses by
    docs/DESIGN.md §2 order (higher first; a stable sort puts equal losses in index order,
    i.e. the lower global index first) and mark the first M."""
    candidates = valid.nonzero().squeeze(1)
    order = torch.sort(losses[candidates].detach(), descending=True, stable=True).indices
    mask = torch.zeros_like(valid)
    mask[candidates[order[: num_to_select(rule, candidates.numel())]]] = True
    return mask


def reference(case: Case) -> tuple[list[torch.Tensor], list[list[int]], list[float]]:
    """Single process: parameters after ``p - LR * mean_b(g_b)``, selected counts per rank
    and the mean loss over the selected examples, for every micro-batch ``b``.

    ``g_b`` is the gradient of the mean loss over the examples that
    :func:`hardest_mask` picks on the concatenated micro-batch ``b``; every ``g_b`` is
    taken at the initial parameters, as gradient accumulation does.
    """
    model = make_model()
    selected_per_rank, mean_losses = [], []
    for index, sizes in enumerate(case.micro_batches):
        inputs, targets = global_batch(case.batch_seed(index), sum(sizes))
        losses = nn.functional.cross_entropy(model(inputs), targets, reduction="none")
        mask = hardest_mask(losses, torch.ones_like(targets, dtype=torch.bool), case.rule)
        mean = losses[mask].mean()
        (mean / case.accumulation_steps).backward()
        selected_per_rank.append([int(part.sum()) for part in mask.split(list(sizes))])
        mean_losses.append(mean.item())
    with torch.no_grad():
        params = [p - LR * p.grad for p in model.parameters()]
    return params, selected_per_rank, mean_losses


def run_cases(
    runs: tuple[Run, ...],
    train: Callable[[Run], tuple[list[torch.Tensor], list[StepOutput], dict]],
) -> None:
    """Train every run on this rank; rank 0 writes the JSON results to ``--out``.

    ``train(run)`` does the framework's optimizer step over all micro-batches of
    ``run.case`` and returns the full updated parameters, the :class:`StepOutput` of
    every micro-batch and extra facts to record (the wrapper type, the ZeRO stage).
    """
    out_path = output_path()
    world_size = checked_world_size()
    results = {}
    for run in runs:
        params, outputs, facts = train(run)
        expected, reference_selected, reference_means = reference(run.case)
        trained = [None] * world_size
        dist.all_gather_object(trained, [out.num_trained_local for out in outputs])
        results[run.name] = {
            "max_abs_diff": max_abs_diff(params, expected),
            "world_size": world_size,
            "selected_per_rank": [list(out.selection.selected_per_rank) for out in outputs],
            "reference_selected_per_rank": reference_selected,
            "reference_mean_losses": reference_means,
            "trained_per_rank": [list(counts) for counts in zip(*trained, strict=True)],
            **facts,
        }
    write_results(out_path, results)


def max_abs_diff(params: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    """Largest ``|param - reference|`` over all parameters, the max over ranks (identical
    on every rank)."""
    diff = max(
        (got.detach() - want).abs().max().item() for got, want in zip(params, expected, strict=True)
    )
    diff_tensor = torch.tensor(diff, dtype=torch.float64)
    dist.all_reduce(diff_tensor, op=dist.ReduceOp.MAX)
    return diff_tensor.item()


def output_path() -> str:
    """The ``--out`` argument: the JSON file rank 0 writes."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="JSON file written by rank 0")
    return parser.parse_known_args()[0].out


def checked_world_size() -> int:
    """The world size, which must be :data:`WORLD_SIZE` (some launcher forms start one)."""
    world_size = dist.get_world_size()
    if world_size != WORLD_SIZE:
        raise SystemExit(f"expected {WORLD_SIZE} ranks, the launcher started {world_size}")
    return world_size


def write_results(out_path: str, results: dict) -> None:
    """Rank 0 writes ``results`` as JSON."""
    if dist.get_rank() == 0:
        with open(out_path, "w") as handle:
            json.dump(results, handle, indent=1)


def leave_process_group() -> None:
    """Free the dead engines, then leave the process group together.

    Reference cycles keep finished DeepSpeed engines, and the process group they hold,
    alive until a garbage collection; one left to interpreter exit makes gloo abort
    ("terminate called without an active exception") now and then.
    """
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
