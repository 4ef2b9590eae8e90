"""The built-in tasks that launch/train.py trains on.

``make_task(name, seed)`` returns a ``Task``: train and test tensors, a subgroup id per
example (for selection telemetry), a model factory and the test metrics. The data are a
pure function of ``seed`` (a private ``torch.Generator``), so every rank and every resumed
run sees the same examples.

- ``"detection"`` (default, torch only): 12x12 grayscale patches of clutter, a few of which
  hold the object to detect, a plus sign (the rare positive class). A few negatives hold a
  look-alike, the plus sign with one arm missing: the hard negatives. Plain training spends
  almost all of its gradient on easy clutter; mining keeps the borderline cases in every
  update. Headline metric: average precision of the positive class.
- ``"digits"`` (optional, needs scikit-learn: ``pip install -e .[digits]``): scikit-learn's
  8x8 handwritten digits with a long-tailed train split (class counts decaying
  geometrically, 25:1 from the most to the least frequent class) and a balanced held-out
  test split. Headline metric: accuracy on the rarest half of the classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TASKS = ("detection", "digits")


@dataclass
class Task:
    """A classification task: data, subgroups, a model factory and the test metrics.

    ``x_*``: inputs, (N, 1, H, W) float32. ``y_*``: class ids, (N,) int64 in
    ``[0, num_classes)``. ``group_*``: subgroup ids, (N,) int64 in
    ``[0, len(group_names))``; ``hard_groups`` are the subgroups whose share of the mined
    selection is worth logging. ``headline``: the key of ``metrics()`` that measures the
    hard cases.
    """

    name: str
    x_train: Tensor
    y_train: Tensor
    group_train: Tensor
    x_test: Tensor
    y_test: Tensor
    group_test: Tensor
    num_classes: int
    group_names: tuple[str, ...]
    hard_groups: tuple[int, ...]
    headline: str

    def make_model(self) -> nn.Module:
        """A fresh model mapping an input batch (N, 1, H, W) to logits (N, num_classes).

        No BatchNorm and no dropout, so a scoring forward pass has no side effects. The
        initial weights come from the global RNG: seed it (``torch.manual_seed``) first.
        """
        raise NotImplementedError

    def metrics(self, logits: Tensor) -> dict[str, float]:
        """Test metrics from the logits (len(x_test), num_classes) of the whole test set, in
        test order. Always has ``"acc"`` (overall accuracy), ``"loss"`` (mean cross-entropy)
        and ``self.headline``."""
        raise NotImplementedError

    def base_metrics(self, logits: Tensor) -> dict[str, float]:
        """Overall accuracy and mean cross-entropy on the test set."""
        logits = logits.detach().float().cpu()
        return {
            "acc": (logits.argmax(1) == self.y_test).float().mean().item(),
            "loss": F.cross_entropy(logits, self.y_test).item(),
        }


def make_task(name: str, seed: int = 0) -> Task:
    """The built-in task ``name`` (one of ``TASKS``), generated from ``seed``."""
    if name == "detection":
        return make_detection_task(seed)
    if name == "digits":
        return make_digits_task(seed)
    raise ValueError(f"unknown task {name!r}: expected one of {TASKS}")


# ----------------------------------------------------------------------------- metrics


def _distinct_threshold_counts(scores: Tensor, positive: Tensor) -> tuple[Tensor, Tensor]:
    """True and false positive counts when calling ``score >= t`` positive, for each
    distinct score t in decreasing order: two float64 vectors of the same length.

    Tied scores share one threshold: a tie cannot be split by a threshold, so it is
    counted all at once rather than in whatever order a sort leaves it.
    """
    scores = scores.detach().flatten().double().cpu()
    positive = positive.detach().flatten().bool().cpu()
    if scores.numel() != positive.numel() or scores.numel() == 0:
        raise ValueError(
            f"need as many labels as scores (> 0): {positive.numel()} and {scores.numel()}"
        )
    if not torch.isfinite(scores).all():
        raise ValueError("scores must be finite")
    order = torch.argsort(scores, descending=True, stable=True)
    scores, hits = scores[order], positive[order].double()
    true_pos = hits.cumsum(0)
    false_pos = (1 - hits).cumsum(0)
    last_of_tie = torch.ones_like(scores, dtype=torch.bool)
    last_of_tie[:-1] = scores[1:] != scores[:-1]
    return true_pos[last_of_tie], false_pos[last_of_tie]


def average_precision(scores: Tensor, positive: Tensor) -> float:
    """Average precision of the positive class: sum over distinct thresholds of
    (recall step) x precision, the step-wise area under the precision-recall curve
    (scikit-learn's ``average_precision_score``). NaN when there is no positive.

    ``scores``: (N,) higher means more positive. ``positive``: (N,) bool labels.
    """
    true_pos, false_pos = _distinct_threshold_counts(scores, positive)
    if true_pos[-1] == 0:
        return math.nan
    precision = true_pos / (true_pos + false_pos)
    recall_step = torch.diff(true_pos, prepend=true_pos.new_zeros(1)) / true_pos[-1]
    return (recall_step * precision).sum().item()


def recall_at_fpr(scores: Tensor, positive: Tensor, max_fpr: float) -> float:
    """The highest recall of any threshold ``score >= t`` whose false positive rate is at
    most ``max_fpr`` (at most floor(max_fpr x negatives) false positives); 0 if even the
    highest score has too many. NaN when there is no positive or no negative.

    ``scores``: (N,) higher means more positive. ``positive``: (N,) bool labels.
    """
    true_pos, false_pos = _distinct_threshold_counts(scores, positive)
    if true_pos[-1] == 0 or false_pos[-1] == 0:
        return math.nan
    allowed = math.floor(max_fpr * false_pos[-1].item() + 1e-9)
    within = false_pos <= allowed
    return (true_pos[within].max().item() if within.any() else 0.0) / true_pos[-1].item()


def ranking_auc(positive_scores: Tensor, negative_scores: Tensor) -> float:
    """ROC AUC: the probability that a random positive scores above a random negative, a
    tie counting one half (the Mann-Whitney U statistic over all pairs). NaN if either
    set is empty. ``positive_scores``: (P,); ``negative_scores``: (N,)."""
    if positive_scores.numel() == 0 or negative_scores.numel() == 0:
        return math.nan
    negatives = negative_scores.detach().flatten().double().cpu().sort().values
    positives = positive_scores.detach().flatten().double().cpu()
    below = torch.searchsorted(negatives, positives, right=False).double()
    below_or_tied = torch.searchsorted(negatives, positives, right=True).double()
    return ((below + below_or_tied) / 2).mean().item() / negatives.numel()


def per_class_recall(predicted: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Recall of each class, (num_classes,) float64; NaN for a class absent from labels."""
    hits = torch.bincount(labels[predicted == labels], minlength=num_classes).double()
    support = torch.bincount(labels, minlength=num_classes).double()
    return hits / support


# ----------------------------------------------------------------------------- detection

PATCH = 12
# The plus sign: centre pixel, then two pixels on each of the four arms (up, down, left,
# right). ARM[i] is the arm of pixel i, -1 for the centre.
PLUS_OFFSETS = torch.tensor(
    [[0, 0], [-1, 0], [-2, 0], [1, 0], [2, 0], [0, -1], [0, -2], [0, 1], [0, 2]]
)
ARM = torch.tensor([-1, 0, 0, 1, 1, 2, 2, 3, 3])
EASY_NEGATIVE, HARD_NEGATIVE, POSITIVE = 0, 1, 2


@dataclass(frozen=True)
class DetectionSpec:
    """How the detection patches are drawn. Rates are exact fractions of each split."""

    num_train: int = 20_000
    num_test: int = 10_000
    positive_rate: float = 0.03
    hard_negative_rate: float = 0.05
    max_strokes: int = 3  # clutter: up to this many horizontal or vertical bars
    stroke_prob: float = 0.6
    max_stroke_len: int = 5
    noise_std: float = 0.25


class DetectionTask(Task):
    """Rare plus signs on clutter; hard negatives are plus signs missing one arm."""

    def make_model(self) -> nn.Module:
        # A 5x5 first layer can match a whole plus sign (and tell a missing arm) in one
        # filter; the max over positions finds the object wherever it is in the patch.
        return nn.Sequential(
            nn.Conv2d(1, 16, 5, padding=2),
            nn.ReLU(),
            nn.Conv2d(16, 32, 1),
            nn.ReLU(),
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
            nn.Linear(32, 2),
        )

    def metrics(self, logits: Tensor) -> dict[str, float]:
        """``acc``, ``loss``; ``ap``: average precision of the positive class;
        ``recall_at_1pct_fpr``: recall at a false positive rate of at most 1%;
        ``hard_negative_auc``: ROC AUC of the positives against the hard negatives alone;
        and the accuracy (argmax) on each subgroup: ``easy_negative_acc``,
        ``hard_negative_acc``, ``positive_acc`` (the recall at the argmax threshold). Read
        the argmax accuracies together: calling everything negative scores 1.0 on both
        negative groups."""
        logits = logits.detach().float().cpu()
        # The logit margin ranks like the softmax probability but does not saturate into
        # spurious ties at 1.0 in float32.
        scores = logits[:, 1] - logits[:, 0]
        positive = self.y_test == 1
        correct = logits.argmax(1) == self.y_test
        out = self.base_metrics(logits)
        out["ap"] = average_precision(scores, positive)
        out["recall_at_1pct_fpr"] = recall_at_fpr(scores, positive, 0.01)
        out["hard_negative_auc"] = ranking_auc(
            scores[positive], scores[self.group_test == HARD_NEGATIVE]
        )
        for group, group_name in enumerate(self.group_names):
            out[f"{group_name}_acc"] = correct[self.group_test == group].float().mean().item()
        return out


def make_detection_task(seed: int, spec: DetectionSpec = DetectionSpec()) -> DetectionTask:
    """The detection task: x (N, 1, 12, 12) float32, y = 1 for a plus sign, group
    easy_negative (clutter only), hard_negative (a plus missing one arm) or positive."""
    gen = torch.Generator().manual_seed(seed)
    x_train, group_train = _detection_split(spec.num_train, spec, gen)
    x_test, group_test = _detection_split(spec.num_test, spec, gen)
    return DetectionTask(
        name="detection",
        x_train=x_train,
        y_train=(group_train == POSITIVE).long(),
        group_train=group_train,
        x_test=x_test,
        y_test=(group_test == POSITIVE).long(),
        group_test=group_test,
        num_classes=2,
        group_names=("easy_negative", "hard_negative", "positive"),
        hard_groups=(HARD_NEGATIVE, POSITIVE),
        headline="ap",
    )


def _detection_split(n: int, spec: DetectionSpec, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """``n`` patches (n, 1, 12, 12) and their groups (n,), in random order."""
    num_pos = round(spec.positive_rate * n)
    num_hard = round(spec.hard_negative_rate * n)
    group = torch.full((n,), EASY_NEGATIVE, dtype=torch.long)
    group[:num_pos] = POSITIVE
    group[num_pos : num_pos + num_hard] = HARD_NEGATIVE
    group = group[torch.randperm(n, generator=gen)]

    canvas = torch.zeros(n, PATCH * PATCH)
    _draw_strokes(canvas, spec, gen)
    _draw_plus_signs(canvas, group, gen)
    # A random background level per patch, then pixel noise.
    canvas += 0.4 * torch.rand(n, 1, generator=gen) - 0.2
    canvas += spec.noise_std * torch.randn(n, PATCH * PATCH, generator=gen)
    return canvas.view(n, 1, PATCH, PATCH), group


def _draw_strokes(canvas: Tensor, spec: DetectionSpec, gen: torch.Generator) -> None:
    """Add up to ``max_strokes`` clutter bars to each flat patch of ``canvas`` (n, 144)."""
    n, strokes, length = canvas.shape[0], spec.max_strokes, spec.max_stroke_len
    present = torch.rand(n, strokes, generator=gen) < spec.stroke_prob
    stroke_len = torch.randint(2, length + 1, (n, strokes), generator=gen)
    vertical = torch.rand(n, strokes, generator=gen) < 0.5
    amplitude = 0.5 + 0.7 * torch.rand(n, strokes, generator=gen)
    # The start position keeps the whole bar inside the patch.
    span_rows = torch.where(vertical, stroke_len, 1)
    span_cols = torch.where(vertical, 1, stroke_len)
    row0 = (torch.rand(n, strokes, generator=gen) * (PATCH - span_rows + 1)).long()
    col0 = (torch.rand(n, strokes, generator=gen) * (PATCH - span_cols + 1)).long()
    along = torch.arange(length)
    rows = row0[..., None] + vertical[..., None] * along
    cols = col0[..., None] + ~vertical[..., None] * along
    on = present[..., None] & (along < stroke_len[..., None])
    values = amplitude[..., None] * on
    flat = torch.arange(n)[:, None, None] * PATCH * PATCH + rows * PATCH + cols
    canvas.view(-1).index_add_(0, flat[on], values[on])


def _draw_plus_signs(canvas: Tensor, group: Tensor, gen: torch.Generator) -> None:
    """Add a plus sign to each positive patch and a plus missing one random arm to each
    hard negative of ``canvas`` (n, 144); easy negatives get nothing."""
    n = canvas.shape[0]
    reach = int(PLUS_OFFSETS.abs().max())
    centre = torch.randint(reach, PATCH - reach, (n, 2), generator=gen)
    missing_arm = torch.randint(0, 4, (n,), generator=gen)
    amplitude = 0.6 + 0.6 * torch.rand(n, generator=gen)
    pixels = centre[:, None, :] + PLUS_OFFSETS  # (n, 9, 2)
    on = (group == POSITIVE)[:, None] | (
        (group == HARD_NEGATIVE)[:, None] & (ARM != missing_arm[:, None])
    )
    flat = torch.arange(n)[:, None] * PATCH * PATCH + pixels[..., 0] * PATCH + pixels[..., 1]
    canvas.view(-1).index_add_(0, flat[on], amplitude[:, None].expand(n, 9)[on])


# ----------------------------------------------------------------------------- digits

DIGITS_CLASSES = 10
DIGITS_TEST_PER_CLASS = 50
DIGITS_HEAD_COUNT = 124  # the rarest digit has 174 images: 124 left after its 50 test images
DIGITS_IMBALANCE = 25.0


class DigitsTask(Task):
    """Long-tailed 8x8 handwritten digits; groups are the digits, the hard ones the tail."""

    def make_model(self) -> nn.Module:
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(64, 128),
            nn.ReLU(),
            nn.Linear(128, DIGITS_CLASSES),
        )

    def metrics(self, logits: Tensor) -> dict[str, float]:
        """``acc``, ``loss``; ``balanced_acc``: mean recall over the 10 digits;
        ``tail_acc`` and ``head_acc``: mean recall over the 5 digits rarest and most
        frequent in training (the test split is balanced, so these are also the plain
        accuracies on those digits' test images)."""
        logits = logits.detach().float().cpu()
        recall = per_class_recall(logits.argmax(1), self.y_test, self.num_classes)
        tail = torch.tensor(self.hard_groups)
        head = torch.tensor([c for c in range(self.num_classes) if c not in self.hard_groups])
        return {
            **self.base_metrics(logits),
            "balanced_acc": recall.mean().item(),
            "tail_acc": recall[tail].mean().item(),
            "head_acc": recall[head].mean().item(),
        }


def digits_train_counts() -> list[int]:
    """Train images of the k-th most frequent digit, k = 0..9: geometric decay from
    ``DIGITS_HEAD_COUNT`` to ``DIGITS_HEAD_COUNT / DIGITS_IMBALANCE``."""
    last = DIGITS_CLASSES - 1
    return [round(DIGITS_HEAD_COUNT * DIGITS_IMBALANCE ** (-k / last)) for k in range(last + 1)]


def make_digits_task(seed: int) -> DigitsTask:
    """The long-tailed digits task: x (N, 1, 8, 8) float32 in [0, 1], y = group = the digit.

    The seed fixes which digit gets which train count (a random order of the 10 digits)
    and which images go to test (``DIGITS_TEST_PER_CLASS`` per digit) and to train.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError(
            "the 'digits' task needs scikit-learn: pip install -e .[digits]"
        ) from error
    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32)[:, None] / 16
    labels = torch.as_tensor(digits.target, dtype=torch.long)

    gen = torch.Generator().manual_seed(seed)
    frequency_order = torch.randperm(DIGITS_CLASSES, generator=gen).tolist()
    train_index, test_index = [], []
    for digit, count in zip(frequency_order, digits_train_counts(), strict=True):
        index = torch.nonzero(labels == digit).flatten()
        index = index[torch.randperm(len(index), generator=gen)]
        test_index.append(index[:DIGITS_TEST_PER_CLASS])
        train_index.append(index[DIGITS_TEST_PER_CLASS : DIGITS_TEST_PER_CLASS + count])
    train = torch.cat(train_index)[torch.randperm(sum(map(len, train_index)), generator=gen)]
    test = torch.cat(test_index)
    tail = tuple(sorted(frequency_order[DIGITS_CLASSES // 2 :]))
    return DigitsTask(
        name="digits",
        x_train=images[train],
        y_train=labels[train],
        group_train=labels[train],
        x_test=images[test],
        y_test=labels[test],
        group_test=labels[test],
        num_classes=DIGITS_CLASSES,
        group_names=tuple(f"digit_{d}" for d in range(DIGITS_CLASSES)),
        hard_groups=tail,
        headline="tail_acc",
    )
