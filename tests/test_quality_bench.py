"""bench/quality.py: reading a run, time to target and the aggregation, on synthetic runs."""

import json
from pathlib import Path

import pytest

from bench import quality

CELL = quality.Cell("digits", 2, "skewed", 64, 4, 2)


def write_run(run_dir: Path, tail: list[float], selected: int) -> None:
    """A 4-step run of ``launch/train.py``'s output format, evaluated at steps 0, 2 and 4."""
    run_dir.mkdir(parents=True)
    lines = []
    for step in range(5):
        if step:
            record = {"kind": "train", "step": step, "step_s_max": 0.5 * step}
            counts = {"hard_in_batch": 4, "hard_selected": 3}
            lines.append(record | counts | {"num_selected_global": selected})
        if step % 2 == 0:
            metrics = {"tail_acc": tail[step // 2], "balanced_acc": 0.5, "head_acc": 0.9}
            lines.append({"kind": "eval", "step": step, **metrics})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    summary = {
        "final_eval": lines[-1],
        "throughput": {"train_s": 5.0},
        "examples_backpropagated": 4 * selected,
        "parameter_sha256_per_rank": ["a", "a"],
    }
    (run_dir / "summary.json").write_text(json.dumps(summary))


def test_read_run_accumulates_cost_up_to_each_evaluation(tmp_path: Path) -> None:
    write_run(tmp_path / "run", [0.0, 0.4, 0.8], selected=32)
    run = quality.read_run(tmp_path / "run", CELL)
    assert [p["step"] for p in run["curve"]] == [0, 2, 4]
    assert [p["train_s"] for p in run["curve"]] == [0.0, 1.5, 5.0]
    assert [p["examples"] for p in run["curve"]] == [0, 64, 128]
    assert run["final"] == {"tail_acc": 0.8, "balanced_acc": 0.5, "head_acc": 0.9}
    assert run["hard_kept"] == 0.75
    assert run["parameter_sha256_agree"]


def test_time_to_target_is_the_first_evaluation_at_or_above_it() -> None:
    curve = [
        {"step": s, "train_s": s / 10, "examples": 10 * s, "m": v}
        for s, v in [(0, 0.1), (25, 0.5), (50, 0.7), (75, 0.6)]
    ]
    assert quality.time_to_target(curve, "m", 0.5) == {"step": 25, "train_s": 2.5, "examples": 250}
    assert quality.time_to_target(curve, "m", 0.7)["step"] == 50
    assert quality.time_to_target(curve, "m", 0.71) is None


def test_aggregate_counts_unreached_seeds_and_pairs_by_seed(tmp_path: Path) -> None:
    # global reaches 0.8 on both seeds; "all" ends at 0.6 / 0.8 and reaches the target
    # (0.9 x best final mean 0.8 = 0.72) on one seed only.
    finals = {"global": [0.8, 0.8], "local": [0.8, 0.7], "random": [0.5, 0.5], "all": [0.6, 0.8]}
    runs = []
    for variant, per_seed in finals.items():
        for seed, final in enumerate(per_seed):
            run_dir = tmp_path / f"{variant}{seed}"
            write_run(run_dir, [0.0, final / 2, final], selected=128 if variant == "all" else 32)
            runs.append({"cell": CELL.name, "variant": variant, "seed": seed})
            runs[-1] |= quality.read_run(run_dir, CELL)
    rows = {row["variant"]: row for row in quality.aggregate([CELL], runs)}
    assert rows["global"]["target"]["value"] == pytest.approx(0.72)
    assert (rows["all"]["reached"], rows["all"]["not_reached"]) == (1, 1)
    assert rows["all"]["to_target"]["examples"] == {"mean": 512, "std": None, "n": 1}
    assert rows["global"]["to_target"]["step"]["mean"] == 4
    assert rows["random"]["reached"] == 0
    assert rows["random"]["to_target"]["train_s"]["mean"] is None
    local = rows["local"]["headline_minus_global"]
    assert local["mean"] == pytest.approx(-0.05)
    assert (local["above"], local["below"]) == (0, 1)
    assert rows["global"]["final"]["tail_acc"] == {"mean": 0.8, "std": 0.0, "n": 2}
    assert all(run["target"] == pytest.approx(0.72) for run in runs)
    markdown = quality.render_markdown(
        {
            "meta": {
                "command": "python bench/quality.py",
                "date": "d",
                "torch": "t",
                "python": "p",
                "cores": 2,
                "git": "g",
                "machine": "quiet",
                "load_start": [0.1],
                "load_end": [0.2],
                "wall_s": 60.0,
                "launch_wall_s": 50.0,
            },
            "cells": [quality.asdict(CELL)],
            "seeds": [0, 1],
            "rows": list(rows.values()),
        }
    )
    assert "| 2 | skewed | local OHEM | 0.750 ± 0.071 |" in markdown
    assert "1/2" in markdown


# ----------------------------------------------------------------------------- budget study


def test_budget_simulation_keeps_the_local_budget_and_the_global_count() -> None:
    """3 steps of digits at W=4, n=4 (budget 1 per rank), the hard digits on rank 0."""
    cell = quality.BudgetCell("digits", 4, 4, "skewed", max_steps=3)
    assert cell.budget == 1 and cell.name == "digits W=4 n=4 skewed"
    runs = {v: quality.simulate(cell, v, seed=0) for v in quality.VARIANTS}
    for run in runs.values():
        assert set(run["final"]) == set(quality.METRICS["digits"])
        assert run["hard_over_budget"] == runs["all"]["hard_over_budget"]  # data, not variant
    # Local OHEM trains one example per rank and step: a quarter of the trained examples
    # from each rank; global OHEM picks the same M = 4 anywhere.
    assert runs["local"]["selected_share_by_rank"] == [0.25] * 4
    assert sum(runs["global"]["selected_share_by_rank"]) == pytest.approx(1.0)
    assert runs["all"]["hard_kept"] == 1.0
    # Every hard example on rank 0 and only one slot there: local keeps at most 1 a step.
    assert runs["local"]["hard_kept"] * runs["local"]["hard_per_step"] <= 1.0 + 1e-9


def test_budget_grid_is_resumable_and_reports(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(quality, "BUDGET_RANKS", ((2, 4),))
    argv = ["--budget", "--tasks", "digits", "--steps", "2", "--seeds", "2"]
    argv += ["--output-dir", str(tmp_path / "out"), "--runs-dir", str(tmp_path / "runs")]
    quality.main(argv)
    store = tmp_path / "runs" / "budget.jsonl"
    lines = store.read_text().splitlines()
    assert len(lines) == 3 * 4 * 2  # 3 shardings x 4 variants x 2 seeds
    quality.main(argv)  # nothing left to train: the report is rebuilt from the store
    assert store.read_text().splitlines() == lines
    report = json.loads((tmp_path / "out" / "budget.json").read_text())
    assert len(report["rows"]) == 3 and len(report["runs"]) == 24
    diff = report["rows"][0]["global_minus_local"]["tail_acc"]
    assert diff["n"] == 2 and len(diff["values"]) == 2
    markdown = (tmp_path / "out" / "budget.md").read_text()
    assert "global - local" in markdown and "## digits: tail acc" in markdown
    assert (tmp_path / "out" / "budget.png").stat().st_size > 10_000


def test_budget_more_seeds_of_one_shard_are_reported_apart(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(quality, "BUDGET_RANKS", ((2, 4),))
    out = ["--output-dir", str(tmp_path / "out"), "--runs-dir", str(tmp_path / "runs")]
    argv = ["--budget", "--tasks", "digits", "--steps", "2", *out]
    quality.main([*argv, "--seeds", "1"])
    quality.main([*argv, "--seeds", "3", "--shards", "iid", "--variants", "local", "global"])
    quality.main([*argv, "--seeds", "1", "--report-only"])
    report = json.loads((tmp_path / "out" / "budget.json").read_text())
    assert [r["shard"] for r in report["rows"]] == ["iid", "skewed", "sources"]
    assert all(r["global_minus_local"]["tail_acc"]["n"] == 1 for r in report["rows"])
    (extra,) = report["more_seeds"]
    assert extra["shard"] == "iid" and extra["seeds"] == [0, 1, 2]
    assert "## More seeds" in (tmp_path / "out" / "budget.md").read_text()


def test_roi_diagnosis_rows_pair_every_variant_with_local_by_seed() -> None:
    from bench import roi_quality

    def run(variant: str, seed: int, maps: tuple[float, float, float]) -> dict:
        final = {"map": maps[0], "map_easy": maps[1], "map_hard": maps[2]}
        return {"variant": variant, "seed": seed, "lr_factor": 1.0, "final": final,
                "rank_share": [0.5, 0.5], "lookalike_kept": 0.1, "fg_kept": 0.4}  # fmt: skip

    runs = [run("local", s, (0.3, 0.5, 0.2)) for s in (0, 1)]
    runs += [run("global", s, (0.28, 0.45, 0.21 + s / 100)) for s in (0, 1)]
    rows = {row["test"]: row for row in roi_quality.diagnosis_rows(runs)}
    assert set(rows) == {"iid", "easy", "hard"}
    easy = rows["easy"]["variants"]["global"]["minus_local"]
    assert easy["mean"] == pytest.approx(-0.05) and easy["ahead"] == 0
    assert rows["hard"]["variants"]["global"]["minus_local"]["ahead"] == 2
    assert "global_per_image" not in rows["iid"]["variants"]
