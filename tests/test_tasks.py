"""launch/tasks.py: the built-in tasks' data, models and metrics."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from launch.tasks import (
    EASY_NEGATIVE,
    HARD_NEGATIVE,
    POSITIVE,
    TASKS,
    DetectionSpec,
    average_precision,
    digits_train_counts,
    make_detection_task,
    make_task,
    per_class_recall,
    ranking_auc,
    recall_at_fpr,
)

SMALL = DetectionSpec(num_train=2_000, num_test=1_000)


def labels(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.bool)


# ----------------------------------------------------------------------------- metrics


@pytest.mark.parametrize(
    ("scores", "positive", "expected"),
    [
        # thresholds 0.9: P=1 R=1/2; 0.8: P=1/2 (no recall step); 0.7: P=2/3 R=1
        ([0.9, 0.8, 0.7, 0.6], labels(1, 0, 1, 0), 0.5 * 1 + 0.5 * 2 / 3),
        ([0.9, 0.8, 0.1, 0.0], labels(1, 1, 0, 0), 1.0),
        ([0.0, 0.1, 0.8, 0.9], labels(1, 1, 0, 0), 0.5 * 1 / 3 + 0.5 * 2 / 4),
        # a four-way tie is one threshold: P=1/2 at R=1, whatever the order inside it
        ([1.0, 1.0, 1.0, 1.0], labels(1, 0, 0, 1), 0.5),
        ([1.0, 1.0, 1.0, 1.0], labels(0, 0, 1, 1), 0.5),
        # the tie at 0.5 counts as one step: P=2/3 at R=1
        ([0.9, 0.5, 0.5, 0.1], labels(1, 0, 1, 0), 0.5 * 1 + 0.5 * 2 / 3),
        ([0.9, 0.5, 0.5, 0.1], labels(1, 1, 0, 0), 0.5 * 1 + 0.5 * 2 / 3),
    ],
)
def test_average_precision_hand_computed(scores, positive, expected):
    assert average_precision(torch.tensor(scores), positive) == pytest.approx(expected)


def test_average_precision_without_positives_is_nan():
    assert math.isnan(average_precision(torch.tensor([0.3, 0.2]), labels(0, 0)))


def test_average_precision_matches_scikit_learn_with_ties():
    metrics = pytest.importorskip("sklearn.metrics")
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        scores = torch.randint(0, 8, (200,), generator=gen).float()  # many ties
        positive = torch.rand(200, generator=gen) < 0.2
        expected = metrics.average_precision_score(positive.numpy(), scores.numpy())
        assert average_precision(scores, positive) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("scores", "positive", "max_fpr", "expected"),
    [
        ([0.9, 0.8, 0.7, 0.6, 0.5], labels(1, 0, 1, 1, 0), 0.0, 1 / 3),
        ([0.9, 0.8, 0.7, 0.6, 0.5], labels(1, 0, 1, 1, 0), 0.49, 1 / 3),
        ([0.9, 0.8, 0.7, 0.6, 0.5], labels(1, 0, 1, 1, 0), 0.5, 1.0),
        ([0.9, 0.8, 0.7, 0.6, 0.5], labels(0, 1, 1, 1, 0), 0.0, 0.0),
        # the tie at 0.5 holds a negative: no threshold takes the positive without it
        ([0.9, 0.5, 0.5], labels(1, 1, 0), 0.0, 0.5),
        ([0.9, 0.5, 0.5], labels(1, 1, 0), 1.0, 1.0),
    ],
)
def test_recall_at_fpr_hand_computed(scores, positive, max_fpr, expected):
    assert recall_at_fpr(torch.tensor(scores), positive, max_fpr) == pytest.approx(expected)


def test_recall_at_fpr_allows_exactly_floor_of_fpr_times_negatives():
    # 100 negatives scored 100..1; one positive just below the 29th negative, one below the 30th.
    scores = torch.cat([torch.arange(100, 0, -1).double(), torch.tensor([71.5, 70.5])])
    positive = torch.zeros(102, dtype=torch.bool)
    positive[100:] = True
    assert recall_at_fpr(scores, positive, 0.29) == 0.5  # 0.29 * 100 is 28.999999999999996
    assert recall_at_fpr(scores, positive, 0.30) == 1.0
    assert recall_at_fpr(scores, positive, 0.28) == 0.0


def test_recall_at_fpr_needs_both_classes():
    assert math.isnan(recall_at_fpr(torch.tensor([0.3, 0.2]), labels(1, 1), 0.1))
    assert math.isnan(recall_at_fpr(torch.tensor([0.3, 0.2]), labels(0, 0), 0.1))


def test_metric_inputs_are_checked():
    with pytest.raises(ValueError, match="finite"):
        average_precision(torch.tensor([0.1, math.nan]), labels(1, 0))
    with pytest.raises(ValueError, match="as many labels"):
        recall_at_fpr(torch.tensor([0.1, 0.2]), labels(1), 0.1)


def test_ranking_auc_hand_computed():
    # pairs (positive, negative): 3>1 3>2 3<4, 2>1 2=2 2<4 -> (2 + 1.5) / 6
    assert ranking_auc(torch.tensor([3.0, 2.0]), torch.tensor([1.0, 2.0, 4.0])) == 3.5 / 6
    assert ranking_auc(torch.tensor([5.0]), torch.tensor([1.0, 2.0])) == 1.0
    assert ranking_auc(torch.tensor([0.0]), torch.tensor([1.0, 2.0])) == 0.0
    assert math.isnan(ranking_auc(torch.tensor([]), torch.tensor([1.0])))


def test_ranking_auc_matches_scikit_learn_with_ties():
    metrics = pytest.importorskip("sklearn.metrics")
    gen = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 6, (300,), generator=gen).float()
    positive = torch.rand(300, generator=gen) < 0.3
    expected = metrics.roc_auc_score(positive.numpy(), scores.numpy())
    assert ranking_auc(scores[positive], scores[~positive]) == pytest.approx(expected)


def test_per_class_recall():
    predicted = torch.tensor([0, 0, 1, 2, 2, 2])
    truth = torch.tensor([0, 1, 1, 2, 2, 0])
    recall = per_class_recall(predicted, truth, num_classes=4)
    assert recall[:3].tolist() == [0.5, 0.5, 1.0]
    assert math.isnan(recall[3])


# ----------------------------------------------------------------------------- detection


def test_detection_is_a_function_of_the_seed():
    first, again, other = (make_detection_task(seed, SMALL) for seed in (3, 3, 4))
    for field in ("x_train", "y_train", "group_train", "x_test", "y_test", "group_test"):
        assert torch.equal(getattr(first, field), getattr(again, field))
        assert not torch.equal(getattr(first, field), getattr(other, field))


def test_detection_shapes_rates_and_groups():
    task = make_task("detection", seed=0)
    spec = DetectionSpec()
    for x, y, group, n in (
        (task.x_train, task.y_train, task.group_train, spec.num_train),
        (task.x_test, task.y_test, task.group_test, spec.num_test),
    ):
        assert x.shape == (n, 1, 12, 12) and x.dtype == torch.float32
        assert torch.isfinite(x).all()
        assert y.shape == group.shape == (n,)
        assert y.dtype == group.dtype == torch.int64
        assert torch.equal(y, (group == POSITIVE).long())
        counts = torch.bincount(group, minlength=3).tolist()
        assert counts[POSITIVE] == round(spec.positive_rate * n)
        assert counts[HARD_NEGATIVE] == round(spec.hard_negative_rate * n)
    assert task.num_classes == 2
    assert task.group_names[HARD_NEGATIVE] == "hard_negative"
    assert HARD_NEGATIVE in task.hard_groups and EASY_NEGATIVE not in task.hard_groups


def test_detection_objects_are_plus_signs_and_plus_signs_missing_an_arm():
    clean = DetectionSpec(num_train=300, num_test=10, stroke_prob=0.0, noise_std=0.0)
    task = make_detection_task(0, clean)
    x = task.x_train.flatten(1)
    background = x.min(1, keepdim=True).values  # one level per patch without clutter or noise
    lit = (x > background + 0.3).sum(1)
    for group, pixels in ((EASY_NEGATIVE, 0), (HARD_NEGATIVE, 7), (POSITIVE, 9)):
        assert (lit[task.group_train == group] == pixels).all()


def test_detection_model_and_metrics():
    task = make_detection_task(0, SMALL)
    torch.manual_seed(0)
    model = task.make_model()
    torch.manual_seed(0)
    assert all(
        map(torch.equal, model.state_dict().values(), task.make_model().state_dict().values())
    )
    with torch.no_grad():
        logits = model(task.x_test)
    assert logits.shape == (len(task.x_test), 2)

    metrics = task.metrics(logits)
    expected = {"acc", "loss", "ap", "recall_at_1pct_fpr", "hard_negative_auc"}
    expected |= {f"{group}_acc" for group in task.group_names}
    assert set(metrics) == expected and task.headline in metrics
    assert all(isinstance(value, float) for value in metrics.values())

    perfect = task.metrics(torch.nn.functional.one_hot(task.y_test, 2).float())
    assert perfect["acc"] == perfect["ap"] == perfect["recall_at_1pct_fpr"] == 1.0
    assert perfect["hard_negative_acc"] == perfect["hard_negative_auc"] == 1.0
    always_positive = task.metrics(torch.tensor([[0.0, 1.0]]).expand(len(task.y_test), 2))
    assert always_positive["hard_negative_acc"] == always_positive["easy_negative_acc"] == 0.0
    assert always_positive["ap"] == pytest.approx(SMALL.positive_rate)
    assert always_positive["hard_negative_auc"] == 0.5


def test_unknown_task():
    assert TASKS == ("detection", "digits")
    with pytest.raises(ValueError, match="unknown task"):
        make_task("imagenet", seed=0)


# ----------------------------------------------------------------------------- digits


def test_digits_without_scikit_learn_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"pip install -e \.\[digits\]"):
        make_task("digits", seed=0)


def test_digits_long_tailed_train_balanced_test():
    pytest.importorskip("sklearn")
    task = make_task("digits", seed=0)
    counts = digits_train_counts()
    assert counts[0] / counts[-1] == pytest.approx(25, rel=0.05)
    assert counts == sorted(counts, reverse=True)

    train_counts = torch.bincount(task.y_train, minlength=10)
    assert sorted(train_counts.tolist(), reverse=True) == counts
    assert torch.bincount(task.y_test, minlength=10).tolist() == [50] * 10
    rarest_half = train_counts.argsort()[:5].sort().values
    assert task.hard_groups == tuple(rarest_half.tolist())
    assert torch.equal(task.group_train, task.y_train)
    assert task.x_train.shape == (len(task.y_train), 1, 8, 8)
    assert task.x_train.dtype == torch.float32
    assert 0 <= task.x_train.min() and task.x_train.max() <= 1

    again, other = make_task("digits", seed=0), make_task("digits", seed=1)
    assert torch.equal(task.x_train, again.x_train) and torch.equal(task.y_train, again.y_train)
    assert not torch.equal(torch.bincount(other.y_train, minlength=10), train_counts)


def test_digits_model_and_metrics():
    pytest.importorskip("sklearn")
    task = make_task("digits", seed=0)
    torch.manual_seed(0)
    with torch.no_grad():
        logits = task.make_model()(task.x_test)
    assert logits.shape == (len(task.x_test), 10)
    metrics = task.metrics(logits)
    assert set(metrics) == {"acc", "loss", "balanced_acc", "tail_acc", "head_acc"}
    assert task.headline == "tail_acc"

    # Right on every head digit, wrong on every tail digit.
    tail = torch.isin(task.y_test, torch.tensor(task.hard_groups))
    predicted = torch.where(tail, (task.y_test + 1) % 10, task.y_test)
    metrics = task.metrics(torch.nn.functional.one_hot(predicted, 10).float())
    assert metrics["tail_acc"] == 0.0 and metrics["head_acc"] == 1.0
    assert metrics["balanced_acc"] == metrics["acc"] == 0.5
