"""Alarm episodes: an alarm that lasts while its fault lasts and ends when the fault clears, with no
warm-up. Pure logic: no I/O, no clock.

The adaptive rule (``anomaly.adaptive``) raises the bar with an entity's recent scores, so a level kept
longer than its span is accepted, a long fault included, and its effect depends on how long the entity
has been scored (README "What the adaptive rule's SKAB figures rest on"). An episode instead follows the
alarm itself:

- at rest, a window alarms above the bar: the fitted threshold, or the *settled* bar an earlier episode
  left (below);
- the first window above opens an episode; while it is open the bar is its *level* (the geometric mean
  of the episode's scores so far) divided by ``drop``, and never under the fitted threshold: a fault
  that stays up stays flagged however long it lasts;
- ``k`` windows in a row at or under that bar end the episode, so it ends when the fault's scores fall
  to 1/``drop`` of its level even if the asset has not come all the way back. While such a run lasts the
  level stays where it was when the run began (its windows are held aside); a window above the bar
  breaks the run and the held windows join the level with it. (Counted in at once, a run's own scores
  pulled the level down under them before ``k`` came: after a short fault an asset settled between the
  fitted threshold and 1/``drop`` of the fault stayed in the episode, alarmed, for good.) The bar is then
  ``settle`` × the highest of those ``k`` scores (at least the fitted threshold) that hold no reading of
  the last window above the bar: a run's first windows still hold the fault's last readings, their
  scores falling step by step, and measured with them the settled bar was a fraction of the fault's own
  size (a later, smaller fault went unflagged). So the level an asset settles at after a fault (a rig
  still warm, a refitted valve) is not alarmed again, a rise above it is. Where ``k`` is too short for
  a window clear of the fault, the run's last window alone sets it. The settled bar holds until the
  model changes (a new model's scores are on its own scale, so every entity starts afresh).

``EpisodeRule`` is configured in readings (``k``) and turned into windows for the scoring stride by
``in_windows``; ``overlap`` says how many windows after one still share a reading with it. Two
implementations of one definition, tested against each other: ``episode_bars`` for one entity's scores
offline, ``EpisodeBars`` in the worker for many entities, fed batch by batch.
NaN scores are never flagged (+inf is: above any bar); non-finite scores change no episode.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

# Keys under which a rule is stored in ``Threshold.params`` (floats, so threshold.json stays flat).
PARAM_KEYS = ("episode_drop", "episode_settle", "episode_k")
_TINY = 1e-300  # a score of 0 inside an episode enters the geometric mean as this


@dataclass(frozen=True)
class EpisodeRule:
    """An episode ends after ``k`` readings at or under its bar, max(fitted threshold, level / ``drop``)
    (``drop`` 0: off); the bar after it is ``settle`` × the highest of those ``k`` scores."""

    drop: float = 0.0
    settle: float = 1.5  # settle and k: the best of SKAB's grid with drop 3 (README "Alarm episodes")
    k: int = 60

    def __post_init__(self) -> None:
        if not (math.isfinite(self.drop) and (self.drop == 0 or self.drop > 1)):
            raise ValueError(f"episode drop must be 0 (off) or > 1, got {self.drop!r}")
        if not (math.isfinite(self.settle) and self.settle > 0):
            raise ValueError(f"episode settle must be > 0, got {self.settle!r}")
        if int(self.k) != self.k or self.k < 1:
            raise ValueError(f"episode k must be a whole number >= 1, got {self.k!r}")
        object.__setattr__(self, "drop", float(self.drop))
        object.__setattr__(self, "settle", float(self.settle))
        object.__setattr__(self, "k", int(self.k))

    @property
    def enabled(self) -> bool:
        return self.drop > 0

    def in_windows(self, stride: int = 1) -> int:
        """``k`` in scored windows at ``stride`` readings between windows (at least 1)."""
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        return max(1, -(-self.k // stride))

    def overlap(self, window_size: int, stride: int = 1) -> int:
        """How many windows after a window (``window_size`` readings, ``stride`` readings apart) still
        share a reading with it: those a run's settled level leaves out."""
        if stride < 1 or window_size < 1:
            raise ValueError(f"window_size and stride must be >= 1, got {window_size}, {stride}")
        return -(-int(window_size) // stride) - 1

    def describe(self) -> str:
        """One line for people (tags, listings): ``episodes: end 15 readings under level/2, settle x3``."""
        if not self.enabled:
            return "off"
        return f"episodes: end {self.k} readings under level/{self.drop:g}, settle x{self.settle:g}"

    def to_params(self) -> dict[str, float]:
        """The rule as ``Threshold.params`` entries (empty when off)."""
        if not self.enabled:
            return {}
        return dict(zip(PARAM_KEYS, (self.drop, self.settle, float(self.k))))

    @classmethod
    def from_params(cls, params: Mapping[str, float]) -> "EpisodeRule | None":
        """The rule stored in ``Threshold.params``, or None (no rule, or ``drop`` 0)."""
        if not params.get("episode_drop"):
            return None
        return cls(drop=float(params["episode_drop"]), settle=float(params.get("episode_settle", cls.settle)),
                   k=int(params.get("episode_k", cls.k)))


@dataclass
class _State:
    """One entity's episode state: the settled bar, and while an episode is open its log-sum, length
    and the run of windows at or under its bar (how many, the highest score of those clear of the last
    window above, their log-sum: held aside until a window above the bar breaks the run)."""

    settled: float = 0.0
    open: bool = False
    log_sum: float = 0.0
    n: int = 0
    below: int = 0
    below_max: float = 0.0
    below_log_sum: float = 0.0
    newest: float = -math.inf  # newest window end (stream time), for pruning
    stream: int = -1  # the stream (partition) its windows came on, for pruning by that stream's clock

    def bar(self, base: float, drop: float) -> float:
        """The bar in force now, without a score (what a non-finite window is shown)."""
        if self.open:
            return max(base, math.exp(self.log_sum / self.n) / drop)
        return max(base, self.settled)

    def step(self, score: float, base: float, drop: float, settle: float, k: int, first: int) -> float:
        """The bar in force for ``score``, then the state after it (a non-finite score changes nothing).
        ``first``: the run's first window that counts for the settled level (``_first_clear``)."""
        bar = self.bar(base, drop)
        if not math.isfinite(score):
            return bar
        if not self.open:
            if score > bar:
                self.open, self.log_sum, self.n = True, math.log(max(score, _TINY)), 1
                self.below, self.below_log_sum = 0, 0.0
            return bar
        if score > bar:  # the run under the bar (if any) is broken: its windows join the level, then this one
            self.log_sum += self.below_log_sum + math.log(max(score, _TINY))
            self.n += self.below + 1
            self.below, self.below_log_sum = 0, 0.0
            return bar
        if self.below >= first:
            self.below_max = score if self.below == first else max(self.below_max, score)
        self.below_log_sum += math.log(max(score, _TINY))
        self.below += 1
        if self.below >= k:
            self.open, self.settled = False, settle * self.below_max  # the run is reset when one opens
        return bar


def _first_clear(k: int, skip: int) -> int:
    """The first of a run's ``k`` windows that holds no reading of the window above before it (``skip``
    windows still do), or the run's last where none is clear."""
    return min(skip, k - 1)


def episode_bars(scores: np.ndarray, base: float, rule: EpisodeRule | None, stride: int = 1, *,
                 window_size: int) -> np.ndarray:
    """The bar in force at each of one entity's windows (time order; ``window_size`` readings each,
    ``stride`` apart): ``base`` (or the settled bar) at rest, the open episode's level / ``drop`` (at
    least ``base``) inside one. A non-finite score is shown the bar in force and changes nothing. Causal."""
    x = np.asarray(scores, dtype=np.float64).ravel()
    bars = np.full(x.shape, float(base))
    if rule is None or not rule.enabled:
        return bars
    state, k = _State(), rule.in_windows(stride)
    first = _first_clear(k, rule.overlap(window_size, stride))
    for i, v in enumerate(x.tolist()):
        bars[i] = state.step(v, float(base), rule.drop, rule.settle, k, first)
    return bars


def episode_flags(scores: np.ndarray, base: float, rule: EpisodeRule | None, stride: int = 1, *,
                  window_size: int) -> np.ndarray:
    """Boolean flags of one entity's windows: score above its bar (NaN: never)."""
    x = np.asarray(scores, dtype=np.float64).ravel()
    return x > episode_bars(x, base, rule, stride, window_size=window_size)


class EpisodeBars:
    """The streaming form of ``episode_bars`` for many entities: a small state per entity that has been
    scored (settled bar, open episode), fed batch by batch. Every finite window goes through its
    entity's state in time order, so ``bars`` looks at each window once; an entity at rest costs a
    dictionary lookup and a comparison a window."""

    def __init__(self, rule: EpisodeRule, stride: int = 1, *, window_size: int) -> None:
        if not rule.enabled:
            raise ValueError("EpisodeBars needs an enabled rule (drop > 0)")
        self.rule = rule
        self.k = rule.in_windows(stride)
        self.first = _first_clear(self.k, rule.overlap(window_size, stride))
        self._states: dict[str, _State] = {}

    @property
    def entities(self) -> int:
        return len(self._states)

    def open_entities(self) -> list[str]:
        """Entities with an episode open now."""
        return [e for e, s in self._states.items() if s.open]

    def forget(self) -> None:
        """Drop every entity's state (a new model's scores are on another scale)."""
        self._states.clear()

    def prune(self, older_than: float | Mapping[int, float]) -> int:
        """Drop the state of entities whose newest window ended before ``older_than`` (one for all, or
        per stream as ``TrailingBars.prune`` takes it). Returns how many."""
        if isinstance(older_than, Mapping):
            stale = [e for e, s in self._states.items() if s.newest < older_than.get(s.stream, -math.inf)]
        else:
            stale = [e for e, s in self._states.items() if s.newest < older_than]
        for e in stale:
            del self._states[e]
        return len(stale)

    def bars(self, entities: Sequence[str], scores: np.ndarray, base: float | np.ndarray,
             need: np.ndarray | None = None, end_ts: np.ndarray | None = None,
             streams: np.ndarray | None = None) -> np.ndarray:
        """The bar of every window of a batch (``entities[i]``'s windows in time order), each window then
        taken into its entity's state. ``base``: the fitted value, one for all or each window's own (its
        entity's). ``need`` is accepted for the same call as ``TrailingBars.bars`` and ignored: every
        window moves an open episode. ``end_ts``: each window's stream time, and ``streams`` its stream,
        for ``prune``."""
        scores = np.asarray(scores, dtype=np.float64)
        bars = np.broadcast_to(np.asarray(base, dtype=np.float64), (len(scores),)).copy()
        rule, k, first = self.rule, self.k, self.first
        states = self._states
        ends = None if end_ts is None else np.asarray(end_ts, dtype=np.float64).tolist()
        ids = None if streams is None else np.asarray(streams, dtype=np.int64).tolist()
        for i, (entity, v, b) in enumerate(zip(entities, scores.tolist(), bars.tolist())):
            state = states.get(entity)
            if state is None:
                state = states[entity] = _State()
            if ends is not None and ends[i] > state.newest:
                state.newest = ends[i]
            if ids is not None:
                state.stream = ids[i]
            bars[i] = state.step(v, b, rule.drop, rule.settle, k, first)
        return bars
