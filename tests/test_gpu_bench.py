"""bench/gpu.py runs on CPU with tiny sizes (its GPU run is a single, prepared call)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_bench_smoke_run_on_cpu(tmp_path):
    command = [
        sys.executable,
        "bench/gpu.py",
        "--device",
        "cpu",
        "--batch",
        "8",
        "--steps",
        "1",
        "--repeats",
        "1",
        "--output-dir",
        str(tmp_path),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert report["device"] == "cpu" and report["torch"]
    assert set(report["syncs"]) == {
        "gather_256",
        "bracket_1048576",
        "gather_65536",
        "auto_1000000",
        "ohemloss_fwd_bwd",
        "ohem_step_default",
        "ohem_step_capacity",
    }
    assert all(report["syncs"][case] == 0 for case in list(report["syncs"])[:5])
    assert report["syncs"]["ohem_step_capacity"] <= 1
    assert [row["K"] for row in report["select"]] == [256, 4096]
    for row in report["select"]:
        assert {"call_ms", "topk_ms", "sort_ms", "pass_ms"} <= set(row)
    assert report["host_us_256"] > 0
    assert set(report["mask_vs_plain"]) == {"tiny_cnn", "tiny_mlp"}
    assert [(row["model"], row["keep"]) for row in report["two_pass"]] == [
        (model, keep) for model in ("tiny_cnn", "tiny_mlp") for keep in (0.5, 0.25, 0.125)
    ]
    for row in report["two_pass"]:
        assert all(row[key] > 0 for key in ("plain_ms", "ceiling_ms", "default_ms", "capacity_ms"))
    assert "Two-pass speed-up" in (tmp_path / "gpu.md").read_text()
