# OMP_NUM_THREADS=1 torchrun --nproc_per_node=2 examples/rho_loss.py
"""RHO-LOSS across ranks: select by the reducible (excess) loss, train on the loss.

Mindermann et al., "Prioritized Training on Points that are Learnable, Worth Learning,
and Not Yet Learnt" (ICML 2022): a small *reference* model trained on held-out data
estimates each example's irreducible loss; the training step keeps the examples with the
highest ``loss - reference_loss``. Plain loss-based OHEM keeps mislabelled examples
(their loss stays high forever); the excess loss of a mislabelled example is low,
because the reference model finds it hard too, so RHO-LOSS skips it.

Here the selection is global (``ohem_step(..., score_fn=...)``): the top 25% by excess
loss over the whole distributed batch, scored and trained in micro-batches of 16 with
one selection per optimizer step. Data: a Gaussian mixture of 4 classes in 16
dimensions, 20% of the training labels replaced by a random class (the noise). The log
shows the share of mislabelled examples in the batch vs. among the selected, and
``StepOutput.mean_loss``, the global mean training loss of the selected examples.
Runs under torchrun (any number of ranks) or as one plain process; ``--out FILE``
writes the per-step records and the final accuracy as JSON (rank 0).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dist_ohem import HardExampleSelector, ohem_step

FEATURES = 16
NUM_CLASSES = 4
LABEL_NOISE = 0.2
#: Class means, shared by every split and rank.
CENTERS = 1.2 * torch.randn(NUM_CLASSES, FEATURES, generator=torch.Generator().manual_seed(0))

log = logging.getLogger("rho_loss")


def make_split(
    gen: torch.Generator, n: int, noise: float = LABEL_NOISE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` examples: features ``(n, FEATURES)``, labels ``(n,)`` of which a share
    ``noise`` is replaced by a uniformly random class, and the bool mask of those."""
    classes = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
    features = CENTERS[classes] + torch.randn(n, FEATURES, generator=gen)
    noisy = torch.rand(n, generator=gen) < noise
    random_labels = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
    labels = torch.where(noisy, random_labels, classes)
    return features, labels, noisy & (labels != classes)


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)  # identical initial weights on every rank
    return nn.Sequential(nn.Linear(FEATURES, 32), nn.ReLU(), nn.Linear(32, NUM_CLASSES))


def train_reference_model(steps: int) -> nn.Module:
    """The irreducible-loss model: trained on a held-out split (same noise), identically
    on every rank, so no communication is needed."""
    features, labels, _ = make_split(torch.Generator().manual_seed(1), 2000)
    model = make_model(seed=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(features), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-per-rank", type=int, default=64)
    parser.add_argument("--micro-batch-size", type=int, default=16)
    parser.add_argument("--keep", type=float, default=0.25)
    parser.add_argument("--reference-steps", type=int, default=150)
    parser.add_argument("--out", type=Path, help="write a JSON summary here (rank 0)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    if "WORLD_SIZE" in os.environ:  # under torchrun
        dist.init_process_group("gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s")

    reference = train_reference_model(args.reference_steps)

    def excess_loss(example_losses, inputs, targets):
        """The RHO-LOSS score: the loss minus the reference model's loss (under no_grad)."""
        reference_losses = nn.functional.cross_entropy(reference(inputs), targets, reduction="none")
        return example_losses - reference_losses

    model = make_model(seed=0)
    ddp = DDP(model) if world_size > 1 else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    selector = HardExampleSelector(keep=args.keep)
    loss_selector = HardExampleSelector(keep=args.keep)
    gen = torch.Generator().manual_seed(1000 + rank)  # each rank its own shard
    records = []
    for step in range(args.steps):
        features, labels, noisy = make_split(gen, args.batch_per_rank)
        out = ohem_step(
            ddp,
            features,
            labels,
            nn.CrossEntropyLoss(),
            selector,
            score_fn=excess_loss,
            micro_batch_size=args.micro_batch_size,
        )
        optimizer.step()
        optimizer.zero_grad()
        # For the log only: mislabelled examples in the batch, among the selected, and
        # among the examples that plain loss-based OHEM would have selected instead.
        by_loss = loss_selector(out.example_losses, out.valid).mask
        counts = torch.tensor(
            [
                float(noisy.sum()),
                float((noisy & out.selection.mask).sum()),
                float((noisy & by_loss).sum()),
            ],
            dtype=torch.float64,
        )
        if dist.is_initialized():
            dist.all_reduce(counts)
        selection = out.selection
        record = {
            "mean_loss": out.mean_loss,
            "num_valid_global": selection.num_valid_global,
            "num_selected_global": selection.num_selected_global,
            "selected_per_rank": list(selection.selected_per_rank),
            "num_chunks": out.num_chunks,
            "noisy_share_batch": float(counts[0]) / selection.num_instances_global,
            "noisy_share_selected": float(counts[1]) / max(selection.num_selected_global, 1),
            "noisy_share_top_loss": float(counts[2]) / max(selection.num_selected_global, 1),
        }
        records.append(record)
        if step % 10 == 0 or step == args.steps - 1:
            log.info(
                "step %3d  mean loss of the selected %.3f  M=%d of K=%d  mislabelled: "
                "%.0f%% of the batch, %.0f%% of the selected, %.0f%% of the top-M by loss",
                step,
                record["mean_loss"],
                record["num_selected_global"],
                record["num_valid_global"],
                100 * record["noisy_share_batch"],
                100 * record["noisy_share_selected"],
                100 * record["noisy_share_top_loss"],
            )

    with torch.no_grad():
        features, labels, noisy = make_split(torch.Generator().manual_seed(7), 2000, noise=0.0)
        accuracy = (model(features).argmax(1) == labels).float().mean().item()
    log.info("clean test accuracy %.3f", accuracy)
    if args.out is not None and rank == 0:
        summary = {
            "world_size": world_size,
            "keep": args.keep,
            "steps": records,
            "accuracy": accuracy,
        }
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    for each in (selector, loss_selector):  # on GPUs, raise what deferred checks hold
        each.check()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
