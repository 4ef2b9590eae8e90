"""The language-model rows of bench/throughput.py: their summary of the ranks' step times."""

from __future__ import annotations

import math

import pytest

from bench.throughput import summarize_trainer_lm, trainer_lm_section


def raw(per_method_ms: dict[tuple[str, float | None, bool], list[list[float]]]) -> dict:
    """A bench/trainer_lm.py result with the given per-rank step times (ms, CPU = wall/2)."""
    methods = [
        {
            "name": name,
            "keep": keep,
            "reference": reference,
            "per_rank": [[(ms / 1e3, ms / 2e3) for ms in steps] for steps in ranks],
        }
        for (name, keep, reference), ranks in per_method_ms.items()
    ]
    config = {"batch_size": 4, "accumulation": 2, "vocab": 8, "length": 4, "width": 8,
              "layers": 1, "rounds": 1, "steps": 3}  # fmt: skip
    return {"methods": methods, "config": config, "world_size": 2, "parameters": 10}


def test_slowest_rank_median_and_ideal_speedups():
    summary = summarize_trainer_lm(
        raw(
            {
                ("plain", None, False): [[100, 90, 110], [95, 120, 80]],
                ("two-pass", 0.25, False): [[40, 50, 60], [70, 45, 55]],
                ("two-pass+reference", 0.25, True): [[80, 80, 80], [80, 80, 80]],
                ("mask", 0.25, False): [[100, 100, 100], [100, 100, 100]],
            }
        )
    )
    plain, two_pass, reference, mask = summary["rows"]
    # Per step the slower rank: plain 100, 120, 110 -> median 110; two-pass 70, 50, 60 -> 60.
    assert plain["step_ms"] == pytest.approx(110)
    assert two_pass["step_ms"] == pytest.approx(60)
    assert two_pass["speedup"] == pytest.approx(110 / 60)
    assert two_pass["cpu_speedup"] == pytest.approx(110 / 60)
    # K = 2 ranks x 4 x 2 = 16 sequences, M = 4: 3K/(K+3M) and 3K/(2K+3M).
    assert summary["sequences_per_step"] == 16
    assert two_pass["ideal"] == pytest.approx(48 / 28)
    assert reference["ideal"] == pytest.approx(48 / 44)
    assert plain["ideal"] == mask["ideal"] == 1.0


def test_section_renders_every_row():
    summary = summarize_trainer_lm(raw({("plain", None, False): [[10.0], [12.0]]}))
    summary["meta"] = {"date": "d", "git": "g", "load_start": [1], "load_end": [1], "wall_s": 1}
    text = "\n".join(trainer_lm_section(summary))
    assert "| plain | - | 12.0 |" in text
    assert math.isclose(summary["rows"][0]["speedup"], 1.0)
