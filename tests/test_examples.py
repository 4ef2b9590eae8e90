"""The runnable examples in examples/ run under their documented launcher."""

from __future__ import annotations

from pathlib import Path

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
