"""The runnable examples in examples/ run under their documented launcher."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.launching import run_example


def test_dense_segmentation_example_under_torchrun(tmp_path: Path) -> None:
    result = run_example("dense_segmentation.py", ["--steps", "4"], tmp_path / "out.json")
    assert result["world_size"] == 2
    assert len(result["steps"]) == 4
    for step in result["steps"]:
        assert step["strategy"] == "bracket"
        assert sum(step["selected_per_rank"]) == step["num_selected_global"]
        assert min(step["num_valid_global"], result["min_kept"]) <= step["num_selected_global"]
        assert step["num_selected_global"] <= step["num_valid_global"]


def test_language_model_example_under_torchrun(tmp_path: Path) -> None:
    """OHEMTrainer with a reference model trained first: each step keeps the global
    top 25% of the 2 ranks x 2 micro-batches x 16 sequences."""
    pytest.importorskip("transformers")
    result = run_example("language_model.py", ["--steps", "4"], tmp_path / "out.json")
    assert result["world_size"] == 2
    assert (result["score"], result["steps"]) == ("excess", 4)
    assert result["last_step_sequences"] == 64
    assert result["last_step_selected"] == 16 == sum(result["last_step_selected_per_rank"])
    assert math.isfinite(result["eval_loss"])
    assert len(result["logged_loss"]) == 4
