"""bench/presets.py runs with tiny inputs (its full run is by hand, results committed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_presets_bench_smoke_run(tmp_path):
    command = [sys.executable, "bench/presets.py", "--small", "--repeats", "1"]
    command += ["--output-dir", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "presets.json").read_text())
    names = [row["preset"].split("(")[0] for row in report["rows"]]
    assert names == [
        "mmseg_ohem",
        "paddleseg_ohem",
        "hrnet_ohem",
        "bisenet_ohem",
        "ssd_hard_negatives",
        "mmdet_ohem",
    ]
    for row in report["rows"]:
        assert row["fwd_ratio"] > 0 and row["fwd_bwd_ratio"] > 0
    assert "| preset |" in (tmp_path / "presets.md").read_text()
