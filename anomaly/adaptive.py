"""A threshold that adapts to each entity's own recent scores. Pure logic: no I/O, no clock.

The fitted threshold (``anomaly.thresholds``) is calibrated on a few hundred validation windows and
never moves. After a fault the asset often stays changed (a valve refitted, a pump re-seated), and a
model of the old normal then scores every later window high: one long false alarm. The adaptive rule
raises the bar with the entity's own recent level:

    window i alarms  ⇔  score_i > max(base, factor × quantile(scores of the ``span`` windows that end
                                                               ``lag`` windows before i))

with no adaptive part until ``lag + span`` earlier scores exist. An anomaly's first minutes cross it
(the trailing span still holds normal scores; ``lag`` keeps a fault's onset out of its own bar); a
level the entity has kept for longer than the span no longer does.

``AdaptiveRule`` is configured in readings (``rows``, ``lag``, as ``[threshold]`` sets them) and turned
into windows for the scoring stride by ``in_windows``: at stride 1 a window per reading. Two
implementations of one definition, tested against each other:

- ``adaptive_bars(scores, base, rule, stride)``: one entity's scores in time order, offline (the
  datasets' protocols, the MLflow pyfunc model, training plots);
- ``TrailingBars``: the streaming worker's state, every entity's last ``lag + span`` scores in one ring
  array, fed batch by batch.

NaN scores are never flagged (+inf is: above any bar); non-finite scores never enter the trailing history.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

# Spans whose quantiles ``adaptive_bars`` computes at once (4,096 × 480 float64 ≈ 16 MB).
_BLOCK = 4096

# Keys under which a rule is stored in ``Threshold.params`` (floats, so threshold.json stays flat).
PARAM_KEYS = ("adaptive_rows", "adaptive_factor", "adaptive_quantile", "adaptive_lag")


@dataclass(frozen=True)
class AdaptiveRule:
    """``rows`` readings whose scores set the bar (0: off), ending ``lag`` readings before the scored
    one; the bar is ``factor`` × their ``quantile``."""

    rows: int = 0
    factor: float = 4.0
    quantile: float = 0.5
    lag: int = 30

    def __post_init__(self) -> None:
        if int(self.rows) != self.rows or self.rows < 0:
            raise ValueError(f"adaptive rows must be a whole number >= 0, got {self.rows!r}")
        if int(self.lag) != self.lag or self.lag < 0:
            raise ValueError(f"adaptive lag must be a whole number >= 0, got {self.lag!r}")
        if not (math.isfinite(self.factor) and self.factor > 0):
            raise ValueError(f"adaptive factor must be > 0, got {self.factor!r}")
        if not 0 < self.quantile < 1:
            raise ValueError(f"adaptive quantile must be in (0, 1), got {self.quantile!r}")
        object.__setattr__(self, "rows", int(self.rows))
        object.__setattr__(self, "lag", int(self.lag))
        object.__setattr__(self, "factor", float(self.factor))
        object.__setattr__(self, "quantile", float(self.quantile))

    @property
    def enabled(self) -> bool:
        return self.rows > 0

    def in_windows(self, stride: int = 1) -> tuple[int, int]:
        """(span, lag) in scored windows at ``stride`` readings between windows: the windows whose last
        reading lies ``lag + 1`` … ``lag + rows`` readings before the scored window's (on an unbroken
        grid). Stride 1 gives (rows, lag)."""
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        nearest = -(-(self.lag + 1) // stride)  # ceil: the first window at least lag + 1 readings back
        farthest = (self.lag + self.rows) // stride
        return max(1, farthest - nearest + 1), nearest - 1

    def describe(self) -> str:
        """One line for people (tags, listings): ``480 rows, x4 q0.5, lag 30``, or ``off``."""
        if not self.enabled:
            return "off"
        return f"{self.rows} rows, x{self.factor:g} q{self.quantile:g}, lag {self.lag}"

    def to_params(self) -> dict[str, float]:
        """The rule as ``Threshold.params`` entries (empty when off: a plain threshold stays plain)."""
        if not self.enabled:
            return {}
        return dict(zip(PARAM_KEYS, (float(self.rows), self.factor, self.quantile, float(self.lag))))

    @classmethod
    def from_params(cls, params: Mapping[str, float]) -> "AdaptiveRule | None":
        """The rule stored in ``Threshold.params``, or None (no rule, or ``rows`` 0)."""
        if not params.get("adaptive_rows"):
            return None
        return cls(rows=int(params["adaptive_rows"]), factor=float(params.get("adaptive_factor", cls.factor)),
                   quantile=float(params.get("adaptive_quantile", cls.quantile)),
                   lag=int(params.get("adaptive_lag", cls.lag)))


def adaptive_bars(scores: np.ndarray, base: float, rule: AdaptiveRule | None, stride: int = 1) -> np.ndarray:
    """The bar in force at each of one entity's windows (time order): ``base``, raised to ``factor`` ×
    the trailing quantile once ``lag + span`` earlier finite scores exist. Causal."""
    x = np.asarray(scores, dtype=np.float64).ravel()
    bars = np.full(x.shape, float(base))
    if rule is None or not rule.enabled:
        return bars
    span, lag = rule.in_windows(stride)
    finite = np.flatnonzero(np.isfinite(x))
    history = x[finite]  # only finite scores enter the trailing history
    # The i-th finite score (0-based) is preceded by i finite scores; its span is history[i-lag-span : i-lag].
    ready = np.arange(len(history)) >= lag + span
    if ready.any():
        spans = sliding_window_view(history, span)[: len(history) - lag - span]  # span k starts at k
        # for finite score i = k + lag + span; in blocks, so a long series never needs its spans copied at once
        level = np.concatenate([np.quantile(spans[a:a + _BLOCK], rule.quantile, axis=1)
                                for a in range(0, len(spans), _BLOCK)])
        bars[finite[ready]] = np.maximum(base, rule.factor * level)
    return bars


def adaptive_flags(scores: np.ndarray, base: float, rule: AdaptiveRule | None, stride: int = 1) -> np.ndarray:
    """Boolean flags of one entity's windows: score above its bar (NaN: never)."""
    x = np.asarray(scores, dtype=np.float64).ravel()
    return x > adaptive_bars(x, base, rule, stride)


class TrailingBars:
    """The streaming form of ``adaptive_bars`` for many entities: each entity's last ``lag + span``
    finite scores in a row of one ring array, so recording a batch is a few vectorised numpy calls
    however many entities it touches; bars are computed only for the windows that ask for one
    (``need``; the worker asks for those above the base threshold, whose flag depends on it)."""

    def __init__(self, rule: AdaptiveRule, stride: int = 1, capacity: int = 64) -> None:
        if not rule.enabled:
            raise ValueError("TrailingBars needs an enabled rule (rows > 0)")
        self.rule = rule
        self.span, self.lag = rule.in_windows(stride)
        self.length = self.span + self.lag
        self._rows: dict[str, int] = {}
        self._ring = np.zeros((max(1, capacity), self.length))
        self._count = np.zeros(max(1, capacity), dtype=np.int64)  # finite scores recorded, ever
        self._newest = np.full(max(1, capacity), -np.inf)  # newest window end (stream time) per entity
        self._stream = np.full(max(1, capacity), -1, dtype=np.int64)  # the stream (partition) it came on; -1: none

    @property
    def entities(self) -> int:
        return len(self._rows)

    def forget(self) -> None:
        """Drop every entity's history (a new model's scores are on another scale)."""
        self._rows.clear()
        self._count[:] = 0
        self._newest[:] = -np.inf
        self._stream[:] = -1

    def prune(self, older_than: float | Mapping[int, float]) -> int:
        """Drop the history of entities whose newest window (``bars``' ``end_ts``) ended before
        ``older_than``, so a fleet whose entities come and go does not grow this without bound.
        ``older_than`` per stream (``bars``' ``streams``: a partition measured by its own clock, so a
        lagging one's entities are not taken for silent); an entity of a stream not in it is kept.
        Returns how many were dropped."""
        names = list(self._rows)
        rows = np.fromiter(self._rows.values(), dtype=np.int64, count=len(names))
        keep = self._newest[rows] >= _cutoffs(older_than, self._stream[rows])
        dropped = int(np.count_nonzero(~keep))
        if dropped:
            kept = rows[keep]
            self._rows = {name: i for i, name in enumerate(n for n, k in zip(names, keep.tolist()) if k)}
            self._ring[: len(kept)] = self._ring[kept]
            self._count[: len(kept)] = self._count[kept]
            self._newest[: len(kept)] = self._newest[kept]
            self._stream[: len(kept)] = self._stream[kept]
            self._count[len(kept):] = 0
            self._newest[len(kept):] = -np.inf
            self._stream[len(kept):] = -1
        return dropped

    def history(self, entity: str) -> np.ndarray:
        """The entity's recorded scores still held, oldest first (a copy)."""
        row = self._rows.get(entity)
        return np.empty(0) if row is None else self._held(row).copy()

    def bars(self, entities: Sequence[str], scores: np.ndarray, base: float | np.ndarray,
             need: np.ndarray | None = None, end_ts: np.ndarray | None = None,
             streams: np.ndarray | None = None) -> np.ndarray:
        """The bar of every window of a batch (``entities[i]``'s windows in time order), then record
        the batch's finite scores. ``base``: the fitted value, one for all or each window's own (its
        entity's, ``Threshold.values_for``). Windows outside ``need`` (default: all) get ``base``
        without a look at the history: the caller knows their flag does not depend on it. ``end_ts``:
        each window's stream time, and ``streams`` the stream (partition) it came on, remembered per
        entity for ``prune``."""
        scores = np.asarray(scores, dtype=np.float64)
        n = len(scores)
        bars = np.broadcast_to(np.asarray(base, dtype=np.float64), (n,)).copy()
        if n == 0:
            return bars
        rows = self._row_ids(entities)
        finite = np.isfinite(scores)
        # Rank of each finite window among its entity's finite windows of this batch.
        key = np.where(finite, rows, -1)
        order = np.argsort(key, kind="stable")
        sorted_key = key[order]
        rank_sorted = np.arange(n) - np.searchsorted(sorted_key, sorted_key, side="left")
        rank = np.empty(n, dtype=np.int64)
        rank[order] = rank_sorted
        wanted = finite if need is None else (finite & np.asarray(need, bool))
        if wanted.any():
            self._fill_bars(rows, finite, rank, wanted, scores, bars)
        self._record(rows[finite], rank[finite], scores[finite])
        if end_ts is not None:
            np.maximum.at(self._newest, rows, np.asarray(end_ts, dtype=np.float64))
        if streams is not None:
            self._stream[rows] = np.asarray(streams, dtype=np.int64)
        return bars

    # --- internals ----------------------------------------------------------------------------
    def _row_ids(self, entities: Sequence[str]) -> np.ndarray:
        table = self._rows
        missing = [e for e in dict.fromkeys(entities) if e not in table]
        if missing:
            for entity in missing:
                table[entity] = len(table)
            if len(table) > len(self._count):
                grow = max(len(table), 2 * len(self._count))
                ring = np.zeros((grow, self.length))
                ring[: len(self._ring)] = self._ring
                count = np.zeros(grow, dtype=np.int64)
                count[: len(self._count)] = self._count
                newest = np.full(grow, -np.inf)
                newest[: len(self._newest)] = self._newest
                stream = np.full(grow, -1, dtype=np.int64)
                stream[: len(self._stream)] = self._stream
                self._ring, self._count, self._newest, self._stream = ring, count, newest, stream
        return np.fromiter((table[e] for e in entities), dtype=np.int64, count=len(entities))

    def _fill_bars(self, rows: np.ndarray, finite: np.ndarray, rank: np.ndarray, wanted: np.ndarray,
                   scores: np.ndarray, bars: np.ndarray) -> None:
        """Bars of every ``wanted`` window at once (``bars`` holds each window's base and is raised), without a loop over entities (a plant-wide incident
        asks for thousands): each asked entity's held scores, left-padded to ``length`` columns, then its
        finite windows of this batch, laid end to end in one array; every span is a slice of it."""
        length = self.length
        asked = np.unique(rows[wanted])
        slot = np.minimum(np.searchsorted(asked, rows), len(asked) - 1)
        member = finite & (asked[slot] == rows)  # finite windows of asked entities
        sizes = length + np.bincount(slot[member], minlength=len(asked))
        offset = np.concatenate([[0], np.cumsum(sizes)[:-1]])  # where each asked entity's part begins
        count = self._count[asked]  # finite scores recorded before this batch
        # Column c of an entity's part holds its score with sequence number count - length + c: its held
        # scores end at column length - 1 (columns before them are padding, never read), this batch's
        # finite windows follow in rank order.
        cols = np.arange(length)
        history = np.empty(int(sizes.sum()))
        history[offset[:, None] + cols] = self._ring[asked[:, None], (count[:, None] - length + cols) % length]
        history[offset[slot[member]] + length + rank[member]] = scores[member]
        targets = np.flatnonzero(wanted)
        ready = count[slot[targets]] + rank[targets] >= self.lag + self.span
        targets = targets[ready]
        first = offset[slot[targets]] + length + rank[targets] - self.lag - self.span  # each span's first column
        span = np.arange(self.span)
        for a in range(0, len(targets), _BLOCK):
            level = np.quantile(history[first[a:a + _BLOCK, None] + span], self.rule.quantile, axis=1)
            block = targets[a:a + _BLOCK]
            bars[block] = np.maximum(bars[block], self.rule.factor * level)

    def _held(self, row: int) -> np.ndarray:
        """Row ``row``'s scores still held, oldest first (a view of the ring until it has wrapped)."""
        count = int(self._count[row])
        if count <= self.length:
            return self._ring[row, :count]
        cut = count % self.length
        return np.concatenate([self._ring[row, cut:], self._ring[row, :cut]])

    def _record(self, rows: np.ndarray, rank: np.ndarray, scores: np.ndarray) -> None:
        if not len(rows):
            return
        per_row = np.bincount(rows, minlength=len(self._count))
        # Only each entity's last ``length`` scores of the batch can survive; write those.
        keep = rank >= per_row[rows] - self.length
        rows, rank, scores = rows[keep], rank[keep], scores[keep]
        self._ring[rows, (self._count[rows] + rank) % self.length] = scores
        self._count += per_row


def _cutoffs(older_than: float | Mapping[int, float], streams: np.ndarray) -> np.ndarray | float:
    """``prune``'s cutoff for entities of ``streams``: one for all, or each stream's own (-inf, kept,
    for a stream without one)."""
    if not isinstance(older_than, Mapping):
        return float(older_than)
    return np.fromiter((older_than.get(int(s), -np.inf) for s in streams.tolist()), dtype=np.float64,
                       count=len(streams))
