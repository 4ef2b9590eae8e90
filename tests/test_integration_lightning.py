"""Global OHEM under a real Lightning ``Trainer(accelerator="cpu", devices=2, strategy="ddp")``.

One ``torchrun`` launch of 2 CPU ranks (``tests/framework_scripts/lightning_step.py``)
fits every case of ``parity_cases`` twice: mask mode with automatic optimization
(``accumulate_grad_batches`` for the accumulated case) and two-pass with
``automatic_optimization=False`` + ``ohem_step(self, ..., backward=self.manual_backward)``
(balance, an idle rank, accumulation, ``micro_batch_size``). Each compares one SGD step
with the single-process reference and checks what ``self.log`` shows.
"""

from __future__ import annotations

import pytest

from tests.framework_scripts.launch_checks import check_run, launch_script, require
from tests.framework_scripts.parity_cases import CASES, runs_for

RUNS = (*runs_for("lightning", "mask"), *runs_for("lightning", "two_pass"))


@pytest.fixture(scope="module")
def lightning_results(tmp_path_factory) -> dict:
    """One torchrun of 2 CPU ranks running every Lightning run."""
    require("lightning")
    return launch_script(tmp_path_factory, "torchrun", "lightning_step.py")


@pytest.mark.parametrize("run", RUNS, ids=lambda run: run.name)
def test_lightning_ddp_matches_single_process(lightning_results, run):
    check_run(lightning_results, run, "DistributedDataParallel")
    result = lightning_results[run.name]
    assert result["strategy"] == "DDPStrategy"
    assert result["global_step"] == 1


@pytest.mark.parametrize("run", RUNS, ids=lambda run: run.name)
def test_lightning_logs_the_global_mean_loss(lightning_results, run):
    """``self.log("train_loss", mean_loss)`` (no sync: identical on every rank) and
    ``self.log("train_share", loss, sync_dist=True)`` (the mean of the ranks' shares)
    both show the mean loss over the globally selected examples of the micro-batch."""
    result = lightning_results[run.name]
    assert len(result["logged"]) == run.case.accumulation_steps
    for logged, expected in zip(result["logged"], result["reference_mean_losses"], strict=True):
        assert logged["train_loss"] == pytest.approx(expected, rel=1e-6)
        assert logged["train_share"] == pytest.approx(expected, rel=1e-6)


def test_lightning_runs_cover_every_case():
    assert {run.case.name for run in RUNS} == {case.name for case in CASES}
