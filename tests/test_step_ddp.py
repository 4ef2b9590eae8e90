"""Two-pass ohem_step under DDP: gradients equal the single-process one (docs/DESIGN.md §4, §6)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dist_ohem import HardExampleSelector, OHEMLoss, ohem_step
from dist_ohem.comm import get_rank
from tests.parity import (
    classification_batch,
    make_mlp,
    rank_slice,
    reference_mask,
    skewed_batch,
)

TOLERANCE = 1e-6


def positives(targets, kwargs):
    """Class 0 is the positive class of the ``neg_pos_ratio`` cases (None otherwise)."""
    return targets == 0 if "neg_pos_ratio" in kwargs else None


def reference_grads(inputs, targets, kwargs, sizes):
    model = make_mlp()
    losses = nn.functional.cross_entropy(model(inputs), targets, reduction="none")
    mask = reference_mask(kwargs, sizes, losses.detach(), None, positives(targets, kwargs))
    (losses[mask].sum() / max(int(mask.sum()), 1)).backward()
    return [p.grad for p in model.parameters()]


#: How ohem_step trains: the selected rows, balanced, or a capacity (0.5: overflows).
PLANS = {
    "selected": {"capacity_factor": None},
    "balanced": {"capacity_factor": None, "balance": True},
    "capacity": {"capacity_factor": 1.25},
    "capacity_overflow": {"capacity_factor": 0.5},
}


def step_on_rank(seed, sizes, kwargs, plan, hard_rank):
    """Worker: ohem_step and, on a fresh model, mask mode; both gradients and the counts."""
    rank = get_rank()
    inputs, targets = (rank_slice(t, sizes, rank) for t in skewed_batch(seed, sizes, hard_rank))
    model = make_mlp()
    out = ohem_step(
        DDP(model),
        inputs,
        targets,
        nn.CrossEntropyLoss(),
        HardExampleSelector(**kwargs),
        positive=positives(targets, kwargs),
        **PLANS[plan],
    )
    mask_model = make_mlp()
    mask_ddp = DDP(mask_model)  # held: a collected DDP wrapper would skip its all-reduce
    OHEMLoss(nn.CrossEntropyLoss(), **kwargs)(
        mask_ddp(inputs), targets, positives(targets, kwargs)
    ).backward()
    return (
        [p.grad.clone() for p in model.parameters()],
        [p.grad.clone() for p in mask_model.parameters()],
        out.num_trained_local,
        out.selection.selected_per_rank,
    )


def assert_close_grads(got, want, what):
    for g, w in zip(got, want, strict=True):
        diff = (g - w).abs().max().item()
        assert diff <= TOLERANCE, f"{what}: max |grad diff| {diff:.2e}"


SIZES = {1: [11], 2: [7, 12], 3: [5, 0, 9], 4: [6, 3, 10, 1]}


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize(
    ("kwargs", "hard_rank"),
    [
        ({"keep": 0.3}, None),
        ({"top_k": 4, "strategy": "bracket"}, None),
        ({"keep": 0.25, "scope": "local"}, None),
        ({"neg_pos_ratio": 2.0, "min_kept": 2}, None),
        ({"loss_thresh": 1.5, "min_kept": 2}, None),
        ({"top_k": 5}, 0),  # rank 0 owns all selected; the others own none
        ({"top_k": 1}, -1),  # the last rank owns the only selected example
    ],
)
def test_two_pass_gradients_equal_reference_and_mask_mode(
    ranks, world_size, plan, kwargs, hard_rank
):
    sizes = SIZES[world_size]
    hard = None if hard_rank is None else hard_rank % world_size
    if hard is not None and sizes[hard] == 0:
        hard = max(range(world_size), key=lambda r: sizes[r])
    outputs = ranks.run(world_size, step_on_rank, 5, sizes, kwargs, plan, hard)
    expected = reference_grads(*skewed_batch(5, sizes, hard), kwargs, sizes)
    total = sum(outputs[0][3])
    for rank, (step_grads, mask_grads, num_trained, per_rank) in enumerate(outputs):
        assert_close_grads(step_grads, expected, f"two-pass rank {rank} {kwargs}")
        assert_close_grads(mask_grads, step_grads, f"mask vs two-pass rank {rank} {kwargs}")
        if plan == "balanced":
            assert num_trained in (total // world_size, -(-total // world_size))
        else:
            assert num_trained == per_rank[rank]
    if hard is not None and kwargs.get("scope") is None:
        assert outputs[0][3][hard] == total  # the skew really landed on one rank


class TaggedMLP(nn.Module):
    """Takes a dict batch with a float and an int64 tensor: exercises mixed-dtype balancing."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = make_mlp()
        self.tag_embedding = nn.Embedding(3, 8)

    def forward(self, features: torch.Tensor, tag: torch.Tensor) -> torch.Tensor:
        return self.mlp(features + self.tag_embedding(tag))


def tagged_batch(n: int):
    inputs, targets = classification_batch(9, n)
    return {"features": inputs, "tag": torch.arange(n) % 3}, (targets,)


def tuple_criterion(logits, targets):
    return nn.functional.cross_entropy(logits, targets[0], reduction="none")


def tagged_step_on_rank(sizes):
    rank = get_rank()
    inputs, targets = tagged_batch(sum(sizes))
    local = {k: rank_slice(v, sizes, rank) for k, v in inputs.items()}
    torch.manual_seed(1)
    model = TaggedMLP()
    out = ohem_step(
        DDP(model),
        local,
        (rank_slice(targets[0], sizes, rank),),
        tuple_criterion,
        HardExampleSelector(keep=0.5),
        balance=True,
    )
    return [p.grad.clone() for p in model.parameters()], out.num_trained_local


def test_balance_moves_dict_and_tuple_batches_of_mixed_dtypes(ranks):
    sizes = [12, 1, 3]
    outputs = ranks.run(3, tagged_step_on_rank, sizes)
    inputs, targets = tagged_batch(sum(sizes))
    torch.manual_seed(1)
    model = TaggedMLP()
    losses = tuple_criterion(model(**inputs), targets)
    mask = reference_mask({"keep": 0.5}, sizes, losses.detach(), None, None)
    (losses[mask].sum() / int(mask.sum())).backward()
    for grads, num_trained in outputs:
        assert_close_grads(grads, [p.grad for p in model.parameters()], "dict batch")
        assert num_trained in (2, 3)  # M = 8 over 3 ranks


def accumulation_on_rank(sizes):
    """Two micro-batches, the first under no_sync, each loss divided by 2."""
    rank = get_rank()
    model = make_mlp()
    ddp = DDP(model)
    selector = HardExampleSelector(keep=0.4)
    for micro, seed in enumerate((21, 22)):
        inputs, targets = (
            rank_slice(t, sizes, rank) for t in classification_batch(seed, sum(sizes))
        )
        context = ddp.no_sync() if micro == 0 else torch.enable_grad()
        with context:
            ohem_step(
                ddp,
                inputs,
                targets,
                nn.CrossEntropyLoss(),
                selector,
                backward=lambda loss: (loss / 2).backward(),
            )
    return [p.grad.clone() for p in model.parameters()]


def test_gradient_accumulation_with_ddp_no_sync(ranks):
    sizes = [9, 4, 6]
    outputs = ranks.run(3, accumulation_on_rank, sizes)
    micro_grads = [
        reference_grads(*classification_batch(seed, sum(sizes)), {"keep": 0.4}, sizes)
        for seed in (21, 22)
    ]
    expected = [(a + b) / 2 for a, b in zip(*micro_grads, strict=True)]
    for rank, grads in enumerate(outputs):
        assert_close_grads(grads, expected, f"accumulation rank {rank}")


def make_bn_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Dropout(0.2), nn.ReLU(), nn.Linear(16, 4)
    )


@pytest.mark.parametrize("score_mode", ["no_grad_train", "eval"])
def test_batchnorm_stats_updated_once_from_the_selected_examples(score_mode):
    inputs, targets = classification_batch(4, 20)
    model = make_bn_mlp()
    model[2].eval()  # a submodule in its own mode must get that mode back
    before = copy.deepcopy(model)
    out = ohem_step(
        model,
        inputs,
        targets,
        nn.CrossEntropyLoss(),
        HardExampleSelector(keep=0.25),
        score_mode=score_mode,
    )
    # Expected: one train-mode forward over exactly the selected examples.
    before(inputs[out.selection.mask])
    assert int(model[1].num_batches_tracked) == 1
    torch.testing.assert_close(model[1].running_mean, before[1].running_mean)
    torch.testing.assert_close(model[1].running_var, before[1].running_var)
    assert model.training and model[1].training and not model[2].training


def test_scoring_pass_does_not_advance_the_rng_in_no_grad_train_mode():
    inputs, targets = classification_batch(4, 20)
    model = make_bn_mlp()
    selector = HardExampleSelector(keep=0.25)
    torch.manual_seed(123)
    ohem_step(model, inputs, targets, nn.CrossEntropyLoss(), selector)
    after_step = torch.random.get_rng_state()
    # The same training pass alone, from the same RNG state, ends in the same state.
    replay = make_bn_mlp()
    torch.manual_seed(123)
    nn.functional.cross_entropy(replay(inputs[:5]), targets[:5]).backward()
    assert torch.equal(after_step, torch.random.get_rng_state())


def weighted_criterion(logits, targets):
    labels, weights = targets
    return nn.functional.cross_entropy(logits, labels, reduction="none") * weights


def bn_zero_selected_on_rank(sizes):
    """Rank 1's losses are scaled by 1e-3, so top_k=3 selects only on rank 0."""
    rank = get_rank()
    inputs, labels = (rank_slice(t, sizes, rank) for t in classification_batch(5, sum(sizes)))
    weights = torch.full((sizes[rank],), 1.0 if rank == 0 else 1e-3)
    model = make_bn_mlp()
    stats_before = model[1].running_mean.clone()
    out = ohem_step(
        DDP(model), inputs, (labels, weights), weighted_criterion, HardExampleSelector(top_k=3)
    )
    return (
        out.num_trained_local,
        torch.equal(stats_before, model[1].running_mean),
        int(model[1].num_batches_tracked),
        [p.grad.clone() for p in model.parameters()],
    )


def test_rank_with_nothing_selected_leaves_batchnorm_untouched(ranks):
    (trained_0, unchanged_0, tracked_0, grads_0), (trained_1, unchanged_1, tracked_1, grads_1) = (
        ranks.run(2, bn_zero_selected_on_rank, [6, 8])
    )
    assert (trained_0, trained_1) == (3, 0)
    assert not unchanged_0 and tracked_0 == 1
    assert unchanged_1 and tracked_1 == 0  # the zero-weight forward left no trace
    assert_close_grads(grads_0, grads_1, "DDP-averaged gradients")
    assert any(g.abs().sum() > 0 for g in grads_0)


def test_step_output_reports_scores_counts_and_phase_times():
    inputs, targets = classification_batch(4, 12)
    model = make_mlp()
    out = ohem_step(model, inputs, targets, nn.CrossEntropyLoss(), HardExampleSelector(top_k=3))
    with torch.no_grad():
        expected = nn.functional.cross_entropy(make_mlp()(inputs), targets, reduction="none")
    torch.testing.assert_close(out.scores, expected)
    assert out.num_trained_local == 3 and out.selection.num_selected_global == 3
    assert set(out.timings) == {"scoring", "selection", "communication", "training"}
    torch.testing.assert_close(out.loss, expected.topk(3).values.mean())


def test_mean_per_example_handles_dense_and_empty_batches():
    from dist_ohem.scoring import mean_per_example

    dense = torch.arange(24.0).view(2, 3, 4)
    torch.testing.assert_close(mean_per_example(dense), dense.view(2, -1).mean(1))
    assert mean_per_example(torch.zeros(0, 3, 4)).shape == (0,)
    assert mean_per_example(torch.ones(5)).tolist() == [1.0] * 5


def training_batch_sizes_on_rank(capacity_factor, steps: int) -> list[int]:
    """Worker: the batch size of every forward with grad over ``steps`` ohem_steps."""
    model = make_mlp()
    sizes = []
    model.register_forward_hook(
        lambda _m, args, _out: sizes.append(args[0].shape[0]) if torch.is_grad_enabled() else None
    )
    ddp = DDP(model)
    selector = HardExampleSelector(keep=0.25)
    for step in range(steps):
        inputs, targets = classification_batch(100 * step + get_rank(), 16)
        ohem_step(ddp, inputs, targets, nn.CrossEntropyLoss(), selector, capacity_factor=2.0)
    return sizes


def test_capacity_trains_a_static_batch_size_every_step(ranks):
    """Without overflow, the training forward sees ceil(c * keep * N) rows every step."""
    for sizes in ranks.run(2, training_batch_sizes_on_rank, 2.0, 4):
        assert sizes == [8] * 4  # ceil(2.0 * 0.25 * 16)


def test_zero_weight_rows_contribute_exactly_zero():
    """Nothing selected (top_k=0): the capacity row trains at weight 0, gradients are 0."""
    model = make_mlp()
    inputs, targets = classification_batch(0, 9)
    out = ohem_step(
        model,
        inputs,
        targets,
        nn.CrossEntropyLoss(),
        HardExampleSelector(top_k=0),
        capacity_factor=1.0,
    )
    assert out.num_chunks == 1 and out.selection.num_selected_global == 0
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.parameters())
    assert float(out.loss) == 0.0


def test_capacity_refuses_balance():
    with pytest.raises(ValueError, match="alternatives"):
        ohem_step(
            make_mlp(),
            *classification_batch(0, 4),
            nn.CrossEntropyLoss(),
            HardExampleSelector(keep=0.5),
            balance=True,
            capacity_factor=1.25,
        )


def tied_mlp() -> nn.Module:
    """make_mlp with a zero last layer: every example's loss is log(4), all tied."""
    model = make_mlp()
    with torch.no_grad():
        model[-1].weight.zero_()
        model[-1].bias.zero_()
    return model


def tied_step_on_rank(sizes, capacity_factor):
    rank = get_rank()
    inputs, targets = (rank_slice(t, sizes, rank) for t in classification_batch(4, sum(sizes)))
    model = tied_mlp()
    out = ohem_step(
        DDP(model),
        inputs,
        targets,
        nn.CrossEntropyLoss(),
        HardExampleSelector(keep=0.3),
        capacity_factor=capacity_factor,
    )
    return [p.grad.clone() for p in model.parameters()], out.selection.mask.clone()


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_tied_losses_train_the_lowest_global_indices(ranks, capacity_factor):
    """All losses equal: the selection is the first ceil(0.3 K) examples in global order
    (rank 0's first), with capacity too (rank 0 then overflows its capacity)."""
    sizes = [5, 7]
    outputs = ranks.run(2, tied_step_on_rank, sizes, capacity_factor)
    inputs, targets = classification_batch(4, sum(sizes))
    model = tied_mlp()
    losses = nn.functional.cross_entropy(model(inputs), targets, reduction="none")
    assert len(set(losses.tolist())) == 1
    mask = torch.zeros(sum(sizes), dtype=torch.bool)
    mask[:4] = True  # ceil(0.3 * 12) = 4, ties to the lower global index
    (losses[mask].sum() / 4).backward()
    for rank, (grads, got_mask) in enumerate(outputs):
        assert torch.equal(got_mask, rank_slice(mask, sizes, rank))
        assert_close_grads(grads, [p.grad for p in model.parameters()], f"rank {rank}")


def normalized_step_on_rank(seed, sizes, kwargs, plan, normalizer):
    """Worker: ohem_step's gradient with ``normalizer``."""
    rank = get_rank()
    inputs, targets = (rank_slice(t, sizes, rank) for t in skewed_batch(seed, sizes, None))
    model = make_mlp()
    ohem_step(
        DDP(model),
        inputs,
        targets,
        nn.CrossEntropyLoss(),
        HardExampleSelector(**kwargs),
        positive=targets == 0,
        normalizer=normalizer,
        **PLANS[plan],
    )
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("normalizer", ["valid", "instances", "positives"])
def test_two_pass_normalizers(ranks, world_size, normalizer):
    """The mean divided by the global valid, all or positive examples, on every plan."""
    sizes = SIZES[world_size]
    kwargs = {"neg_pos_ratio": 1.0, "min_kept": 1}
    inputs, targets = skewed_batch(5, sizes, None)
    model = make_mlp()
    losses = nn.functional.cross_entropy(model(inputs), targets, reduction="none")
    mask = reference_mask(kwargs, sizes, losses.detach(), None, targets == 0)
    divisor = {"valid": len(targets), "instances": len(targets)}.get(
        normalizer, int((targets == 0).sum())
    )
    (losses[mask].sum() / max(divisor, 1)).backward()
    expected = [p.grad for p in model.parameters()]
    for plan in ("selected", "capacity_overflow"):
        outputs = ranks.run(world_size, normalized_step_on_rank, 5, sizes, kwargs, plan, normalizer)
        for rank, grads in enumerate(outputs):
            assert_close_grads(grads, expected, f"{plan} rank {rank} {normalizer}")
