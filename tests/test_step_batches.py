"""ohem_step on real batches (docs/DESIGN.md §9): padding and ignored positions, a valid mask,
one selection over micro-batches, a score that is not the loss, the logged mean loss.

Every case runs under DDP on real gloo ranks and is compared with a single-process
reference on the concatenated batch written here from scratch (log-softmax, per-example
mean over the valid positions, a brute-force sort for the selection): gradients within
1e-6 in fp32, the selection, and the global mean loss. One multi-rank run per world
size executes all of that world size's cases (module-scoped fixtures), and the tests
check them one by one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

from dist_ohem import DistributedInputError, HardExampleSelector, OHEMLoss, ohem_step
from dist_ohem.batches import chunk_bounds
from dist_ohem.comm import get_rank
from dist_ohem.loss import per_instance_criterion
from dist_ohem.scoring import ExampleLosses, masked_mean_per_example
from dist_ohem.train_pass import capacity_of
from tests.parity import (
    IGNORE,
    BufferedMLP,
    TokenModel,
    brute_force_top,
    classification_batch,
    make_mlp,
    rank_slice,
    reference_count,
    token_batch,
)

TOLERANCE = 1e-6
TIMEOUT_S = 90


# -- scores (module level: the cases travel to the ranks by pickle) ------------------------


def baseline_model() -> nn.Module:
    """A fixed second MLP standing in for a reference model (another seed)."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def easiest(example_losses: torch.Tensor, inputs, targets) -> torch.Tensor:
    """Score = -loss: the selection takes the easiest examples."""
    return -example_losses


def excess_loss(example_losses: torch.Tensor, inputs, targets) -> torch.Tensor:
    """Score = loss - the baseline model's loss (RHO-LOSS's reducible loss)."""
    with torch.no_grad():
        baseline = nn.functional.cross_entropy(baseline_model()(inputs), targets, reduction="none")
    return example_losses - baseline


def nan_for_marked(example_losses: torch.Tensor, inputs, targets) -> torch.Tensor:
    """The loss, but NaN for examples whose first feature is exactly 0 (marked)."""
    return torch.where(inputs[:, 0] == 0, math.nan, example_losses)


SCORES = {"easiest": easiest, "excess": excess_loss, "nan_marked": nan_for_marked}


# -- cases and the single-process reference ---------------------------------------------------


@dataclass(frozen=True)
class StepCase:
    """One two-pass step on W ranks.

    ``data``: ``"tokens"`` ((N, T) token batches with padding and ignored positions),
    ``"classes"`` (8 features, 4 classes) or ``"skewed"`` (classes whose only hard
    examples are ``hard_rank``'s). ``invalid`` are global indices passed as
    ``valid=False``; ``fully_ignored`` are token examples with no valid position;
    ``marked`` are global indices whose first feature is set to 0 (``nan_marked``).
    """

    name: str
    data: str
    sizes: tuple[int, ...]
    rule: dict
    micro_batch_size: int | None = None
    balance: bool = False
    invalid: tuple[int, ...] = ()
    fully_ignored: tuple[int, ...] = ()
    marked: tuple[int, ...] = ()
    score: str | None = None
    hard_rank: int | None = None
    nan: str = "raise"
    sync_mean_loss: bool = True
    seed: int = 3
    capacity: float | None = None  # ohem_step's capacity_factor (None: the selected rows)


def build_model(case: StepCase) -> nn.Module:
    return TokenModel() if case.data == "tokens" else BufferedMLP()


def case_batch(case: StepCase) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The concatenated batch of all ranks and the ``valid`` mask (None when not used)."""
    n = sum(case.sizes)
    if case.data == "tokens":
        inputs, targets = token_batch(case.seed, n, fully_ignored=case.fully_ignored)
    else:
        inputs, targets = classification_batch(case.seed, n)
        inputs[list(case.marked), 0] = 0.0
    if case.hard_rank is not None:
        with torch.no_grad():
            logits = build_model(case)(inputs)
        hard = torch.zeros(n, dtype=torch.bool)
        rank_slice(hard, list(case.sizes), case.hard_rank)[:] = True
        targets = torch.where(hard, logits.argmin(1), logits.argmax(1))
    valid = None
    if case.invalid:
        valid = torch.ones(n, dtype=torch.bool)
        valid[list(case.invalid)] = False
    return inputs, targets, valid


def reference_example_losses(logits: torch.Tensor, targets: torch.Tensor):
    """Per-example cross-entropy, averaged over the target positions != IGNORE, and whether
    an example has any such position; from log_softmax, not nn.CrossEntropyLoss."""
    log_probs = torch.log_softmax(logits, dim=1)
    kept = targets != IGNORE
    picked = log_probs.gather(1, targets.clamp(min=0).unsqueeze(1)).squeeze(1)
    per_position = -picked * kept
    if per_position.dim() == 1:
        return per_position, kept
    counts = kept.sum(1)
    return per_position.sum(1) / counts.clamp(min=1), counts > 0


@dataclass
class Expected:
    grads: list[torch.Tensor]
    mask: torch.Tensor
    mean_loss: float
    num_valid: int
    num_nan: int


def reference(case: StepCase) -> Expected:
    """One process, concatenated batch: the selection by the case's score over the valid
    examples, then the gradient of the mean loss over the selected examples."""
    inputs, targets, valid = case_batch(case)
    model = build_model(case)
    losses, has_position = reference_example_losses(model(inputs), targets)
    usable = has_position if valid is None else has_position & valid
    scores = losses.detach()
    if case.score == "easiest":
        scores = -scores
    elif case.score == "excess":
        with torch.no_grad():
            baseline = -torch.log_softmax(baseline_model()(inputs), 1)
        scores = scores - baseline.gather(1, targets.unsqueeze(1)).squeeze(1)
    elif case.score == "nan_marked":
        scores = scores.clone()
        scores[list(case.marked)] = math.nan
    nan = torch.isnan(scores) & usable
    usable = usable & ~nan
    count = reference_count(case.rule, int(usable.sum()))
    mask = brute_force_top(scores, usable, count)
    mean = losses[mask].sum() / max(count, 1)
    mean.backward()
    return Expected(
        [p.grad for p in model.parameters()],
        mask,
        float(mean.detach()),
        int(usable.sum()),
        int(nan.sum()),
    )


def counting_allreduce(counter: list[int], bucket):
    """DDP comm hook: the default all-reduce, counted."""
    counter[0] += 1
    return default_hooks.allreduce_hook(None, bucket)


def step_cases_on_rank(cases: list[StepCase]) -> list[dict]:
    """Worker: every case's ohem_step under DDP on this rank's slice."""
    rank = get_rank()
    results = []
    for case in cases:
        inputs, targets, valid = (
            None if t is None else rank_slice(t, list(case.sizes), rank) for t in case_batch(case)
        )
        model = build_model(case)
        ddp = DDP(model)
        syncs = [0]
        ddp.register_comm_hook(syncs, counting_allreduce)
        out = ohem_step(
            ddp,
            inputs,
            targets,
            nn.CrossEntropyLoss(),
            HardExampleSelector(**case.rule, nan=case.nan),
            balance=case.balance,
            valid=valid,
            micro_batch_size=case.micro_batch_size,
            score_fn=SCORES.get(case.score),
            sync_mean_loss=case.sync_mean_loss,
            capacity_factor=case.capacity,
        )
        results.append(
            {
                "grads": [p.grad.clone() for p in model.parameters()],
                "mask": out.selection.mask.clone(),
                "mean_loss": out.mean_loss,
                "loss": float(out.loss),
                "num_chunks": out.num_chunks,
                "num_trained": out.num_trained_local,
                "selected_per_rank": out.selection.selected_per_rank,
                "num_valid": out.selection.num_valid_global,
                "num_nan": out.selection.num_nan_global,
                "syncs": syncs[0],
            }
        )
    return results


TOKENS_3 = (5, 2, 4)
STEP_CASES: dict[int, list[StepCase]] = {
    1: [
        StepCase("micro3", "classes", (7,), {"keep": 0.6}, micro_batch_size=3),
        StepCase("tokens-micro4", "tokens", (6,), {"keep": 0.5}, micro_batch_size=4),
    ],
    2: [
        StepCase("micro2", "classes", (7, 3), {"keep": 0.7}, micro_batch_size=2),
        StepCase("micro2-bal", "classes", (7, 3), {"keep": 0.7}, micro_batch_size=2, balance=True),
        # rank 0 owns none of the selection; it trains only zero-weight chunks
        StepCase("micro3-idle0", "skewed", (4, 8), {"top_k": 7}, 3, hard_rank=1),
        StepCase("micro3-idle0-bal", "skewed", (4, 8), {"top_k": 7}, 3, True, hard_rank=1),
        StepCase("easiest", "classes", (6, 5), {"keep": 0.3}, score="easiest"),
        StepCase("easiest-micro2", "classes", (6, 5), {"keep": 0.3}, 2, score="easiest"),
        StepCase("excess", "classes", (6, 5), {"top_k": 4}, score="excess"),
        StepCase(
            "nan-ignore",
            "classes",
            (6, 5),
            {"keep": 0.5},
            score="nan_marked",
            marked=(1, 7),
            nan="ignore",
        ),
        StepCase("no-mean-sync", "classes", (6, 5), {"keep": 0.5}, sync_mean_loss=False),
    ],
    3: [
        StepCase("tokens", "tokens", TOKENS_3, {"keep": 0.5}, fully_ignored=(6,)),
        StepCase("tokens-top", "tokens", TOKENS_3, {"top_k": 9}, fully_ignored=(0, 6)),
        StepCase(
            "tokens-micro2-bal", "tokens", TOKENS_3, {"keep": 0.5}, 2, True, fully_ignored=(6,)
        ),
        # rank 1's examples are all invalid
        StepCase("valid", "classes", (4, 3, 5), {"keep": 0.5}, invalid=(0, 4, 5, 6, 11)),
        StepCase(
            "valid-micro2-bal", "classes", (4, 3, 5), {"keep": 0.5}, 2, True, invalid=(4, 5, 6)
        ),
        StepCase("micro2", "classes", (5, 1, 8), {"keep": 0.8}, micro_batch_size=2),
        StepCase("micro3-bal", "classes", (5, 1, 8), {"keep": 0.8}, 3, balance=True),
        # ranks 0 and 1 own none of the selection
        StepCase("micro3-idle01", "skewed", (3, 4, 6), {"top_k": 6}, 3, hard_rank=2),
        StepCase("excess-micro2", "classes", (5, 1, 8), {"keep": 0.4}, 2, score="excess"),
    ],
    4: [
        StepCase("tokens-micro2", "tokens", (3, 0, 4, 2), {"keep": 0.6}, 2, fully_ignored=(4,)),
    ],
}
# Capacity: a fixed number of rows per rank, weight 0 on the unselected ones; "over"
# cases put the selection on one rank, beyond its capacity (an overflow chunk).
CAPACITY_CASES: dict[int, list[StepCase]] = {
    1: [StepCase("cap", "classes", (9,), {"keep": 0.4}, capacity=1.25)],
    2: [
        StepCase("cap", "classes", (7, 3), {"keep": 0.7}, capacity=1.0),
        StepCase("cap-over-idle0", "skewed", (4, 8), {"top_k": 7}, hard_rank=1, capacity=1.0),
        StepCase("cap-over-micro2", "skewed", (4, 8), {"top_k": 7}, 2, hard_rank=1, capacity=1.0),
        StepCase("cap-easiest", "classes", (6, 5), {"keep": 0.3}, score="easiest", capacity=1.5),
        StepCase(
            "cap-nan-ignore",
            "classes",
            (6, 5),
            {"keep": 0.5},
            score="nan_marked",
            marked=(1, 7),
            nan="ignore",
            capacity=1.25,
        ),
    ],
    3: [
        StepCase(
            "cap-tokens", "tokens", TOKENS_3, {"keep": 0.5}, fully_ignored=(6,), capacity=1.25
        ),
        StepCase(
            "cap-valid",
            "classes",
            (4, 3, 5),
            {"keep": 0.5},
            invalid=(0, 4, 5, 6, 11),
            capacity=1.25,
        ),
        StepCase("cap-micro2", "classes", (5, 1, 8), {"keep": 0.8}, 2, capacity=1.25),
        StepCase("cap-over", "skewed", (3, 4, 6), {"top_k": 6}, hard_rank=2, capacity=0.5),
    ],
    4: [
        StepCase(
            "cap-tokens-micro2",
            "tokens",
            (3, 0, 4, 2),
            {"keep": 0.6},
            2,
            fully_ignored=(4,),
            capacity=1.0,
        ),
    ],
}
for _world_size, _cases in CAPACITY_CASES.items():
    STEP_CASES[_world_size] += _cases
ALL_STEP_CASES = [(w, case) for w, cases in STEP_CASES.items() for case in cases]


@pytest.fixture(scope="module")
def step_results(ranks) -> dict[int, list[list[dict]]]:
    """Every world size's cases, one multi-rank run each: ``[case][rank] -> result``."""
    results = {}
    for world_size, cases in STEP_CASES.items():
        per_rank = ranks.run(world_size, step_cases_on_rank, cases, timeout=TIMEOUT_S)
        results[world_size] = [list(by_rank) for by_rank in zip(*per_rank, strict=True)]
    return results


@pytest.mark.parametrize(
    ("world_size", "case"), ALL_STEP_CASES, ids=[f"W{w}-{case.name}" for w, case in ALL_STEP_CASES]
)
def test_step_matches_single_process_reference(step_results, world_size, case):
    """Selection, K, gradients (<= 1e-6) and the global mean loss equal the reference;
    every rank ran the same number of chunks and synchronised gradients exactly once."""
    got = step_results[world_size][STEP_CASES[world_size].index(case)]
    want = reference(case)
    sizes = list(case.sizes)
    for rank, result in enumerate(got):
        assert torch.equal(result["mask"], rank_slice(want.mask, sizes, rank)), f"rank {rank}"
        assert (result["num_valid"], result["num_nan"]) == (want.num_valid, want.num_nan)
        for g, w in zip(result["grads"], want.grads, strict=True):
            diff = (g - w).abs().max().item()
            assert diff <= TOLERANCE, f"rank {rank}: max |grad diff| {diff:.2e}"
        if case.sync_mean_loss:
            assert math.isclose(result["mean_loss"], want.mean_loss, rel_tol=1e-6), rank
        else:
            assert math.isnan(result["mean_loss"])
        if case.capacity is None:
            assert result["syncs"] == 1, f"rank {rank} synchronised {result['syncs']} times"
        else:  # once per capacity span: the overflow's span synchronises again
            assert result["syncs"] == 1 + (result["num_chunks"] > capacity_chunks(case, got)), rank
    # The logged loss is each rank's share: their average is the mean.
    shares = sum(result["loss"] for result in got) / world_size
    assert math.isclose(shares, want.mean_loss, rel_tol=1e-5, abs_tol=1e-7)
    trained = [result["num_trained"] for result in got]
    assert sum(trained) == int(want.mask.sum())
    if case.balance:
        assert max(trained) - min(trained) <= 1
    if case.capacity is not None:
        assert len({result["num_chunks"] for result in got}) == 1
        if case.name.startswith("cap-over"):  # the selection overflowed the hard rank
            assert got[0]["num_chunks"] > capacity_chunks(case, got)
        return
    chunk = case.micro_batch_size or max(max(trained), 1)
    assert {result["num_chunks"] for result in got} == {max(1, -(-max(trained) // chunk))}
    if case.hard_rank is not None:
        assert got[0]["selected_per_rank"][case.hard_rank] == int(want.mask.sum())


def capacity_chunks(case: StepCase, got: list[dict]) -> int:
    """The chunks of the capacity span, every rank's: capacity over the chunk size."""
    if case.micro_batch_size is None:
        return 1
    selector = HardExampleSelector(**case.rule)
    capacities = [capacity_of(selector, case.capacity, n, len(case.sizes)) for n in case.sizes]
    return max(-(-capacity // case.micro_batch_size) for capacity in capacities)


def test_cases_exercise_what_they_claim():
    """The data really has what the cases are about (else a case could pass vacuously)."""
    tokens = STEP_CASES[3][0]
    _, targets, _ = case_batch(tokens)
    kept = (targets != IGNORE).sum(1)
    assert kept[6] == 0 and (kept > 0).sum() == sum(TOKENS_3) - 1
    assert len(set(kept.tolist())) >= 3  # padding at different lengths
    rank1_invalid = STEP_CASES[3][3]
    assert set(range(4, 7)) <= set(rank1_invalid.invalid)  # rank 1 holds globals 4..6
    micro = STEP_CASES[3][5]
    assert any(n % micro.micro_batch_size for n in micro.sizes)
    easiest_case = STEP_CASES[2][4]
    assert easiest_case.score == "easiest"
    inputs, targets, _ = case_batch(easiest_case)
    with torch.no_grad():
        losses, _ = reference_example_losses(BufferedMLP()(inputs), targets)
    selected = reference(easiest_case).mask
    assert losses[selected].max() < losses[~selected].min()  # the easiest, not the hardest


# -- mask mode: OHEMLoss(score=) and last_mean_loss -----------------------------------------


@dataclass(frozen=True)
class MaskCase:
    name: str
    sizes: tuple[int, ...]
    rule: dict
    score: str | None
    ignore_fraction: float = 0.0
    seed: int = 4


MASK_CASES = [
    MaskCase("loss", (6, 0, 7), {"keep": 0.4}, None, ignore_fraction=0.2),
    MaskCase("easiest", (6, 0, 7), {"keep": 0.4}, "easiest"),
    MaskCase("excess", (6, 0, 7), {"top_k": 5}, "excess", ignore_fraction=0.2),
]


def mask_score(name: str | None, losses: torch.Tensor, inputs, targets) -> torch.Tensor | None:
    if name is None:
        return None
    safe_targets = targets.clamp(min=0)  # ignored instances are dropped by ignore_index
    return SCORES[name](losses.detach(), inputs, safe_targets)


def mask_cases_on_rank(cases: list[MaskCase]) -> list[tuple[list[torch.Tensor], float]]:
    rank = get_rank()
    results = []
    for case in cases:
        inputs, targets = (
            rank_slice(t, list(case.sizes), rank)
            for t in classification_batch(case.seed, sum(case.sizes), case.ignore_fraction)
        )
        model = make_mlp()
        ddp = DDP(model)
        ohem = OHEMLoss(nn.CrossEntropyLoss(), **case.rule)
        logits = ddp(inputs)
        losses = nn.functional.cross_entropy(logits, targets, reduction="none")
        loss = ohem(logits, targets, score=mask_score(case.score, losses, inputs, targets))
        loss.backward()
        results.append(([p.grad.clone() for p in model.parameters()], ohem.last_mean_loss))
    return results


@pytest.fixture(scope="module")
def mask_results(ranks):
    per_rank = ranks.run(3, mask_cases_on_rank, MASK_CASES, timeout=TIMEOUT_S)
    return [list(by_rank) for by_rank in zip(*per_rank, strict=True)]


@pytest.mark.parametrize("case", MASK_CASES, ids=lambda case: case.name)
def test_ohem_loss_score_selects_by_score_and_trains_on_loss(mask_results, case):
    inputs, targets = classification_batch(case.seed, sum(case.sizes), case.ignore_fraction)
    model = make_mlp()
    losses, usable = reference_example_losses(model(inputs), targets)
    scores = losses.detach()
    if case.score == "easiest":
        scores = -scores
    elif case.score == "excess":
        baseline = -torch.log_softmax(baseline_model()(inputs), 1).detach()
        scores = scores - baseline.gather(1, targets.clamp(min=0).unsqueeze(1)).squeeze(1)
    count = reference_count(case.rule, int(usable.sum()))
    mask = brute_force_top(scores, usable, count)
    mean = losses[mask].sum() / count
    mean.backward()
    for rank, (grads, last_mean_loss) in enumerate(mask_results[MASK_CASES.index(case)]):
        for g, w in zip(grads, [p.grad for p in model.parameters()], strict=True):
            diff = (g - w).abs().max().item()
            assert diff <= TOLERANCE, f"rank {rank}: max |grad diff| {diff:.2e}"
        assert math.isclose(last_mean_loss, float(mean.detach()), rel_tol=1e-6), rank


ACCUMULATION_SIZES = ((6, 0, 7), (3, 5, 2))


def mask_accumulation_on_rank() -> list[torch.Tensor]:
    """README recipe: mask mode over 2 micro-batches with reduction="sum", the first under
    no_sync, then the gradients divided by the step's total M."""
    rank = get_rank()
    model = make_mlp()
    ddp = DDP(model)
    ohem = OHEMLoss(nn.CrossEntropyLoss(), keep=0.4, reduction="sum")
    selected_in_step = 0
    for micro, sizes in enumerate(ACCUMULATION_SIZES):
        inputs, targets = (
            rank_slice(t, list(sizes), rank) for t in classification_batch(30 + micro, sum(sizes))
        )
        context = ddp.no_sync() if micro == 0 else torch.enable_grad()
        with context:
            ohem(ddp(inputs), targets).backward()
        selected_in_step += ohem.last.num_selected_global
    for p in model.parameters():
        p.grad /= selected_in_step
    return [p.grad.clone() for p in model.parameters()]


def test_mask_mode_accumulation_weights_every_selected_instance_alike(ranks):
    """Each micro-batch selects its own top-M_b; the step's gradient is the mean over all
    M_1 + M_2 selected instances."""
    outputs = ranks.run(3, mask_accumulation_on_rank, timeout=TIMEOUT_S)
    model = make_mlp()
    total, count = 0.0, 0
    for micro, sizes in enumerate(ACCUMULATION_SIZES):
        inputs, targets = classification_batch(30 + micro, sum(sizes))
        losses, usable = reference_example_losses(model(inputs), targets)
        m = reference_count({"keep": 0.4}, int(usable.sum()))
        total = total + losses[brute_force_top(losses.detach(), usable, m)].sum()
        count += m
    (total / count).backward()
    for rank, grads in enumerate(outputs):
        for g, w in zip(grads, [p.grad for p in model.parameters()], strict=True):
            diff = (g - w).abs().max().item()
            assert diff <= TOLERANCE, f"rank {rank}: max |grad diff| {diff:.2e}"


def test_ohem_loss_without_mean_sync_reports_nan():
    logits, targets = torch.randn(5, 3), torch.tensor([0, 1, 2, 0, 1])
    ohem = OHEMLoss(nn.CrossEntropyLoss(), keep=0.5, sync_mean_loss=False)
    ohem(logits, targets)
    assert math.isnan(ohem.last_mean_loss)


# -- bad input: the same clear error on every rank ------------------------------------------


BAD_SIZES = [4, 5, 3]


def _classes_step(rank: int, **kwargs) -> None:
    inputs, targets = (
        rank_slice(t, BAD_SIZES, rank) for t in classification_batch(8, sum(BAD_SIZES))
    )
    model = DDP(BufferedMLP())  # held until the backward: a collected DDP skips its all-reduce
    kwargs.setdefault("selector", HardExampleSelector(keep=0.5))
    ohem_step(model, inputs, targets, nn.CrossEntropyLoss(), **kwargs)


def _raising_score(example_losses, inputs, targets):
    raise RuntimeError("the reference model is not loaded")


def bad_valid_shape(rank: int) -> None:
    _classes_step(rank, valid=torch.ones(3 if rank == 1 else BAD_SIZES[rank], dtype=torch.bool))


def bad_micro_batch_everywhere(rank: int) -> None:
    _classes_step(rank, micro_batch_size=0)


def bad_micro_batch_on_rank_1(rank: int) -> None:
    _classes_step(rank, micro_batch_size=-1 if rank == 1 else 2)


def nan_score_raise_on_rank_1(rank: int) -> None:
    def score(example_losses, inputs, targets):
        return torch.where(torch.arange(len(inputs)) == 2, math.nan, example_losses)

    _classes_step(rank, score_fn=score if rank == 1 else None)


def score_fn_raises_on_rank_1(rank: int) -> None:
    _classes_step(rank, score_fn=_raising_score if rank == 1 else easiest)


def score_wrong_shape_on_rank_1(rank: int) -> None:
    _classes_step(rank, score_fn=lambda losses, x, y: losses[:-1] if rank == 1 else losses)


def score_wrong_dtype_on_rank_1(rank: int) -> None:
    _classes_step(rank, score_fn=lambda losses, x, y: losses.long() if rank == 1 else losses)


def mask_score_wrong_shape_on_rank_1(rank: int) -> None:
    model = DDP(make_mlp())
    inputs, targets = classification_batch(rank, 4)
    logits = model(inputs)
    score = torch.rand(3 if rank == 1 else 4)
    OHEMLoss(nn.CrossEntropyLoss(), keep=0.5)(logits, targets, score=score).backward()


def mask_score_nan_on_rank_1(rank: int) -> None:
    model = DDP(make_mlp())
    inputs, targets = classification_batch(rank, 4)
    score = torch.rand(4)
    score[1] = math.nan if rank == 1 else 0.5
    OHEMLoss(nn.CrossEntropyLoss(), keep=0.5)(model(inputs), targets, score=score).backward()


@dataclass(frozen=True)
class BadInput:
    name: str
    call: object
    fragment: str
    ranks: tuple[int, ...] = (1,)  # the ranks the message must name


BAD_INPUTS = [
    BadInput("valid_shape", bad_valid_shape, "valid has shape (3,) but the batch holds 5"),
    BadInput(
        "micro_batch_zero",
        bad_micro_batch_everywhere,
        "micro_batch_size must be a positive number of examples, got 0",
        ranks=(0, 1, 2),
    ),
    BadInput("micro_batch_negative", bad_micro_batch_on_rank_1, "got -1; pass None"),
    BadInput("nan_score", nan_score_raise_on_rank_1, "score_fn returned 1 NaN score(s)"),
    BadInput("score_fn_raises", score_fn_raises_on_rank_1, "the reference model is not loaded"),
    BadInput("score_shape", score_wrong_shape_on_rank_1, "score_fn's return value has shape (4,)"),
    BadInput("score_dtype", score_wrong_dtype_on_rank_1, "floating-point tensor"),
    BadInput("mask_score_shape", mask_score_wrong_shape_on_rank_1, "score has shape (3,)"),
    BadInput("mask_score_nan", mask_score_nan_on_rank_1, "1 NaN loss(es)"),
]


def bad_inputs_on_rank(calls) -> list[str]:
    """Worker: each call's DistributedInputError message ('no error' if none)."""
    messages = []
    for call in calls:
        try:
            call(get_rank())
        except DistributedInputError as exc:
            messages.append(str(exc))
        else:
            messages.append("no error")
    return messages


@pytest.fixture(scope="module")
def bad_input_messages(ranks):
    per_rank = ranks.run(3, bad_inputs_on_rank, [bad.call for bad in BAD_INPUTS], timeout=TIMEOUT_S)
    return [list(by_rank) for by_rank in zip(*per_rank, strict=True)]


@pytest.mark.parametrize("bad", BAD_INPUTS, ids=lambda bad: bad.name)
def test_bad_input_raises_the_same_error_on_every_rank(bad_input_messages, bad):
    messages = bad_input_messages[BAD_INPUTS.index(bad)]
    assert len(set(messages)) == 1, messages
    assert bad.fragment in messages[0], messages[0]
    for rank in bad.ranks:
        assert f"rank {rank}:" in messages[0], messages[0]


def fsdp2_steps_on_rank(sizes: list[int]) -> tuple[list[str], list[torch.Tensor], int]:
    """FSDP2: three bad inputs, then a good chunked step (3 scoring chunks on rank 0, 1 on
    rank 1: the forwards gather parameters, so rank 1 pads its scoring pass). The third
    bad input is a score_fn raising on rank 0's second chunk, after the agreement on the
    number of chunks: rank 0 must still run its third forward before failing."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    rank = get_rank()
    mesh = init_device_mesh("cpu", (len(sizes),))
    inputs, targets = (rank_slice(t, sizes, rank) for t in classification_batch(12, sum(sizes)))
    calls = []

    def sharded_mlp() -> nn.Module:
        # Each Linear its own unit: non-root units reshard after every forward, so every
        # scoring forward all-gathers their parameters.
        model = make_mlp()
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        return fully_shard(model, mesh=mesh)

    def raises_on_the_second_chunk(losses, *_):
        calls.append(len(losses))
        if rank == 0 and len(calls) == 2:
            raise RuntimeError("score_fn failed on chunk 2")
        return losses

    messages = []
    for kwargs in (
        {"micro_batch_size": 0 if rank == 1 else 2},
        {"micro_batch_size": 2, "valid": torch.ones(sizes[rank] + rank, dtype=torch.bool)},
        {"micro_batch_size": 2, "score_fn": raises_on_the_second_chunk},
    ):
        model = sharded_mlp()
        try:
            ohem_step(
                model,
                inputs,
                targets,
                nn.CrossEntropyLoss(),
                HardExampleSelector(keep=0.5),
                **kwargs,
            )
        except DistributedInputError as exc:
            messages.append(str(exc))
        else:
            messages.append("no error")
    model = sharded_mlp()
    out = ohem_step(
        model,
        inputs,
        targets,
        nn.CrossEntropyLoss(),
        HardExampleSelector(keep=0.5),
        micro_batch_size=2,
    )
    return messages, [p.grad.full_tensor() for p in model.parameters()], out.num_chunks


def test_fsdp2_pads_the_scoring_pass_and_fails_together(ranks):
    sizes = [6, 2]
    outputs = ranks.run(2, fsdp2_steps_on_rank, sizes, timeout=TIMEOUT_S)
    (bad_micro, bad_valid, bad_score), _, _ = outputs[0]
    for messages, _, _ in outputs:
        assert messages == [bad_micro, bad_valid, bad_score]
    assert "rank 1: micro_batch_size must be a positive number" in bad_micro, bad_micro
    assert "rank 1: valid has shape (3,) but the batch holds 2" in bad_valid, bad_valid
    expected = "rank 0: the scoring pass raised RuntimeError: score_fn failed on chunk 2"
    assert expected in bad_score, bad_score
    assert "rank 1" not in bad_score, bad_score
    model = make_mlp()
    inputs, targets = classification_batch(12, sum(sizes))
    losses, usable = reference_example_losses(model(inputs), targets)
    mask = brute_force_top(losses.detach(), usable, reference_count({"keep": 0.5}, 8))
    losses[mask].mean().backward()
    most_chunks = max(-(-int(rank_slice(mask, sizes, r).sum()) // 2) for r in range(2))
    for rank, (_, grads, num_chunks) in enumerate(outputs):
        assert num_chunks == most_chunks
        for g, w in zip(grads, [p.grad for p in model.parameters()], strict=True):
            diff = (g - w).abs().max().item()
            assert diff <= TOLERANCE, f"rank {rank}: max |grad diff| {diff:.2e}"


# -- pure parts ----------------------------------------------------------------------------


@given(
    st.lists(
        st.lists(
            st.tuples(st.sampled_from([0.5, 1.0, 2.0, math.inf, math.nan]), st.booleans()),
            min_size=3,
            max_size=3,
        ),
        max_size=5,
    )
)
def test_masked_mean_is_the_mean_over_kept_positions(rows):
    """Ignored positions never reach the value, whatever they hold (inf, NaN)."""
    losses = torch.tensor([[v for v, _ in row] for row in rows]).reshape(len(rows), 3)
    kept = torch.tensor([[k for _, k in row] for row in rows], dtype=torch.bool)
    got = masked_mean_per_example(losses, kept.reshape(len(rows), 3))
    for i, row in enumerate(rows):
        values = [v for v, k in row if k]
        want = sum(values) / len(values) if values else 0.0
        if math.isnan(want):
            assert math.isnan(got[i])
        else:
            assert got[i].item() == pytest.approx(want)


@given(st.integers(0, 6), st.integers(1, 5), st.integers(0, 2**31 - 1), st.booleans())
def test_example_losses_mean_over_valid_tokens(n, length, seed, custom):
    """(N, T) token losses: the mean over the tokens whose target is not IGNORE, by loops;
    an example without one is flagged. A custom example_score sees every position and
    still gets the flags."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 3, length, generator=gen)
    targets = torch.randint(0, 3, (n, length), generator=gen)
    targets[torch.rand(n, length, generator=gen) < 0.4] = IGNORE
    score = (lambda losses: losses.sum(1)) if custom else None
    reduce = ExampleLosses(per_instance_criterion(nn.CrossEntropyLoss()), score, IGNORE)
    got, has_position = reduce(logits, targets)
    for i in range(n):
        token_losses = [
            -torch.log_softmax(logits[i, :, t], 0)[targets[i, t]].item()
            for t in range(length)
            if targets[i, t] != IGNORE
        ]
        assert bool(has_position[i]) == bool(token_losses)
        if custom:  # ignored tokens have loss 0 in CrossEntropyLoss
            want = sum(token_losses)
        else:
            want = sum(token_losses) / len(token_losses) if token_losses else 0.0
        assert got[i].item() == pytest.approx(want, abs=1e-5)


@given(st.integers(0, 40), st.integers(1, 9), st.integers(0, 6))
def test_chunk_bounds_cover_the_examples_once(num_examples, chunk_size, extra):
    num_chunks = -(-num_examples // chunk_size) + extra
    bounds = chunk_bounds(num_examples, chunk_size, num_chunks)
    assert len(bounds) == num_chunks
    covered = [i for rows in bounds for i in range(num_examples)[rows]]
    assert covered == list(range(num_examples))
    assert all(rows.stop - rows.start <= chunk_size for rows in bounds)
