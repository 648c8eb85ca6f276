"""The regular sampling grid: period inference, snapping readings onto slots, gap filling and a
per-sensor quality report. Pure functions over pandas objects. No I/O, no logging of data, no
scaling and no model knowledge: callers (``anomaly.preparation``) decide what to do with the report.

Rules, in the order ``to_grid`` applies them:

1. **Grid.** Slots are ``first + k * period`` for ``k = 0 .. K`` where ``first`` is the earliest
   timestamp and slot ``K`` holds the latest one ("from first to last timestamp").
2. **Snapping.** Each reading goes to the nearest slot; a reading exactly half-way between two
   slots goes to the later one.
3. **Collisions** (duplicates, jitter, late/out-of-order readings landing in one slot): per sensor,
   **the first observed value wins**, "first" meaning the earliest timestamp and, among equal
   timestamps, the earlier row, as the streaming worker keeps each sensor's first value in a slot (a
   reading's later parts are merged while the slot is open, the rest dropped as duplicates; a model
   trained on the last of each slot was served the first). A NaN (a sensor that reported nothing)
   never stands in for a value.
4. **Missing mask.** A slot/sensor with no observed value is ``missing``. The mask is taken before
   filling, so it stays True for values that were filled as well as for those still NaN.
5. **Filling** (``fill``): ``"ffill"`` holds the last observed value, and a *leading* gap (before the
   first observation) is back-filled from the first observation; ``"linear"`` interpolates interior
   gaps linearly in time, holds the last value over a trailing gap and back-fills a leading one;
   ``"zero"`` writes 0.0; ``"none"`` leaves NaN. ``max_fill_steps`` is all-or-nothing per gap: a run
   of more than ``max_fill_steps`` consecutive missing slots is left NaN entirely (a gap that long
   is an outage, not jitter), a shorter run is filled whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import pandas as pd
from pandas.api import types as ptypes

from anomaly.errors import ConfigError, DataError

FILL_POLICIES: tuple[str, ...] = ("ffill", "linear", "zero", "none")

MAX_GRID_SLOTS = 50_000_000  # a stray timestamp years away would otherwise allocate gigabytes
MAX_GRID_CELLS = 100_000_000  # slots x sensors: 0.8 GB per float64 copy, and gridding makes several

IssueKind = Literal["constant", "flat", "mostly_missing"]


@dataclass(frozen=True)
class GridResult:
    """Readings on a regular grid."""

    frame: pd.DataFrame  # (K+1, F) float64, index: regular DatetimeIndex "ts" (input's tz; input's unit if it fits)
    missing: pd.DataFrame  # (K+1, F) bool, same index/columns: True = not observed (filled or NaN)
    period: pd.Timedelta  # slot width


@dataclass(frozen=True)
class SensorIssue:
    """A reason not to train on a sensor."""

    sensor: str
    kind: IssueKind  # "constant" | "flat" | "mostly_missing"
    detail: str  # human-readable numbers behind the verdict


INTERLEAVED_RATIO = 4  # every sensor's own period this many times the rows' spacing: rows per sensor, not per time


def infer_period(index: pd.DatetimeIndex, frame: pd.DataFrame | None = None) -> pd.Timedelta:
    """The median of the positive gaps between sorted timestamps (duplicates do not count; of an even
    count, the lower of the middle two, a gap the data has). With
    ``frame`` (readings at ``index``) whose rows do not each hold every sensor, when even the fastest
    sensor's own period (the median gap between the rows holding it) is more than
    ``INTERLEAVED_RATIO`` times that: the fastest sensor's period (a historian's export, one row per
    sensor reading a few ms apart, is not sampled every few ms).

    Raises ``DataError`` with fewer than two rows or no two distinct timestamps.
    """
    if len(index) < 2:
        raise DataError(f"cannot infer a sampling period from {len(index)} row(s); need at least 2")
    ns = _ns(pd.DatetimeIndex(index))
    overall = _median_gap(ns)
    if overall is None:
        raise DataError(f"cannot infer a sampling period: all {len(index)} timestamps are equal")
    if frame is not None and frame.shape[1] > 1:
        observed = ~np.isnan(frame.to_numpy(dtype=np.float64))
        if not observed.all():
            own = [g for j in range(observed.shape[1]) if (g := _median_gap(ns[observed[:, j]])) is not None]
            if own and min(own) > INTERLEAVED_RATIO * overall:
                return pd.Timedelta(min(own), unit="ns")
    return pd.Timedelta(overall, unit="ns")


_ROUNDINGS_NS = (10**9, 10**8, 10**7, 10**6, 10**5, 10**4, 10**3)  # 1 s .. 1 µs: a period as a logger sets it
DRIFT_LIMIT = 0.1  # of a period: how far a rounded period may drift from the readings over their whole span


def _median_gap(ns: np.ndarray) -> int | None:
    """The median positive gap between ``ns`` (int64 nanoseconds, any order), the lower of the middle
    two: a gap the data has (100 rows 1 s apart, then 101 2 s apart, are not sampled every 1.5 s, a grid
    on which a third of the readings collide); None with none.

    Where most gaps near it differ from it (readings stamped with jitter), the median is off by about
    the jitter over the square root of the count (1.000039 s for 1 s ± 5 ms stamped in µs: 20,000 readings
    drifted 0.8 s over the grid, and 73 of them collided); the mean of those gaps is not (each reading's
    jitter cancels in the next gap), then rounded as coarsely (1 s, 100 ms, ... 1 µs) as keeps the drift
    over the readings' span under a tenth of a period: the period the logger was set to."""
    gaps = np.diff(np.sort(ns))
    gaps = gaps[gaps > 0]
    if not gaps.size:
        return None
    median = int(np.partition(gaps, (gaps.size - 1) // 2)[(gaps.size - 1) // 2])
    near = gaps[(gaps > median // 2) & (gaps < median + median // 2)]  # not a missed slot, not a burst
    if near.size < 2 or np.count_nonzero(near == median) * 2 >= near.size:
        return median  # on a clean clock (at most some odd gaps, as NAB's series have): the median is exact
    mean = float(near.sum()) / near.size
    steps = float(ns.max() - ns.min()) / mean  # periods the readings span
    for unit in _ROUNDINGS_NS:
        rounded = round(mean / unit) * unit
        if rounded > 0 and abs(rounded - mean) * steps < DRIFT_LIMIT * mean:
            return int(rounded)
    return int(round(mean))


def nearest_slots(ns: np.ndarray, origin: int, period_ns: int) -> np.ndarray:
    """The slot of each of ``ns`` (int64 nanoseconds) on the grid of ``period_ns`` from ``origin``: the
    nearest one, exactly half-way the later one (whole nanoseconds: no float rounds a half down)."""
    return (ns - origin + period_ns // 2) // period_ns


def to_grid(frame: pd.DataFrame, period: pd.Timedelta | None = None, fill: str = "ffill",
            max_fill_steps: int | None = None) -> GridResult:
    """Put ``frame``'s readings on a regular grid of ``period`` (default: ``infer_period``) and fill
    gaps by ``fill``; see the module docstring for the exact rules. ``frame`` is not modified.

    Raises ``ConfigError`` for an unknown fill policy, a non-positive period or a negative
    ``max_fill_steps``; ``DataError`` for an empty frame, a single row without ``period``, a
    non-datetime index, a missing timestamp, a non-numeric column (group by entity first) or a grid
    that would be absurdly large.
    """
    if fill not in FILL_POLICIES:
        raise ConfigError("data.fill", f"unknown fill policy {fill!r}; expected one of {', '.join(FILL_POLICIES)}")
    if max_fill_steps is not None and max_fill_steps < 0:
        raise ConfigError("data.max_fill_steps", f"must be >= 0 or empty, got {max_fill_steps}")
    if not isinstance(frame.index, pd.DatetimeIndex):
        raise DataError(f"to_grid needs a DatetimeIndex, got {type(frame.index).__name__}")
    if len(frame) == 0:
        raise DataError("no readings to put on the grid: the table has no data rows")
    if frame.index.hasnans:
        raise DataError("to_grid: missing timestamp (NaT) in the index")
    _check_numeric(frame)
    if period is None:
        period = infer_period(frame.index, frame)
    period = pd.Timedelta(period)
    if period <= pd.Timedelta(0):
        raise ConfigError("data.period_s", f"sampling period must be positive, got {period}")

    ns = _ns(frame.index)
    p = int(period / pd.Timedelta(1, unit="ns"))
    origin = int(ns.min())
    slots = nearest_slots(ns, origin, p)
    n_slots = int(slots.max()) + 1
    if n_slots > MAX_GRID_SLOTS or n_slots * max(frame.shape[1], 1) > MAX_GRID_CELLS:
        raise DataError(f"to_grid: {n_slots} slots of {period} x {frame.shape[1]} sensors between "
                        f"{frame.index.min()} and {frame.index.max()}; check for stray timestamps or a wrong period")

    order = np.lexsort((np.arange(len(ns)), ns))  # by time, then by row: the first one wins
    values = pd.DataFrame(frame.to_numpy(dtype=np.float64)[order], columns=frame.columns)
    per_slot = values.groupby(slots[order], sort=True).first()  # first non-NaN per column
    dense = np.full((n_slots, frame.shape[1]), np.nan)
    dense[per_slot.index.to_numpy()] = per_slot.to_numpy(dtype=np.float64)

    grid_index = pd.DatetimeIndex(frame.index.min() + pd.to_timedelta(np.arange(n_slots) * p, unit="ns"),
                                  name="ts")
    unit = frame.index.unit  # keep the input's resolution (pandas 3: s/ms/us/ns) when the grid fits it
    if p % int(pd.Timedelta(1, unit=unit) / pd.Timedelta(1, unit="ns")) == 0:
        grid_index = grid_index.as_unit(unit)
    missing = np.isnan(dense)
    filled = _fill(dense, missing, fill, max_fill_steps)
    return GridResult(frame=pd.DataFrame(filled, index=grid_index, columns=frame.columns),
                      missing=pd.DataFrame(missing, index=grid_index, columns=frame.columns),
                      period=period)


def sensor_quality(frame: pd.DataFrame, missing: pd.DataFrame | None = None, *, max_missing_fraction: float = 0.5,
                   flat_rel_std: float = 1e-6) -> list[SensorIssue]:
    """Sensors not fit to train on, judged on their **observed** values only (``missing`` True or NaN
    excluded), in column order; a sensor may have two issues (mostly missing and constant).

    - ``"mostly_missing"``: missing fraction above ``max_missing_fraction``, or nothing observed; the
      fraction is of the rows where some sensor was observed (an outage of the whole table, a plant
      stopped overnight, is no sensor's fault);
    - ``"constant"``: exactly one distinct observed value;
    - ``"flat"``: not constant, but std / max|value| below ``flat_rel_std`` (scale-free; the largest
      magnitude is used rather than the mean so that a signal centred on 0 is not called flat).
    """
    _check_numeric(frame)
    values = frame.to_numpy(dtype=np.float64)
    absent = np.isnan(values)
    if missing is not None:
        if missing.shape != frame.shape:
            raise DataError(f"sensor_quality: missing mask shape {missing.shape} differs from the frame's {frame.shape}")
        absent |= missing.to_numpy(dtype=bool)
    issues: list[SensorIssue] = []
    n = int((~absent.all(axis=1)).sum())  # rows where some sensor reported
    for j, sensor in enumerate(frame.columns):
        name = str(sensor)
        observed = values[~absent[:, j], j]
        n_missing = n - observed.size
        if observed.size == 0:
            issues.append(SensorIssue(name, "mostly_missing", f"no observed value in {len(frame)} rows"))
            continue
        if n_missing / n > max_missing_fraction:
            issues.append(SensorIssue(name, "mostly_missing",
                                      f"{n_missing} of the {n} rows with a reading missing ({n_missing / n:.1%} > "
                                      f"{max_missing_fraction:.1%})"))
        lo, hi = observed.min(), observed.max()
        if lo == hi:
            issues.append(SensorIssue(name, "constant", f"always {lo:g} ({observed.size} observed rows)"))
            continue
        rel = float(observed.std() / max(abs(lo), abs(hi)))
        if rel < flat_rel_std:
            issues.append(SensorIssue(name, "flat", f"relative std {rel:.3g} < {flat_rel_std:g} (mean {observed.mean():g})"))
    return issues


def usable_sensors(frame: pd.DataFrame, issues: Sequence[SensorIssue]) -> list[str]:
    """``frame``'s columns, in order, that have no issue."""
    bad = {i.sensor for i in issues}
    return [str(c) for c in frame.columns if str(c) not in bad]


# --- helpers -------------------------------------------------------------------------------------

def _ns(index: pd.DatetimeIndex) -> np.ndarray:
    """Timestamps as int64 nanoseconds (pandas 3 may hold s/ms/us units); ``DataError`` for times that
    nanoseconds cannot hold (before 1677 or after 2262)."""
    try:
        return index.as_unit("ns").asi8
    except (pd.errors.OutOfBoundsDatetime, OverflowError) as exc:
        raise DataError(f"timestamps out of range (1677-2262): {index.min()} .. {index.max()}") from exc


def _check_numeric(frame: pd.DataFrame) -> None:
    for col in frame.columns:
        dtype = frame[col].dtype
        if not (ptypes.is_numeric_dtype(dtype) or ptypes.is_bool_dtype(dtype)):
            raise DataError(f"column {col!r} is not numeric ({dtype}); grid one entity's sensor columns at a time")


def _fill(dense: np.ndarray, missing: np.ndarray, fill: str, max_fill_steps: int | None) -> np.ndarray:
    if fill == "none" or not missing.any():
        return dense.copy()
    frame = pd.DataFrame(dense)
    if fill == "zero":
        out = frame.fillna(0.0).to_numpy(copy=True)
    elif fill == "ffill":
        out = frame.ffill().bfill().to_numpy(copy=True)  # bfill only reaches leading gaps after a full ffill
    else:  # linear: interior by position (= time on a regular grid), edges held
        out = frame.interpolate(method="linear", limit_area="inside").ffill().bfill().to_numpy(copy=True)
    if max_fill_steps is not None:
        out[missing & (run_lengths(missing) > max_fill_steps)] = np.nan
    return out


def outage_rows(no_reading: np.ndarray, steps: int) -> np.ndarray:
    """(T,) rows in a run of more than ``steps`` rows in a row with no reading (``no_reading`` (T,) bool):
    where the worker restarts an entity's window, and no window over one is scored."""
    no_reading = np.asarray(no_reading, dtype=bool)
    return no_reading & (run_lengths(no_reading[:, None])[:, 0] > steps)


def run_lengths(mask: np.ndarray) -> np.ndarray:
    """For each True cell, the length of the run of consecutive True cells (down its column) it is
    in; 0 elsewhere."""
    out = np.zeros(mask.shape, dtype=np.int64)
    for j in range(mask.shape[1]):
        col = mask[:, j]
        if not col.any():
            continue
        edges = np.diff(np.r_[0, col.astype(np.int8), 0])
        starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        run = np.cumsum(edges[:-1] == 1) - 1  # index of the latest run started at or before each row
        out[:, j] = np.where(col, (ends - starts)[np.maximum(run, 0)], 0)
    return out


SAMPLING_TOLERANCE = 0.25  # readings' median spacing this far (relative) from a grid's period is said


def sampling_mismatch(index: pd.DatetimeIndex, period_s: float | None, frame: pd.DataFrame | None = None) -> float | None:
    """The sampling period of readings at ``index`` (``infer_period``, of their sensor columns ``frame``
    where given: a sensor per row is read as the grid reads it) when it differs from ``period_s`` by
    more than ``SAMPLING_TOLERANCE`` of it, else None (also with fewer than two distinct timestamps)."""
    if not period_s:
        return None
    try:
        spacing = infer_period(index, frame).total_seconds()
    except DataError:  # fewer than two distinct timestamps: nothing to compare
        return None
    return spacing if abs(spacing - period_s) > SAMPLING_TOLERANCE * period_s else None
