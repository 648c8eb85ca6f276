"""Replay a recorded table or dataset series into the input topic, as live sensors would send it.

Owns three things, kept apart:

- the plan (pure): ``replay_plan`` turns a wide frame (UTC ``DatetimeIndex``, one float column per
  sensor) into a fleet's readings in time order: ``copies`` entities ``f"{entity}-{i}"``, copy ``i``
  delayed by ``i * offset_rows`` sampling periods so the fleet is not in lock-step, timestamps
  re-based to ``start_ts`` with the recorded spacing kept, NaN (and ±inf) sent as null (missing);
- pacing (pure): ``send_times`` gives each reading's wall-clock offset from the start of the replay:
  a fixed rate, the recorded spacing sped up by a factor, or as fast as possible;
- sending (I/O): ``replay`` produces each reading keyed by its entity (UTF-8) with
  ``codec.encode_reading`` as the value, waits for its send time, flushes at the end and reports.

Also the two sources the command line offers: ``frame_from_file`` (CSV/Parquet; label columns
dropped) and ``frame_from_dataset`` (a benchmark series' whole frame, e.g. SKAB ``valve1/0``).

Must not: decide anything about how readings are scored, create topics, or import ``kafka``
(clients come from ``anomaly.kafka_io``). A recording with out-of-order rows is replayed in time
order: the plan sorts (stably) by timestamp.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from anomaly import codec, kafka_io
from anomaly.codec import Reading
from anomaly.errors import ConfigError, DataError, TopicError

log = logging.getLogger(__name__)

MIN_SLEEP_S = 0.001  # shorter waits cost more than they save: we are ahead by less than a sleep's jitter
MAX_SLEEP_S = 86_400.0  # a longer wait is slept a day at a time: time.sleep overflows past ~9e9 s (--rate 1e-10)
FLUSH_TIMEOUT_S = 60.0  # the producer's own delivery timeout is 120 s; a stuck broker fails the replay sooner
DEFAULT_PERIOD_S = 1.0  # spacing assumed for a copy's delay when the recording has < 2 distinct timestamps


# --- the plan (pure) -----------------------------------------------------------------------------

class ReplayPlan:
    """A fleet's readings in time order: iterable (each iteration starts over) and sized.

    Built by ``replay_plan``; iterating yields ``(entity, Reading)``.
    """

    def __init__(self, entities: Sequence[str], sensors: Sequence[str], values: np.ndarray, offsets_s: np.ndarray,
                 order: np.ndarray, delays_s: Sequence[float], start_ts: float,
                 period_s: float = DEFAULT_PERIOD_S) -> None:
        self.entities = tuple(entities)
        self.period_s = float(period_s)  # the recording's median spacing
        self.sensors = tuple(sensors)
        self._values = values  # (T, F) float64, rows in file order
        self._offsets_s = offsets_s  # (T,) seconds since the earliest row, file order
        self._order = order  # (T,) row indices in time order (stable)
        self._delays_s = tuple(delays_s)  # per copy
        self.start_ts = float(start_ts)

    def __len__(self) -> int:
        return len(self.entities) * len(self._order)

    @property
    def span_s(self) -> float:
        """Seconds from the first reading to the last, over the whole fleet."""
        if not len(self._order):
            return 0.0
        return float(self._offsets_s[self._order[-1]] + max(self._delays_s))

    def __iter__(self) -> Iterator[tuple[str, Reading]]:
        copies = [self._copy(entity, delay) for entity, delay in zip(self.entities, self._delays_s)]
        # heapq.merge is stable: equal timestamps come in copy order, then file order.
        for _, entity, reading in heapq.merge(*copies, key=lambda item: item[0]):
            yield entity, reading

    def _copy(self, entity: str, delay_s: float) -> Iterator[tuple[float, str, Reading]]:
        sensors, values, offsets = self.sensors, self._values, self._offsets_s
        base = self.start_ts + delay_s
        for row in self._order:
            ts = base + float(offsets[row])
            reading = Reading(entity=entity, ts=ts,
                              values={name: (v if math.isfinite(v) else None)
                                      for name, v in zip(sensors, values[row].tolist())})
            yield ts, entity, reading


class FleetPlan:
    """Several entities' plans as one stream in time order (``fleet_plan``): iterable and sized, like
    ``ReplayPlan``."""

    def __init__(self, plans: Sequence[ReplayPlan]) -> None:
        self._plans = tuple(plans)
        self.entities = tuple(e for plan in self._plans for e in plan.entities)
        self.start_ts = min((plan.start_ts for plan in self._plans), default=0.0)
        self.period_s = max((plan.period_s for plan in self._plans), default=DEFAULT_PERIOD_S)

    def __len__(self) -> int:
        return sum(len(plan) for plan in self._plans)

    @property
    def span_s(self) -> float:
        return max((plan.span_s for plan in self._plans), default=0.0)

    def __iter__(self) -> Iterator[tuple[str, Reading]]:
        return heapq.merge(*self._plans, key=lambda item: item[1].ts)  # stable: equal times in plan order


def fleet_plan(frames: Mapping[str, pd.DataFrame], copies: int = 1, offset_rows: int = 0, *,
               start_ts: float | None = None, clock: Callable[[], float] = time.time) -> FleetPlan:
    """A table's entities (entity id -> its readings, ``data.entity_column``) replayed together: each
    under its own id (``<id>-<i>`` with several copies), all on one time axis from their earliest
    reading, so their recorded timing relative to each other is kept."""
    frames = {str(k): v for k, v in frames.items() if len(v)}
    if not frames:
        raise DataError("nothing to replay: no entity has a row")
    origin = min(int(f.index.as_unit("ns").asi8.min()) for f in frames.values())
    start = clock() if start_ts is None else float(start_ts)
    return FleetPlan([replay_plan(frame, entity, copies, offset_rows, start_ts=start, origin_ns=origin,
                                  names=[entity] if copies == 1 else None)
                      for entity, frame in frames.items()])


def first_readings_span_s(plan: ReplayPlan | FleetPlan, n: int) -> float:
    """Seconds from the plan's first reading (its ``start_ts``) to its ``n``-th: the span a replay stopped
    after ``n`` readings (``--limit``) covers."""
    last = None
    for _, last in itertools.islice(plan, max(0, n)):
        pass
    return 0.0 if last is None else max(0.0, last.ts - plan.start_ts)


def seconds_ahead(span_s: float, readings: int, *, speed: float | None = None, rate_per_s: float | None = None) -> float:
    """How far ahead of the wall clock the last reading's timestamp will be when it is sent (pure).

    A replay stamps its readings from now on with the recorded spacing (``span_s`` from first to last)
    but sends them ``speed`` times faster, at ``rate_per_s``, or as fast as it can (neither given): stream
    time then runs ahead of the clock, up to ``span_s`` minus the time the sending takes."""
    if speed is not None:
        sending = span_s / speed
    elif rate_per_s is not None:
        sending = readings / rate_per_s
    else:
        sending = 0.0
    return max(0.0, span_s - sending)


def replay_plan(frame: pd.DataFrame, entity: str, copies: int = 1, offset_rows: int = 0, *,
                start_ts: float | None = None, clock: Callable[[], float] = time.time,
                origin_ns: int | None = None, names: Sequence[str] | None = None) -> ReplayPlan:
    """The readings of ``copies`` entities replaying ``frame``, in time order.

    ``frame``: indexed by a ``DatetimeIndex`` (naive = UTC), every column a numeric sensor. Entity
    ``i`` is named ``f"{entity}-{i}"`` and is the series delayed by ``i * offset_rows`` sampling
    periods (the median recorded spacing), so copies are not in lock-step. Timestamps start at
    ``start_ts`` (default: ``clock()``, i.e. now) and keep the recorded spacing. NaN and ±inf values
    become ``None`` (sent as null: missing). ``origin_ns``: the recorded time (epoch ns) that ``start_ts``
    stands for (default: the frame's earliest row), so several entities' plans keep their recorded timing
    relative to each other (``fleet_plan``); ``names``: the copies' entity names instead of the stem's.
    """
    if copies < 1:
        raise ValueError(f"copies must be >= 1, got {copies}")
    if offset_rows < 0:
        raise ValueError(f"offset_rows must be >= 0, got {offset_rows}")
    if not entity or not str(entity).strip():
        raise DataError(f"cannot replay an entity with an empty or blank id: {str(entity)!r}")
    if not isinstance(frame.index, pd.DatetimeIndex):
        raise DataError(f"replay needs a frame indexed by timestamps, got a {type(frame.index).__name__}")
    if len(frame) == 0 or frame.shape[1] == 0:
        raise DataError(f"nothing to replay: the frame has {len(frame)} rows and {frame.shape[1]} columns")
    if frame.index.hasnans:
        raise DataError("nothing to replay at a missing timestamp: the frame's index has NaT")
    not_numeric = [str(c) for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])
                   or pd.api.types.is_bool_dtype(frame[c])]
    if not_numeric:
        raise DataError(f"replay sends numeric sensor columns only; not numeric: {not_numeric}")

    ns = frame.index.as_unit("ns").asi8
    offsets_s = (ns - (ns.min() if origin_ns is None else origin_ns)) / 1e9  # exact differences, then seconds
    order = np.argsort(ns, kind="stable")
    gaps = np.diff(ns[order]) / 1e9
    gaps = gaps[gaps > 0]
    period_s = float(np.median(gaps)) if gaps.size else DEFAULT_PERIOD_S
    start = clock() if start_ts is None else float(start_ts)
    if not math.isfinite(start) or start < 0:
        raise ValueError(f"start_ts must be finite epoch seconds, got {start_ts!r}")
    if names is None:
        names = [f"{entity}-{i}" for i in range(copies)]
    elif len(names) != copies:
        raise ValueError(f"{len(names)} names for {copies} copies")
    for name in names:  # a worker would dead-letter every reading of it: say so before sending any
        problem = codec.entity_problem(name)
        if problem:
            raise DataError(f"cannot replay entity {name[:80]!r}: {problem}")
    delays = [i * offset_rows * period_s for i in range(copies)]
    values = frame.to_numpy(dtype=np.float64, na_value=np.nan)
    return ReplayPlan(names, [str(c) for c in frame.columns], values, offsets_s, order, delays, start, period_s)


def newest_stamp(values: Iterable[bytes | None]) -> float | None:
    """The newest ``ts`` among input records' bytes (pure): readings, and dead letters whose ``ts`` was
    read; None when none has one."""
    newest = None
    for value in values:
        if value is None:
            continue
        ts = codec.decode_reading(value).ts
        if ts is not None and (newest is None or ts > newest):
            newest = float(ts)
    return newest


def resume_ts(bootstrap: str, topic: str, period_s: float, client_options: Mapping[str, Any] | None = None,
              clock: Callable[[], float] = time.time) -> float | None:
    """Where a replay into ``topic`` must start its stamps when not now: one ``period_s`` after the newest
    reading already on the topic, when that is later than now (an earlier replay sent faster than its
    recording stamped ahead of the clock); None when now is fine (or the topic holds no reading).

    Why: a worker drops a reading stamped well behind its partition's newest (or its entity's newest
    slot) as late, so a second sped-up replay stamped from now would go almost all unscored."""
    newest = newest_stamp(record.value for record in kafka_io.read_tail(bootstrap, topic,
                                                                        client_options=client_options))
    if newest is None or newest + period_s <= clock():
        return None
    return newest + period_s


# --- pacing (pure) -------------------------------------------------------------------------------

def send_times(timestamps: Iterable[float], rate_per_s: float | None = None,
               speed: float | None = None) -> Iterator[float]:
    """Each reading's send time in seconds after the replay starts (lazy, non-decreasing).

    - ``rate_per_s``: a fixed rate, ``k / rate_per_s`` for the k-th reading, whatever the timestamps;
    - ``speed``: the recorded spacing divided by ``speed`` (1 = real time, 10 = ten times faster);
      a timestamp earlier than one before it is sent at once rather than in the past;
    - neither: as fast as possible (all zeros). Both at once is an error.
    """
    if rate_per_s is not None and speed is not None:
        raise ValueError("give a rate (readings per second) or a speed factor, not both")
    if rate_per_s is not None and not (math.isfinite(rate_per_s) and rate_per_s > 0):
        raise ValueError(f"rate_per_s must be > 0, got {rate_per_s}")
    if speed is not None and not (math.isfinite(speed) and speed > 0):
        raise ValueError(f"speed must be > 0, got {speed}")
    return _send_times(iter(timestamps), rate_per_s, speed)


def _send_times(timestamps: Iterator[float], rate_per_s: float | None, speed: float | None) -> Iterator[float]:
    if rate_per_s is not None:
        for k, _ in enumerate(timestamps):
            yield k / rate_per_s
    elif speed is not None:
        first: float | None = None
        latest = 0.0
        for ts in timestamps:
            if first is None:
                first = ts
            latest = max(latest, (ts - first) / speed)
            yield latest
    else:
        for _ in timestamps:
            yield 0.0


# --- sending (I/O) -------------------------------------------------------------------------------

@dataclass(frozen=True)
class ReplayStats:
    """What a replay did: readings delivered and the wall time it took."""

    sent: int
    seconds: float

    @property
    def rate_per_s(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else float("inf")


class _Clock(Protocol):
    def monotonic(self) -> float: ...
    def sleep(self, seconds: float) -> None: ...


class _Producer(Protocol):
    def send(self, topic: str, value: bytes | None = ..., key: bytes | None = ...) -> Any: ...
    def flush(self, timeout: float | None = ...) -> None: ...
    def close(self, timeout: float | None = ...) -> None: ...


def _close(producer: _Producer) -> None:
    """Close ``producer``, saying (not raising) why it failed: kafka-python's close flushes first, and with
    the broker gone that times out again, which replaced the error (or Ctrl-C) that stopped the replay."""
    try:
        producer.close(timeout=5)
    except Exception as exc:
        log.warning("closing the producer failed: %s", exc)


def replay(bootstrap: str, topic: str, plan: Iterable[tuple[str, Reading]], rate_per_s: float | None = None,
           speed: float | None = None, client_options: Mapping[str, Any] | None = None, limit: int | None = None,
           progress: bool = True, clock: _Clock = time, *,
           producer_factory: Callable[..., _Producer] = kafka_io.make_producer,
           on_delivered: Callable[[], None] | None = None) -> ReplayStats:
    """Produce ``plan`` to ``topic`` paced by ``send_times``; flush; the readings delivered and seconds.

    Keys are entity ids (UTF-8), values ``codec.encode_reading``. ``limit`` stops after that many
    readings. ``clock`` provides ``monotonic()`` and ``sleep()`` (the ``time`` module; a fake in
    tests), ``producer_factory(bootstrap, client_options)`` the producer (``kafka_io.make_producer``).
    ``on_delivered()`` is called (on the producer's thread) for each reading the broker confirms, also
    for those confirmed by the flush of an interrupted or failed replay.
    Raises ``TopicError`` when the broker cannot be reached or a reading is not delivered. On an
    interrupt (Ctrl-C) what was sent so far is flushed before the interrupt propagates.
    """
    send_times((), rate_per_s, speed)  # refuses bad pacing arguments before connecting
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    total = len(plan) if hasattr(plan, "__len__") else None  # type: ignore[arg-type]
    if limit is not None:
        total = limit if total is None else min(total, limit)
        plan = itertools.islice(plan, limit)
    for_items, for_times = itertools.tee(plan)
    send_offsets = send_times((reading.ts for _, reading in for_times), rate_per_s, speed)

    try:
        producer = producer_factory(bootstrap, client_options)
    except (TopicError, ConfigError):  # kafka_io.make_producer already says why (a bad option: not the broker)
        raise
    except Exception as exc:  # another factory's NoBrokersAvailable and friends: this is the one boundary
        raise TopicError(f"cannot connect a producer to {bootstrap}: {exc} (is the broker running? "
                         "`anomaly broker` starts a local one)") from exc

    errors: list[BaseException] = []
    queued = 0
    bar = tqdm(total=total, desc=f"replay → {topic}", unit="msg", disable=not progress, smoothing=0.1)
    started = clock.monotonic()
    try:
        for (entity, reading), due in zip(for_items, send_offsets):
            wait = due - (clock.monotonic() - started)
            while wait >= MIN_SLEEP_S:
                clock.sleep(min(wait, MAX_SLEEP_S))
                wait = due - (clock.monotonic() - started)
            key, value = entity.encode("utf-8"), codec.encode_reading(reading)
            try:
                future = producer.send(topic, key=key, value=value)
            except Exception as exc:  # e.g. metadata for the topic not available within max_block_ms
                raise TopicError(f"cannot produce to {topic!r} on {bootstrap}: {exc}") from exc
            if hasattr(future, "add_errback"):
                future.add_errback(errors.append)
            if on_delivered is not None and hasattr(future, "add_callback"):
                future.add_callback(lambda _metadata: on_delivered())
            queued += 1
            bar.update(1)
    except BaseException:
        # Interrupted or failed: still deliver what was queued, but let the original error through.
        bar.close()
        try:
            producer.flush(timeout=FLUSH_TIMEOUT_S)
        except Exception as exc:
            log.warning("flushing %d queued readings after an error failed: %s", queued, exc)
        _close(producer)
        raise
    bar.close()
    try:
        producer.flush(timeout=FLUSH_TIMEOUT_S)
    except Exception as exc:  # kafka-python raises KafkaTimeoutError when the broker does not confirm in time
        raise TopicError(f"readings not confirmed by {bootstrap} within {FLUSH_TIMEOUT_S:.0f} s: {exc}") from exc
    finally:
        _close(producer)
    seconds = clock.monotonic() - started
    if errors:
        raise TopicError(f"{len(errors)} of {queued} readings were not delivered to {topic!r}: {errors[0]!r}")
    log.info("replayed %d readings to %s in %.2f s (%.0f msg/s)", queued, topic, seconds,
             queued / seconds if seconds > 0 else float("inf"))
    return ReplayStats(sent=queued, seconds=seconds)


# --- sources -------------------------------------------------------------------------------------

def frame_from_file(path: str | Path, timestamp_col: str | None = None,
                    sensors: Sequence[str] | None = None) -> pd.DataFrame:
    """A CSV/Parquet wide table's readings (label columns such as ``anomaly`` dropped)."""
    from anomaly import tables

    frame = tables.read_table(path, timestamp_col=timestamp_col, sensors=sensors)
    readings, _ = tables.split_labels(frame)
    return readings


def frame_from_dataset(name: str, data_dir: str | Path, series: str,
                       sensors: Sequence[str] | None = None) -> pd.DataFrame:
    """The whole frame (training and test rows) of one benchmark series, e.g. ``("skab", dir, "valve1/0")``,
    limited to ``sensors`` (in that order) when given."""
    from anomaly import datasets
    from anomaly.preparation import select_sensors

    if str(name).lower() == "smd":  # read one machine's files, not all of them (unknown ones raise)
        return select_sensors(datasets.load_smd(data_dir, machines=[series])[0].frame, sensors)
    loaded = datasets.load_dataset(name, data_dir)
    chosen = next((s for s in loaded if s.name == series), None)
    if chosen is None:
        raise DataError(f"no series {series!r} in {name}; e.g. {', '.join(s.name for s in loaded[:5])}")
    return select_sensors(chosen.frame, sensors)
