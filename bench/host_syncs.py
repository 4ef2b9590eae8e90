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

Torch calls per steady-state call (:class:`TorchCalls`, whatever ``--device``): every
torch function, tensor method, operator and tensor attribute read (``.shape``,
``.device``: they dispatch too) that reaches ``__torch_function__`` from outside torch,
each counted once (what a torch function calls inside is not counted), in one call of
``HardExampleSelector(keep=0.25, check=...)`` on K = 256 float32 losses per rank, scope
global, reading ``result.mask`` included; counted after two warm-up calls (the first is
eager by design; the second leaves the rows that the next call checks, as every later
call does). ``torch_calls_device_256``: ``check="deferred"``, W = 1, CPU tensors;
``torch_calls_host_256``: ``check="eager"``, W = 1, CPU; ``torch_calls_device_256_w4``:
``check="deferred"``, W = 4 in torch's fake process group (no communication: an
all-gather copies this rank's input, an all-reduce keeps it), CPU tensors. A table splits
them by stage: the function that ``HardExampleSelector.__call__`` called (found on the
Python stack; where ``__call__`` only hands the call to one function, the stages are
that function's callees; ``--stage-depth 2`` splits each stage by its callees).
``--ops`` lists the operations of each stage.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from types import CodeType, FrameType

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
    "gather_65536": ("gather", 1 << 16),
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
    positive = "neg_pos_ratio" in rule or "pos_fraction" in rule

    def call(on: torch.device) -> object:
        losses = torch.rand(num, device=on)
        mask = torch.rand(num, device=on) < 0.2 if positive else None
        groups = torch.arange(num, device=on) // 64 if rule.get("per_group") else None
        return selector(losses, positive=mask, groups=groups)

    call(warm_device(device))
    return count(lambda: call(device))


def ohemloss_reads(device: torch.device, count: Callable, **kwargs: object) -> int:
    """Reads of one steady-state OHEMLoss forward + backward (keep 1/4, or ``kwargs``)."""
    model = nn.Linear(8, 4)
    criterion = OHEMLoss(nn.CrossEntropyLoss(), check="deferred", **(kwargs or {"keep": 0.25}))

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


#: The torch-call case: rule, float32 losses per rank, world size of the "_w4" count.
TORCH_CALL_KEEP, TORCH_CALL_KEYS, TORCH_CALL_WORLD = 0.25, 256, 4
#: Stage names of the calls made outside ``HardExampleSelector.__call__``.
OUTSIDE, RESULT = "outside", "result"
_TORCH_DIR = str(Path(torch.__file__).resolve().parent)


class TorchCalls(TorchFunctionMode):
    """Counts torch calls: every ``__torch_function__`` dispatch (torch function, tensor
    method, operator, tensor attribute read) that does not come from inside another one.

    While a call it saw runs, torch turns this mode off, so what a torch function calls
    inside is not counted. ``calls`` holds, per call, ``(op, path, phase)``: the
    operation's name (``.shape`` for an attribute), the names of the Python functions
    from ``root`` (a code object; default ``HardExampleSelector.__call__``) down to the
    call site (the innermost frame outside torch) — ``()`` for a call made in ``root``
    itself, ``None`` for one made outside it — and ``phase``, which the caller sets to
    name the calls made outside ``root`` (:data:`OUTSIDE` unless told).
    """

    def __init__(self, root: CodeType | None = None) -> None:
        super().__init__()
        self.root = root or _code_of(HardExampleSelector.__call__)
        self.calls: list[tuple[str, tuple[str, ...] | None, str]] = []
        self.phase = OUTSIDE

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls.append((_op_name(func), self._path(sys._getframe(1)), self.phase))
        return func(*args, **(kwargs or {}))

    def _path(self, frame: FrameType | None) -> tuple[str, ...] | None:
        names: list[str] = []
        while frame is not None and frame.f_code is not self.root:
            # torch's own frames below the call site (Python-level torch functions,
            # handle_torch_function) are not part of the caller's path
            if names or not frame.f_code.co_filename.startswith(_TORCH_DIR):
                names.append(frame.f_code.co_name)
            frame = frame.f_back
        return None if frame is None else tuple(reversed(names))

    def __len__(self) -> int:
        return len(self.calls)

    def stages(self, depth: int = 1) -> tuple[tuple[str, ...], dict[str, list[str]]]:
        """The operations of each stage, in order of first call, and the functions
        through which ``root`` hands the call on (``via``).

        A stage is the function that ``root`` called, found on the stack. Where ``root``
        makes no torch call itself and calls only one function that makes any (a
        delegation such as ``__call__`` -> ``_select``), the stages are that function's
        callees instead, and so on down; the calls a function of ``via`` makes itself
        count under its name (under ``root``'s name where ``via`` is empty). With
        ``depth`` > 1 a stage is split by the functions it called, ``depth`` levels down
        (``stage > callee``).
        """
        paths = [path for _, path, _ in self.calls if path is not None]
        via: tuple[str, ...] = ()
        while True:
            level = len(via)
            children = {path[level] for path in paths if len(path) > level}
            if len(children) != 1 or any(len(path) == level for path in paths):
                break
            via += (children.pop(),)
        own = via[-1] if via else self.root.co_name
        by_stage: dict[str, list[str]] = {}
        for op, path, phase in self.calls:
            if path is None:
                stage = phase
            else:
                below = path[len(via) : len(via) + depth]
                stage = " > ".join(below) if below else own
            by_stage.setdefault(stage, []).append(op)
        return via, by_stage


def _code_of(fn: Callable) -> CodeType:
    while hasattr(fn, "__wrapped__"):
        fn = fn.__wrapped__
    return fn.__code__


def _op_name(func: Callable) -> str:
    owner = getattr(func, "__self__", None)
    name = getattr(func, "__name__", "")
    if name in ("__get__", "__set__") and owner is not None:  # a tensor attribute
        return "." + getattr(owner, "__name__", str(owner)) + ("=" if name == "__set__" else "")
    qualname = getattr(func, "__qualname__", None) or name or repr(func)
    for prefix, shown in (("_VariableFunctionsClass.", "torch."), ("TensorBase.", "Tensor.")):
        if qualname.startswith(prefix):
            return shown + qualname[len(prefix) :]
    return qualname


def is_attribute(op: str) -> bool:
    """Whether a :class:`TorchCalls` operation is a tensor attribute read or write."""
    return op.startswith(".")


def selector_torch_calls(check: str, device: torch.device) -> TorchCalls:
    """Torch calls of one steady-state ``HardExampleSelector(keep=0.25, check=check)``
    call on 256 float32 losses per rank, reading ``result.mask`` included (stage
    :data:`RESULT`), after two warm-up calls: the first is eager by design (on CPU when
    ``device`` is meta: it reads); the second leaves the rows that the next call checks
    under deferred checks. On meta tensors :class:`HostReads` answers any read with
    zeros (it is outside the count: what it does is not counted)."""
    selector = HardExampleSelector(keep=TORCH_CALL_KEEP, check=check)
    warm = warm_device(device)
    warm_losses = torch.rand(TORCH_CALL_KEYS, device=warm)
    losses = warm_losses if warm == device else torch.rand(TORCH_CALL_KEYS, device=device)
    selector(warm_losses)
    selector(losses)
    with contextlib.ExitStack() as stack:
        if device.type == "meta":
            stack.enter_context(HostReads())
        counter = stack.enter_context(TorchCalls())
        result = selector(losses)
        counter.phase = RESULT
        result.mask  # noqa: B018 -- a lazy mask would compute here
    return counter


def torch_call_cases() -> dict[str, TorchCalls]:
    """The three torch-call counts; W = 4 opens (and closes) torch's fake group, so call
    this while no process group is open."""
    cpu = torch.device("cpu")
    counts = {
        "torch_calls_device_256": selector_torch_calls("deferred", cpu),
        "torch_calls_host_256": selector_torch_calls("eager", cpu),
    }
    init_fake_group(TORCH_CALL_WORLD)
    try:
        counts[f"torch_calls_device_256_w{TORCH_CALL_WORLD}"] = selector_torch_calls(
            "deferred", cpu
        )
    finally:
        dist.destroy_process_group()
    return counts


def stage_table(counts: dict[str, TorchCalls], depth: int = 1) -> str:
    """Torch calls per stage (rows) of each case (columns), with totals."""
    split = {case: counter.stages(depth) for case, counter in counts.items()}
    stages: list[str] = []
    for _, by_stage in split.values():
        stages += [stage for stage in by_stage if stage not in stages]
    rows = [
        [stage, *(str(len(by_stage.get(stage, ()))) for _, by_stage in split.values())]
        for stage in stages
    ]
    rows.append(["**total**", *(f"**{len(counter)}**" for counter in counts.values())])
    rows.append(
        [
            "of which tensor attributes (`.shape`, ...)",
            *(str(sum(is_attribute(op) for op, _, _ in c.calls)) for c in counts.values()),
        ]
    )
    vias = {" > ".join(("__call__", *via)) for via, _ in split.values()}
    headers = [f"stage (called by {' / '.join(sorted(vias))})", *counts]
    return markdown_table(headers, rows)


def ops_listing(counts: dict[str, TorchCalls], depth: int = 1) -> str:
    """Each case's operations per stage, most frequent first."""
    lines = []
    for case, counter in counts.items():
        lines.append(f"{case}:")
        for stage, ops in counter.stages(depth)[1].items():
            listed = ", ".join(f"{op} x{n}" for op, n in collections.Counter(ops).most_common())
            lines.append(f"  {stage} ({len(ops)}): {listed}")
    return "\n".join(lines)


def init_fake_group(world_size: int) -> None:
    """Torch's fake process group: collectives of any world size, without communication."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="meta", choices=["meta", "cuda"])
    parser.add_argument("--world-size", type=int, default=1, help="fake group size (meta)")
    parser.add_argument("--ops", action="store_true", help="list each stage's torch calls")
    parser.add_argument(
        "--stage-depth", type=int, default=1, help="split stages by their callees, N levels"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --device meta")
        return
    if args.world_size > 1 and device.type == "cuda":
        parser.error("--world-size > 1 needs --device meta (the fake process group)")
    torch_calls = torch_call_cases()  # before the script's fake group: it opens its own
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
    print()
    print("Torch calls per steady-state call (K=256 per rank, keep=0.25), by stage:")
    print(stage_table(torch_calls, args.stage_depth))
    if args.ops:
        print(ops_listing(torch_calls, args.stage_depth))
    result.update({case: len(counter) for case, counter in torch_calls.items()})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
