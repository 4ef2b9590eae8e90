"""Draw docs/figures/skewed_batch.png: one skewed batch, local against global selection.

    python docs/figures/skewed_batch.py

Four ranks hold 16 examples each; most of the hard ones (high loss) happen to be on
rank 0. With a budget of a quarter of the batch (16 examples), per-rank (local) OHEM
keeps each rank's own top 4; global OHEM keeps the top 16 of all 64 examples.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

RANKS, PER_RANK, KEEP = 4, 16, 0.25
BUDGET = int(KEEP * RANKS * PER_RANK)
OUT = Path(__file__).with_suffix(".png")


def batch() -> np.ndarray:
    """``(RANKS, PER_RANK)`` losses: rank 0 holds 11 hard examples, the others 1 or 2."""
    rng = np.random.default_rng(3)
    losses = rng.uniform(0.02, 0.35, size=(RANKS, PER_RANK))
    hard = {0: 11, 1: 2, 2: 1, 3: 2}
    for rank, count in hard.items():
        losses[rank, :count] = rng.uniform(0.9, 2.6, size=count)
    return -np.sort(-losses, axis=1)  # each rank's examples hardest first, for reading


def draw(ax: plt.Axes, losses: np.ndarray, selected: np.ndarray, title: str) -> None:
    """Bars of every example's loss, grouped by rank; the selected ones dark."""
    hard = losses > 0.6
    for rank in range(RANKS):
        x = rank * (PER_RANK + 3) + np.arange(PER_RANK)
        colors = np.where(selected[rank], "#1f4e9c", "#c9d3e3")
        ax.bar(x, losses[rank], width=0.85, color=colors)
        missed = hard[rank] & ~selected[rank]
        ax.bar(
            x[missed],
            losses[rank][missed],
            width=0.85,
            fill=False,
            hatch="///",
            edgecolor="#c0392b",
            lw=0,
        )
        kept = int(selected[rank].sum())
        ax.text(x.mean(), -0.38, f"rank {rank}\nkeeps {kept}", ha="center", va="top", fontsize=9)
    trained_hard, all_hard = int((selected & hard).sum()), int(hard.sum())
    easy = int((selected & ~hard).sum())
    summary = f"{trained_hard} of the {all_hard} hard examples trained, {easy} easy ones"
    ax.set_title(f"{title}\n{summary}", fontsize=10)
    ax.set(ylim=(0, 2.8), xticks=[])
    ax.spines[["top", "right"]].set_visible(False)


def main() -> None:
    losses = batch()
    per_rank = BUDGET // RANKS
    local = np.zeros_like(losses, dtype=bool)
    local[:, :per_rank] = True  # each rank's own hardest (rows are sorted)
    threshold = np.sort(losses, axis=None)[-BUDGET]
    global_ = losses >= threshold
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    draw(axes[0], losses, local, f"local OHEM: each rank keeps its own top {per_rank}")
    draw(axes[1], losses, global_, f"global OHEM (dist_ohem): the top {BUDGET} of the batch")
    axes[1].axhline(threshold, color="black", ls="--", lw=0.8)
    axes[1].text(
        2 * (PER_RANK + 3) + 2, threshold + 0.06, "global threshold", ha="left", fontsize=8
    )
    axes[0].set_ylabel("per-example loss")
    handles = [
        plt.Rectangle((0, 0), 1, 1, color="#1f4e9c"),
        plt.Rectangle((0, 0), 1, 1, color="#c9d3e3"),
        plt.Rectangle((0, 0), 1, 1, fill=False, hatch="///", edgecolor="#c0392b"),
    ]
    labels = ["selected (back-propagated)", "not selected", "hard, but dropped"]
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=9, frameon=False)
    fig.suptitle(
        f"The same batch of {RANKS} x {PER_RANK} examples, a budget of {BUDGET}", fontsize=11
    )
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(OUT, dpi=110)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
