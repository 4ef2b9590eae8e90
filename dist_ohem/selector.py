"""HardExampleSelector: a rule + scope + strategy, applied across the data-parallel group.

One call does, on every rank:

1. local checks (shapes, NaN, ...) and local counts, *never* raising before step 2;
2. one small all-gather of a per-rank row (sizes, counts, config fingerprint, error
   flag): any rank's error is raised identically on all ranks (DESIGN.md §7);
3. the number to select, computed from global counts, identical everywhere;
4. the k-selection itself, by an algorithm of :mod:`dist_ohem.kselect`: ``"gather"``
   (all-gather the keys) or ``"radix"`` (all-reduce histograms of the keys, then one tiny
   all-gather of tie counts). Both end in the same mask as :func:`dist_ohem.selection.select_mask` on the concatenated batch.
   Skipped when the global counts of step 2 already decide the mask: nothing to select,
   every candidate, or (``loss_thresh``) at least ``min_kept`` losses above the threshold.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist

from dist_ohem import comm, kselect
from dist_ohem.selection import (
    SelectionRule,
    hardness_key,
    key_dtype_for,
    key_to_loss,
    random_keys,
    top_m_mask,
)

__all__ = ["HardExampleSelector", "SelectionResult"]

SCOPES = ("global", "local", "random", "all")
STRATEGIES = ("gather", "radix", "auto")
NAN_POLICIES = ("raise", "ignore")
#: ``strategy="auto"`` uses radix once the largest rank holds more than this many
#: instances (valid or not). From ``bench/selection.py`` (gloo, 2 CPU cores): radix
#: overtakes gather between 1e4 and 1e5 instances per rank for W = 1, 2 and 4 (radix
#: pays 3 more collective latencies, gather moves and sorts W x n keys), so 2^16.
AUTO_RADIX_MIN_KEYS = 1 << 16

# Columns of the per-rank row exchanged on every call.
(
    _NUMEL,
    _VALID,
    _NAN,
    _FORCED,
    _CANDIDATES,
    _ABOVE,
    _MIN_KEY,
    _MIN_ABOVE_KEY,
    _CONFIG,
    _KEY_BITS,
    _CALLS,
) = range(11)
_NO_KEY = 2**63 - 1  # the min of no keys


@dataclass
class SelectionResult:
    """Outcome of one selection (DESIGN.md §8).

    Attributes:
        mask: bool, same shape as the local ``losses``; True = selected, owned here.
        num_valid_global: K, valid instances over all ranks.
        num_selected_global: M, selected instances over all ranks (the mean's divisor).
        num_selected_local: selected instances on this rank (``mask.sum()``).
        selected_per_rank: selected count of every rank, identical on all ranks.
        threshold: loss of the least hard selected candidate (the M-th in hardness
            order; for ``neg_pos_ratio`` the least hard selected negative). For
            ``scope="local"`` this rank's own; NaN when nothing was chosen by hardness
            (no candidate selected, or scope ``"random"`` / ``"all"``).
        strategy: how the selection was reached: ``"gather"``, ``"radix"`` or
            ``"none"`` (no exchange of losses: scope ``"local"`` / ``"all"``).
        scope: the selector's scope.
        num_nan_global: NaN losses over all ranks (invalid under ``nan="ignore"``).
        num_instances_global: all instances over all ranks, valid or not.
    """

    mask: torch.Tensor
    num_valid_global: int
    num_selected_global: int
    num_selected_local: int
    selected_per_rank: tuple[int, ...]
    threshold: float
    strategy: str
    scope: str
    num_nan_global: int = 0
    num_instances_global: int = 0


@dataclass
class _LocalBatch:
    """This rank's flattened inputs and their counts, before any communication."""

    losses: torch.Tensor
    forced: torch.Tensor
    candidate: torch.Tensor
    keys: torch.Tensor
    above: torch.Tensor
    num_valid: int = 0
    num_nan: int = 0


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
        strategy: ``"gather"``, ``"radix"`` or ``"auto"`` (DESIGN §5); identical masks.
        group: process group (None = default group; no group = single process).
        nan: ``"raise"`` (every rank raises) or ``"ignore"`` (NaN instances are invalid).
        seed: seed of ``scope="random"``; draws depend on (seed, call number, global index).

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
    ) -> None:
        _check_choice("scope", scope, SCOPES)
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
        self.num_calls = 0
        # Per call only the caller's settings are added (see _row).
        self._config_repr = repr((self.rule, scope, strategy, nan, self.seed))

    def __repr__(self) -> str:
        rule = {k: v for k, v in vars(self.rule).items() if v is not None and v != 0}
        args = ", ".join(f"{k}={v!r}" for k, v in rule.items())
        return (
            f"HardExampleSelector({args}, scope={self.scope!r}, strategy={self.strategy!r}, "
            f"nan={self.nan!r}, seed={self.seed})"
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
    ) -> NoReturn:
        """Join this step's selection collective with an error, so every rank raises it.

        Call this instead of the selector on a rank that cannot produce losses (its
        criterion raised, say) while the other ranks call the selector: all ranks then
        raise the same :class:`comm.DistributedInputError` instead of hanging.
        ``like`` gives the loss dtype and device (default float32 on CPU).
        """
        self._select(like, None, None, message, caller_config)
        raise AssertionError("unreachable: _select raises when a rank reports an error")

    def _select(
        self,
        losses: torch.Tensor | None,
        valid: torch.Tensor | None,
        positive: torch.Tensor | None,
        error: str | None,
        caller_config: object,
    ) -> SelectionResult:
        self.num_calls += 1
        batch = None
        if error is None:
            try:
                batch = self._prepare(losses, valid, positive)
            except (TypeError, ValueError) as exc:
                error = str(exc)
        if batch is None:
            batch = _empty_batch(losses)
        rows = comm.exchange_rank_rows(self._row(batch, caller_config), error, self.group)
        self._check_ranks_agree(rows)

        rank = comm.get_rank(self.group)
        if self.scope == "all":
            mask = batch.forced | batch.candidate
            per_rank = (rows[:, _FORCED] + rows[:, _CANDIDATES]).tolist()
            threshold, strategy = math.nan, "none"
        elif self.scope == "local":
            picked_per_rank = [min(int(row[_CANDIDATES]), self._num_to_select(row)) for row in rows]
            picked = top_m_mask(batch.keys, batch.candidate, picked_per_rank[rank])
            mask = batch.forced | picked
            per_rank = _add(rows[:, _FORCED].tolist(), picked_per_rank)
            kth_key = int(batch.keys[picked].min()) if picked.any() else None
            threshold = _key_to_threshold(kth_key, batch.losses.dtype)
            strategy = "none"
        else:
            picked, picked_per_rank, kth_key, strategy = self._select_global(batch, rows, rank)
            mask = batch.forced | picked
            per_rank = _add(rows[:, _FORCED].tolist(), picked_per_rank)
            threshold = math.nan
            if self.scope == "global":
                threshold = _key_to_threshold(kth_key, batch.losses.dtype)

        return SelectionResult(
            mask=mask.reshape(losses.shape),
            num_valid_global=int(rows[:, _VALID].sum()),
            num_selected_global=int(sum(per_rank)),
            num_selected_local=int(per_rank[rank]),
            selected_per_rank=tuple(int(n) for n in per_rank),
            threshold=threshold,
            strategy=strategy,
            scope=self.scope,
            num_nan_global=int(rows[:, _NAN].sum()),
            num_instances_global=int(rows[:, _NUMEL].sum()),
        )

    # -- local part -------------------------------------------------------------------

    def _prepare(
        self,
        losses: torch.Tensor,
        valid: torch.Tensor | None,
        positive: torch.Tensor | None,
    ) -> _LocalBatch:
        if not isinstance(losses, torch.Tensor) or not losses.is_floating_point():
            raise TypeError(
                "losses must be a floating-point tensor of per-instance losses, got "
                f"{getattr(losses, 'dtype', type(losses).__name__)}"
            )
        for name, extra in (("valid", valid), ("positive", positive)):
            if extra is not None and tuple(extra.shape) != tuple(losses.shape):
                raise ValueError(
                    f"`{name}` has shape {tuple(extra.shape)} but losses have shape "
                    f"{tuple(losses.shape)}; pass one mask entry per loss"
                )
        if self.rule.needs_positive and positive is None and self.scope != "all":
            raise ValueError(
                "neg_pos_ratio needs `positive=`, a bool mask marking the positive instances"
            )
        flat = losses.detach().reshape(-1)
        nan = torch.isnan(flat)
        valid_flat = torch.ones_like(nan) if valid is None else valid.reshape(-1).to(torch.bool)
        num_nan = _count(nan & valid_flat)
        if num_nan and self.nan == "raise":
            raise ValueError(
                f"{num_nan} NaN loss(es) among {flat.numel()} instances; fix the loss or "
                "pass nan='ignore' to treat NaN instances as invalid"
            )
        valid_flat = valid_flat & ~nan
        positive_flat = None if positive is None else positive.reshape(-1).to(torch.bool)
        if self.scope == "all":
            forced, candidate = torch.zeros_like(valid_flat), valid_flat
        else:
            forced, candidate = self.rule.split(valid_flat, positive_flat)
        return _LocalBatch(
            losses=flat,
            forced=forced,
            candidate=candidate,
            keys=hardness_key(flat),
            above=self.rule.above_threshold(flat, candidate),
            num_valid=_count(valid_flat),
            num_nan=num_nan,
        )

    def _row(self, batch: _LocalBatch, caller_config: object) -> torch.Tensor:
        row = [0] * 11
        row[_NUMEL] = batch.losses.numel()
        row[_VALID] = batch.num_valid
        row[_NAN] = batch.num_nan
        row[_FORCED] = _count(batch.forced)
        row[_CANDIDATES] = _count(batch.candidate)
        row[_ABOVE] = _count(batch.above)
        row[_MIN_KEY] = _min_key(batch.keys, batch.candidate, row[_CANDIDATES])
        row[_MIN_ABOVE_KEY] = _min_key(batch.keys, batch.above, row[_ABOVE])
        fingerprint = f"{self._config_repr}|{caller_config!r}".encode()
        row[_CONFIG] = int.from_bytes(hashlib.blake2b(fingerprint, digest_size=7).digest())
        row[_KEY_BITS] = torch.iinfo(batch.keys.dtype).bits
        row[_CALLS] = self.num_calls
        return torch.tensor(row, dtype=torch.int64, device=batch.losses.device)

    def _check_ranks_agree(self, rows: torch.Tensor) -> None:
        """Raise (identically on every rank: all see the same rows) if the ranks disagree."""
        for column, what, fix in (
            (
                _CONFIG,
                "selector configuration",
                "build the selector (and ohem_step's balance and score_mode, or OHEMLoss's "
                "reduction and ignore_index) from the same config on every rank",
            ),
            (_KEY_BITS, "loss dtype (float64 vs. narrower)", "use one loss dtype on all ranks"),
            (_CALLS, "number of selector calls", "call the selector once per step on every rank"),
        ):
            differing = (rows[:, column] != rows[0, column]).nonzero().squeeze(1).tolist()
            if differing:
                raise comm.DistributedInputError(
                    f"{what} differs between rank 0 and rank(s) {differing}; {fix}"
                )

    def _num_to_select(self, row: torch.Tensor) -> int:
        """Candidates to select given the counts of one row (or of the summed rows)."""
        return self.rule.num_candidates_to_select(
            int(row[_VALID]), int(row[_FORCED]), int(row[_CANDIDATES]), int(row[_ABOVE])
        )

    # -- global part ------------------------------------------------------------------

    def _select_global(
        self, batch: _LocalBatch, rows: torch.Tensor, rank: int
    ) -> tuple[torch.Tensor, list[int], int | None, str]:
        """Global top-m candidates.

        Returns:
            (local mask of picked candidates, picked count of every rank, key of the
            least hard picked candidate or None if none, strategy used).
        """
        totals = rows.sum(0)
        num_to_select = self._num_to_select(totals)
        numel_per_rank = rows[:, _NUMEL].tolist()
        strategy = self.strategy
        if strategy == "auto":
            strategy = "radix" if max(numel_per_rank) > AUTO_RADIX_MIN_KEYS else "gather"
        if num_to_select == 0:
            return torch.zeros_like(batch.candidate), [0] * len(rows), None, strategy
        if num_to_select >= int(totals[_CANDIDATES]):
            min_key = int(rows[:, _MIN_KEY].min())
            return batch.candidate.clone(), rows[:, _CANDIDATES].tolist(), min_key, strategy
        if self.scope == "global" and num_to_select == int(totals[_ABOVE]):
            # Threshold rule with at least min_kept losses above t: the top m are exactly
            # those (none of them ties with a loss <= t), so no k-selection is needed.
            min_key = int(rows[:, _MIN_ABOVE_KEY].min())
            return batch.above.clone(), rows[:, _ABOVE].tolist(), min_key, strategy

        keys = batch.keys
        if self.scope == "random":
            offset = sum(numel_per_rank[:rank])
            global_index = torch.arange(offset, offset + keys.numel(), device=keys.device)
            keys = random_keys(global_index, self.seed, self.num_calls)
        if strategy == "gather":
            picked, per_rank, kth_key = kselect.gather_select(
                keys, batch.candidate, num_to_select, rank, numel_per_rank, self.group
            )
        else:
            picked, per_rank, kth_key = kselect.radix_select(
                keys, batch.candidate, num_to_select, rank, self.group
            )
        return picked, per_rank, kth_key, strategy


def _key_to_threshold(kth_key: int | None, loss_dtype: torch.dtype) -> float:
    return math.nan if kth_key is None else key_to_loss(kth_key, loss_dtype)


def _empty_batch(losses: object) -> _LocalBatch:
    dtype = getattr(losses, "dtype", torch.float32)
    device = getattr(losses, "device", torch.device("cpu"))
    loss_dtype = (
        dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32
    )
    empty = torch.zeros(0, dtype=torch.bool, device=device)
    return _LocalBatch(
        losses=torch.zeros(0, dtype=loss_dtype, device=device),
        forced=empty,
        candidate=empty,
        keys=torch.zeros(0, dtype=key_dtype_for(loss_dtype), device=device),
        above=empty,
    )


def _min_key(keys: torch.Tensor, mask: torch.Tensor, count: int) -> int:
    """Smallest key where ``mask`` (with ``count`` True entries) is True; ``_NO_KEY`` if none."""
    if count == 0:
        return _NO_KEY
    if count == mask.numel():
        return int(keys.min())
    return int(torch.where(mask, keys, torch.iinfo(keys.dtype).max).min())


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _add(left: list[int], right: list[int]) -> list[int]:
    return [a + b for a, b in zip(left, right, strict=True)]


def _count(mask: torch.Tensor) -> int:
    """Number of True entries of a bool tensor, as a Python int."""
    return int(torch.count_nonzero(mask))
