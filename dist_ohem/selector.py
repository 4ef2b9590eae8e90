"""HardExampleSelector: a rule + scope + strategy, applied across the data-parallel group.

One call does, on every rank:

1. local checks (shapes, types) and local counts, kept on the device: nothing raises and
   nothing is read back to the host before step 2;
2. one all-gather of a per-rank row (sizes, counts, config fingerprint, error and NaN
   flags): any rank's error is raised identically on all ranks (DESIGN.md §7). The row
   also carries what the k-selection will need when the previous call predicts it
   (the keys for ``gather``, a sample for ``bracket``; buffer sizes from the previous
   call's rows, so all ranks agree on them): then a small batch needs this one
   collective only;
3. the number to select, computed from global counts, identical everywhere;
4. the k-selection itself, by an algorithm of :mod:`dist_ohem.kselect` (gather, radix
   or bracket). All end in the same mask as :func:`dist_ohem.selection.select_mask` on
   the concatenated batch. Skipped when the global counts of step 2 already decide the
   mask: nothing to select, every candidate, or (``loss_thresh``) at least ``min_kept``
   losses above the threshold.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist

from dist_ohem import comm, kselect
from dist_ohem.local_batch import NO_KEY, LocalBatch, empty_batch, prepare
from dist_ohem.selection import SelectionRule, key_to_loss, random_keys, top_m_mask

__all__ = ["HardExampleSelector", "SelectionResult"]

SCOPES = ("global", "local", "random", "all")
STRATEGIES = ("gather", "radix", "bracket", "auto")
NAN_POLICIES = ("raise", "ignore")
#: ``strategy="auto"`` uses bracket once the largest rank holds more than this many
#: instances (valid or not), gather below. From ``bench/selection.py`` (gloo, 2 CPU
#: cores): bracket overtakes gather between 1e5 and 1e6 instances per rank on W = 2 and 4
#: (at 1e5 gather is 2.5x faster, at 1e6 bracket is 2x faster), so 2^18.
AUTO_BRACKET_MIN_KEYS = 1 << 18

# Columns of the per-rank row exchanged on every call.
(
    _NUMEL,
    _VALID,
    _NAN,
    _FORCED,
    _CANDIDATES,
    _ABOVE,
    _MIN_ABOVE_KEY,
    _CONFIG,
    _KEY_BITS,
    _CALLS,
) = range(10)
_HEADER = 10


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
        strategy: how the selection was reached: ``"gather"``, ``"radix"``,
            ``"bracket"`` or ``"none"`` (no exchange of losses: scope ``"local"`` /
            ``"all"``).
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
        # What the next call sends with its row, predicted from this call's rows (the
        # same on every rank): its keys (gather) or its sample (bracket).
        self._payload: _Payload | None = None
        # Per call only the caller's settings are added (see _row).
        self._config_repr = repr((self.rule, scope, strategy, nan, self.seed))
        # (repr of the last caller_config, fingerprint of it with the selector's config).
        self._fingerprint: tuple[str | None, int] = (None, 0)

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
                batch = prepare(losses, valid, positive, self.rule, self.scope, self.nan)
            except (TypeError, ValueError) as exc:
                error = str(exc)
        if batch is None:
            batch = empty_batch(losses)
        payload = self._payload
        rows, gathered = comm.exchange_rank_rows(
            self._row(batch, caller_config),
            error,
            self.group,
            device=batch.losses.device,
            payload=None if payload is None else self._payload_words(batch, payload),
            listed=_HEADER,
        )
        self._check_ranks_agree(rows)
        self._check_nan(rows, batch)
        rank = comm.get_rank(self.group)
        strategy = self._resolve_strategy(rows)
        self._payload = self._next_payload(strategy, rows)

        if self.scope == "all":
            mask = _union(batch.forced, batch.candidate_mask())
            per_rank = [row[_FORCED] + row[_CANDIDATES] for row in rows]
            threshold, strategy = math.nan, "none"
        elif self.scope == "local":
            picked_per_rank = [min(row[_CANDIDATES], self._num_to_select(row)) for row in rows]
            picked = top_m_mask(batch.keys, batch.candidate_mask(), picked_per_rank[rank])
            mask = _union(batch.forced, picked)
            per_rank = _add([row[_FORCED] for row in rows], picked_per_rank)
            kth_key = int(batch.keys[picked].min()) if picked_per_rank[rank] else None
            threshold = _key_to_threshold(kth_key, batch.losses.dtype)
            strategy = "none"
        else:
            usable = self._usable_payload(payload, rows)
            arrived = {}
            if usable is not None:
                arrived[usable.kind] = gathered[:, _HEADER:].view(usable.key_dtype)
            picked, picked_per_rank, kth_key = self._select_global(
                batch, rows, rank, strategy, arrived
            )
            mask = _union(batch.forced, picked)
            per_rank = _add([row[_FORCED] for row in rows], picked_per_rank)
            threshold = math.nan
            if self.scope == "global":
                threshold = _key_to_threshold(kth_key, batch.losses.dtype)

        return SelectionResult(
            mask=mask.reshape(losses.shape),
            num_valid_global=sum(row[_VALID] for row in rows),
            num_selected_global=sum(per_rank),
            num_selected_local=per_rank[rank],
            selected_per_rank=tuple(per_rank),
            threshold=threshold,
            strategy=strategy,
            scope=self.scope,
            num_nan_global=sum(row[_NAN] for row in rows),
            num_instances_global=sum(row[_NUMEL] for row in rows),
        )

    # -- local part -------------------------------------------------------------------

    def _row(self, batch: LocalBatch, caller_config: object) -> list[int | torch.Tensor]:
        """This rank's header row, in column order (device counts stay 0-dim tensors)."""
        caller_repr = repr(caller_config)
        if self._fingerprint[0] != caller_repr:  # hashed once per distinct caller config
            fingerprint = f"{self._config_repr}|{caller_repr}".encode()
            digest = hashlib.blake2b(fingerprint, digest_size=7).digest()
            self._fingerprint = (caller_repr, int.from_bytes(digest))
        columns = {
            _NUMEL: batch.losses.numel(),
            _VALID: batch.num_valid,
            _NAN: batch.num_nan,
            _FORCED: batch.num_forced,
            _CANDIDATES: batch.num_candidates,
            _ABOVE: batch.num_above,
            _MIN_ABOVE_KEY: batch.min_above_key,
            _CONFIG: self._fingerprint[1],
            _KEY_BITS: torch.iinfo(kselect.key_dtype_of(batch.losses)).bits,
            _CALLS: self.num_calls,
        }
        return [columns[column] for column in range(_HEADER)]

    def _payload_words(self, batch: LocalBatch, payload: _Payload) -> torch.Tensor:
        """``payload.words`` int64 words: this rank's keys or sample, zeros when unusable."""
        fits = kselect.key_dtype_of(batch.losses) == payload.key_dtype
        if payload.kind == "keys" and fits and batch.losses.numel() <= payload.capacity:
            keys = kselect.pad_keys(batch.keys, batch.candidate, payload.capacity)
        elif payload.kind == "sample" and fits:
            keys = kselect.draw_sample(batch.losses, batch.candidate, payload.capacity)
        else:  # the rows tell every rank that this payload is unusable
            return batch.losses.new_zeros(payload.words, dtype=torch.int64)
        return keys.view(torch.int64)

    def _check_ranks_agree(self, rows: list[list[int]]) -> None:
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
            differing = [r for r, row in enumerate(rows) if row[column] != rows[0][column]]
            if differing:
                raise comm.DistributedInputError(
                    f"{what} differs between rank 0 and rank(s) {differing}; {fix}"
                )

    def _check_nan(self, rows: list[list[int]], batch: LocalBatch) -> None:
        """Under ``nan="raise"``, every rank raises when any rank flagged a NaN loss."""
        if self.nan != "raise" or not any(row[_NAN] for row in rows):
            return
        error = None
        if rows[comm.get_rank(self.group)][_NAN]:
            nan = torch.isnan(batch.losses)
            num_nan = int((nan if batch.valid is None else nan & batch.valid).sum())
            error = (
                f"{num_nan} NaN loss(es) among {batch.losses.numel()} instances; fix the "
                "loss or pass nan='ignore' to treat NaN instances as invalid"
            )
        comm.raise_together(error, self.group)

    def _num_to_select(self, row: list[int]) -> int:
        """Candidates to select given the counts of one row (or of the summed rows)."""
        return self.rule.num_candidates_to_select(
            row[_VALID], row[_FORCED], row[_CANDIDATES], row[_ABOVE]
        )

    # -- payload ------------------------------------------------------------------------

    def _resolve_strategy(self, rows: list[list[int]]) -> str:
        if self.strategy != "auto":
            return self.strategy
        largest = max(row[_NUMEL] for row in rows)
        return "bracket" if largest > AUTO_BRACKET_MIN_KEYS else "gather"

    def _next_payload(self, strategy: str, rows: list[list[int]]) -> _Payload | None:
        """What the next call sends with its row, assuming it resembles this one."""
        if self.scope != "global":  # random keys depend on offsets known after the row
            return None
        key_dtype = torch.int64 if rows[0][_KEY_BITS] == 64 else torch.int32
        if strategy == "gather":
            return _Payload("keys", _round_up_capacity(max(row[_NUMEL] for row in rows)), key_dtype)
        if strategy == "bracket":
            return _Payload("sample", kselect.SAMPLE_SIZE, key_dtype)
        return None

    def _usable_payload(self, payload: _Payload | None, rows: list[list[int]]) -> _Payload | None:
        """``payload`` if every rank could fill it (identical on all ranks), else None."""
        if payload is None or torch.iinfo(payload.key_dtype).bits != rows[0][_KEY_BITS]:
            return None
        if payload.kind == "keys" and max(row[_NUMEL] for row in rows) > payload.capacity:
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
        num_to_select = self._num_to_select(totals)
        numel_per_rank = [row[_NUMEL] for row in rows]
        if num_to_select == 0:
            return torch.zeros_like(batch.losses, dtype=torch.bool), [0] * len(rows), None
        if num_to_select >= totals[_CANDIDATES]:
            kth_key = self._global_min_key(batch) if self.scope == "global" else None
            return batch.candidate_mask().clone(), [row[_CANDIDATES] for row in rows], kth_key
        if self.scope == "global" and num_to_select == totals[_ABOVE]:
            # Threshold rule with at least min_kept losses above t: the top m are exactly
            # those (none of them ties with a loss <= t), so no k-selection is needed.
            min_key = min(row[_MIN_ABOVE_KEY] for row in rows)
            return batch.above.clone(), [row[_ABOVE] for row in rows], min_key

        if self.scope == "random":
            offset = sum(numel_per_rank[:rank])
            global_index = torch.arange(
                offset, offset + batch.losses.numel(), device=batch.losses.device
            )
            keys = values = random_keys(global_index, self.seed, self.num_calls)
        else:
            keys, values = None, batch.losses
        if strategy == "bracket":
            selection = kselect.bracket_select(
                values,
                batch.candidate,
                num_to_select,
                rank,
                numel_per_rank,
                totals[_CANDIDATES],
                self.group,
                samples=arrived.get("sample"),
            )
        elif strategy == "gather" and "keys" in arrived:
            selection = kselect.select_gathered(
                arrived["keys"], num_to_select, rank, numel_per_rank
            )
        elif strategy == "gather":
            selection = kselect.gather_select(
                batch.keys if keys is None else keys,
                batch.candidate,
                num_to_select,
                rank,
                numel_per_rank,
                self.group,
            )
        else:
            selection = kselect.radix_select(
                batch.keys if keys is None else keys,
                batch.candidate,
                num_to_select,
                rank,
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


def _key_to_threshold(kth_key: int | None, loss_dtype: torch.dtype) -> float:
    return math.nan if kth_key is None else key_to_loss(kth_key, loss_dtype)


def _round_up_capacity(numel: int) -> int:
    """Smallest ``k * 2^j >= numel`` with ``8 <= k < 16`` (at most 1/8 slack), at least 16."""
    if numel <= 16:
        return 16
    step = 1 << (numel.bit_length() - 4)
    return -(-numel // step) * step


def _union(forced: torch.Tensor | None, picked: torch.Tensor) -> torch.Tensor:
    return picked if forced is None else forced | picked


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _add(left: list[int], right: list[int]) -> list[int]:
    return [a + b for a, b in zip(left, right, strict=True)]
