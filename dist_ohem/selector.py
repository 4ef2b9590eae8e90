"""HardExampleSelector: a rule + scope + strategy, applied across the data-parallel group.

A call is a short pipeline, the same on every rank:

1. **prepare**: local checks (shapes, types) and local counts, kept on the device;
2. **exchange**: one all-gather of a per-rank row (sizes, counts, config fingerprint,
   error and NaN flags). Any rank's error is raised identically on all ranks
   (DESIGN.md §7): at once (``check="eager"``), or from a copy read at the next call or
   at :meth:`HardExampleSelector.check` (``check="deferred"``);
3. **decide M** from the global counts, identical everywhere;
4. **select** the global top-M candidates;
5. **result**: a :class:`SelectionResult` whose counts are read back only when asked.

Two paths run these stages. On an accelerator (and with ``check="deferred"``) every
stage stays on the device, with static shapes and no host read (:mod:`dist_ohem.on_device`
and :mod:`dist_ohem.static_select`). On CPU with eager checks the counts are read at step
2 and the k-selection is one of :mod:`dist_ohem.kselect`'s algorithms (gather, radix,
bracket), which read what they need; the row then also carries what the k-selection will
need when the previous call predicts it (the keys for ``gather``, a sample for
``bracket``), so a small batch needs this one collective only, and stages 3-4 are
skipped when the global counts already decide the mask.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dist_ohem import comm, kselect
from dist_ohem.local_batch import (
    CALL,
    CALLS,
    CHECK,
    CONFIG,
    KEY_BITS,
    KIND,
    NAN,
    NUMEL,
    LocalBatch,
    empty_batch,
    prepare,
    row_columns,
)
from dist_ohem.on_device import select_on_device
from dist_ohem.on_host import HostPath
from dist_ohem.result import SelectionResult
from dist_ohem.selection import SelectionRule

__all__ = ["HardExampleSelector", "SelectionResult"]

SCOPES = ("global", "local", "random", "all")
STRATEGIES = ("gather", "radix", "bracket", "auto")
NAN_POLICIES = ("raise", "ignore")
CHECKS = ("auto", "eager", "deferred")


@dataclass
class _Deferred:
    """A call's rows on their way to the host, checked at the next call or ``check()``."""

    rows: comm.LateRead
    error: str | None


class HardExampleSelector:
    """Selects the hardest instances across all ranks of a data-parallel group.

    Args:
        keep: ratio rule, keep ``ceil(keep * K)`` (0 < keep <= 1).
        top_k: count rule, keep ``top_k``.
        loss_thresh: threshold rule, keep every loss > ``loss_thresh``.
        min_kept: lower bound on the number kept, combined with any rule.
        neg_pos_ratio: SSD-style rule: every valid positive plus the hardest
            ``floor(neg_pos_ratio * P)`` negatives (``min_kept`` negatives when P = 0).
        scope: ``"global"`` (default), ``"local"``, ``"random"`` or ``"all"`` (DESIGN §3).
        strategy: ``"gather"``, ``"radix"``, ``"bracket"`` or ``"auto"`` (DESIGN §5, and
            :mod:`dist_ohem.kselect`); identical masks.
        group: process group (None = default group; no group = single process).
        nan: ``"raise"`` (every rank raises) or ``"ignore"`` (NaN instances are invalid).
        seed: seed of ``scope="random"``; draws depend on (seed, call number, global index).
        check: when a bad input on some rank raises (on every rank, the same
            :class:`comm.DistributedInputError`). ``"eager"``: in the same call, at the
            cost of one host read per call. ``"deferred"``: the call never waits for the
            device; it completes on every rank with the bad instances counted as
            invalid (the bad rank's, the NaN ones; nothing is selected when the ranks'
            configurations differ), and the error is raised at the next call or at
            :meth:`check`. ``"auto"`` (default): eager on CPU, deferred on an
            accelerator. The first call is always eager: it agrees the configuration
            and the loss dtype.

    Exactly one of keep / top_k / loss_thresh / neg_pos_ratio, except with
    ``scope="all"`` where the rule may be omitted. Invalid arguments raise ValueError here;
    a configuration that differs between ranks raises on every rank at the first call.

    Call ``selector(losses, valid=None, positive=None)`` with per-instance losses of any
    shape on every rank of the group (same number of calls on every rank).
    """

    def __init__(
        self,
        keep: float | None = None,
        top_k: int | None = None,
        loss_thresh: float | None = None,
        min_kept: int = 0,
        neg_pos_ratio: float | None = None,
        scope: str = "global",
        strategy: str = "gather",
        group: dist.ProcessGroup | None = None,
        nan: str = "raise",
        seed: int = 0,
        check: str = "auto",
    ) -> None:
        _check_choice("scope", scope, SCOPES)
        _check_choice("check", check, CHECKS)
        _check_choice("strategy", strategy, STRATEGIES)
        _check_choice("nan", nan, NAN_POLICIES)
        no_rule = keep is None and top_k is None and loss_thresh is None and neg_pos_ratio is None
        if scope == "all" and no_rule:
            keep = 1.0
        self.rule = SelectionRule(
            keep=keep,
            top_k=top_k,
            loss_thresh=loss_thresh,
            neg_pos_ratio=neg_pos_ratio,
            min_kept=min_kept,
        )
        self.scope = scope
        self.strategy = strategy
        self.group = group
        self.nan = nan
        self.seed = int(seed)
        self.checking = check
        self.num_calls = 0
        # Set by the first call: whether the read-free path runs (an accelerator, or
        # check="deferred"), on which device; and once its eager check has passed, the
        # agreed key dtype (the first call after a restore from a checkpoint agrees anew).
        self._on_device: bool | None = None
        self._device = torch.device("cpu")
        self._key_dtype = torch.int32
        self._agreed = False
        self._deferred: _Deferred | None = None
        # The config part of the fingerprint; per call only the caller's settings are added.
        self._config_repr = repr((self.rule, scope, strategy, nan, self.seed, check))
        self._host = HostPath(self.rule, scope, strategy, self.seed, group)
        # (repr of the last caller_config, fingerprint of it with the selector's config).
        self._fingerprint: tuple[str | None, int] = (None, 0)

    def __repr__(self) -> str:
        rule = {k: v for k, v in vars(self.rule).items() if v is not None and v != 0}
        args = ", ".join(f"{k}={v!r}" for k, v in rule.items())
        return (
            f"HardExampleSelector({args}, scope={self.scope!r}, strategy={self.strategy!r}, "
            f"nan={self.nan!r}, seed={self.seed}, check={self.checking!r})"
        )

    def __call__(
        self,
        losses: torch.Tensor,
        valid: torch.Tensor | None = None,
        positive: torch.Tensor | None = None,
        *,
        caller_config: object = None,
    ) -> SelectionResult:
        """Select across the group.

        Args:
            losses: per-instance losses, any shape; detached internally.
            valid: optional bool mask, same shape; False = ignored instance.
            positive: bool mask, same shape; required by ``neg_pos_ratio``.
            caller_config: settings of the calling code that must agree across ranks
                (``ohem_step`` passes ``balance`` and ``score_mode``, ``OHEMLoss`` its
                reduction); compared with the selector's own config, by its ``repr``.

        Returns:
            :class:`SelectionResult`; its ``mask`` has the shape of ``losses``.

        Raises:
            comm.DistributedInputError (a ValueError) on every rank when any rank's
            input is bad or the ranks' selectors differ.
        """
        return self._select(losses, valid, positive, None, caller_config)

    def fail(
        self, message: str, like: torch.Tensor | None = None, *, caller_config: object = None
    ) -> SelectionResult:
        """Join this step's selection with an error, so every rank raises it.

        Call this instead of the selector on a rank that cannot produce losses (its
        criterion raised, say) while the other ranks call the selector. With eager
        checks every rank raises the same :class:`comm.DistributedInputError` in this
        call. With deferred checks this rank selects nothing and gets a result back, so
        that it can finish the step in step with the others (a zero loss through the
        model); every rank raises at the next call or :meth:`check`. ``like`` gives the
        loss dtype and device (default: the first call's device, float32).
        """
        return self._select(like, None, None, message, caller_config)

    def check(self) -> None:
        """Raise, on every rank, any error that deferred checking still holds.

        A point every rank passes through: call it on every rank, e.g. after the last
        step (a no-op with eager checks). It also catches a rank that made one call
        fewer than the others, which the rows of the calls cannot show.
        """
        self._raise_deferred()
        if self._on_device and not self._eager():
            self._select(None, None, None, None, None, kind=CHECK)

    def _eager(self) -> bool:
        if self.checking == "auto":
            return self._device.type == "cpu"
        return self.checking == "eager"

    def _select(
        self,
        losses: torch.Tensor | None,
        valid: torch.Tensor | None,
        positive: torch.Tensor | None,
        error: str | None,
        caller_config: object,
        kind: int = CALL,
    ) -> SelectionResult:
        self._raise_deferred()
        if kind == CALL:
            self.num_calls += 1
        if self._on_device is None:
            self._device = getattr(losses, "device", self._device)
            self._on_device = self._device.type != "cpu" or self.checking == "deferred"
        batch, error = self._prepare(losses, valid, positive, error, kind)
        if self._on_device:
            result = self._select_on_device(batch, error, caller_config, kind)
        else:
            result = self._select_on_host(batch, error, caller_config)
        if isinstance(losses, torch.Tensor):
            shape = losses.shape
            result.mask = result.mask.reshape(shape) if error is None else _nothing_like(losses)
        return result

    def _prepare(
        self,
        losses: torch.Tensor | None,
        valid: torch.Tensor | None,
        positive: torch.Tensor | None,
        error: str | None,
        kind: int,
    ) -> tuple[LocalBatch, str | None]:
        """This rank's batch and its error (then an empty batch): stage 1."""
        if error is None and kind == CALL:
            # The read-free path treats NaN as invalid and reports it through the rows.
            nan_policy = "ignore" if self._on_device else self.nan
            try:
                batch = prepare(losses, valid, positive, self.rule, self.scope, nan_policy)
                if self._on_device and self._agreed:
                    self._check_key_dtype(batch)
                return batch, error
            except (TypeError, ValueError) as exc:
                error = str(exc)
        like = losses
        if self._on_device:  # the agreed key dtype and device, whatever this rank got
            loss_dtype = torch.float64 if self._key_dtype == torch.int64 else torch.float32
            like = torch.empty(0, dtype=loss_dtype, device=self._device)
        return empty_batch(like), error

    def _check_key_dtype(self, batch: LocalBatch) -> None:
        key_dtype = kselect.key_dtype_of(batch.losses)
        if key_dtype != self._key_dtype:
            raise ValueError(
                f"losses of dtype {batch.losses.dtype} give {key_dtype} keys, but the first "
                f"call agreed on {self._key_dtype} keys; use one loss dtype on all ranks "
                "and calls (float64, or anything narrower)"
            )

    def _fingerprint_of(self, caller_config: object) -> int:
        """Hash of the selector's and the caller's configuration (cached per caller)."""
        caller_repr = repr(caller_config)
        if self._fingerprint[0] != caller_repr:  # hashed once per distinct caller config
            fingerprint = f"{self._config_repr}|{caller_repr}".encode()
            digest = hashlib.blake2b(fingerprint, digest_size=7).digest()
            self._fingerprint = (caller_repr, int.from_bytes(digest))
        return self._fingerprint[1]

    def _select_on_host(
        self, batch: LocalBatch, error: str | None, caller_config: object
    ) -> SelectionResult:
        """Stages 2-5 with the counts read at the exchange (:mod:`dist_ohem.on_host`)."""
        columns = row_columns(
            batch,
            self._fingerprint_of(caller_config),
            torch.iinfo(kselect.key_dtype_of(batch.losses)).bits,
            self.num_calls,
        )
        return self._host.select(batch, error, columns, self.num_calls, self._check_header)

    # -- the read-free path -------------------------------------------------------------

    def _select_on_device(
        self, batch: LocalBatch, error: str | None, caller_config: object, kind: int
    ) -> SelectionResult:
        """Stages 2-5 on the device: no host read unless the checks are eager."""
        first_call = kind == CALL and not self._agreed
        if first_call:
            self._key_dtype = kselect.key_dtype_of(batch.losses)
        columns = row_columns(
            batch,
            self._fingerprint_of(caller_config),
            torch.iinfo(self._key_dtype).bits,
            self.num_calls,
            kind,
        )
        rows = comm.gather_rows(columns, error, self.group, device=batch.losses.device)
        if first_call:  # agree on the key dtype before collectives that depend on it
            self._check_rows(rows.tolist(), error)
            self._agreed = True
        result = select_on_device(
            batch,
            rows,
            rule=self.rule,
            scope=self.scope,
            seed=self.seed,
            call=self.num_calls,
            group=self.group,
            rank=comm.get_rank(self.group),
        )
        # Checked after the selection's collectives, which every rank runs, so that a
        # rank still in a call and one in check() part in step.
        if kind == CHECK or (self._eager() and not first_call):
            self._check_rows(rows.tolist(), error)
        elif not first_call:
            self._deferred = _Deferred(comm.LateRead(rows), error)
        return result

    def _raise_deferred(self) -> None:
        """Check the previous call's rows (deferred mode); every rank raises alike."""
        deferred, self._deferred = self._deferred, None
        if deferred is not None:
            self._check_rows(deferred.rows.tolist(), deferred.error)

    def _check_rows(self, rows: list[list[int]], error: str | None) -> None:
        """Raise on every rank (all read the same rows) if any rank's row says so."""
        header = comm.raise_flagged(rows, error, self.group)
        own = header[comm.get_rank(self.group)]
        self._check_header(header, lambda: own[NAN])

    def _check_header(self, rows: list[list[int]], count_own_nan: Callable[[], int]) -> None:
        self._check_ranks_agree(rows)
        self._check_nan(rows, count_own_nan)

    # -- the checks of both paths -------------------------------------------------------

    def _check_ranks_agree(self, rows: list[list[int]]) -> None:
        """Raise (identically on every rank: all see the same rows) if the ranks disagree."""
        for column, what, fix in (
            (
                KIND,
                "kind of call (a selector call vs. check())",
                "a rank made one selector call fewer than the others: call the selector "
                "once per step on every rank",
            ),
            (
                CONFIG,
                "selector configuration",
                "build the selector (and ohem_step's balance and score_mode, or OHEMLoss's "
                "reduction and ignore_index) from the same config on every rank",
            ),
            (KEY_BITS, "loss dtype (float64 vs. narrower)", "use one loss dtype on all ranks"),
            (CALLS, "number of selector calls", "call the selector once per step on every rank"),
        ):
            differing = [r for r, row in enumerate(rows) if row[column] != rows[0][column]]
            if differing:
                raise comm.DistributedInputError(
                    f"{what} differs between rank 0 and rank(s) {differing}; {fix}"
                )

    def _check_nan(self, rows: list[list[int]], count_own: Callable[[], int]) -> None:
        """Under ``nan="raise"``, every rank raises when any rank flagged a NaN loss."""
        if self.nan != "raise" or not any(row[NAN] for row in rows):
            return
        own = rows[comm.get_rank(self.group)]
        error = None
        if own[NAN]:
            error = (
                f"{count_own()} NaN loss(es) among {own[NUMEL]} instances; fix the "
                "loss or pass nan='ignore' to treat NaN instances as invalid"
            )
        comm.raise_together(error, self.group)


def _nothing_like(losses: torch.Tensor) -> torch.Tensor:
    """The mask of a rank whose input was rejected: nothing selected."""
    return torch.zeros(losses.shape, dtype=torch.bool, device=losses.device)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
