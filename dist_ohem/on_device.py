"""The selector's read-free selection (docs/DESIGN.md §13): from a batch and its rows to a result.

Everything data-dependent stays a device tensor: the global counts are sums of the
gathered rows, M is computed from them by the rule on the device, the k-selection is
:func:`dist_ohem.kselect.top_m_sorted`, and the result's counts are derived from them
only when read. With one rank no row is needed: the counts are this rank's own, and M
is looked up in a table of the rule evaluated once per batch size. The collectives
depend only on the world size and on the key dtype agreed by earlier calls, never on
the data, so a call whose input is bad on some rank still runs them all.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from dist_ohem import comm, kselect, row
from dist_ohem.local_batch import LocalBatch
from dist_ohem.result import NO_KEY, SelectionResult, pack_counts
from dist_ohem.selection import (
    SelectionRule,
    hardness_key_of,
    key_dtype_for,
    key_from_descending,
    random_keys,
)

__all__ = ["DevicePath"]

#: Batch sizes up to which M is looked up in a table (8 MB of int64 at the largest).
_TABLE_MAX_NUMEL = 1 << 20


class DevicePath:
    """The read-free selection of one selector: its rule, scope and cached tables."""

    def __init__(
        self, rule: SelectionRule, scope: str, seed: int, group: dist.ProcessGroup | None
    ) -> None:
        self.rule = rule
        self.scope = scope
        self.seed = seed
        self.group = group
        self._cache: dict[tuple, torch.Tensor] = {}

    def select(
        self, batch: LocalBatch, rows: torch.Tensor | None, agreement: int, call: int
    ) -> SelectionResult:
        """Select from this rank's batch and the gathered rows, without a host read.

        Args:
            batch: this rank's prepared batch; NaN losses are not candidates.
            rows: ``(W, row.WIDTH)`` int64 rows of every rank, or None with one rank.
            agreement: this rank's :func:`dist_ohem.row.agreement_hash` column.
            call: the call number (``scope="random"`` draws from it).

        A rank that reported an error counts no instance, and when the ranks disagree on
        the configuration, the key dtype, the call count or the kind of call, nothing is
        selected anywhere: the call completes the same collectives on every rank and the
        error is raised afterwards from the rows.
        """
        counts = _Counts(batch, rows, self.group)
        if batch.grouped is not None:  # selected before the exchange
            mask = batch.with_forced(batch.grouped)
            return self._result(
                mask,
                counts,
                lambda: counts.per_rank(row.GROUPED) + counts.per_rank(row.FORCED),
                None,
                batch,
            )
        if self.scope == "all":
            mask = batch.with_forced(batch.candidate_mask())
            return self._result(mask, counts, lambda: counts.per_rank(row.VALID), None, batch)
        local = self.scope == "local" or rows is None
        m = self._num_to_select(counts, local, batch)
        if rows is not None:
            m = m.where(counts.total(row.AGREE) == agreement * counts.world_size, 0)
        world_size = 1 if local else counts.world_size
        key_dtype = torch.int32 if self.scope == "random" else key_dtype_for(batch.dtype)
        positions = self._positions(batch.numel, batch.device)
        ranked = self._ranked_keys(batch, counts, call, positions)
        hard = kselect.hardness_sort(ranked, batch.candidate, key_dtype, positions, batch.device)
        chosen = kselect.top_m_sorted(hard, m, self.group, world_size, counts.rank)

        def per_rank() -> torch.Tensor:
            if self.scope == "local" and rows is not None:  # every rank's own M
                valid, examples, forced, above = (
                    rows[:, c] for c in (row.VALID, row.EXAMPLES, row.FORCED, row.ABOVE)
                )
                floor = self.rule.floor(valid, examples)
                picked = self.rule.num_candidates_to_select(
                    valid, forced, valid - forced, above, floor
                )
            else:
                picked = chosen.per_rank
            return counts.per_rank(row.FORCED) + picked

        kth = None if self.scope == "random" else (chosen, m)
        return self._result(batch.with_forced(chosen.picked), counts, per_rank, kth, batch)

    def _num_to_select(self, counts: _Counts, local: bool, batch: LocalBatch) -> torch.Tensor:
        """M's candidates, from this rank's counts (``local``) or the global ones."""
        rule = self.rule
        get = counts.own if local else counts.total
        valid, forced, above = get(row.VALID), get(row.FORCED), get(row.ABOVE)
        tabled = local and batch.numel <= _TABLE_MAX_NUMEL
        if not tabled or (rule.needs_positive and rule.min_kept_fraction):
            examples = batch.num_examples if local else counts.total(row.EXAMPLES)
            floor = rule.floor(valid, examples, 1 if local else counts.world_size)
            candidates = valid - forced if rule.needs_positive else valid
            return rule.num_candidates_to_select(valid, forced, candidates, above, floor)
        # torch.take: indexing with a 0-dim tensor would read it as a Python int. (A
        # rejected batch's counts are Python ints.)
        table = self._table(batch.numel, batch.num_examples, batch.device)
        if rule.needs_positive:  # the table is indexed by P; clamp to the negatives
            m = table.take(counts.device_scalar(forced))
            return m.minimum(counts.device_scalar(valid - forced))
        m = table.take(counts.device_scalar(valid))
        return m.maximum(counts.device_scalar(above)) if rule.loss_thresh is not None else m

    def _positions(self, numel: int, device: torch.device) -> torch.Tensor:
        """``arange(numel)`` on ``device``, once per batch size."""
        return self._cached(("positions", numel, device), lambda: torch.arange(numel))

    def _table(self, numel: int, examples: int, device: torch.device) -> torch.Tensor:
        """The rule evaluated at every count from 0 to ``numel``, once per batch size.

        Indexed by the valid count K, or for ``neg_pos_ratio`` by the positives P (then
        clamped to the negatives; its floor must not depend on K); for ``loss_thresh``
        it holds the floor (at most K) under the count above the threshold. The same
        IEEE operations as the rule on scalars, so the same integers.
        """

        def evaluated() -> torch.Tensor:
            count = torch.arange(numel + 1)
            floor = self.rule.floor(count, examples)
            if self.rule.needs_positive:
                return self.rule.num_candidates_to_select(count, count, numel, 0, floor)
            return self.rule.num_candidates_to_select(count, 0, count, 0, floor)

        return self._cached(("table", numel, examples, device), evaluated)

    def _cached(self, key: tuple, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``make()`` on ``key[-1]``, the device, made once per key (a few kept)."""
        if key not in self._cache:
            if len(self._cache) >= 16:
                self._cache.clear()
            self._cache[key] = make().to(key[-1])
        return self._cache[key]

    def _ranked_keys(
        self, batch: LocalBatch, counts: _Counts, call: int, positions: torch.Tensor
    ) -> torch.Tensor:
        """The descending key of every instance (:class:`kselect.HardnessOrder`): of its
        loss, or for ``scope="random"`` of its draw."""
        if self.scope != "random":
            return hardness_key_of(batch.losses, batch.dtype, descending=True)
        return ~random_keys(positions + counts.offset(), self.seed, call)

    def _result(
        self,
        mask: torch.Tensor,
        counts: _Counts,
        per_rank: Callable[[], torch.Tensor],
        kth: tuple[kselect.SortedSelection, torch.Tensor] | None,
        batch: LocalBatch,
    ) -> SelectionResult:
        """The result; its counts are packed when first read (:func:`pack_counts`)."""

        def packed() -> torch.Tensor:
            if kth is None:
                kth_key = counts.device_scalar(NO_KEY)
            else:
                chosen, m = kth
                kth_key = key_from_descending(chosen.kth_ranked).to(torch.int64)
                kth_key = kth_key.where(m > 0, NO_KEY)
            totals = (
                counts.device_scalar(counts.total(c))
                for c in (row.VALID, row.NAN, row.NUMEL, row.POSITIVE)
            )
            return pack_counts(*totals, kth_key, per_rank(), counts.rank)

        strategy = "none" if self.scope in ("all", "local") else "static"
        strategy = "grouped" if batch.grouped is not None else strategy
        return SelectionResult(
            mask, packed, strategy=strategy, scope=self.scope, loss_dtype=batch.dtype
        )


class _Counts:
    """The counts a selection needs: this rank's, every rank's and their totals.

    From the gathered rows, or with one rank (no rows) from the batch itself; 0-dim
    int64 tensors on the device (or Python ints), never read.
    """

    def __init__(self, batch: LocalBatch, rows: torch.Tensor | None, group: object) -> None:
        self.batch, self.rows = batch, rows
        self.rank = 0 if rows is None else comm.get_rank(group)
        self.world_size = 1 if rows is None else comm.get_world_size(group)
        self.device = batch.device
        self._totals: tuple[torch.Tensor, ...] | None = None

    def own(self, column: int) -> int | torch.Tensor:
        if self.rows is not None:
            return self.rows[self.rank, column]
        return self._of_batch(column)

    def total(self, column: int) -> int | torch.Tensor:
        if self.rows is None:
            return self._of_batch(column)
        if self._totals is None:
            self._totals = self.rows.sum(0).unbind()
        return self._totals[column]

    def per_rank(self, column: int) -> torch.Tensor:
        """``(W,)``: the column of every rank."""
        if self.rows is None:
            return self.device_scalar(self._of_batch(column)).view(1)
        return self.rows[:, column]

    def offset(self) -> int | torch.Tensor:
        """Instances on the ranks before this one: where its global indices start."""
        return 0 if self.rows is None else self.rows[: self.rank, row.NUMEL].sum()

    def device_scalar(self, value: int | torch.Tensor) -> torch.Tensor:
        if isinstance(value, torch.Tensor):
            return value
        # Filled on the device: a tensor copied from the host would wait for it.
        return self.batch.losses.new_full((), value, dtype=torch.int64)

    def _of_batch(self, column: int) -> int | torch.Tensor:
        return getattr(self.batch, row.BATCH_FIELDS[column])
