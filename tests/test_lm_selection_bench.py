"""bench/lm_selection.py: a tiny run of the whole study (report structure, finite numbers),
the FLOP accounting and the simulated ranks' selection."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from bench import lm_selection as lm


def _finite_numbers(value: object, where: str = "") -> None:
    """Every number in ``value`` (nested dicts/lists) is finite; None only for a std."""
    if isinstance(value, dict):
        for key, item in value.items():
            if item is None:
                assert key == "std", f"{where}.{key} is None"
            else:
                _finite_numbers(item, f"{where}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _finite_numbers(item, f"{where}[{index}]")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        assert math.isfinite(value), f"{where} = {value}"


def test_quick_study_writes_a_complete_report(tmp_path: Path) -> None:
    lm.main(["--quick", "--output-dir", str(tmp_path)])
    report = json.loads((tmp_path / "lm_selection_quick.json").read_text())
    config = lm.QUICK
    cells = [[0.0, "iid"], [0.3, "iid"], [0.3, "skewed"]]
    assert report["cells"] == cells
    assert report["seeds"] == [0, 1]
    assert {"load_start", "load_end", "load_samples", "wall_s", "command"} <= set(report["meta"])
    assert len(report["meta"]["load_samples"]) == len(report["runs"]) + config.seeds

    # Every variant in iid cells, only the per-rank ones again in the skewed cell.
    assert len(report["runs"]) == config.seeds * (2 * len(lm.VARIANTS) + len(lm.PER_RANK))
    assert [(r["cell"], r["variant"]) for r in report["rows"]] == [
        (lm.cell_name(q, s), v) for q, s in cells for v in lm.VARIANTS
    ]
    budget = report["flop_budget"]
    for run in report["runs"]:
        steps = [p["step"] for p in run["curve"]]
        assert steps == sorted(set(steps)) and steps[0] == 0 and steps[-1] == run["steps"]
        assert run["equal_steps"]["step"] == config.steps
        assert budget - run["step_flops"] < run["equal_flops"]["flops"] <= budget
        assert sum(run["kept_share"].values()) == pytest.approx(1.0)
    by_variant = {r["variant"]: r for r in report["runs"] if r["seed"] == 0}
    assert by_variant["all"]["steps"] == config.steps
    assert by_variant["random"]["steps"] == 4 * config.steps
    assert by_variant["global"]["step_flops"] < by_variant["excess_global"]["step_flops"]
    # A plain run trains on every sequence, noise included; no run at 0% noise sees noise.
    plain_noisy = [r for r in report["rows"] if r["variant"] == "all" and r["noise"] == 0.3]
    assert plain_noisy[0]["kept_share"]["noise"]["mean"] == pytest.approx(0.3, abs=0.02)
    assert all(r["kept_share"]["noise"] == 0 for r in report["runs"] if r["noise"] == 0)
    _finite_numbers(report, "report")
    for row in report["rows"]:
        for point in ("equal_steps", "equal_flops"):
            assert row[point]["learnable"]["n"] == config.seeds
            if row["variant"] != "all":
                assert row["minus_plain"][point]["n"] == config.seeds

    markdown = (tmp_path / "lm_selection_quick.md").read_text()
    assert markdown.startswith("# Which selection helps a language model")
    assert "## Rule" in markdown and "**top-loss global - plain**" in markdown
    assert "- **Top-loss vs plain.** top-loss global - plain: " in markdown
    assert "learnable @ equal CPU s" in markdown
    for noise, shard in cells:
        assert f"## {lm.cell_name(noise, shard)}\n" in markdown
    assert "| variant | noise 0% iid | noise 30% iid | noise 30% skewed |" in markdown
    assert "| top-loss per rank |" in markdown and "| excess-loss global ¹ |" in markdown
    assert not re.search(r"\b(nan|inf)\b", markdown, re.IGNORECASE)
    assert (tmp_path / "lm_selection_quick.png").stat().st_size > 10_000

    # --report-only rebuilds the same tables from the JSON's runs, training nothing.
    (tmp_path / "lm_selection_quick.png").unlink()
    lm.main(["--quick", "--report-only", "--output-dir", str(tmp_path)])
    rebuilt = (tmp_path / "lm_selection_quick.md").read_text()
    assert "rebuilt from the JSON's runs" in rebuilt
    assert rebuilt.split("## Rule")[1] == markdown.split("## Rule")[1]
    assert json.loads((tmp_path / "lm_selection_quick.json").read_text())["runs"] == report["runs"]
    assert (tmp_path / "lm_selection_quick.png").exists()


def test_step_flops_count_scoring_and_reference_forwards() -> None:
    params, batch = 1000, 64
    forward = 2 * params * lm.SEQ_LEN
    plain = lm.step_flops("all", batch, params)
    assert plain == 3 * forward * batch
    assert lm.step_flops("random", batch, params) == plain // 4
    assert lm.step_flops("global", batch, params) == lm.step_flops("local", batch, params)
    assert lm.step_flops("global", batch, params) == forward * batch + plain // 4
    assert lm.step_flops("excess_local", batch, params) == 2 * forward * batch + plain // 4
    config = lm.Config(steps=150)
    steps, points = lm.schedule(config, "excess_global", params)
    assert steps == 150 * 3 * 4 // 11  # 2.75 F(B) a step against plain's 3 F(B)
    assert points[0] == 0 and config.steps in points and points[-1] == steps


def test_global_selection_ignores_the_sharding_and_per_rank_keeps_a_quarter_each() -> None:
    model = lm.make_model(0)
    batch, world = 32, 4
    iid, _, iid_place = lm.global_batch(0, 0.3, 5, batch, "iid")
    skewed, skewed_kinds, skewed_place = lm.global_batch(0, 0.3, 5, batch, "skewed")
    # The same sequences, the noise moved to the first ranks.
    assert sorted(iid_place.tolist()) == sorted(skewed_place.tolist()) == list(range(batch))
    noise = lm.KINDS.index("noise")
    num_noise = round(0.3 * batch)
    assert (skewed_kinds[:num_noise] == noise).all() and (skewed_kinds[num_noise:] != noise).all()
    assert torch.equal(skewed[skewed_place.argsort()], iid[iid_place.argsort()])

    def chosen(variant: str, sequences: torch.Tensor, place: torch.Tensor) -> set[int]:
        mask = lm.select(variant, model, None, sequences, place, world, seed=0, step=5)
        assert int(mask.sum()) == lm.num_selected(batch) == batch // 4
        if variant == "local":
            assert mask.view(world, -1).sum(1).tolist() == [batch // (4 * world)] * world
        return set(place[mask].tolist())

    for variant in ("global", "random"):
        assert chosen(variant, iid, iid_place) == chosen(variant, skewed, skewed_place)
    # Per rank, the skewed sharding changes what is kept: rank 0 holds only noise.
    assert chosen("local", iid, iid_place) != chosen("local", skewed, skewed_place)
