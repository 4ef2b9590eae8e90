"""examples/rho_loss.py (README, "Sequences, padding and accumulation") runs under torchrun."""

from __future__ import annotations

import math
from pathlib import Path

from tests.launching import run_example


def test_rho_loss_example_under_torchrun(tmp_path: Path) -> None:
    """A few global RHO-LOSS steps on 2 ranks: the selection counts add up, the logged mean
    loss is finite, micro-batches were used, and selecting by excess loss keeps fewer
    mislabelled examples than the top-M by loss would have (the point of the method)."""
    result = run_example("rho_loss.py", ["--steps", "6"], tmp_path / "out.json")
    assert result["world_size"] == 2
    steps = result["steps"]
    assert len(steps) == 6
    for step in steps:
        assert step["num_selected_global"] == math.ceil(result["keep"] * step["num_valid_global"])
        assert sum(step["selected_per_rank"]) == step["num_selected_global"]
        assert math.isfinite(step["mean_loss"]) and step["mean_loss"] > 0
    assert max(step["num_chunks"] for step in steps) > 1
    by_excess = sum(step["noisy_share_selected"] for step in steps)
    by_loss = sum(step["noisy_share_top_loss"] for step in steps)
    assert by_excess < by_loss, (by_excess, by_loss)
