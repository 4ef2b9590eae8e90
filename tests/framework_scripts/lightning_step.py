"""Lightning ``Trainer(accelerator="cpu", devices=2, strategy="ddp")``, one launch.

Launched by tests/test_integration_lightning.py as
``torchrun --nproc_per_node=2 ... lightning_step.py --out result.json`` (Lightning
adopts the torchrun ranks). Every case of ``parity_cases`` runs as one ``fit`` of one
epoch whose batches are this rank's micro-batches of the case:

- mask mode, automatic optimization: ``training_step`` returns the :class:`OHEMLoss`
  loss; ``accumulate_grad_batches`` = the case's micro-batches (Lightning divides the
  loss by it);
- two-pass, ``automatic_optimization=False``: ``ohem_step(self, ...,
  backward=self.manual_backward)`` and the optimizer stepped after the last micro-batch.

Each micro-batch logs the global mean loss two ways, recorded for the test: the
selection's ``mean_loss`` as it is (``train_loss``; identical on every rank), and this
rank's returned share with ``sync_dist=True`` (``train_share``; the mean over ranks).
"""

from __future__ import annotations

import tempfile

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from dist_ohem import HardExampleSelector, OHEMLoss
from tests.framework_scripts.parity_cases import (
    CRITERION,
    LR,
    MaskStep,
    Run,
    leave_process_group,
    local_micro_batches,
    make_model,
    run_cases,
    runs_for,
    train_micro_batch,
)

RUNS = (*runs_for("lightning", "mask"), *runs_for("lightning", "two_pass"))


class OHEMModule(L.LightningModule):
    """The parity MLP trained on one case in mask or two-pass mode."""

    def __init__(self, run: Run) -> None:
        super().__init__()
        self.run = run
        self.net = make_model()
        self.selector = HardExampleSelector(**run.case.rule)
        self.criterion = OHEMLoss(CRITERION, selector=self.selector)
        self.automatic_optimization = run.mode == "mask"
        self.outputs: list = []
        self.logged: list[dict[str, float]] = []
        self.wrapper = ""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.net(inputs)

    def training_step(self, batch, batch_idx):
        self.wrapper = type(self.trainer.strategy.model).__name__
        accumulation = self.run.case.accumulation_steps
        if self.automatic_optimization:
            loss = self.criterion(self(batch[0]), batch[1])
            # Lightning runs the backward of the returned loss.
            self.outputs.append(MaskStep(self.criterion.last))
            mean_loss = self.criterion.last_mean_loss
        else:

            def backward(loss: torch.Tensor) -> None:
                self.manual_backward(loss / accumulation)

            out = train_micro_batch(self, batch, self.run, self.selector, backward)
            self.outputs.append(out)
            loss, mean_loss = out.loss, out.mean_loss
            if batch_idx + 1 == accumulation:
                optimizer = self.optimizers()
                optimizer.step()
                optimizer.zero_grad()
        self.log("train_loss", mean_loss, on_step=True, on_epoch=False)
        self.log("train_share", loss.detach(), on_step=True, on_epoch=False, sync_dist=True)
        metrics = self.trainer.callback_metrics
        self.logged.append({name: float(metrics[name]) for name in ("train_loss", "train_share")})
        return loss if self.automatic_optimization else None

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)


def train(run: Run):
    """One ``fit`` over this rank's micro-batches of the case."""
    module = OHEMModule(run)
    batches = list(local_micro_batches(run.case, dist.get_rank()))
    with tempfile.TemporaryDirectory() as root:
        trainer = L.Trainer(
            accelerator="cpu",
            devices=2,
            strategy="ddp",
            max_epochs=1,
            accumulate_grad_batches=run.case.accumulation_steps if run.mode == "mask" else 1,
            use_distributed_sampler=False,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=root,
        )
        trainer.fit(module, DataLoader(batches, batch_size=None))
    facts = {
        "wrapper": module.wrapper,
        "strategy": type(trainer.strategy).__name__,
        "logged": module.logged,
        "global_step": trainer.global_step,
    }
    return list(module.net.parameters()), module.outputs, facts


def main() -> None:
    """Run every case in mask and two-pass mode, then leave the process group."""
    dist.init_process_group("gloo")
    run_cases(RUNS, train)
    leave_process_group()


if __name__ == "__main__":
    main()
