"""The runnable examples in examples/ run under their documented launcher."""

from __future__ import annotations

from pathlib import Path

from tests.launching import REPO, launch, launcher_command


def test_dense_segmentation_example_under_torchrun(tmp_path: Path) -> None:
    script = REPO / "examples" / "dense_segmentation.py"
    assert script.read_text().splitlines()[0] == (
        "# OMP_NUM_THREADS=1 torchrun --nproc_per_node=2 examples/dense_segmentation.py"
    )
    command = [*launcher_command("torchrun", 2), str(script), "--steps", "4"]
    result = launch("torchrun examples/dense_segmentation.py", command, tmp_path / "out.json")
    assert result["world_size"] == 2
    assert len(result["steps"]) == 4
    for step in result["steps"]:
        assert step["strategy"] == "radix"
        assert sum(step["selected_per_rank"]) == step["num_selected_global"]
        assert min(step["num_valid_global"], result["min_kept"]) <= step["num_selected_global"]
        assert step["num_selected_global"] <= step["num_valid_global"]
