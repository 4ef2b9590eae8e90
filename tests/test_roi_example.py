"""examples/roi_detection.py trains under torchrun (2 gloo ranks) and reports COCO mAP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.launching import run_example

pytest.importorskip("pycocotools", reason="the example's COCO mAP needs the [detection] extra")

STEPS = 3


@pytest.mark.parametrize("scope", ["global", "local"])
def test_roi_example_under_torchrun(tmp_path: Path, scope: str) -> None:
    run_dir = tmp_path / "run"
    args = [f"scope={scope}", f"max_steps={STEPS}", "test_images=4", f"run_dir={run_dir}"]
    args += ["progress=false", f"plot={'true' if scope == 'global' else 'false'}"]
    summary = run_example("roi_detection.py", args, tmp_path / "s.json")
    assert summary["world_size"] == 2
    assert summary["config"]["scope"] == scope
    assert 0.0 <= summary["map"] <= 1.0 and 0.0 <= summary["map50"] <= 1.0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    for record in train:  # 64 RoIs per image, 1 image per rank, 2 ranks
        assert record["rois_backpropagated"] == 128
        assert record["fg_selected"] <= record["fg_in_batch"]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [STEPS]
    assert (run_dir / "metrics.png").exists() == (scope == "global")
    assert json.loads((run_dir / "summary.json").read_text()) == summary
