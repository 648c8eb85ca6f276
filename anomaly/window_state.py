"""Per-entity window buffers on the model's sampling grid, for the streaming worker. No I/O.

Owns the state between readings and scored windows: where each reading goes on the grid, what is
filled, what is dropped, which windows are ready to score, and which offsets may be committed. It
never reads a clock (stream time is the readings' own ``ts``), a socket or a file.

Semantics (README quotes this section)
--------------------------------------
- **Grid.** A reading's slot is ``floor(ts / period_s + 0.5)``: the nearest multiple of the model's
  sampling period (halves round up; reckoned in whole microseconds for a period of whole microseconds,
  so an exact half is one in every case: ``grid_slots``). Window times are slot times (``slot * period_s``), not the raw
  reading times, so the same readings always give the same windows.
- **Sealed.** A slot is sealed once the entity has a reading more than ``grace_slots`` slots later
  (with ``grace_slots = 0`` a reading seals its own slot at once): a reading up to ``grace_slots``
  slots behind the entity's newest is still placed. Sealing is final: what a sealed slot holds
  never changes.
- **In order / out of order within grace.** A reading for an unsealed slot is placed in its slot
  (``"accepted"``), whatever order it arrived in.
- **Duplicate.** A reading for a slot that already holds a reading is dropped, the first one is kept
  (``"duplicate"``). This is checked before lateness, so a re-delivered copy of a recent reading
  counts as a duplicate, not as late.
- **Parts of a reading.** A reading for an unsealed slot whose reading lacks (``None``) a sensor this
  one has, from the same partition, is merged into it (``"accepted"``): each sensor keeps its first
  value, as the file grid does (a producer sending a slot's sensors one message each). The slot keeps
  the first part's offset, so a replay from it reads the later parts again. A part for a sealed slot is
  a duplicate, and its entity is named in ``split`` (``take_split``): with ``grace_slots = 0`` every
  part after the first comes too late, and ``grace_slots >= 1`` lets them be merged.
- **Late.** A reading for a sealed slot that holds no reading (it was filled, or is an unfilled
  gap) is dropped (``"late"``): the windows over that slot may already be scored.
- **Missing sensor.** A ``None`` value is forward-filled from the entity's previous slot, or from
  ``fill_values`` (the model's training centre per sensor) when the entity has no previous slot
  (its first reading, or the first after a restart). A sensor ``None`` in more than
  ``max_fill_steps`` slots in a row (a gap slot, with no reading, counts for every sensor, as a file's
  grid counts it) takes its ``fill_values`` value from then on, until it reports
  again: a sensor that died would otherwise repeat its last value for ever (an event open on it never
  closing, with an ``actual`` nobody sent; or a normal last value hiding a later fault).
- **Gaps.** When a slot is sealed with no reading, a run of up to ``max_fill_steps`` missing slots
  is forward-filled with the previous slot's values once the next reading is sealed. A longer run
  restarts the entity's window: its buffer is cleared and the reading that revealed the gap is
  answered ``"reset"`` (it is kept, and starts the new buffer). A new window becomes ready again
  ``window_size`` slots later.
- **Windows.** A window is the ``window_size`` consecutive slots ending at a sealed slot that holds
  a reading (a filled slot never ends a window, so every window ends on real data and has an
  ``end_offset``), with at least ``window_size`` slots since the last restart. With ``stride > 1``
  only slots with ``slot % stride == 0`` end a window: the alignment is absolute, so a worker that
  restarts from committed offsets scores the very same windows. ``ready()`` hands each window out
  once.
- **Commit offsets.** Per partition, the next offset that may be committed is the smallest offset of
  any reading an entity still needs: readings in unsealed slots, readings in windows not yet handed
  out by ``ready()``, and, for the next window still to come, the readings in its slots that are
  already sealed — including the reading a filled slot was copied from. With no such reading it is
  ``last_offset + 1``. Replaying from there rebuilds every window that is not yet scored (DESIGN §3).
  A sensor ``None`` in a reading, carried over from the last reading that had it (within
  ``max_fill_steps``), makes that older reading needed too (a row's ``src``): a replay from after it
  filled the sensor from ``fill_values`` instead, the window scored otherwise, and an event open across
  the restart came back under another id with the first never closed. Not covered: a value carried from
  a reading on another partition (an entity whose readings come on more than one, a producer keying it
  oddly), which a replay may still fill from ``fill_values``.
- **Memory.** Per entity: at most ``window_size - 1 + max(8, window_size // 4)`` grid rows and the
  readings of its unsealed slots (``grace_slots + 1`` with grace). ``evict_idle`` drops entities that stopped sending (they would
  otherwise hold their partition's commit back for ever), ``reset`` drops state on demand.
"""

from __future__ import annotations

import functools
import heapq
import math
from bisect import bisect_right
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from anomaly.codec import Reading
from anomaly.errors import ConfigError

AddOutcome = Literal["accepted", "duplicate", "late", "reset", "empty"]
ACCEPTED: AddOutcome = "accepted"
DUPLICATE: AddOutcome = "duplicate"
LATE: AddOutcome = "late"
RESET: AddOutcome = "reset"
EMPTY: AddOutcome = "empty"  # every sensor None: no reading (its slot is missing), as a file's blank row is

_MIN_SPARE_ROWS = 8  # rows appended between compactions (at least): each compaction copies W-1 rows
_BULK_MIN = 4  # an entity's run of consecutive readings shorter than this is placed one by one (cheaper)
# commit_offsets keeps what entities need in heaps with this many held at least, and this many times the entities
# changed since its last call: a walk of all costs less below (measured, 500-reading batches, 3 sensors, W=10).
# It builds them after that many calls in a row that would use them (a build costs about two walks), and drops
# them for walks when more than 1 / _HEAP_DROP_RATIO of the entities held changed (so that calls about the line
# do not build them again and again).
_HEAP_MIN_ENTITIES = 2048
_HEAP_MIN_RATIO = 8
_HEAP_DROP_RATIO = 4
_HEAP_AFTER = 3
_HEAP_SLACK = 1024  # heap entries beyond twice those of the last build that make commit_offsets build them again


def grid_slots(ts: np.ndarray, period_s: float) -> np.ndarray:
    """The grid slots (int64) of epoch seconds ``ts``: the nearest multiple of ``period_s``, halves up.

    A period of whole microseconds (0.1 s, 1 s, 2.5 ms) places them in whole microseconds: in floats a
    reading exactly half-way (x.x50 s on a 0.1 s grid: 17000000000.499998...) went down, one in five
    of them, onto the slot before it, and was dropped there as a duplicate. Another period (1/3 s) is
    placed in floats."""
    p = whole_us(period_s)
    if p:
        return (np.rint(ts * 1e6).astype(np.int64) + p // 2) // p
    return np.floor(ts / period_s + 0.5).astype(np.int64)


@functools.lru_cache(maxsize=64)
def whole_us(period_s: float) -> int | None:
    """``period_s`` in microseconds when it is a whole number of them (else None)."""
    period_us = period_s * 1e6
    if period_us >= 1.0 and abs(period_us - round(period_us)) <= 1e-9 * period_us:
        return int(round(period_us))
    return None


@dataclass(frozen=True)
class WindowPolicy:
    """How readings become windows on the model's sampling grid (see the module docstring)."""

    window_size: int  # W: slots per window (the model's window length)
    period_s: float  # the model's sampling period: one slot per period
    stride: int = 1  # score windows ending at slots with slot % stride == 0
    grace_slots: int = 0  # a reading may arrive this many slots late and still be placed
    max_fill_steps: int = 5  # longest run of missing slots that is forward-filled; longer restarts

    def __post_init__(self) -> None:
        if isinstance(self.window_size, bool) or int(self.window_size) < 1:
            raise ConfigError("window.window_size", f"must be >= 1, got {self.window_size!r}")
        if not (isinstance(self.period_s, (int, float)) and math.isfinite(self.period_s) and self.period_s > 0):
            raise ConfigError("window.period_s", f"must be a finite number > 0, got {self.period_s!r}")
        if int(self.stride) < 1:
            raise ConfigError("window.stride", f"must be >= 1, got {self.stride!r}")
        if int(self.grace_slots) < 0:
            raise ConfigError("window.grace_slots", f"must be >= 0, got {self.grace_slots!r}")
        if int(self.max_fill_steps) < 0:
            raise ConfigError("window.max_fill_steps", f"must be >= 0, got {self.max_fill_steps!r}")

    @property
    def seal_lag(self) -> int:
        """How many slots behind an entity's newest the sealed ones end: 0 without grace (a reading seals
        its own slot: a second reading there is a duplicate), else ``grace_slots + 1``, so the slot
        ``grace_slots`` behind the newest still takes a reading."""
        grace = int(self.grace_slots)
        return grace + 1 if grace > 0 else 0

    def slot(self, ts: float) -> int:
        """The grid slot of epoch seconds ``ts``: the nearest multiple of ``period_s``, halves up."""
        p = whole_us(self.period_s)
        return (round(ts * 1e6) + p // 2) // p if p else math.floor(ts / self.period_s + 0.5)


@dataclass(frozen=True)
class ReadyWindow:
    """One window ready to score: ``values`` (W, F) float64 in original units, read-only."""

    entity: str
    values: np.ndarray  # (W, F) the W slots ending at end_ts, sensors in the store's order
    end_ts: float  # epoch s of the last slot (slot * period_s)
    start_ts: float  # epoch s of the first slot
    partition: int  # partition of the reading in the last slot
    end_offset: int  # offset of the reading in the last slot
    filled: int  # cells (slot × sensor) that were filled rather than read
    start_offset: int  # oldest offset among the window's readings in its last reading's partition


@dataclass(frozen=True)
class ReadyBatch:
    """Windows ready to score, stacked: ``values`` (N, W, F) float64, window ``i`` of ``entities[i]``."""

    entities: list[str]
    values: np.ndarray  # (N, W, F)
    end_ts: np.ndarray  # (N,) epoch s of each window's last slot
    start_ts: np.ndarray  # (N,) epoch s of each window's first slot
    partition: np.ndarray  # (N,) partition of the reading in the last slot
    end_offset: np.ndarray  # (N,) offset of that reading
    filled: np.ndarray  # (N,) cells that were filled rather than read
    start_offset: np.ndarray  # (N,) oldest offset among each window's readings in ``partition`` (a replay of
    # that partition from it rebuilds the window, when the entity's readings all come on one partition)
    # (N,) epoch s stamped on the reading in each window's last slot (``end_ts`` is its slot's time, up to
    # half a period away): what end-to-end latency is measured from. None: not known (then ``end_ts``)
    reading_ts: np.ndarray | None = None
    # (N,) the offset a replay of ``partition`` must start after to rebuild none of each window: its oldest
    # reading's, or where a reading of it lies past a later slot's (placed out of order within grace), the
    # newest such one's (a replay from between them fills the later slot from it). None: not known
    through_offset: np.ndarray | None = None
    # (N, F) bool: the sensors null in the reading each window ends on (their last value there is carried
    # over or typical, not read). None: every window's last reading had every sensor
    last_missing: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.entities)


def _replay_offsets_one(off: Sequence[int], part: Sequence[int] | None, partition: int) -> tuple[int, int]:
    """``_replay_offsets`` of one window (``off``: its readings' offsets, oldest slot first; ``part``: their
    partitions, None: all on ``partition``), in plain Python: a window queued a reading at a time (a fleet
    of thousands, about one reading of each entity a poll) spent more in numpy's calls than in the work."""
    least = through = -1
    for i in range(len(off) - 1, -1, -1):  # newest slot first: ``least`` is the least offset after slot i
        if part is not None and part[i] != partition:
            continue  # another partition's offsets mean nothing here
        o = off[i]
        if least < 0 or o < least:
            least = o
        elif o > least and o > through:  # past a later slot's reading: placed out of order within grace
            through = o
    if least < 0:
        big = int(np.iinfo(np.int64).max)
        return big, big
    return least, max(least, through)


def _replay_offsets(off: np.ndarray, mine: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Per window (rows of ``off``: its readings' offsets, oldest slot first; ``mine``: those on the window's
    partition, None: all): the oldest offset, and the offset a replay must start after to rebuild none of it
    (the oldest, or the newest reading that lies past a later slot's: placed out of order within grace)."""
    big = np.iinfo(np.int64).max
    o = off.astype(np.int64) if mine is None else np.where(mine, off, big).astype(np.int64)
    oldest = o.min(axis=1)
    later = np.minimum.accumulate(o[:, ::-1], axis=1)[:, ::-1]  # the least offset from each slot on
    later = np.concatenate([later[:, 1:], np.full((len(o), 1), big)], axis=1)  # ... from the next slot on
    torn = (o > later) if mine is None else (mine & (o > later))
    return oldest, np.maximum(oldest, np.where(torn, o, -1).max(axis=1, initial=-1))


class _Chunk:
    """Consecutive queued windows of one entity (one from ``_place``, many from ``_append_run``)."""

    __slots__ = ("entity", "values", "end_slot", "partition", "end_offset", "filled", "start_offset", "reading_ts",
                 "through_offset", "last_missing")

    def __init__(self, entity: str, values: np.ndarray, end_slot: np.ndarray, partition: np.ndarray,
                 end_offset: np.ndarray, filled: np.ndarray, start_offset: np.ndarray,
                 reading_ts: np.ndarray, through_offset: np.ndarray, last_missing: np.ndarray | None = None) -> None:
        self.entity = entity
        self.values = values  # (k, W, F)
        self.end_slot = end_slot  # (k,)
        self.partition = partition  # (k,)
        self.end_offset = end_offset  # (k,)
        self.filled = filled  # (k,)
        self.start_offset = start_offset  # (k,)
        self.reading_ts = reading_ts  # (k,) epoch s stamped on the reading that ends each window
        self.through_offset = through_offset  # (k,)
        self.last_missing = last_missing  # (k, F) bool, the sensors null in each window's last reading; None: none


class _Entity:
    """One entity's buffer: a contiguous run of sealed grid rows plus the readings of unsealed slots."""

    __slots__ = ("pending", "max_slot", "values", "filled", "from_reading", "part", "off", "src", "n", "run_end",
                 "last_partition", "mixed", "needs", "queued_needs", "last_end", "null_runs", "unaligned", "full",
                 "partial", "carried", "pushed", "token")

    def __init__(self, capacity: int, n_sensors: int) -> None:
        # Readings of slots not yet sealed: slot -> (values with None for missing, partition, offset, ts).
        self.pending: dict[int, tuple[list[float | None], int, int, float]] = {}
        self.max_slot: int | None = None  # newest slot that holds a reading (sealing is relative to it)
        self.values = np.empty((capacity, n_sensors), dtype=np.float64)  # run rows; row n-1 is slot run_end
        self.filled = np.zeros(capacity, dtype=np.int64)  # filled cells per row
        self.from_reading = np.zeros(capacity, dtype=bool)  # row holds a reading (not a filled gap slot)
        self.part = np.zeros(capacity, dtype=np.int64)  # partition of the reading each row came from
        self.off = np.zeros(capacity, dtype=np.int64)  # offset of the reading each row came from
        # oldest offset a row's values come from, on its partition: its reading's, or that of an older reading
        # a sensor None in it was carried over from (<= off)
        self.src = np.zeros(capacity, dtype=np.int64)
        # (partition, offset) of the newest reading of the run with every sensor, and per sensor present in a
        # reading since, that reading's: where a None sensor's carried value comes from (None: no reading)
        self.full: tuple[int, int] | None = None
        self.partial: dict[int, tuple[int, int]] | None = None
        self.carried = -1  # slot of the newest row whose src is older than its reading (-1: none)
        self.n = 0  # rows in the run
        self.run_end = 0  # slot of row n-1 (meaningful when n > 0)
        self.last_partition = -1  # partition of the newest reading (-1: none yet)
        self.mixed = False  # readings came from more than one partition (a producer keyed it oddly)
        # partition -> oldest offset it needs for the commit, as last worked out (again at the next commit_offsets
        # while the entity is in the store's ``_changed``)
        self.needs: dict[int, int] = {}
        self.pushed: dict[int, int] = {}  # the needs in the store's commit heaps, under ``token`` (-1: none)
        self.token = -1
        # Oldest offsets of the windows queued and not yet handed out by ready(); None when none are.
        self.queued_needs: dict[int, int] | None = None
        self.last_end: int | None = None  # slot of the newest window queued (None: none yet)
        self.null_runs: list[int] | None = None  # per sensor, slots in a row it was None or unread (None: all 0)
        self.unaligned = 0  # readings in a row, a window's worth held, none on a stride slot (``unaligned``)

    def holds_reading(self, slot: int) -> bool:
        if slot in self.pending:
            return True
        index = self.n - 1 - (self.run_end - slot)
        return self.n > 0 and 0 <= index < self.n and bool(self.from_reading[index])


class WindowStore:
    """Window buffers of every entity, on the grid of ``policy``; sensors in the order given.

    ``fill_values`` (one per sensor, original units) fill a missing sensor that has no earlier value.
    """

    def __init__(self, policy: WindowPolicy, sensors: Sequence[str], fill_values: Sequence[float]) -> None:
        self.policy = policy
        self.sensors: tuple[str, ...] = tuple(sensors)
        if not self.sensors:
            raise ConfigError("window.sensors", "needs at least one sensor")
        if len(fill_values) != len(self.sensors):
            raise ConfigError("window.fill_values", f"{len(fill_values)} fill values for {len(self.sensors)} sensors")
        fill = np.asarray(fill_values, dtype=np.float64)
        if not np.all(np.isfinite(fill)):
            raise ConfigError("window.fill_values", f"must be finite, got {list(fill_values)}")
        self._fill = fill
        self._w = int(policy.window_size)
        self._keep = max(self._w - 1, 1)  # rows a future window (or a forward fill) can still need
        # Slack of W/4 rows (at least 8) keeps the copying of compaction under ~4 rows per slot.
        self._capacity = self._keep + max(_MIN_SPARE_ROWS, self._w // 4)
        self._steps = np.arange(self._w)  # row offsets inside a window (bulk gathers)
        self._entities: dict[str, _Entity] = {}
        self._queue: list[_Chunk] = []  # windows not yet handed out by ready()
        self._queued_by: list[_Entity] = []  # entities whose queued_needs are set
        self._orphan_needs: dict[int, int] = {}  # queued needs of entities evicted before ready()
        # What every entity needs, kept between batches so that a commit works out only the entities changed since
        # the last (walking every entity cost 13 ms a batch with 50,000 held, more than placing the batch):
        # per partition a min-heap of (offset, token, entity), an entry live while the entity held is the one
        # that pushed it under that token (others are dropped as they reach the top, or all at a rebuild).
        self._heaps: dict[int, list[tuple[int, int, str]]] | None = None  # None: not kept (``commit_offsets``)
        self._heaped = 0  # entries in the heaps, live or not
        self._built = 0  # entries in the heaps when they were last built (all live then)
        self._heap_calls = 0  # commit_offsets calls in a row, without heaps, that would have used them
        self._tokens = 0  # tokens given out so far
        # entities whose commit needs may have moved since the last commit_offsets (it works them out again)
        self._changed: dict[str, _Entity] = {}
        self._watermark: dict[int, int] = {}  # partition -> newest slot seen in it (evict_idle)
        self._arrivals = 0  # entity states created so far (a new one may be idle or inactive from the start)
        self._moves = 0  # entities moved to another partition, runs restarted: idle or inactive without time passing
        # What the last scan of evict_idle / evict_excess saw (the watermarks, arrivals, its argument, and for
        # evict_excess whether it left candidates): while nothing of it moved, a scan finds what it found.
        self._idle_scanned: tuple | None = None
        self._excess_scanned: tuple | None = None
        # entities whose readings keep missing the stride slots (2 x stride readings in a row with a window's
        # worth held and no window): sampled more slowly than the model's period at another phase, they are
        # never scored. Named again after as many more readings; the caller takes them (``take_unaligned``).
        self.unaligned: list[str] = []
        # entities that sent part of a reading (a sensor its slot's reading lacked) for a slot already sealed: the
        # part was dropped as a duplicate (sensors sent one message each, with too little grace to merge them)
        self.split: dict[str, None] = {}

    def take_split(self) -> list[str]:
        """The entities named in ``split`` since the last call (and forget them)."""
        names = list(self.split)
        self.split.clear()
        return names

    def take_unaligned(self) -> list[str]:
        """The entities named in ``unaligned`` since the last call (and forget them)."""
        names, self.unaligned = self.unaligned, []
        return names

    # --- inspection ---------------------------------------------------------------------------
    @property
    def entities(self) -> int:
        """How many entities have state."""
        return len(self._entities)

    def __contains__(self, entity: object) -> bool:
        return entity in self._entities

    def set_fill_values(self, fill_values: Sequence[float]) -> None:
        """Use new ``fill_values`` (a new model version) for fills from now on; buffers are kept."""
        fill = np.asarray(fill_values, dtype=np.float64)
        if fill.shape != (len(self.sensors),) or not np.all(np.isfinite(fill)):
            raise ConfigError("window.fill_values", f"need {len(self.sensors)} finite values, got {list(fill_values)}")
        self._fill = fill

    # --- readings in --------------------------------------------------------------------------
    def add(self, entity: str, reading: Reading, partition: int, offset: int) -> str:
        """Place one reading; returns ``"accepted"``, ``"duplicate"``, ``"late"``, ``"reset"`` or ``"empty"``.

        Sensors are read in the store's order; a sensor absent from ``reading.values`` is missing
        (``None``), and sensors the store does not know are ignored (callers validate sensor sets). A
        reading with every sensor missing is no reading (``"empty"``): its time passes on its partition,
        and its slot stays missing (filled or a gap, as a file's blank row is on the grid).
        """
        slot = self.policy.slot(reading.ts)
        if slot > self._watermark.get(partition, slot - 1):
            self._watermark[partition] = slot
        row = [reading.values.get(name) for name in self.sensors]
        if all(v is None for v in row):
            self._pass_empty(entity, slot)
            return EMPTY
        state = self._entities.get(entity)
        if state is None:
            state = self._entities[entity] = self._changed[entity] = _Entity(self._capacity, len(self.sensors))
            self._arrivals += 1
        return self._place(entity, state, slot, row, partition, int(offset), float(reading.ts))

    def add_many(self, entities: Sequence[str], ts: np.ndarray, values: np.ndarray, partitions: np.ndarray,
                 offsets: np.ndarray) -> dict[str, int]:
        """Place many readings, in the order given; the same state and windows as calling ``add`` for
        each in turn. ``values`` (n, F) in the store's sensor order with NaN for a missing sensor;
        ``ts`` epoch seconds. Returns how many readings had each outcome of ``add``.

        Readings are grouped by entity (entities are independent, so only each entity's own order
        matters); a run of an entity's readings on consecutive slots, each continuing its window
        with every sensor present, is appended in bulk (numpy slices, no per-reading Python), which
        is the common case of a healthy stream. The rest go through ``add``'s logic one by one.
        """
        counts = dict.fromkeys((ACCEPTED, DUPLICATE, LATE, RESET, EMPTY), 0)
        n = len(entities)
        if n == 0:
            return counts
        slots = self._advance(ts, partitions)
        stamps = np.asarray(ts, dtype=np.float64)
        values = np.asarray(values, dtype=np.float64)
        partitions = np.asarray(partitions, dtype=np.int64)
        offsets = np.asarray(offsets, dtype=np.int64)
        # Group by entity, keeping each entity's order: one stable sort, then every group is a slice.
        names = list(dict.fromkeys(entities))
        code = {name: i for i, name in enumerate(names)}
        codes = np.array(list(map(code.__getitem__, entities)), dtype=np.int64)
        order = np.argsort(codes, kind="stable")
        codes, slots, values, stamps = codes[order], slots[order], values[order], stamps[order]
        partitions, offsets = partitions[order], offsets[order]
        complete = ~np.isnan(values).any(axis=1)
        empty = np.isnan(values).all(axis=1)  # no sensor at all: no reading (``add``'s "empty")
        bounds = np.flatnonzero(np.diff(codes)) + 1
        group_starts = [0, *bounds.tolist()]
        group_ends = [*bounds.tolist(), n]
        # Where a bulk run must stop: a new entity, a slot that is not the next one, a missing sensor,
        # another partition.
        if self.policy.grace_slots == 0:  # with grace, readings wait in pending slots: one by one
            cont = (np.diff(slots) == 1) & (np.diff(codes) == 0) & (np.diff(partitions) == 0) & complete[1:]
            breaks = (np.flatnonzero(~cont) + 1).tolist()
            breaks.append(n)
        else:
            breaks = None
        slot_list, part_list, off_list, ts_list = slots.tolist(), partitions.tolist(), offsets.tolist(), stamps.tolist()
        complete_list = complete.tolist()
        empty_list = empty.tolist() if empty.any() else None
        entities_state = self._entities
        place = self._place
        for g, (a, b) in enumerate(zip(group_starts, group_ends)):
            entity = names[int(codes[a])] if g else names[int(codes[0])]
            if empty_list is not None and all(empty_list[a:b]):
                counts[EMPTY] += b - a  # (no state for an entity that has sent nothing)
                for q in range(a, b):
                    self._pass_empty(entity, slot_list[q])
                continue
            state = entities_state.get(entity)
            q = a
            while q < b:
                if empty_list is not None and empty_list[q]:
                    counts[EMPTY] += 1
                    self._pass_empty(entity, slot_list[q])  # (nothing, for an entity not held: as ``add``)
                    q += 1
                    continue
                if state is None:  # its first reading with a sensor: held from now on
                    state = entities_state[entity] = self._changed[entity] = _Entity(self._capacity,
                                                                                     len(self.sensors))
                    self._arrivals += 1
                if (breaks is not None and b - q >= _BULK_MIN and state.n > 0 and complete_list[q]
                        and slot_list[q] == state.run_end + 1 and not state.pending
                        and state.max_slot == state.run_end):
                    end = breaks[bisect_right(breaks, q)]  # the run continues up to the next break
                    if end - q >= _BULK_MIN:
                        self._append_run(entity, state, slot_list[q], values[q:end], partitions[q:end],
                                         offsets[q:end], stamps[q:end])
                        counts[ACCEPTED] += end - q
                        q = end
                        continue
                row = values[q].tolist()
                if not complete_list[q]:
                    row = [None if v != v else v for v in row]
                counts[place(entity, state, slot_list[q], row, part_list[q], off_list[q], ts_list[q])] += 1
                q += 1
        return counts

    def _pass_empty(self, entity: str, slot: int) -> None:
        """An empty reading (every sensor None) of an entity the store holds: its slot stays missing, but its
        time passes as a reading's would, sealing the readings ``grace_slots`` behind it (else an entity whose
        sensors all went null kept its last readings, and their windows, pending until the idle timeout)."""
        state = self._entities.get(entity)
        if state is not None and (state.max_slot is None or slot > state.max_slot):
            state.max_slot = slot
            self._changed[entity] = state  # its next window's first slot moves with the newest slot
            self._seal(entity, state, slot - self.policy.seal_lag)

    def _place(self, entity: str, state: _Entity, slot: int, row: list[float | None], partition: int,
               offset: int, ts: float) -> str:
        """``add`` after the slot and the watermark: duplicate, late, or pending then sealed."""
        policy = self.policy
        if state.holds_reading(slot):
            held = state.pending.get(slot)
            if held is None:
                if self._splits_sealed(state, slot, row):
                    self.split[entity] = None
            elif held[1] == partition and any(a is None and b is not None for a, b in zip(held[0], row)):
                # another part of the slot's reading (a producer sending its sensors one message each): each
                # sensor's first value, as the grid keeps offline; the first part's offset is the slot's (a
                # replay of the partition from it reads the later part again)
                state.pending[slot] = ([b if a is None else a for a, b in zip(held[0], row)], *held[1:])
                return ACCEPTED
            return DUPLICATE
        if state.max_slot is not None and slot <= state.max_slot - policy.seal_lag:
            return LATE
        state.pending[slot] = (row, partition, offset, ts)
        self._changed[entity] = state
        if state.last_partition not in (-1, partition):
            state.mixed = True
            self._moves += 1  # measured against another partition's newest slot now: idle or inactive at once?
        state.last_partition = partition
        if state.max_slot is None or slot > state.max_slot:
            state.max_slot = slot
        if self._seal(entity, state, state.max_slot - policy.seal_lag):
            return RESET
        return ACCEPTED

    @staticmethod
    def _splits_sealed(state: _Entity, slot: int, row: list[float | None]) -> bool:
        """Whether ``row``, for a sealed slot, has a sensor the reading there lacked (known for the newest
        sealed slot, where the parts of a reading sent sensor by sensor land): a part that came too late."""
        i = state.n - 1
        if i < 0 or slot != state.run_end or not state.from_reading[i] or not state.filled[i]:
            return False
        here = (int(state.part[i]), int(state.off[i]))
        partial = state.partial or {}
        return any(value is not None and partial.get(j, state.full) != here for j, value in enumerate(row))

    def _seal(self, entity: str, state: _Entity, upto: int) -> bool:
        """Move every pending reading at or before slot ``upto`` into the run, filling gaps and
        queueing the windows they end; returns whether a gap restarted the run."""
        if not state.pending:
            due: list[int] = []
        else:
            due = sorted(s for s in state.pending if s <= upto)
        restarted = False
        max_fill = self.policy.max_fill_steps
        for slot in due:
            row, partition, offset, ts = state.pending.pop(slot)
            if state.n > 0:
                gap = slot - state.run_end - 1
                if gap > max_fill:
                    state.n = 0
                    restarted = True
                else:
                    for _ in range(gap):
                        self._append_fill(state)
            self._append_reading(state, slot, row, partition, offset)
            self._maybe_queue(entity, state, slot, partition, offset, ts, row)
        # Missing slots after the run are sealed for good: too many of them is a gap we already know.
        if state.n > 0 and upto - state.run_end > max_fill:
            state.n = 0
            restarted = True
        if due or restarted:
            self._changed[entity] = state
        if restarted:
            self._moves += 1  # a whole window's rows gone: inactive, if not heard from in the newest slots
        return restarted

    def _make_room(self, state: _Entity) -> None:
        if state.n < self._capacity:
            return
        keep, n = self._keep, state.n
        for array in (state.values, state.filled, state.from_reading, state.part, state.off, state.src):
            array[:keep] = array[n - keep:n]
        state.n = keep

    def _append_fill(self, state: _Entity) -> None:
        """Append a gap slot: a copy of the previous row, every cell counted as filled. A slot with no
        reading is a missing slot of every sensor: each one's run of missing slots goes on through it (a
        sensor past ``max_fill_steps`` takes its ``fill_values`` value), as a file's grid counts them; counted
        in readings, a sensor null on both sides of a gap kept its last value for the gap's slots longer
        than ``anomaly score`` gave it on the same readings."""
        self._make_room(state)
        i = state.n
        runs = [r + 1 for r in state.null_runs] if state.null_runs is not None else [1] * len(self.sensors)
        state.null_runs = runs
        cap = self.policy.max_fill_steps
        if max(runs) > cap:
            previous = state.values[i - 1].tolist()
            state.values[i] = [previous[j] if r <= cap else float(self._fill[j]) for j, r in enumerate(runs)]
        else:
            state.values[i] = state.values[i - 1]
        state.filled[i] = len(self.sensors)
        state.from_reading[i] = False
        state.part[i] = state.part[i - 1]  # the reading this copy came from
        state.off[i] = state.off[i - 1]
        state.src[i] = state.src[i - 1]
        state.n += 1
        state.run_end += 1
        if state.carried == state.run_end - 1:  # a copy of a row that carries a sensor from before it
            state.carried = state.run_end

    def _append_reading(self, state: _Entity, slot: int, row: list[float | None], partition: int,
                        offset: int) -> None:
        self._make_room(state)
        i = state.n
        filled = row.count(None)
        src = offset
        if i == 0:  # a new run: nothing carried over from before it
            state.full = state.partial = None
        if filled:
            previous = (state.values[i - 1] if i > 0 else self._fill).tolist()
            runs = state.null_runs or [0] * len(row)
            cap = self.policy.max_fill_steps
            full, partial = state.full, state.partial
            if partial is None:
                partial = state.partial = {}
            here = (partition, offset)
            for j, value in enumerate(row):
                if value is None:
                    runs[j] += 1
                    at = partial.get(j, full)  # the reading its carried value comes from
                    if i > 0 and runs[j] <= cap and at is not None and at[0] == partition and at[1] < src:
                        src = at[1]
                else:
                    runs[j] = 0
                    partial[j] = here
            row = [value if value is not None else previous[j] if runs[j] <= cap else float(self._fill[j])
                   for j, value in enumerate(row)]
            state.null_runs = runs
        else:
            state.full, state.partial = (partition, offset), None
            if state.null_runs is not None:  # every sensor reported: no run of Nones goes on
                state.null_runs = None
        state.values[i] = row  # one assignment per row: element-wise numpy writes cost more than the list
        state.filled[i] = filled
        state.from_reading[i] = True
        state.part[i] = partition
        state.off[i] = offset
        state.src[i] = src
        if src < offset:
            state.carried = slot
        state.n += 1
        state.run_end = slot
        if state.queued_needs is not None and src < state.queued_needs.get(partition, src + 1):
            state.queued_needs[partition] = src

    def _maybe_queue(self, entity: str, state: _Entity, slot: int, partition: int, offset: int, ts: float,
                     row: list[float | None]) -> None:
        w, stride = self._w, self.policy.stride
        if state.n < w:
            state.unaligned = 0
            return
        if slot % stride != 0:
            state.unaligned += 1
            if state.unaligned >= 2 * stride:  # named again after as many more, while it lasts
                self.unaligned.append(entity)
                state.unaligned = 0
            return
        state.unaligned = 0
        lo = state.n - w
        state.last_end = slot
        first, last = _replay_offsets_one(state.off[lo:state.n].tolist(),
                                          state.part[lo:state.n].tolist() if state.mixed else None, partition)
        oldest, through = np.array([first], dtype=np.int64), np.array([last], dtype=np.int64)
        if state.carried > slot - w:  # a row of the window carries a sensor from an older reading
            mine = state.part[lo:state.n] == partition
            oldest = np.minimum(oldest, np.where(mine, state.src[lo:state.n], oldest[0]).min(keepdims=True))
        missing = np.array([[value is None for value in row]]) if None in row else None  # row: as read
        self._queue.append(_Chunk(entity, state.values[lo:state.n][None].copy(), np.array([slot]),
                                  np.array([partition]), np.array([offset]),
                                  np.array([state.filled[lo:state.n].sum()]), oldest, np.array([ts]), through,
                                  missing))
        if state.queued_needs is None:  # later windows' rows are these plus rows appended after (tracked there)
            state.queued_needs = _rows_needs(state, lo)
            self._queued_by.append(state)

    def _append_run(self, entity: str, state: _Entity, first_slot: int, rows: np.ndarray, parts: np.ndarray,
                    offs: np.ndarray, stamps: np.ndarray) -> None:
        """Append readings on consecutive slots from ``first_slot`` (the slot after the run's end), every
        sensor present, grace 0 (each seals its own slot), queueing the windows they end: ``_place``
        for each in turn, in bulk."""
        m, n, w, keep, cap = len(rows), state.n, self._w, self._keep, self._capacity
        partition = int(parts[0])  # one partition per run (add_many breaks runs where it changes)
        if state.last_partition not in (-1, partition):
            state.mixed = True
        # Windows end on new rows j with n + j + 1 >= w (enough rows since the restart) on stride slots.
        stride = self.policy.stride
        j0 = max(-(-first_slot // stride) * stride - first_slot, w - 1 - n)
        if j0 % stride != (-first_slot) % stride:  # keep the stride alignment after raising j0
            j0 += ((-first_slot - j0) % stride)
        new_from = 0  # first new row that queued windows need (rows before a first window are not)
        if j0 < m:
            j = np.arange(j0, m, stride)
            h = min(n, w - 1)  # held rows a window can reach back to
            joined = np.concatenate([state.values[n - h:n], rows])
            starts = j + h - (w - 1)  # in ``joined``
            held_filled = state.filled[n - h:n]
            if held_filled.any():
                csum = np.concatenate([[0], np.cumsum(held_filled), np.full(m, held_filled.sum())])
                filled = csum[np.minimum(j + h + 1, h)] - csum[np.minimum(starts, h)]
            else:
                filled = np.zeros(len(j), dtype=np.int64)
            gather = starts[:, None] + self._steps  # (k, W) rows of ``joined`` per window
            joined_off = np.concatenate([state.off[n - h:n], offs])
            if state.mixed:  # only this partition's rows: another partition's offsets mean nothing here
                joined_part = np.concatenate([state.part[n - h:n], parts])
                mine = joined_part[gather] == partition
            else:
                mine = None
            oldest, through = _replay_offsets(joined_off[gather], mine)
            if state.carried >= first_slot - h:  # a held row carries a sensor from an older reading
                src = np.concatenate([state.src[n - h:n], offs])[gather]
                oldest = np.minimum(oldest, (src if mine is None else np.where(mine, src, oldest[:, None])).min(axis=1))
            self._queue.append(_Chunk(entity, joined[gather], first_slot + j,
                                      np.full(len(j), partition), offs[j], filled, oldest, stamps[j], through))
            state.last_end = first_slot + int(j[-1])
            state.unaligned = 0
            if state.queued_needs is None:  # the first window queued: its rows and every later one
                state.queued_needs = {}
                self._queued_by.append(state)
                first_row = n + int(j[0]) - (w - 1)  # in the run (0 .. n + m)
                if first_row < n:
                    _merge_min(state.queued_needs, _rows_needs(state, first_row))
                new_from = max(first_row - n, 0)
        if state.queued_needs is not None:  # windows queued: the new rows are needed until ready()
            needs = state.queued_needs
            low = int(offs[new_from:].min())
            if low < needs.get(partition, low + 1):
                needs[partition] = low
        # Keep what the one-by-one path would hold after its compactions (the same rows, so duplicate
        # detection and commit needs are unchanged): the last ``held`` rows of the run.
        total = n + m
        held = total if total <= cap else keep + (total - cap - 1) % (cap - keep) + 1
        old = held - m  # rows kept from those held before (<= 0: only new rows)
        if old > 0:
            for array in (state.values, state.filled, state.from_reading, state.part, state.off, state.src):
                array[:old] = array[n - old:n]
            lo = 0
        else:
            lo = -old
        tail = slice(max(old, 0), held)
        state.values[tail] = rows[lo:]
        state.null_runs = None  # every sensor present in these rows
        state.filled[tail] = 0
        state.from_reading[tail] = True
        state.part[tail] = parts[lo:]
        state.off[tail] = offs[lo:]
        state.src[tail] = offs[lo:]
        state.full, state.partial = (partition, int(offs[-1])), None
        state.n = held
        state.run_end = state.max_slot = first_slot + m - 1
        if state.last_partition not in (-1, partition):
            self._moves += 1
        state.last_partition = partition
        self._changed[entity] = state

    # --- windows out --------------------------------------------------------------------------
    def ready(self) -> list[ReadyWindow]:
        """Every window whose last slot is sealed and that was not handed out before, in the order
        they became ready (per entity: in time order). Each window is handed out once."""
        batch = self.ready_batch()
        values = batch.values
        values.flags.writeable = False
        return [ReadyWindow(entity=entity, values=values[i], end_ts=end, start_ts=start, partition=p,
                            end_offset=o, filled=f, start_offset=so)
                for i, (entity, end, start, p, o, f, so) in enumerate(zip(
                    batch.entities, batch.end_ts.tolist(), batch.start_ts.tolist(), batch.partition.tolist(),
                    batch.end_offset.tolist(), batch.filled.tolist(), batch.start_offset.tolist()))]

    def ready_batch(self) -> ReadyBatch:
        """``ready()`` as arrays: the same windows in the same order, stacked (what one forward pass
        takes), without a Python object per window."""
        chunks = self._queue
        self._queue = []
        for state in self._queued_by:
            state.queued_needs = None
        self._queued_by.clear()
        self._orphan_needs.clear()
        w, f, period = self._w, len(self.sensors), self.policy.period_s
        if not chunks:
            empty = np.empty(0, dtype=np.int64)
            return ReadyBatch([], np.empty((0, w, f)), np.empty(0), np.empty(0), empty, empty, empty, empty, np.empty(0),
                              empty)
        entities: list[str] = []
        for chunk in chunks:
            entities.extend([chunk.entity] * len(chunk.end_slot))
        last_missing = None
        if any(c.last_missing is not None for c in chunks):  # a window's last reading had a null sensor
            last_missing = np.zeros((len(entities), f), dtype=bool)
            row = 0
            for c in chunks:
                if c.last_missing is not None:
                    last_missing[row:row + len(c.end_slot)] = c.last_missing
                row += len(c.end_slot)
        if len(chunks) == 1:
            c = chunks[0]
            values, end_slot, partition, end_offset, filled = c.values, c.end_slot, c.partition, c.end_offset, c.filled
            start_offset, reading_ts, through_offset = c.start_offset, c.reading_ts, c.through_offset
        else:
            values = np.concatenate([c.values for c in chunks])
            end_slot = np.concatenate([c.end_slot for c in chunks])
            partition = np.concatenate([c.partition for c in chunks])
            end_offset = np.concatenate([c.end_offset for c in chunks])
            filled = np.concatenate([c.filled for c in chunks])
            start_offset = np.concatenate([c.start_offset for c in chunks])
            reading_ts = np.concatenate([c.reading_ts for c in chunks])
            through_offset = np.concatenate([c.through_offset for c in chunks])
        return ReadyBatch(entities, values, end_slot * period, (end_slot - w + 1) * period,
                          partition.astype(np.int64), end_offset.astype(np.int64), filled.astype(np.int64),
                          start_offset.astype(np.int64), np.asarray(reading_ts, dtype=np.float64),
                          through_offset.astype(np.int64), last_missing)

    def observe(self, ts: np.ndarray, partitions: np.ndarray) -> None:
        """Move each partition's stream time on to the newest of ``ts`` seen on it, placing no reading:
        for readings that are dead letters only because they carry another sensor set than the
        model's. Their time is real; without this, a partition whose every reading is such a record
        would keep its stream time, so its entities would never age out (``evict_idle``) and their
        buffers and alert state would hold its commit for ever."""
        if len(ts):
            self._advance(ts, partitions)

    def _advance(self, ts: np.ndarray, partitions: np.ndarray) -> np.ndarray:
        """Each reading's slot (as ``slot()``), after moving every partition's watermark to its newest."""
        slots = grid_slots(np.asarray(ts, dtype=np.float64), self.policy.period_s)
        partitions = np.asarray(partitions, dtype=np.int64)
        for partition in np.unique(partitions).tolist():
            newest = int(slots[partitions == partition].max())
            if newest > self._watermark.get(partition, newest - 1):
                self._watermark[partition] = newest
        return slots

    def stream_time(self, partition: int) -> float | None:
        """Epoch seconds of the newest slot seen on ``partition`` (its stream time); None if none yet."""
        slot = self._watermark.get(partition)
        return None if slot is None else slot * self.policy.period_s

    # --- commits ------------------------------------------------------------------------------
    def commit_offsets(self, last_offsets: Mapping[int, int]) -> dict[int, int]:
        """Per partition in ``last_offsets`` (partition -> last offset consumed), the next offset that
        may be committed: the oldest offset still needed by an entity (see the module docstring),
        or ``last_offset + 1`` when nothing older is needed.

        Only the entities changed since the last call are worked out again. With many entities held and few
        of them in a batch, what each needs stays in per-partition heaps between calls (a walk of every entity
        cost 13 ms a batch with 50,000 held, more than placing the batch); with most of them changed, a walk
        of every entity costs less than keeping the heaps, and is what is done."""
        entities, changed = self._entities, self._changed
        for name, state in changed.items():  # worked out again, once, whichever way the minimum is then taken
            if entities.get(name) is state:  # (one dropped since needs nothing)
                state.needs = self._needs(state)
        needed: dict[int, int] = {}
        heaps = self._heaps
        held, touched = len(entities), len(changed)
        if heaps is not None:
            walk = held < _HEAP_MIN_ENTITIES or held < _HEAP_DROP_RATIO * touched
        else:
            use = held >= _HEAP_MIN_ENTITIES and held >= _HEAP_MIN_RATIO * touched
            self._heap_calls = self._heap_calls + 1 if use else 0
            walk = self._heap_calls < _HEAP_AFTER
        if walk:
            for state in entities.values():
                _merge_min(needed, state.needs)
            self._heaps = heaps = None  # built again from every entity when the heaps are next used
        elif heaps is None or self._heaped > 2 * self._built + _HEAP_SLACK:  # none yet, or mostly dead entries
            heaps = self._build_heaps()
        else:
            tokens = self._tokens
            for name, state in changed.items():
                needs = state.needs
                if entities.get(name) is not state or needs == state.pushed:
                    continue  # dropped since (its entries die with it), or needing what its entries say
                tokens += 1  # a new token: the entity's older entries are dead
                state.token, state.pushed = tokens, needs
                for partition, offset in needs.items():
                    heapq.heappush(heaps.setdefault(partition, []), (offset, tokens, name))
                self._heaped += len(needs)
            self._tokens = tokens
        changed.clear()
        for state in self._queued_by:  # windows queued, not yet handed out (windows of entities dropped too)
            if state.queued_needs is not None:
                _merge_min(needed, state.queued_needs)
        _merge_min(needed, self._orphan_needs)
        commits: dict[int, int] = {}
        for partition, last in last_offsets.items():
            next_offset = int(last) + 1
            heap = heaps.get(partition) if heaps is not None else None
            while heap:
                offset, token, name = heap[0]
                state = entities.get(name)
                if state is not None and state.token == token:
                    next_offset = min(next_offset, offset)
                    break
                heapq.heappop(heap)
                self._heaped -= 1
            commits[partition] = min(needed.get(partition, next_offset), next_offset)
        return commits

    def _build_heaps(self) -> dict[int, list[tuple[int, int, str]]]:
        """The commit heaps built afresh from what every entity held needs now (each under a new token)."""
        heaps: dict[int, list[tuple[int, int, str]]] = {}
        tokens = self._tokens
        for name, state in self._entities.items():
            tokens += 1
            state.token, state.pushed = tokens, state.needs
            for partition, offset in state.needs.items():
                heaps.setdefault(partition, []).append((offset, tokens, name))
        for heap in heaps.values():
            heapq.heapify(heap)
        self._tokens = tokens
        self._heaps = heaps
        self._heaped = self._built = sum(map(len, heaps.values()))
        self._heap_calls = 0
        return heaps

    def _needs(self, state: _Entity) -> dict[int, int]:
        """partition -> oldest offset this entity's unsealed slots and next window still need."""
        needs = _pending_needs(state)
        if state.n > 0 and state.max_slot is not None:
            stride = self.policy.stride
            sealed_upto = state.max_slot - self.policy.seal_lag
            next_end = (sealed_upto // stride + 1) * stride  # first slot that can still end a window
            first_needed = next_end - self._w + 1
            run_start = state.run_end - state.n + 1
            if first_needed <= state.run_end:
                index = max(first_needed - run_start, 0)  # a filled row carries its source reading's offset
            elif first_needed < next_end and first_needed - state.run_end <= self.policy.max_fill_steps:
                index = state.n - 1  # the first needed slot would be a gap filled from the last row
            else:
                index = state.n  # the next window holds no sealed row (or the run restarts first)
            _merge_min(needs, _rows_needs(state, index))
        return needs

    def replay_plan(self, history_s: float, step_s: float) -> tuple[dict[int, int], dict[str, float]]:
        """What a swap to a model these buffers do not fit (other sensors, window or period) re-reads.

        Returns, per entity, the time of the end of its newest window handed out (queued) so far (-inf:
        none yet, e.g. an entity still filling its first window); and, per partition, the oldest offset
        among every entity's unsealed readings and the readings of its grid rows from ``history_s``
        before the first slot after that end (``step_s`` later: the new model's period) on (an entity
        with no window yet: all its rows), as far back as the buffer holds them. Re-reading from there
        gives a new model whose windows reach ``history_s`` back every window ending after those ends,
        whatever its stride. Call this after ``ready()``."""
        period = self.policy.period_s
        seek: dict[int, int] = {}
        scored: dict[str, float] = {}
        for name, state in self._entities.items():
            _merge_min(seek, _pending_needs(state))
            if state.last_end is None:
                scored[name], first = -math.inf, 0
            else:
                scored[name] = state.last_end * period
                oldest = math.floor((state.last_end * period + step_s - history_s) / period + 1e-9)  # its slot
                first = max(oldest - (state.run_end - state.n + 1), 0)
            if state.n > 0:
                _merge_min(seek, _rows_needs(state, first))
        return seek, scored

    # --- housekeeping -------------------------------------------------------------------------
    def reset(self, entity: str | None = None) -> None:
        """Forget one entity's state, or every entity's (and every window not yet handed out)."""
        if entity is None:
            self._entities.clear()
            self._queue.clear()
            self._queued_by.clear()
            self._orphan_needs.clear()
            self._watermark.clear()
            self._heaps = None
            self._heaped = self._built = self._heap_calls = 0
            self._changed.clear()
            return
        state = self._entities.pop(entity, None)
        if state is not None and state.queued_needs is not None:
            self._queue = [chunk for chunk in self._queue if chunk.entity != entity]
            self._queued_by.remove(state)

    def forget_partitions(self, partitions: Iterable[int]) -> int:
        """Drop every entity whose newest reading came from one of ``partitions`` (they were revoked
        in a rebalance; the new owner replays them from the committed offset). Returns how many."""
        gone = set(partitions)
        names = [name for name, state in self._entities.items() if state.last_partition in gone]
        for name in names:
            self.reset(name)
        for partition in gone:
            self._watermark.pop(partition, None)
        return len(names)

    def _scan_key(self) -> tuple:
        """What an eviction scan's finding depends on besides time: each partition's newest slot, the
        entities come in and those moved (``evict_idle``, ``evict_excess``)."""
        return tuple(self._watermark.items()), self._arrivals, self._moves

    def silent_sensors(self) -> dict[str, tuple[str, ...]]:
        """Per entity held, its sensors None or unread in more than ``max_fill_steps`` slots in a row: each
        is scored on its ``fill_values`` value (typical), not on anything it sent (a sensor unplugged or
        dead). One pass over the entities held; cheap for those with every sensor reporting."""
        cap = self.policy.max_fill_steps
        out: dict[str, tuple[str, ...]] = {}
        for name, state in self._entities.items():
            runs = state.null_runs
            if runs is not None and max(runs) > cap:
                out[name] = tuple(sensor for sensor, run in zip(self.sensors, runs) if run > cap)
        return out

    def evict_idle(self, max_idle_slots: int) -> list[str]:
        """Drop entities whose newest reading is more than ``max_idle_slots`` slots behind the newest
        slot seen in its partition; their unsealed readings are sealed first, so the windows they end
        are still queued for ``ready()``. Returns the entities dropped.

        Why: an entity that stopped sending would otherwise pin its partition's commit offset and
        keep its buffer for ever. Stream time (the partition's newest slot), not a clock, decides, so
        a backlog being replayed does not evict everyone.

        An entity's newest slot only moves on, so none becomes idle until a partition's newest slot moves,
        a new entity comes in or one moves to another partition (``_moves``): until then the scan (every
        entity, every batch: 1.5 ms a batch with 20,000 held) is skipped.
        """
        seen = (self._scan_key(), max_idle_slots)
        if seen == self._idle_scanned:
            return []
        self._idle_scanned = seen
        idle = []
        for name, state in self._entities.items():
            newest = self._watermark.get(state.last_partition)
            if state.max_slot is not None and newest is not None and newest - state.max_slot > max_idle_slots:
                idle.append(name)
        self._drop(idle)
        return idle

    def evict_excess(self, keep: int) -> int:
        """Drop entities, down to ``keep`` if it can be done without touching an active one, as
        ``evict_idle`` drops them; returns how many went. Active: heard from in its partition's newest
        slot or the one before (plus ``grace_slots``), or holding a whole window of rows and heard from within the last window (plus a stride) of
        its partition's slots; those are never dropped here (a fleet bigger than the cap is still scored).
        The rest (an id heard from once, two slots or more ago) go most slots behind first, then those
        holding the fewest rows, then the first seen.

        Why: entities are held until an hour of silence; a producer that sends a new entity id with every
        reading (one row each, never a window) would otherwise grow the store without bound
        (``worker.max_entities``), while a fleet bigger than the cap must still be scored.

        An entity turns inactive as its partition's newest slot moves on, as it moves to another partition
        or as its run restarts after a gap (``_moves``); one that comes in may be inactive: while none of
        that happened and the last scan dropped every entity that was not active, a scan would find none
        (a fleet over the cap that is all active was scanned every batch: 2 ms with 20,000)."""
        excess = len(self._entities) - max(int(keep), 0)
        if excess <= 0:
            return 0
        if self._excess_scanned == (self._scan_key(), False):
            return 0
        watermark, w = self._watermark, self._w
        recent = w + self.policy.stride
        fresh = 1 + self.policy.grace_slots  # a slot read over several batches: the one before is fresh too
        candidates = []
        for i, (name, state) in enumerate(self._entities.items()):
            age = watermark.get(state.last_partition, 0) - (state.max_slot if state.max_slot is not None else -10**18)
            if age <= fresh or (state.n >= w and age <= recent):
                continue  # active: heard from in the partition's newest slots, or a whole window lately
            candidates.append((age, -state.n, -i, name))
        chosen = heapq.nlargest(excess, candidates)
        self._drop([name for *_, name in chosen])
        self._excess_scanned = (self._scan_key(), len(candidates) > len(chosen))  # as the drops left it
        return len(chosen)

    def _drop(self, names: Sequence[str]) -> None:
        """Forget ``names``: their unsealed readings are sealed first, so the windows they end are still
        queued for ``ready()``, and what queued windows need is kept for the commit."""
        for name in names:
            state = self._entities[name]
            if state.pending:
                self._seal(name, state, max(state.pending))
            if state.queued_needs is not None:  # its windows are still queued: keep what they need
                _merge_min(self._orphan_needs, state.queued_needs)
            del self._entities[name]


def _pending_needs(state: _Entity) -> dict[int, int]:
    """partition -> smallest offset among the entity's readings in unsealed slots."""
    needs: dict[int, int] = {}
    for _, partition, offset, _ in state.pending.values():
        if offset < needs.get(partition, offset + 1):
            needs[partition] = offset
    return needs


def _rows_needs(state: _Entity, lo: int) -> dict[int, int]:
    """partition -> smallest source offset among the entity's rows ``lo`` .. end."""
    if lo >= state.n:
        return {}
    offsets = state.src[lo:state.n].tolist()  # a row's reading's offset, or an older one it carries a sensor of
    if not state.mixed:  # the usual case: one entity, one partition
        return {state.last_partition: min(offsets)}
    out: dict[int, int] = {}
    for partition, offset in zip(state.part[lo:state.n].tolist(), offsets):
        if offset < out.get(partition, offset + 1):
            out[partition] = offset
    return out


def _merge_min(into: dict[int, int], other: Mapping[int, int]) -> None:
    for partition, offset in other.items():
        current = into.get(partition)
        if current is None or offset < current:
            into[partition] = offset
