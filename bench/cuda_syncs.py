"""Run: ``python bench/cuda_syncs.py`` on a machine with a CUDA GPU (2 GPUs for W=2).

Counts the device-to-host synchronizations of one ``HardExampleSelector`` call on CUDA,
as ``torch.cuda.set_sync_debug_mode("warn")`` reports them (one warning per
synchronizing operation: ``.item()``, ``.tolist()``, ``nonzero``, a blocking copy, ...),
for the small-batch case (K = 256 per rank, ``gather``, ``keep=0.25``) and the dense
case (K = 1e7 per rank, ``bracket``, ``keep=0.1``), in the steady state (after two
warm-up calls: the first teaches the selector what to send with its row). W = 1 in
this process; W = 2 over NCCL in two spawned processes when two GPUs are visible.
Prints one table row per case; the design target is at most 3 per call
(``tests/test_kselect.py::test_host_reads_per_call`` counts the same reads on CPU).

On a machine without CUDA it prints why it cannot run and exits with status 0.
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as torch_mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(1, str(ROOT))  # `python bench/cuda_syncs.py` puts bench/ first on sys.path

from dist_ohem import HardExampleSelector  # noqa: E402

#: (name, keys per rank, strategy, keep)
CASES = (("small batch", 256, "gather", 0.25), ("dense", 10**7, "bracket", 0.1))


def syncs_per_call(num_keys: int, strategy: str, keep: float, device: torch.device) -> int:
    """Synchronizing operations of one steady-state selector call on ``device``."""
    losses = torch.rand(num_keys, device=device)
    selector = HardExampleSelector(keep=keep, strategy=strategy)
    selector(losses), selector(losses)
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            selector(losses)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def rank_main(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    """One NCCL rank: count every case, rank 0 writes its counts."""
    torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        device = torch.device("cuda", rank)
        counts = [syncs_per_call(n, s, keep, device) for _, n, s, keep in CASES]
        Path(out_dir, f"rank{rank}.txt").write_text(" ".join(map(str, counts)))
    finally:
        dist.barrier()
        dist.destroy_process_group()


def main() -> int:
    if not torch.cuda.is_available():
        print(f"bench/cuda_syncs.py: no CUDA device (torch {torch.__version__}), nothing to count")
        return 0
    rows = [
        (name, n, strategy, 1, syncs_per_call(n, strategy, keep, torch.device("cuda", 0)))
        for name, n, strategy, keep in CASES
    ]
    if torch.cuda.device_count() >= 2:
        with tempfile.TemporaryDirectory(prefix="dist_ohem_syncs_") as tmp:
            torch_mp.spawn(rank_main, args=(2, os.path.join(tmp, "rendezvous"), tmp), nprocs=2)
            per_rank = [Path(tmp, f"rank{r}.txt").read_text().split() for r in range(2)]
        for i, (name, n, strategy, _) in enumerate(CASES):
            rows.append((name, n, strategy, 2, max(int(counts[i]) for counts in per_rank)))
    else:
        print("one GPU visible: W=2 over NCCL needs two, so only W=1 is counted")
    print("| case | K per rank | strategy | W | syncs per call |\n|---|---|---|---|---|")
    for name, n, strategy, world_size, count in rows:
        print(f"| {name} | {n:,} | {strategy} | {world_size} | {count} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
