"""The fault matrix (docs/DESIGN.md §3, §4, §7): no hang, no lost step, in every mode and strategy.

Modes: ``mask`` (OHEMLoss under DDP) and two-pass (``ohem_step`` under DDP, without and
with ``balance``); strategies ``gather`` and ``bracket``. Three families of cases:

- a fault on one rank: NaN losses (``nan="raise"`` and ``"ignore"``), +inf and -inf losses,
  and garbage (losses of the wrong shape or dtype, targets of the wrong length);
- a selector configuration that differs on one rank;
- edge batches: a rank without examples, no examples at all, every instance ignored
  (K = 0), M = K and M = 1.

A case either raises the same :class:`DistributedInputError` on every rank, or it runs
and matches the single-process reference on the concatenated batch: the selection, K,
M, the global mean loss and the gradients. Every case runs on real gloo ranks through
the ``ranks`` fixture with a timeout, so a hang fails the case instead of the run.

Losses come from :func:`coded_criterion`: per-example cross-entropy, where a fault code
carried in each label (``label = class + NUM_CLASSES * code``) replaces the loss by NaN
or +-inf. Codes travel with the examples through selection and balancing, so the scoring
and the training pass of two-pass mode see the same losses, and the replaced losses
have a zero gradient, so a selected +inf loss leaves the gradient finite.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dist_ohem import DistributedInputError, HardExampleSelector, OHEMLoss, ohem_step
from dist_ohem.comm import get_rank
from tests.parity import (
    IGNORE,
    NUM_CLASSES,
    classification_batch,
    make_mlp,
    rank_slice,
    reference_mask,
)

TOLERANCE = 1e-6
TIMEOUT_S = 30
MODES = ("mask", "two_pass", "two_pass_balanced")
STRATEGIES = ("gather", "bracket")
CLEAN, NAN, POS_INF, NEG_INF = range(4)
CODE_VALUES = {NAN: math.nan, POS_INF: math.inf, NEG_INF: -math.inf}
#: The rank that gets the fault or the differing config, and its faulty local examples.
ODD_RANK = 1
FAULTY_EXAMPLES = (1, 3)
SIZES = {2: (6, 9), 3: (5, 8, 4), 4: (3, 7, 2, 5)}
SIZES_WITH_EMPTY_RANK = {2: (0, 9), 3: (6, 0, 8), 4: (0, 5, 0, 7)}

#: Garbage that the odd rank's criterion returns instead of its per-example losses.
GARBAGE_LOSSES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "losses_short": lambda losses: losses[:-1],
    "losses_scalar": lambda losses: losses.mean(),  # reduction="none" forgotten
    "losses_int": lambda losses: losses.long(),
    "losses_float64": lambda losses: losses.double(),
}


def garbled_criterion(
    garble: Callable[[torch.Tensor], torch.Tensor],
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """:func:`coded_criterion` whose losses pass through ``garble``."""

    def criterion(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return garble(coded_criterion(logits, labels))

    return criterion


def coded_criterion(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy; the code in a label replaces its loss by NaN, +inf or -inf.

    An ``IGNORE`` label's loss is NaN (undefined): mask mode drops it through
    ``ignore_index``, two-pass mode through ``nan="ignore"``.
    """
    ignored = labels == IGNORE
    codes = torch.where(ignored, NAN, labels.div(NUM_CLASSES, rounding_mode="floor"))
    classes = torch.where(ignored, 0, labels % NUM_CLASSES)
    losses = nn.functional.cross_entropy(logits, classes, reduction="none")
    for code, value in CODE_VALUES.items():
        losses = torch.where(codes == code, value, losses)
    return losses


@dataclass
class Scenario:
    """One step on W ranks: mode, per-rank sizes, selector kwargs and what goes wrong where.

    ``codes`` maps global example indices to a fault code; ``nan_inputs`` are global
    indices of examples whose features are NaN; ``garbage`` names what ``ODD_RANK``
    returns instead of proper losses or targets; ``odd_kwargs`` are selector kwargs that
    differ on ``ODD_RANK``.
    """

    mode: str
    sizes: tuple[int, ...]
    kwargs: dict
    codes: dict[int, int] = field(default_factory=dict)
    nan_inputs: tuple[int, ...] = ()
    garbage: str | None = None
    odd_kwargs: dict = field(default_factory=dict)
    ignore_fraction: float = 0.0
    seed: int = 7


@dataclass
class Outcome:
    """What one rank saw: the error it raised, or its loss, gradients and selection."""

    error: str | None = None
    loss: float = math.nan
    grads: list[torch.Tensor] = field(default_factory=list)
    mask: torch.Tensor | None = None
    num_valid: int = -1
    num_selected: int = -1
    num_nan: int = -1


def global_batch(scenario: Scenario) -> tuple[torch.Tensor, torch.Tensor]:
    """The concatenated batch: NaN inputs and the fault codes folded into the labels."""
    inputs, labels = classification_batch(
        scenario.seed, sum(scenario.sizes), scenario.ignore_fraction
    )
    inputs[list(scenario.nan_inputs)] = math.nan
    for index, code in scenario.codes.items():
        labels[index] += NUM_CLASSES * code
    return inputs, labels


def step_on_rank(scenario: Scenario) -> Outcome:
    """Worker: one training step of ``scenario.mode`` on this rank's slice."""
    rank = get_rank()
    inputs, labels = (rank_slice(t, list(scenario.sizes), rank) for t in global_batch(scenario))
    criterion = coded_criterion
    kwargs = dict(scenario.kwargs)
    if rank == ODD_RANK:
        kwargs.update(scenario.odd_kwargs)
        if scenario.garbage == "targets_short":
            labels = labels[:-1]
        elif scenario.garbage is not None:
            criterion = garbled_criterion(GARBAGE_LOSSES[scenario.garbage])
    model = make_mlp()
    ddp = DDP(model)  # held until the backward: a collected wrapper skips its all-reduce
    try:
        if scenario.mode == "mask":
            ohem = OHEMLoss(criterion, ignore_index=IGNORE, **kwargs)
            loss = ohem(ddp(inputs), labels)
            loss.backward()
            selection = ohem.last
        else:
            out = ohem_step(
                ddp,
                inputs,
                labels,
                criterion,
                HardExampleSelector(**kwargs),
                balance=scenario.mode == "two_pass_balanced",
            )
            loss, selection = out.loss, out.selection
    except DistributedInputError as exc:
        return Outcome(error=str(exc))
    return Outcome(
        loss=float(loss.detach()),
        grads=[p.grad.clone() for p in model.parameters()],
        mask=selection.mask.clone(),
        num_valid=selection.num_valid_global,
        num_selected=selection.num_selected_global,
        num_nan=selection.num_nan_global,
    )


def reference_step(scenario: Scenario) -> Outcome:
    """One process on the concatenated batch: the reference selection on every example's
    loss, then the mean loss over the selected examples alone, its gradients and the counts.
    """
    model = make_mlp()
    inputs, labels = global_batch(scenario)
    with torch.no_grad():
        detached = coded_criterion(model(inputs), labels)
    nan = torch.isnan(detached)
    valid = (labels != IGNORE) & ~nan
    # Mask mode drops ignored labels (ignore_index) before counting NaN; two-pass mode has
    # no ignore mask, so it sees their NaN losses and counts them.
    counted_nan = nan & (labels != IGNORE) if scenario.mode == "mask" else nan
    mask = reference_mask(scenario.kwargs, list(scenario.sizes), detached, valid, None)
    loss = coded_criterion(model(inputs[mask]), labels[mask]).sum() / max(int(mask.sum()), 1)
    loss.backward()
    return Outcome(
        loss=float(loss.detach()),
        grads=[p.grad for p in model.parameters()],
        mask=mask,
        num_valid=int(valid.sum()),
        num_selected=int(mask.sum()),
        num_nan=int(counted_nan.sum()),
    )


def run(ranks, scenario: Scenario) -> list[Outcome]:
    return ranks.run(len(scenario.sizes), step_on_rank, scenario, timeout=TIMEOUT_S)


def assert_matches_reference(outcomes: list[Outcome], scenario: Scenario) -> Outcome:
    """Every rank ran the step and agrees with the single-process reference; returns it."""
    expected = reference_step(scenario)
    world_size = len(scenario.sizes)
    for rank, got in enumerate(outcomes):
        assert got.error is None, f"rank {rank} raised: {got.error}"
        want_mask = rank_slice(expected.mask, list(scenario.sizes), rank)
        assert torch.equal(got.mask, want_mask), f"rank {rank}: {got.mask} != {want_mask}"
        assert (got.num_valid, got.num_selected, got.num_nan) == (
            expected.num_valid,
            expected.num_selected,
            expected.num_nan,
        ), f"rank {rank}: K, M, NaN count"
        for g, w in zip(got.grads, expected.grads, strict=True):
            diff = (g - w).abs().max().item()
            assert diff <= TOLERANCE, f"rank {rank}: max |grad diff| {diff:.2e}"
    # Each rank returns its share (W / M) * sum(local); the global mean is their average.
    global_mean = sum(got.loss for got in outcomes) / world_size
    assert math.isclose(global_mean, expected.loss, rel_tol=1e-5, abs_tol=1e-6), (
        global_mean,
        expected.loss,
    )
    return expected


def assert_same_error_everywhere(outcomes: list[Outcome], fragment: str) -> None:
    """Every rank raised the identical error, naming the odd rank and containing ``fragment``."""
    messages = [got.error for got in outcomes]
    assert None not in messages, f"some rank did not raise: {messages}"
    assert len(set(messages)) == 1, messages
    assert fragment in messages[0], messages[0]
    assert f"rank {ODD_RANK}:" in messages[0] or f"rank(s) [{ODD_RANK}]" in messages[0], messages[0]


# -- 1. a fault on one rank ---------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    """A fault on ``ODD_RANK``: loss codes on its ``FAULTY_EXAMPLES`` or garbage.

    ``error`` is a fragment of the error every rank must raise; None = the step runs.
    """

    name: str
    code: int = CLEAN
    garbage: str | None = None
    nan: str = "raise"
    error: str | None = None


FAULTS = [
    Fault("nan_raise", code=NAN, error="2 NaN loss(es)"),
    Fault("nan_ignore", code=NAN, nan="ignore"),
    Fault("pos_inf", code=POS_INF),
    Fault("neg_inf", code=NEG_INF),
    Fault("losses_short", garbage="losses_short", error="shape"),
    Fault("losses_scalar", garbage="losses_scalar", error="shape"),
    Fault("losses_int", garbage="losses_int", error="floating-point"),
    Fault("losses_float64", garbage="losses_float64", error="loss dtype"),
    Fault("targets_short", garbage="targets_short", error=" raised "),
]


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fault", FAULTS, ids=lambda fault: fault.name)
def test_fault_on_one_rank(ranks, fault: Fault, mode: str, strategy: str, world_size: int):
    """NaN with nan="raise" and garbage: the same error on all ranks, naming the odd rank.
    NaN with nan="ignore": those instances are invalid (counted as NaN), the step matches
    the reference that drops them. +inf: the hardest, selected first; -inf: the easiest,
    not selected; no error, the step matches the reference."""
    sizes = SIZES[world_size]
    offset = sum(sizes[:ODD_RANK])
    codes = {offset + index: fault.code for index in FAULTY_EXAMPLES if fault.code != CLEAN}
    scenario = Scenario(
        mode,
        sizes,
        {"keep": 0.4, "strategy": strategy, "nan": fault.nan},
        codes=codes,
        garbage=fault.garbage,
    )
    outcomes = run(ranks, scenario)
    if fault.error is not None:
        assert_same_error_everywhere(outcomes, fault.error)
        return
    expected = assert_matches_reference(outcomes, scenario)
    faulty_selected = outcomes[ODD_RANK].mask[list(FAULTY_EXAMPLES)].tolist()
    if fault.code == POS_INF:
        assert faulty_selected == [True, True]
        assert expected.loss == math.inf
    elif fault.code == NEG_INF:
        assert faulty_selected == [False, False]
    else:
        assert faulty_selected == [False, False]
        assert outcomes[0].num_nan == len(FAULTY_EXAMPLES)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("mode", ["two_pass", "two_pass_balanced"])
@pytest.mark.parametrize("nan_inputs", [(6, 7), (6, 7, 8, 9, 10)], ids=["some", "all"])
def test_two_pass_rank_training_nothing_skips_nan_inputs(
    ranks, nan_inputs: tuple[int, ...], mode: str, strategy: str
):
    """NaN features on rank 1 (``nan="ignore"``), which trains nothing (the one selected
    example is rank 0's +inf): its zero-weight forward skips the NaN examples, so no NaN
    reaches the gradient, and the step matches the reference that drops them. Mask mode
    back-propagates through every instance, so NaN activations do reach its gradient."""
    scenario = Scenario(
        mode,
        (6, 5),
        {"top_k": 1, "strategy": strategy, "nan": "ignore"},
        codes={0: POS_INF},
        nan_inputs=nan_inputs,
    )
    outcomes = run(ranks, scenario)
    assert_matches_reference(outcomes, scenario)
    assert outcomes[0].mask[0] and not outcomes[1].mask.any()
    assert outcomes[0].num_nan == len(nan_inputs)


# -- 2. a selector configuration that differs on one rank -----------------------------------

CONFIG_CHANGES = {
    "keep": ({"keep": 0.5}, {"keep": 0.25}),
    "top_k": ({"top_k": 3}, {"top_k": 4}),
    "rule": ({"keep": 0.5}, {"keep": None, "top_k": 3}),
    "scope": ({"keep": 0.5}, {"scope": "local"}),
    "strategy": ({"keep": 0.5}, {"strategy": "bracket"}),
    "nan": ({"keep": 0.5}, {"nan": "ignore"}),
    "min_kept": ({"keep": 0.5, "min_kept": 2}, {"min_kept": 3}),
    "seed": ({"keep": 0.5, "scope": "random", "seed": 1}, {"seed": 2}),
}


@pytest.mark.parametrize("mode", ["mask", "two_pass"])
@pytest.mark.parametrize("what", CONFIG_CHANGES)
def test_selector_config_differing_on_one_rank(ranks, what: str, mode: str):
    """Any selector argument differing on one rank: the same error on every rank."""
    base, changed = CONFIG_CHANGES[what]
    outcomes = run(ranks, Scenario(mode, SIZES[3], base, odd_kwargs=changed))
    assert_same_error_everywhere(outcomes, "selector configuration differs between rank 0")


# -- 3. edge batches -------------------------------------------------------------------------

#: name -> (uses SIZES_WITH_EMPTY_RANK / all-empty / SIZES, selector kwargs, ignore fraction)
EDGES = {
    "empty_rank": ("one_empty", {"keep": 0.4}, 0.0),
    "all_ranks_empty": ("all_empty", {"keep": 0.4}, 0.0),
    "all_ignored": ("full", {"keep": 0.4, "nan": "ignore"}, 1.0),
    "m_equals_k_keep_1": ("full", {"keep": 1.0, "nan": "ignore"}, 0.3),
    "m_equals_k_top_k_above_k": ("full", {"top_k": 1000, "nan": "ignore"}, 0.3),
    "m_one_top_k": ("one_empty", {"top_k": 1}, 0.0),
    "m_one_min_kept": ("full", {"loss_thresh": 1e9, "min_kept": 1}, 0.0),
}
EDGE_CASES = [(w, edge) for w in (2, 3) for edge in EDGES] + [
    (4, "empty_rank"),
    (4, "all_ignored"),
    (4, "m_one_top_k"),
]


def edge_sizes(layout: str, world_size: int) -> tuple[int, ...]:
    if layout == "one_empty":
        return SIZES_WITH_EMPTY_RANK[world_size]
    if layout == "all_empty":
        return (0,) * world_size
    return SIZES[world_size]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("world_size", "edge"), EDGE_CASES)
def test_edge_batch(ranks, world_size: int, edge: str, mode: str, strategy: str):
    """Edge batches run on every rank and match the reference (selection, K, M, mean loss,
    gradients); K = 0 gives loss 0 and zero gradients, no NaN; M equals K or 1 as asked."""
    layout, kwargs, ignore_fraction = EDGES[edge]
    scenario = Scenario(
        mode,
        edge_sizes(layout, world_size),
        {**kwargs, "strategy": strategy},
        ignore_fraction=ignore_fraction,
    )
    outcomes = run(ranks, scenario)
    expected = assert_matches_reference(outcomes, scenario)
    if edge in ("all_ignored", "all_ranks_empty"):
        assert expected.num_valid == 0 and expected.num_selected == 0
        for got in outcomes:
            assert got.loss == 0.0
            assert all(torch.count_nonzero(g) == 0 for g in got.grads)
    elif edge.startswith("m_equals_k"):
        assert 0 < expected.num_selected == expected.num_valid < sum(scenario.sizes)
    elif edge.startswith("m_one"):
        assert expected.num_selected == 1
    else:
        assert 0 < expected.num_selected < expected.num_valid


# -- 4. deferred checks: the bad call completes, the next call raises ------------------------

DEFERRED_FAULTS = {
    "nan": "NaN loss(es)",
    "wrong_shape": "score has shape",
    "config_differs": "selector configuration differs between rank 0",
}


def deferred_fault_on_rank(fault: str, sizes: tuple[int, ...]) -> tuple[Outcome, Outcome]:
    """Worker: a clean first call, the fault in the second call (deferred checks), then a
    third call and ``check()``. Returns the second call's outcome and the raise after it."""
    rank = get_rank()
    inputs, labels = (rank_slice(t, list(sizes), rank) for t in global_batch(deferred(sizes)))
    model = make_mlp()
    ddp = DDP(model)
    ohem = OHEMLoss(coded_criterion, ignore_index=IGNORE, keep=0.5, check="deferred")
    ohem(ddp(inputs), labels).backward()  # the first call: eager, agrees the config
    model.zero_grad()
    odd = rank == ODD_RANK
    bad_labels, score = labels.clone(), None
    if odd and fault == "nan":
        bad_labels[list(FAULTY_EXAMPLES)] += NUM_CLASSES * NAN
    elif odd and fault == "wrong_shape":
        score = torch.zeros(len(labels) + 1)
    elif odd and fault == "config_differs":
        ohem._caller_config = (*ohem._caller_config, "changed")
    ohem(ddp(inputs), bad_labels, score=score).backward()
    selected = ohem.last
    bad_call = Outcome(
        grads=[p.grad.clone() if p.grad is not None else None for p in model.parameters()],
        mask=selected.mask.clone(),
        num_selected=selected.num_selected_global,
    )
    try:
        ohem(model(inputs), labels)
        ohem.selector.check()
    except DistributedInputError as exc:
        return bad_call, Outcome(error=str(exc))
    return bad_call, Outcome()


def deferred(sizes: tuple[int, ...]) -> Scenario:
    return Scenario("mask", sizes, {"keep": 0.5})


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("fault", DEFERRED_FAULTS)
def test_deferred_fault_raises_on_every_rank_by_the_next_call(ranks, fault: str, world_size):
    """The bad call runs everywhere and trains on the rest: its gradients equal the
    reference without the bad instances (the NaN ones, the bad rank's, or none at all
    when the configurations differ); every rank raises the same error afterwards."""
    sizes = SIZES[world_size]
    outcomes = ranks.run(world_size, deferred_fault_on_rank, fault, sizes, timeout=TIMEOUT_S)
    assert_same_error_everywhere([after for _, after in outcomes], DEFERRED_FAULTS[fault])
    inputs, labels = global_batch(deferred(sizes))
    model = make_mlp()
    with torch.no_grad():
        losses = coded_criterion(model(inputs), labels)
    usable = torch.ones(len(labels), dtype=torch.bool)
    odd_rows = torch.arange(sum(sizes[:ODD_RANK]), sum(sizes[: ODD_RANK + 1]))
    if fault == "nan":
        usable[odd_rows[list(FAULTY_EXAMPLES)]] = False
    elif fault == "wrong_shape":
        usable[odd_rows] = False
    elif fault == "config_differs":
        usable[:] = False
    mask = select_mask_of(losses, usable)
    reference = coded_criterion(model(inputs[mask]), labels[mask]).sum() / max(int(mask.sum()), 1)
    if mask.any():
        reference.backward()
    for rank, (bad_call, _) in enumerate(outcomes):
        assert torch.equal(bad_call.mask, rank_slice(mask, list(sizes), rank)), rank
        assert bad_call.num_selected == int(mask.sum())
        for got, parameter in zip(bad_call.grads, model.parameters(), strict=True):
            want = torch.zeros_like(parameter) if parameter.grad is None else parameter.grad
            assert (got - want).abs().max().item() <= TOLERANCE, rank


def select_mask_of(losses: torch.Tensor, usable: torch.Tensor) -> torch.Tensor:
    return reference_mask({"keep": 0.5}, [len(losses)], losses, usable, None)


def skipped_call_on_rank(losses: torch.Tensor) -> Outcome:
    """Worker: three deferred selector calls, one fewer on ``ODD_RANK``, then ``check()``."""
    selector = HardExampleSelector(keep=0.5, check="deferred")
    try:
        for call in range(3):
            if not (get_rank() == ODD_RANK and call == 1):
                selector(losses)
        selector.check()
    except DistributedInputError as exc:
        return Outcome(error=str(exc))
    return Outcome()


@pytest.mark.parametrize("world_size", [2, 4])
def test_deferred_rank_that_skips_a_call_raises_at_check(ranks, world_size: int):
    outcomes = ranks.run(world_size, skipped_call_on_rank, torch.rand(6), timeout=TIMEOUT_S)
    assert_same_error_everywhere(outcomes, "a rank made one selector call fewer")


def deferred_clean_on_rank(losses: torch.Tensor) -> int:
    """Worker: deferred calls and ``check()`` with nothing wrong raise nothing."""
    selector = HardExampleSelector(keep=0.5, check="deferred")
    for _ in range(3):
        selected = selector(losses).num_selected_global
    selector.check()
    selector.check()
    return selected


def test_deferred_check_without_a_fault_passes(ranks):
    assert ranks.run(3, deferred_clean_on_rank, torch.rand(5), timeout=TIMEOUT_S) == [8] * 3


def test_deferred_selector_restored_from_a_checkpoint_agrees_anew():
    """A restored call counter (launch/checkpoints.py) does not skip the eager first call
    that agrees the key dtype: float64 losses keep working."""
    selector = HardExampleSelector(keep=0.5, check="deferred")
    selector.num_calls = 7
    losses = torch.rand(10, dtype=torch.float64)
    for _ in range(3):
        mask = selector(losses).mask
    selector.check()
    assert torch.equal(mask, reference_mask({"keep": 0.5}, [10], losses, None, None))


def deferred_capacity_failure_on_rank(
    sizes: tuple[int, ...],
) -> tuple[list, int, str | None]:
    """Worker: two-pass with capacity in micro-batches, deferred checks; the odd rank's
    ``score_fn`` raises at the second step. Returns that step's gradients and training
    chunks, and the error of the third step."""
    rank = get_rank()
    inputs, labels = (rank_slice(t, list(sizes), rank) for t in global_batch(deferred(sizes)))
    model = make_mlp()
    # A buffer: DDP broadcasts it in every forward, so the ranks must run as many.
    model.register_buffer("marker", torch.zeros(1))
    ddp = DDP(model)
    selector = HardExampleSelector(keep=0.5, check="deferred")
    failing = [False]

    def score_fn(example_losses: torch.Tensor, *_: object) -> torch.Tensor:
        if failing[0]:
            raise RuntimeError("the score model is broken")
        return example_losses

    def step() -> int:
        return ohem_step(
            ddp,
            inputs,
            labels,
            coded_criterion,
            selector,
            score_fn=score_fn,
            micro_batch_size=2,
            capacity_factor=1.0,
        ).num_chunks

    step()
    model.zero_grad()
    failing[0] = rank == ODD_RANK
    num_chunks = step()
    failing[0] = False
    grads = [p.grad.clone() for p in model.parameters()]
    try:
        step()
    except DistributedInputError as exc:
        return grads, num_chunks, str(exc)
    return grads, num_chunks, None


def test_deferred_failure_under_capacity_micro_batches_keeps_the_chunk_count(ranks):
    """A rank whose scoring pass fails trains as many capacity chunks as the ranks agreed
    before scoring (rank 1's 3, not rank 0's 2), at weight 0: DDP's buffer broadcast in
    every forward stays paired, the step ends everywhere and equals the reference without
    its examples; every rank raises at the next step."""
    sizes = (6, 9)
    outcomes = ranks.run(2, deferred_capacity_failure_on_rank, sizes, timeout=TIMEOUT_S)
    assert [num_chunks for _, num_chunks, _ in outcomes] == [3, 3]
    errors = [error for _, _, error in outcomes]
    assert errors[0] is not None and errors[0] == errors[1], errors
    assert "the score model is broken" in errors[0]
    inputs, labels = global_batch(deferred(sizes))
    model = make_mlp()
    with torch.no_grad():
        losses = coded_criterion(model(inputs), labels)
    usable = torch.zeros(sum(sizes), dtype=torch.bool)
    usable[: sizes[0]] = True
    mask = select_mask_of(losses, usable)
    (coded_criterion(model(inputs[mask]), labels[mask]).sum() / int(mask.sum())).backward()
    for grads, _, _ in outcomes:
        for got, parameter in zip(grads, model.parameters(), strict=True):
            assert (got - parameter.grad).abs().max().item() <= TOLERANCE
