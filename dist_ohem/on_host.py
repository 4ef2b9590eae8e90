"""The selector's host-path selection: from a batch and its rows, read, to a result.

Taken on CPU with eager checks, where reading a count costs nothing: the selector reads
the per-rank rows right after their all-gather, the number to select is computed in
Python, and the k-selection is gather (small batches) or bracket (large ones, with
radix as its fallback) from :mod:`dist_ohem.kselect`, skipped when the global counts
already decide the mask (nothing to select, every candidate, or ``loss_thresh`` with at
least ``min_kept`` losses above it). The row also carries what the k-selection will need
when the previous call predicts it (the keys for gather, a sample for bracket): the
:meth:`HostPath.payload`, so a small batch needs this one collective.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from dist_ohem import bracket, comm, kselect
from dist_ohem.local_batch import LocalBatch
from dist_ohem.result import NO_KEY, SelectionResult, host_counts
from dist_ohem.row import (
    ABOVE,
    EXAMPLES,
    FORCED,
    GROUPED,
    KEY_BITS,
    MIN_ABOVE_KEY,
    NAN,
    NUMEL,
    POSITIVE,
    VALID,
    WIDTH,
)
from dist_ohem.selection import SelectionRule, random_keys, top_m_mask

__all__ = ["AUTO_BRACKET_MIN_KEYS", "HostPath", "count_nan"]

#: ``strategy="auto"`` uses bracket once the largest rank holds more than this many
#: instances (valid or not), gather below. From ``bench/selection.py`` (gloo, 2 CPU
#: cores): bracket overtakes gather between 1e5 and 1e6 instances per rank on W = 2 and 4
#: (at 1e5 gather is 2.5x faster, at 1e6 bracket is 2x faster), so 2^18.
AUTO_BRACKET_MIN_KEYS = 1 << 18


@dataclass(frozen=True)
class _Payload:
    """Keys that travel with the row: ``capacity`` keys of ``key_dtype`` per rank."""

    kind: str  # "keys" (every key, for gather) or "sample" (for bracket)
    capacity: int
    key_dtype: torch.dtype

    @property
    def words(self) -> int:
        """Length in int64 words (capacity is even, so int32 keys fill whole words)."""
        return self.capacity * torch.iinfo(self.key_dtype).bits // 64


class HostPath:
    """The host path of one selector: its configuration and the payload it predicts."""

    def __init__(
        self,
        rule: SelectionRule,
        scope: str,
        strategy: str,
        seed: int,
        group: dist.ProcessGroup | None,
    ) -> None:
        self.rule = rule
        self.scope = scope
        self.strategy = strategy
        self.seed = seed
        self.group = group
        # What the next call sends with its row, predicted from this call's rows (the
        # same on every rank): its keys (gather) or its sample (bracket).
        self._payload: _Payload | None = None
        self._sent: _Payload | None = None

    def payload(self, batch: LocalBatch) -> torch.Tensor | None:
        """The int64 words this call sends with its row (every rank the same length)."""
        self._sent = self._payload
        return None if self._sent is None else self._payload_words(batch, self._sent)

    def select(
        self, batch: LocalBatch, rows: list[list[int]], gathered: torch.Tensor, call: int
    ) -> SelectionResult:
        """Select from this rank's batch and every rank's row, read (``rows``) and as
        gathered (``gathered``: ``(W, WIDTH + payload)``, the payload after the row)."""
        rank = comm.get_rank(self.group)
        strategy = self._resolve_strategy(rows)
        sent, self._payload = self._sent, self._next_payload(strategy, rows)
        kth_key = None
        if batch.grouped is not None:  # selected before the exchange
            self._payload = None
            mask = batch.with_forced(batch.grouped)
            per_rank = [row[GROUPED] + row[FORCED] for row in rows]
            strategy = "grouped"
        elif self.scope == "all":
            mask = batch.with_forced(batch.candidate_mask())
            per_rank = [row[VALID] for row in rows]
            strategy = "none"
        elif self.scope == "local":
            picked_per_rank = [min(_candidates(row), self._num_to_select(row, 1)) for row in rows]
            picked = top_m_mask(batch.keys, batch.candidate_mask(), picked_per_rank[rank])
            mask = batch.with_forced(picked)
            per_rank = _add([row[FORCED] for row in rows], picked_per_rank)
            kth_key = int(batch.keys[picked].min()) if picked_per_rank[rank] else None
            strategy = "none"
        else:
            usable = self._usable_payload(sent, rows)
            arrived = {}
            if usable is not None:
                arrived[usable.kind] = gathered[:, WIDTH:].view(usable.key_dtype)
            picked, picked_per_rank, kth_key = self._select_global(
                batch, rows, rank, strategy, arrived, call
            )
            mask = batch.with_forced(picked)
            per_rank = _add([row[FORCED] for row in rows], picked_per_rank)
            if self.scope != "global":
                kth_key = None

        counts = host_counts(
            sum(row[VALID] for row in rows),
            per_rank[rank],
            sum(row[NAN] for row in rows),
            sum(row[NUMEL] for row in rows),
            sum(row[POSITIVE] for row in rows),
            kth_key,
            per_rank,
        )
        return SelectionResult(
            mask, counts, strategy=strategy, scope=self.scope, loss_dtype=batch.losses.dtype
        )

    def _payload_words(self, batch: LocalBatch, payload: _Payload) -> torch.Tensor:
        """``payload.words`` int64 words: this rank's keys or sample, zeros when unusable."""
        fits = kselect.key_dtype_of(batch.losses) == payload.key_dtype
        if payload.kind == "keys" and fits and batch.losses.numel() <= payload.capacity:
            keys = kselect.pad_keys(batch.keys, batch.candidate, payload.capacity)
        elif payload.kind == "sample" and fits:
            keys = bracket.draw_sample(batch.losses, batch.candidate, payload.capacity)
        else:  # the rows tell every rank that this payload is unusable
            return batch.losses.new_zeros(payload.words, dtype=torch.int64)
        return keys.view(torch.int64)

    def _num_to_select(self, row: list[int], world_size: int) -> int:
        """Candidates to select given the counts of one row (or of the summed rows of
        ``world_size`` ranks)."""
        floor = self.rule.floor(row[VALID], row[EXAMPLES], world_size)
        return self.rule.num_candidates_to_select(
            row[VALID], row[FORCED], _candidates(row), row[ABOVE], floor
        )

    # -- payload ------------------------------------------------------------------------

    def _resolve_strategy(self, rows: list[list[int]]) -> str:
        if self.strategy != "auto":
            return self.strategy
        largest = max(row[NUMEL] for row in rows)
        return "bracket" if largest > AUTO_BRACKET_MIN_KEYS else "gather"

    def _next_payload(self, strategy: str, rows: list[list[int]]) -> _Payload | None:
        """What the next call sends with its row, assuming it resembles this one."""
        if self.scope != "global":  # random keys depend on offsets known after the row
            return None
        key_dtype = torch.int64 if rows[0][KEY_BITS] == 64 else torch.int32
        if strategy == "gather":
            return _Payload("keys", _round_up_capacity(max(row[NUMEL] for row in rows)), key_dtype)
        if strategy == "bracket":
            return _Payload("sample", bracket.SAMPLE_SIZE, key_dtype)
        return None

    def _usable_payload(self, payload: _Payload | None, rows: list[list[int]]) -> _Payload | None:
        """``payload`` if every rank could fill it (identical on all ranks), else None."""
        if payload is None or torch.iinfo(payload.key_dtype).bits != rows[0][KEY_BITS]:
            return None
        if payload.kind == "keys" and max(row[NUMEL] for row in rows) > payload.capacity:
            return None
        return payload

    # -- global part ------------------------------------------------------------------

    def _select_global(
        self,
        batch: LocalBatch,
        rows: list[list[int]],
        rank: int,
        strategy: str,
        arrived: dict[str, torch.Tensor],
        call: int,
    ) -> tuple[torch.Tensor, list[int], int | None]:
        """Global top-m candidates.

        Args:
            arrived: what came with the rows, by payload kind: ``(W, capacity)`` keys
                (``"keys"``) or samples (``"sample"``).

        Returns:
            (local mask of picked candidates, picked count of every rank, key of the
            least hard picked candidate or None if none).
        """
        totals = [sum(column) for column in zip(*rows, strict=True)]
        num_to_select = self._num_to_select(totals, len(rows))
        num_candidates = _candidates(totals)
        numel_per_rank = [row[NUMEL] for row in rows]
        if num_to_select == 0:
            return torch.zeros_like(batch.losses, dtype=torch.bool), [0] * len(rows), None
        if num_to_select >= num_candidates:
            kth_key = self._global_min_key(batch) if self.scope == "global" else None
            return batch.candidate_mask().clone(), [_candidates(row) for row in rows], kth_key
        if self.scope == "global" and num_to_select == totals[ABOVE]:
            # Threshold rule with at least min_kept losses above t: the top m are exactly
            # those (none of them ties with a loss <= t), so no k-selection is needed.
            min_key = min(row[MIN_ABOVE_KEY] for row in rows)
            return batch.above.clone(), [row[ABOVE] for row in rows], min_key

        if self.scope == "random":
            offset = sum(numel_per_rank[:rank])
            global_index = torch.arange(
                offset, offset + batch.losses.numel(), device=batch.losses.device
            )
            keys = values = random_keys(global_index, self.seed, call)
        else:
            keys, values = None, batch.losses
        if strategy == "bracket":
            selection = bracket.bracket_select(
                values,
                batch.candidate,
                num_to_select,
                rank,
                numel_per_rank,
                num_candidates,
                self.group,
                samples=arrived.get("sample"),
            )
        elif "keys" in arrived:
            selection = kselect.select_gathered(
                arrived["keys"], num_to_select, rank, numel_per_rank
            )
        else:
            selection = kselect.gather_select(
                batch.keys if keys is None else keys,
                batch.candidate,
                num_to_select,
                rank,
                numel_per_rank,
                self.group,
            )
        return selection.picked, selection.per_rank, selection.kth_key

    def _global_min_key(self, batch: LocalBatch) -> int:
        """Smallest candidate key over all ranks: one all-gather, when everything is picked."""
        if batch.losses.numel() == 0:
            local = batch.losses.new_full((1,), NO_KEY, dtype=torch.int64)
        else:
            local = batch.keys.to(torch.int64).where(batch.candidate_mask(), NO_KEY).amin()
        rows, _ = comm.exchange_rank_rows([local], None, self.group, device=local.device)
        return min(row[0] for row in rows)


def count_nan(batch: LocalBatch) -> int:
    """NaN losses among this rank's valid instances (read: for an error message)."""
    nan = torch.isnan(batch.losses)
    return int((nan if batch.valid is None else nan & batch.valid).sum())


def _candidates(row: list[int]) -> int:
    """The valid instances of a row (or of summed rows) that are not forced."""
    return row[VALID] - row[FORCED]


def _round_up_capacity(numel: int) -> int:
    """Smallest ``k * 2^j >= numel`` with ``8 <= k < 16`` (at most 1/8 slack), at least 16."""
    if numel <= 16:
        return 16
    step = 1 << (numel.bit_length() - 4)
    return -(-numel // step) * step


def _add(left: list[int], right: list[int]) -> list[int]:
    return [a + b for a, b in zip(left, right, strict=True)]
