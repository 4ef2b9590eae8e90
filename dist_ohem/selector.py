"""HardExampleSelector: a rule + scope, applied across the data-parallel group.

A call is a short pipeline, the same on every rank:

1. **prepare**: local checks (shapes, types) and local counts, kept on the device
   (:func:`dist_ohem.local_batch.prepare`);
2. **exchange**: one all-gather of a per-rank row (:mod:`dist_ohem.row`: sizes, counts,
   config fingerprint, error and NaN flags). Any rank's error is raised identically on
   all ranks (DESIGN.md §7): at once (``check="eager"``), or from a copy read at the
   next call or at :meth:`HardExampleSelector.check` (``check="deferred"``);
3. **select** the global top M, on the host or on the device;
4. **result**: a :class:`SelectionResult` whose counts are read back only when asked.

The selection runs on one of two paths. On an accelerator (and with
``check="deferred"``) it stays on the device, with static shapes and no host read
(:class:`dist_ohem.on_device.DevicePath`); with one rank it needs no row at all. On CPU
with eager checks the rows are read at step 2 and the k-selection is gather or bracket
(:class:`dist_ohem.on_host.HostPath`), which read what they need.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dist_ohem import comm, row
from dist_ohem.grouped import Quota, select_groups
from dist_ohem.local_batch import LocalBatch, empty_batch, prepare
from dist_ohem.on_device import DevicePath
from dist_ohem.on_host import HostPath, count_nan
from dist_ohem.result import SelectionResult
from dist_ohem.selection import SelectionRule, key_dtype_for

__all__ = ["HardExampleSelector", "SelectionResult"]

SCOPES = ("global", "local", "random", "all")
STRATEGIES = ("auto", "gather", "bracket")
NAN_POLICIES = ("raise", "ignore")
CHECKS = ("auto", "eager", "deferred")


class HardExampleSelector:
    """Selects the hardest instances across all ranks of a data-parallel group.

    Args:
        keep: ratio rule, keep ``ceil(keep * K)`` (0 < keep <= 1).
        top_k: count rule, keep ``top_k``.
        loss_thresh: threshold rule, keep every loss > ``loss_thresh``.
        min_kept: lower bound on the number kept, combined with any rule; counted over
            the whole distributed batch, or per ``min_kept_per``.
        min_kept_per: what ``min_kept`` counts per: ``"batch"`` (default), ``"rank"``
            (the floor is ``min_kept * W``, for code that counted it per GPU) or
            ``"example"`` (``min_kept`` times the examples, dim 0 of the losses, of all
            ranks: mmseg's per-image ``min_kept``).
        min_kept_fraction: a floor relative to the valid count: at least
            ``floor(min_kept_fraction * K)`` (BiSeNet's ``n_valid // 16`` is ``1/16``).
        per_group: apply the rule within each group of instances, given by the
            ``groups=`` ids of every call (an image's anchors or RoIs, say); groups
            never span ranks, the floor counts per group (:mod:`dist_ohem.grouped`).
        pos_fraction: a positive quota per group (mmdetection's ``OHEMSampler``): of
            the budget B that ``keep`` or ``top_k`` gives (``top_k`` is not clamped to
            the group's size), at most ``floor(pos_fraction * B)`` of the hardest
            positives, then the hardest negatives up to B. Needs ``per_group`` and
            ``positive=``.
        neg_pos_ub: with a quota, at most ``floor(neg_pos_ub * max(1, positives
            kept))`` negatives when ``neg_pos_ub >= 0``.
        neg_pos_ratio: SSD-style rule: every valid positive plus the hardest
            ``floor(neg_pos_ratio * P)`` negatives (``min_kept`` negatives when P = 0).
        scope: ``"global"`` (default), ``"local"``, ``"random"`` or ``"all"`` (DESIGN §3).
        strategy: the k-selection of the host path (CPU with eager checks; DESIGN §5):
            ``"gather"`` (default; all-gathers the keys, best up to ~1e5 instances per
            rank), ``"bracket"`` (a sampled bracket, bytes independent of the batch; for
            dense mining) or ``"auto"`` (gather or bracket by the largest rank's size).
            Identical masks. On the device path (accelerators, ``check="deferred"``)
            there is one algorithm and this setting has no effect.
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
        min_kept_per: str = "batch",
        min_kept_fraction: float = 0.0,
        per_group: bool = False,
        pos_fraction: float | None = None,
        neg_pos_ub: float = -1.0,
    ) -> None:
        for name, value, choices in (
            ("scope", scope, SCOPES),
            ("check", check, CHECKS),
            ("strategy", strategy, STRATEGIES),
            ("nan", nan, NAN_POLICIES),
        ):
            _check_choice(name, value, choices)
        if scope == "all" and all(r is None for r in (keep, top_k, loss_thresh, neg_pos_ratio)):
            keep = 1.0
        self.rule = SelectionRule(
            keep, top_k, loss_thresh, neg_pos_ratio, min_kept, min_kept_per, min_kept_fraction
        )
        self.quota = None if pos_fraction is None else Quota(pos_fraction, neg_pos_ub)
        _check_grouping(per_group, self.quota, self.rule, scope)
        self.per_group = per_group
        self.scope = scope
        self.strategy = strategy
        self.group = group
        self.nan = nan
        self.seed = int(seed)
        self.checking = check
        self.num_calls = 0
        # Set by the first call: the path (the device path on an accelerator or with
        # check="deferred") and its device; on the device path, once the eager first
        # call has agreed it, the key dtype (a restore from a checkpoint agrees anew).
        self._on_device: bool | None = None
        self._device = torch.device("cpu")
        self._key_dtype: torch.dtype | None = None
        self._pending: row.Pending | None = None
        self._fingerprint = row.Fingerprint("")
        self._host = HostPath(self.rule, scope, strategy, self.seed, group)
        self._device_path = DevicePath(self.rule, scope, self.seed, group)

    def __repr__(self) -> str:
        rule = {k: v for k, v in vars(self.rule).items() if v is not None and v != 0}
        args = ", ".join(f"{k}={v!r}" for k, v in rule.items())
        return (
            f"HardExampleSelector({args}, scope={self.scope!r}, strategy={self.strategy!r}, "
            f"nan={self.nan!r}, seed={self.seed}, check={self.checking!r})"
        )

    # -- entry points -------------------------------------------------------------------

    def __call__(
        self,
        losses: torch.Tensor,
        valid: torch.Tensor | None = None,
        positive: torch.Tensor | None = None,
        *,
        groups: torch.Tensor | None = None,
        caller_config: object = None,
    ) -> SelectionResult:
        """Select across the group.

        Args:
            losses: per-instance losses, any shape; detached internally.
            valid: optional bool mask, same shape; False = ignored instance.
            positive: bool mask, same shape; required by ``neg_pos_ratio`` and a quota.
            groups: integer ids, same shape, with ``per_group=True``: the rule applies
                within each set of instances with the same id on this rank.
            caller_config: settings of the calling code that must agree across ranks
                (``ohem_step`` passes its step configuration, ``OHEMLoss`` its
                reduction); compared with the selector's own config, by its ``repr``.

        Returns:
            :class:`SelectionResult`; its ``mask`` has the shape of ``losses``.

        Raises:
            comm.DistributedInputError (a ValueError) on every rank when any rank's
            input is bad or the ranks' selectors differ.
        """
        self._begin_call(losses)
        batch, error = self._prepare(losses, valid, positive, groups)
        result = self._select(batch, error, caller_config, row.CALL)
        if error is not None:
            result.mask = _nothing(losses)
        elif len(batch.shape) != 1:
            result.mask = result.mask.reshape(batch.shape)
        return result

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
        self._begin_call(like)
        result = self._select(self._empty_batch(like), message, caller_config, row.CALL)
        if like is not None:
            result.mask = _nothing(like)
        return result

    def check(self) -> None:
        """Raise, on every rank, any error that deferred checking still holds.

        A point every rank passes through: call it on every rank, e.g. after the last
        step (a no-op with eager checks). It also catches a rank that made one call
        fewer than the others, which the rows of the calls cannot show.
        """
        self._raise_pending()
        if self._on_device and not self._eager():
            self._select(self._empty_batch(None), None, None, row.CHECK)

    # -- stages -------------------------------------------------------------------------

    def _begin_call(self, losses: object) -> None:
        """Raise what the previous call left pending; fix the path at the first call."""
        self._raise_pending()
        self.num_calls += 1
        if self._on_device is None:
            self._device = getattr(losses, "device", self._device)
            self._on_device = self._device.type != "cpu" or self.checking == "deferred"
            # The device path's algorithm is the same whatever the strategy: not in its
            # fingerprint, so ranks that differ only there agree.
            settings = (self.rule, self.scope, self.nan, self.seed, self.checking)
            strategy = None if self._on_device else self.strategy
            settings += (self.per_group, self.quota, strategy)
            self._fingerprint = row.Fingerprint(repr(settings))

    def _prepare(
        self,
        losses: torch.Tensor,
        valid: torch.Tensor | None,
        positive: torch.Tensor | None,
        groups: torch.Tensor | None,
    ) -> tuple[LocalBatch, str | None]:
        """This rank's batch, or an empty one and the reason it was rejected; a grouped
        selection is made here, before the exchange (groups never span ranks)."""
        # The device path treats NaN as invalid and reports it through the rows.
        nan_policy = "ignore" if self._on_device else self.nan
        try:
            if (groups is not None) != self.per_group:
                raise ValueError(_GROUPS_MISMATCH[self.per_group])
            if self.quota is not None and positive is None:
                raise ValueError("pos_fraction needs `positive=`, a bool mask of the positives")
            batch = prepare(losses, valid, positive, self.rule, self.scope, nan_policy, groups)
            if self._on_device and self._key_dtype is not None:
                _check_key_dtype(batch, self._key_dtype)
        except (TypeError, ValueError) as exc:
            return self._empty_batch(losses), str(exc)
        if self.per_group:
            select_groups(batch, self.rule, self.quota)
        return batch, None

    def _select(
        self, batch: LocalBatch, error: str | None, caller_config: object, kind: int
    ) -> SelectionResult:
        """Exchange, then the host or the device selection."""
        if self._on_device:
            return self._select_on_device(batch, error, caller_config, kind)
        config = self._fingerprint(caller_config)
        columns = row.columns(batch, config, key_dtype_for(batch.dtype), self.num_calls, kind)
        rows = row.gather(columns, error, self.group, batch.device, self._host.payload(batch))
        listed = row.read(rows)
        row.check(listed, error, self.nan, lambda: count_nan(batch), self.group)
        return self._host.select(batch, listed, rows, self.num_calls)

    def _select_on_device(
        self, batch: LocalBatch, error: str | None, caller_config: object, kind: int
    ) -> SelectionResult:
        """The device selection; the rows are read only by an eager check."""
        first_call = self._key_dtype is None
        key_dtype = key_dtype_for(batch.dtype) if first_call else self._key_dtype
        eager = first_call or kind == row.CHECK or self._eager()
        config = self._fingerprint(caller_config)
        columns = row.columns(batch, config, key_dtype, self.num_calls, kind)
        rows = None
        if eager or comm.is_distributed(self.group):
            rows = row.gather(columns, error, self.group, batch.device)
        if first_call:  # agree on the key dtype before collectives that depend on it
            row.check(row.read(rows), error, self.nan, None, self.group)
            self._key_dtype = key_dtype
        result = self._device_path.select(batch, rows, columns[row.AGREE - 1], self.num_calls)
        # Checked after the selection's collectives, which every rank runs, so that a
        # rank still in a call and one in check() part in step.
        if eager and not first_call:
            row.check(row.read(rows), error, self.nan, None, self.group)
        elif not eager:
            self._pending = row.Pending(rows, columns, error, self._device)
        return result

    # -- rows ---------------------------------------------------------------------------

    def _raise_pending(self) -> None:
        """Check the previous call's rows (deferred mode); every rank raises alike."""
        pending, self._pending = self._pending, None
        if pending is not None:
            row.check(pending.read(), pending.error, self.nan, None, self.group)

    def _empty_batch(self, like: object) -> LocalBatch:
        """A batch of no instances; on the device path of the agreed dtype and device.
        Grouped like the others' (their collectives depend on it)."""
        if self._on_device and self._key_dtype is not None:
            loss_dtype = torch.float64 if self._key_dtype == torch.int64 else torch.float32
            like = torch.empty(0, dtype=loss_dtype, device=self._device)
        return empty_batch(like, self.per_group)

    def _eager(self) -> bool:
        """Whether this call checks at once: ``check="auto"`` is eager on CPU only."""
        return self._device.type == "cpu" if self.checking == "auto" else self.checking == "eager"


def _check_key_dtype(batch: LocalBatch, agreed: torch.dtype) -> None:
    key_dtype = key_dtype_for(batch.dtype)
    if key_dtype != agreed:
        raise ValueError(
            f"losses of dtype {batch.dtype} give {key_dtype} keys, but the first call "
            f"agreed on {agreed} keys; use one loss dtype on all ranks and calls (float64, "
            "or anything narrower)"
        )


_GROUPS_MISMATCH = {
    True: "this selector has per_group=True: pass groups=, one group id per loss",
    False: "groups= was given, but this selector selects over all instances: build it "
    "with per_group=True",
}


def _check_grouping(per_group: bool, quota: Quota | None, rule: SelectionRule, scope: str) -> None:
    if per_group and scope not in ("global", "local"):
        raise ValueError(f"per_group=True selects by hardness within groups, not scope={scope!r}")
    if quota is not None and not per_group:
        raise ValueError("pos_fraction applies per group: pass per_group=True (and groups=)")
    if quota is not None and rule.keep is None and rule.top_k is None:
        raise ValueError("pos_fraction splits the budget of keep= or top_k=; give one of them")


def _nothing(losses: torch.Tensor) -> torch.Tensor:
    """The mask of a rank whose input was rejected: nothing selected."""
    return torch.zeros(losses.shape, dtype=torch.bool, device=losses.device)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if name == "strategy" and value == "radix":
        raise ValueError(
            "strategy='radix' was removed: it was never the fastest; use 'bracket' for "
            "dense mining (it falls back to radix by itself) or 'auto'"
        )
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
