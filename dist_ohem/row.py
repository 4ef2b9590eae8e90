"""The row every selector call exchanges: its columns, the fingerprint, the checks.

A row is one int64 vector per rank (docs/DESIGN.md §5, §7). Its first part holds host
numbers: the error flag, the instance and example counts, then what the ranks must agree
on: the configuration fingerprint, the key width, the call count, the kind of call and
:func:`agreement_hash` of the four before it. The rest holds this rank's counts, device
values on an accelerator: valid, NaN, forced, valid positives, above the threshold, the
least key above it, and the candidates a grouped selection picked (it runs before the
exchange: groups never span ranks). One all-gather (:func:`gather`) gives every rank
every row; every rank then reads the same rows, so :func:`check` raises the same error on
all of them, at once (eager checks) or from a :class:`Pending` read at the next call
(deferred checks).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from dist_ohem import comm, numpy_host

if TYPE_CHECKING:
    from dist_ohem.local_batch import LocalBatch

__all__ = [
    "CALL",
    "CHECK",
    "Fingerprint",
    "Pending",
    "agreement_hash",
    "check",
    "columns",
    "gather",
    "read",
]

# Columns of a row, FLAG first (comm's error flag).
(
    FLAG,
    NUMEL,
    EXAMPLES,
    CONFIG,
    KEY_BITS,
    CALLS,
    KIND,
    AGREE,
    VALID,
    NAN,
    FORCED,
    POSITIVE,
    ABOVE,
    MIN_ABOVE_KEY,
    GROUPED,
) = range(15)
WIDTH = 15
#: What a row was sent by: a selector call, or ``HardExampleSelector.check``.
CALL, CHECK = 0, 1
#: The columns compared across ranks, with what differs and how to fix it.
_AGREED = (
    (
        KIND,
        "kind of call (a selector call vs. check())",
        "a rank made one selector call fewer than the others: call the selector once per "
        "step on every rank",
    ),
    (
        CONFIG,
        "selector configuration",
        "build the selector (and ohem_step's balance and score_mode, or OHEMLoss's "
        "reduction and ignore_index) from the same config on every rank",
    ),
    (KEY_BITS, "loss dtype (float64 vs. narrower)", "use one loss dtype on all ranks"),
    (CALLS, "number of selector calls", "call the selector once per step on every rank"),
)
_HASH_BITS = 48  # summed over the ranks without overflow for W < 2^15
#: The columns that are this rank's batch numbers: the ``LocalBatch`` attribute of each.
BATCH_FIELDS = {
    NUMEL: "numel",
    EXAMPLES: "num_examples",
    VALID: "num_valid",
    NAN: "num_nan",
    FORCED: "num_forced",
    POSITIVE: "num_positive",
    ABOVE: "num_above",
    MIN_ABOVE_KEY: "min_above_key",
    GROUPED: "num_grouped",
}


class Fingerprint:
    """A 56-bit hash of a selector's configuration and its caller's settings.

    The caller's settings (``ohem_step``'s, ``OHEMLoss``'s) are compared by their
    ``repr``; the hash is computed once per distinct caller setting.
    """

    def __init__(self, config_repr: str) -> None:
        self._config_repr = config_repr
        self._last: tuple[str | None, int] = (None, 0)

    def __call__(self, caller_config: object) -> int:
        caller_repr = repr(caller_config)
        if self._last[0] != caller_repr:
            text = f"{self._config_repr}|{caller_repr}".encode()
            self._last = (
                caller_repr,
                int.from_bytes(hashlib.blake2b(text, digest_size=7).digest()),
            )
        return self._last[1]


def agreement_hash(config: int, key_bits: int, calls: int, kind: int) -> int:
    """A 48-bit mix of the columns the ranks must agree on (SplitMix64's finalizer).

    The device path compares the sum of this column over the ranks with W times its
    own: one comparison instead of four, equal (but for a 2^-48 chance) only when every
    rank's columns are equal. The columns themselves are what the checks read.
    """
    x = (config ^ (key_bits << 56) ^ (calls * 0x9E3779B97F4A7C15) ^ (kind << 62)) & (2**64 - 1)
    for shift, multiplier in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
        x = ((x ^ (x >> shift)) * multiplier) & (2**64 - 1)
    return (x ^ (x >> 31)) >> (64 - _HASH_BITS)


def columns(
    batch: LocalBatch, config: int, key_dtype: torch.dtype, calls: int, kind: int
) -> list[int | torch.Tensor]:
    """This rank's row after the flag, in column order (device counts stay tensors)."""
    key_bits = torch.iinfo(key_dtype).bits
    agreed = {CONFIG: config, KEY_BITS: key_bits, CALLS: calls, KIND: kind}
    agreed[AGREE] = agreement_hash(config, key_bits, calls, kind)
    return [agreed[c] if c in agreed else getattr(batch, BATCH_FIELDS[c]) for c in range(1, WIDTH)]


def gather(
    columns: Sequence[int | torch.Tensor],
    error: str | None,
    group: dist.ProcessGroup | None,
    device: torch.device,
    payload: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(W, WIDTH + len(payload))`` int64: every rank's row, nothing read.

    ``columns``: this rank's row after the flag, in column order (Python ints, or 0-dim
    tensors on ``device``); ``payload``: int64 words the host path sends with the row.
    """
    return comm.gather_rows(columns, error, group, device=device, payload=payload)


def read(rows: torch.Tensor | comm.LateRead) -> list[list[int]]:
    """The rows' columns (not the payload) as Python ints: one copy to the host."""
    if isinstance(rows, comm.LateRead):
        return [row[:WIDTH] for row in rows.tolist()]
    # On CPU through numpy, whose tolist is several times faster.
    return (rows.numpy() if numpy_host.on_numpy(rows) else rows)[:, :WIDTH].tolist()


def check(
    rows: list[list[int]],
    error: str | None,
    nan: str,
    count_own_nan: Callable[[], int] | None,
    group: dist.ProcessGroup | None,
) -> None:
    """Raise on every rank (all read the same rows) if any row says so.

    In order: a rank's error flag (every rank raises every message), a column the ranks
    disagree on, a NaN loss under ``nan="raise"`` (the NaN rank counts its own with
    ``count_own_nan`` for the message; None: the NaN column is a count already).
    """
    comm.raise_flagged(rows, error, group)
    for column, what, fix in _AGREED:
        differing = [r for r, row in enumerate(rows) if row[column] != rows[0][column]]
        if differing:
            raise comm.DistributedInputError(
                f"{what} differs between rank 0 and rank(s) {differing}; {fix}"
            )
    if nan != "raise" or not any(row[NAN] for row in rows):
        return
    own = rows[comm.get_rank(group)]
    own_error = None
    if own[NAN]:
        count = own[NAN] if count_own_nan is None else count_own_nan()
        own_error = (
            f"{count} NaN loss(es) among {own[NUMEL]} instances; fix the loss or "
            "pass nan='ignore' to treat NaN instances as invalid"
        )
    comm.raise_together(own_error, group)


class Pending:
    """A call's rows on their way to the host, checked at the next call or ``check()``.

    Args:
        rows: the gathered rows, or None with one rank (no rows were gathered).
        columns: this rank's columns (after the flag), the row's source with one rank:
            its only device value that a check reads is the NaN count.
        error: this rank's own message.
        device: where the rows or counts are.

    The copy to the host starts here without blocking (:class:`comm.LateRead`) and is
    typically done a whole step later, when :meth:`read` waits for it.
    """

    def __init__(
        self,
        rows: torch.Tensor | None,
        columns: Sequence[int | torch.Tensor],
        error: str | None,
        device: torch.device,
    ) -> None:
        self.error = error
        self._rows = None if rows is None else comm.LateRead(rows, device)
        nan = columns[NAN - 1]
        self._nan = comm.LateRead(nan, device) if isinstance(nan, torch.Tensor) else nan
        self._own = [int(error is not None)]
        self._own += [0 if isinstance(c, torch.Tensor) else c for c in columns]

    def read(self) -> list[list[int]]:
        """Every rank's row, as :func:`read` gives them."""
        if self._rows is not None:
            return read(self._rows)
        self._own[NAN] = self._nan if isinstance(self._nan, int) else self._nan.tolist()
        return [self._own]
