"""Run a function on W real gloo ranks, fail (never hang) when a rank errors or stalls.

A pool of W forked worker processes per world size is started once and kept for the
test session (process start and group rendezvous cost seconds; a call costs
milliseconds). Rendezvous goes through a FileStore in a fresh temp dir: no TCP port
is chosen by the tests, so parallel runs cannot collide. If a call errors on some
ranks while others stall (a collective one rank skipped), or runs past its timeout,
the pool is killed and a fresh one is started for the next test.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

DEFAULT_TIMEOUT_S = 60.0
#: After one rank errors, how long the others get to finish before the pool is killed.
ERROR_GRACE_S = 5.0


class RankError(AssertionError):
    """A function failed or timed out on at least one rank."""


def _worker(rank: int, world_size: int, init_file: str, tasks: Any, results: Any) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args, kwargs = task
        try:
            results.put((rank, True, fn(*args, **kwargs)))
        except BaseException:  # noqa: BLE001 - reported to the parent, never swallowed
            results.put((rank, False, traceback.format_exc()))
    dist.barrier()
    dist.destroy_process_group()


class RankPool:
    """W persistent worker processes forming one gloo process group."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        ctx = mp.get_context("fork")
        self._tmpdir = tempfile.TemporaryDirectory(prefix="dist_ohem_pg_")
        init_file = os.path.join(self._tmpdir.name, "rendezvous")
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(world_size)]
        self._procs = [
            ctx.Process(
                target=_worker,
                args=(rank, world_size, init_file, self._tasks[rank], self._results),
                daemon=True,
            )
            for rank in range(world_size)
        ]
        for proc in self._procs:
            proc.start()

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float, **kwargs: Any) -> list[Any]:
        for task_queue in self._tasks:
            task_queue.put((fn, args, kwargs))
        outcomes: dict[int, tuple[bool, Any]] = {}
        deadline = time.monotonic() + timeout
        while len(outcomes) < self.world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                rank, ok, value = self._results.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                dead = [r for r, p in enumerate(self._procs) if not p.is_alive()]
                if dead:
                    raise RankError(
                        f"rank(s) {dead} died (exit codes "
                        f"{[self._procs[r].exitcode for r in dead]})"
                    ) from None
                continue
            outcomes[rank] = (ok, value)
            if not ok:
                deadline = min(deadline, time.monotonic() + ERROR_GRACE_S)
        failures = {rank: value for rank, (ok, value) in outcomes.items() if not ok}
        missing = sorted(set(range(self.world_size)) - set(outcomes))
        if missing or failures:
            report = [f"--- rank {rank} raised:\n{tb}" for rank, tb in sorted(failures.items())]
            if missing:
                report.append(f"--- rank(s) {missing} did not finish within the time limit")
            raise RankError(
                f"{fn.__name__} failed on {self.world_size} ranks:\n" + "\n".join(report)
            )
        return [outcomes[rank][1] for rank in range(self.world_size)]

    @property
    def healthy(self) -> bool:
        return all(proc.is_alive() for proc in self._procs)

    def close(self, graceful: bool = True) -> None:
        if graceful and self.healthy:
            for task_queue in self._tasks:
                task_queue.put(None)
            for proc in self._procs:
                proc.join(timeout=10)
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
        self._tmpdir.cleanup()


class RankPools:
    """One lazily started :class:`RankPool` per world size; a failed pool is replaced."""

    def __init__(self) -> None:
        self._pools: dict[int, RankPool] = {}

    def run(
        self,
        world_size: int,
        fn: Callable[..., Any],
        *args: Any,
        timeout: float = DEFAULT_TIMEOUT_S,
        **kwargs: Any,
    ) -> list[Any]:
        """Run ``fn(*args, **kwargs)`` on every rank; return the W results, rank order.

        Raises RankError with every failing rank's traceback if any rank raises or
        the call does not finish within ``timeout`` seconds.
        """
        pool = self._pools.get(world_size)
        if pool is None or not pool.healthy:
            pool = self._pools[world_size] = RankPool(world_size)
        try:
            return pool.run(fn, *args, timeout=timeout, **kwargs)
        except RankError:
            # Ranks may be stuck in a collective: never reuse this group.
            pool.close(graceful=False)
            del self._pools[world_size]
            raise

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
