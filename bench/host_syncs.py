"""Run: ``python bench/host_syncs.py [--device meta|cuda] [--world-size 4]``.

Counts the device-to-host reads of one steady-state call (after a warm-up call: the
first call of a selector is eager by design) of each case, and prints them as a table
and, on its last line, as JSON: ``{case: reads per call}``.

- ``--device cuda``: by ``torch.cuda.set_sync_debug_mode("warn")`` (one warning per
  synchronizing operation; the one-time "prototype feature" notice is not counted).
  W = 1.
- ``--device meta`` (default; no GPU needed): the path a GPU takes, run on meta
  tensors, which hold no values. :class:`HostReads` records every read of a non-CPU
  tensor into Python (``item``, ``tolist``, ``bool``, ``int``, a blocking copy to the
  host, ...) and every operation whose output size depends on the data (``nonzero``,
  boolean-mask indexing). A scalar read of a meta tensor gives 0; a data-dependent size
  raises. With ``--world-size`` W > 1 the collectives run in torch's fake process group
  (no communication). ``tests/test_host_reads.py`` counts with the same class.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.overrides import TorchFunctionMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(1, str(ROOT))  # `python bench/host_syncs.py` puts bench/ first on sys.path

from bench.common import markdown_table  # noqa: E402
from dist_ohem import HardExampleSelector, OHEMLoss, ohem_step  # noqa: E402

#: case -> (strategy, instances per rank) of the selector cases (keep 0.1, scope global).
SELECTOR_CASES = {
    "gather_256": ("gather", 256),
    "bracket_1048576": ("bracket", 1 << 20),
    "radix_65536": ("radix", 1 << 16),
    "auto_1000000": ("auto", 10**6),
}
STEP_CASES = {"ohem_step_default": "auto", "ohem_step_capacity": 1.25}
_SCALAR_READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy"}
_SIZED_BY_DATA = {"nonzero", "masked_select", "unique", "bincount", "repeat_interleave"}


class HostReads(TorchFunctionMode):
    """Records what would make the host wait for a device, on non-CPU tensors.

    ``reads`` lists the operation names in order. On meta tensors a scalar read returns
    zeros (there are no values), so that code which reads once can be counted to the
    end; an operation whose output size depends on the data raises.
    """

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        tensor = args[0] if args and isinstance(args[0], torch.Tensor) else None
        on_device = tensor is not None and tensor.device.type != "cpu"
        if _is_copy_from_host(name, args, kwargs, on_device):
            # A pageable host-to-device copy also waits for the device's queue.
            self.reads.append(f"{name} from host")
        elif on_device and name in _SCALAR_READS:
            self.reads.append(name)
            if tensor.is_meta:
                return _zeros_read(name, tensor)
        elif on_device and _is_data_sized(name, args):
            self.reads.append(name)
        elif on_device and _is_blocking_copy_to_host(name, args, kwargs):
            self.reads.append(f"{name} to cpu")
            if tensor.is_meta:
                return torch.zeros(tensor.shape, dtype=tensor.dtype)
        return func(*args, **kwargs)


def _is_data_sized(name: str, args: tuple) -> bool:
    if name in _SIZED_BY_DATA:
        return True
    index = args[1] if len(args) > 1 else None
    return name in ("__getitem__", "__setitem__") and (
        isinstance(index, torch.Tensor) and index.dtype == torch.bool
    )


def _is_copy_from_host(name: str, args: tuple, kwargs: dict, on_device: bool) -> bool:
    """``torch.tensor(data, device=...)`` or indexing a device tensor with a Python list."""
    if name in ("tensor", "as_tensor"):
        device = kwargs.get("device")
        return device is not None and torch.device(device).type != "cpu"
    index = args[1] if len(args) > 1 else None
    parts = index if isinstance(index, tuple) else (index,)
    return on_device and name == "__getitem__" and any(isinstance(p, list) for p in parts)


def _is_blocking_copy_to_host(name: str, args: tuple, kwargs: dict) -> bool:
    if name == "cpu":
        return True
    if name == "to":
        target = [a for a in args[1:] if isinstance(a, (str, torch.device))]
        target = target[0] if target else kwargs.get("device")
        blocking = not kwargs.get("non_blocking", False)
        return target is not None and torch.device(target).type == "cpu" and blocking
    return False


def _zeros_read(name: str, tensor: torch.Tensor) -> object:
    zeros = torch.zeros(tensor.shape, dtype=tensor.dtype)
    if name == "numpy":
        return zeros.numpy()
    return zeros.tolist() if name == "tolist" else getattr(zeros, name)()


def reads_of(call: Callable[[], object]) -> list[str]:
    """The reads of ``call()`` (a steady-state call: run the warm-up before)."""
    with HostReads() as reads:
        call()
    return reads.reads


def counter_for(device: torch.device) -> Callable[[Callable[[], object]], int]:
    """How to count a call's reads on ``device``: sync warnings on CUDA, else HostReads."""
    if device.type != "cuda":
        return lambda call: len(reads_of(call))

    def count_cuda_syncs(call: Callable[[], object]) -> int:
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                call()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("prototype" not in str(w.message) for w in caught)

    return count_cuda_syncs


def warm_device(device: torch.device) -> torch.device:
    """Where the warm-up call runs: the first call is eager and reads, which meta cannot."""
    return torch.device("cpu") if device.type == "meta" else device


def selector_reads(
    device: torch.device, strategy: str, num: int, count: Callable, **rule: object
) -> int:
    """Reads of one steady-state selector call (deferred checks, the GPU's default)."""
    rule = rule or {"keep": 0.1}
    selector = HardExampleSelector(strategy=strategy, check="deferred", **rule)
    positive = "neg_pos_ratio" in rule

    def call(on: torch.device) -> object:
        losses = torch.rand(num, device=on)
        mask = torch.rand(num, device=on) < 0.2 if positive else None
        return selector(losses, positive=mask)

    call(warm_device(device))
    return count(lambda: call(device))


def ohemloss_reads(device: torch.device, count: Callable) -> int:
    """Reads of one steady-state OHEMLoss forward + backward (keep 1/4)."""
    model = nn.Linear(8, 4)
    criterion = OHEMLoss(nn.CrossEntropyLoss(), keep=0.25, check="deferred")

    def call(on: torch.device) -> None:
        model.to(on)
        inputs, targets = torch.randn(64, 8, device=on), torch.randint(4, (64,), device=on)
        criterion(model(inputs), targets).backward()

    call(warm_device(device))
    return count(lambda: call(device))


def step_reads(device: torch.device, capacity_factor: object, count: Callable) -> int:
    """Reads of one steady-state ``ohem_step`` (keep 1/4, BatchNorm in the model)."""
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
    selector = HardExampleSelector(keep=0.25, check="deferred")

    def call(on: torch.device) -> None:
        model.to(on)
        inputs, targets = torch.randn(64, 8, device=on), torch.randint(4, (64,), device=on)
        ohem_step(
            model,
            inputs,
            targets,
            nn.CrossEntropyLoss(),
            selector,
            capacity_factor=capacity_factor,
        )

    call(warm_device(device))
    return count(lambda: call(device))


def all_cases(device: torch.device) -> dict[str, int]:
    """Reads per steady-state call of every case on ``device``."""
    count = counter_for(device)
    result = {
        name: selector_reads(device, strategy, num, count)
        for name, (strategy, num) in SELECTOR_CASES.items()
    }
    result["ohemloss_fwd_bwd"] = ohemloss_reads(device, count)
    for name, capacity_factor in STEP_CASES.items():
        result[name] = step_reads(device, capacity_factor, count)
    return result


def init_fake_group(world_size: int) -> None:
    """Torch's fake process group: collectives of any world size, without communication."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="meta", choices=["meta", "cuda"])
    parser.add_argument("--world-size", type=int, default=1, help="fake group size (meta)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --device meta")
        return
    if args.world_size > 1:
        if device.type == "cuda":
            parser.error("--world-size > 1 needs --device meta (the fake process group)")
        init_fake_group(args.world_size)
    try:
        result = all_cases(device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    print(markdown_table(["case", "host reads per call"], [[k, str(v)] for k, v in result.items()]))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
