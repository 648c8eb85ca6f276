"""From a raw wide table to model input: regular grid, gap filling, sensor screening. No I/O.

Sensors that are constant, flat or mostly missing in the training data are reported and left out
instead of being trained on silently; the report travels with the run (MLflow) and the model.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from anomaly.errors import DataError
from anomaly.grid import (SAMPLING_TOLERANCE, SensorIssue, nearest_slots, outage_rows, sampling_mismatch, sensor_quality,
                          to_grid, usable_sensors)
from anomaly.windowing import exclusion_mask, n_windows, windows_touching

log = logging.getLogger(__name__)

# Whose data the warnings below are about ("entity pump-1"), and whether they are said at all (a fleet's
# second pass over an entity would say them again): set by ``about``.
_ABOUT: contextvars.ContextVar[tuple[str, bool]] = contextvars.ContextVar("preparation_about", default=("", False))


@contextlib.contextmanager
def about(who: str, quiet: bool = False) -> Iterator[None]:
    """Within it, this module's warnings about the data name ``who`` (``quiet``: are not said)."""
    token = _ABOUT.set((who, quiet))
    try:
        yield
    finally:
        _ABOUT.reset(token)


def _warn(message: str, *args: object) -> None:
    who, quiet = _ABOUT.get()
    if not quiet:
        log.warning("%s" + message, f"{who}: " if who else "", *args)


@dataclass
class Prepared:
    timestamps: pd.DatetimeIndex
    values: np.ndarray  # (T, F) gap-free readings in original units, columns in ``sensors`` order
    sensors: list[str]
    missing: np.ndarray  # (T, F) bool: the value was not observed (it was filled)
    period_s: float
    issues: list[SensorIssue] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    # (T,) bool: rows inside a gap the fill policy does not bridge (longer than ``max_fill_steps``, before a
    # sensor's first reading, or any gap with ``fill = "none"``). ``values`` holds stand-ins there so arrays
    # stay gap-free, but no window touching such a row trains, validates, or gets a score. None: no such row.
    gaps: np.ndarray | None = None
    # the entities whose rows these are, for a model shared by a fleet (``prepare_fleet``); empty: one series
    entities: list[str] = field(default_factory=list)
    # entity -> the (start, end) row ranges of ``values`` holding its validation rows (``prepare_fleet``, a
    # retrain's challenger): where its own threshold is fitted (``train_job.entity_thresholds``)
    entity_tails: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    # grid rows kept out of training because ground truth marks them anomalous (or they lie within the
    # margin around such a row): counted in ``gaps`` too, so no window touching them trains or validates
    labelled_out: int = 0

    def gap_windows(self, window_size: int) -> np.ndarray:
        """(T - W + 1,) bool: the windows of ``window_size`` rows that touch a gap row."""
        if self.gaps is None:
            return np.zeros(n_windows(len(self.values), window_size), dtype=bool)
        return windows_touching(self.gaps, window_size)

    def report(self) -> dict[str, object]:
        return {"sensors": self.sensors, "dropped": self.dropped, "rows": len(self.values),
                **({"entities": self.entities} if self.entities else {}),
                **({"labelled_rows_left_out": self.labelled_out} if self.labelled_out else {}),
                "period_s": self.period_s, "missing_fraction": float(self.missing.mean()) if self.missing.size else 0.0,
                "issues": [{"sensor": i.sensor, "kind": i.kind, "detail": i.detail} for i in self.issues]}


def prepare_training(frame: pd.DataFrame, sensors: Sequence[str] | None = None, period_s: float | None = None,
                     fill: str = "ffill", max_fill_steps: int | None = None,
                     max_missing_fraction: float = 0.5, labels: np.ndarray | None = None,
                     margin_rows: int = 0, outage_steps: int | None = None) -> Prepared:
    """Grid, fill and screen training data; the sensors kept are those fit to train on. ``labels``
    (ground truth, row for row with ``frame``): the grid rows of anomalous readings, and ``margin_rows``
    on each side, are left out of training (``leave_out_labelled``). ``outage_steps``: a run of more than
    this many slots in which no sensor reported is a gap, whatever ``max_fill_steps`` (the worker restarts
    its window after such an outage; training on it filled would learn a flat line as normal)."""
    prepared = _prepare_training(frame, sensors, period_s, fill, max_fill_steps, max_missing_fraction, outage_steps)
    if labels is not None:
        prepared = leave_out_labelled(prepared, frame.index, labels, margin_rows)
    return screen_kept_rows(prepared)


def screen_kept_rows(prepared: Prepared) -> Prepared:
    """``prepared`` without the sensors that are constant, flat or never observed on the rows that train (outside
    ``gaps``), reported and dropped as the first screening drops them. A sensor that moves only in a
    labelled fault, an outage or before the others' first readings passed the screening of every row,
    then trained constant: scale 1, its error in raw units swamping (or vanishing beside) the others'."""
    if prepared.gaps is None or not prepared.gaps.any():
        return prepared
    kept = ~prepared.gaps
    frame = pd.DataFrame(prepared.values[kept], columns=prepared.sensors)
    missing = pd.DataFrame(prepared.missing[kept], columns=prepared.sensors)
    # (max_missing_fraction 1: "mostly missing" only where nothing was observed on these rows, a sensor that
    # reports only in a labelled fault: it would train on its held value alone)
    issues = [SensorIssue(i.sensor, i.kind, f"{i.detail} on the rows that train")
              for i in sensor_quality(frame, missing, max_missing_fraction=1.0)
              if i.kind in ("constant", "flat", "mostly_missing")]
    if not issues:
        return prepared
    bad = {i.sensor for i in issues}
    for issue in issues:
        _warn("sensor %s: %s (%s) - left out", issue.sensor, issue.kind, issue.detail)
    keep = [j for j, name in enumerate(prepared.sensors) if name not in bad]
    if not keep:
        raise DataError("no usable sensor on the rows that train (outside labelled faults, outages and gaps): "
                        + "; ".join(f"{i.sensor}: {i.kind} ({i.detail})" for i in issues))
    return dataclasses.replace(prepared, values=prepared.values[:, keep], missing=prepared.missing[:, keep],
                               sensors=[prepared.sensors[j] for j in keep], issues=[*prepared.issues, *issues],
                               dropped=[*prepared.dropped, *(s for s in prepared.sensors if s in bad)])


def _prepare_training(frame: pd.DataFrame, sensors: Sequence[str] | None, period_s: float | None, fill: str,
                      max_fill_steps: int | None, max_missing_fraction: float, outage_steps: int | None) -> Prepared:
    frame = _select(first_readings(frame), sensors)
    period = pd.Timedelta(seconds=period_s) if period_s else None
    say_spacing(frame, period_s, "data.period_s", "trains")
    grid = to_grid(frame, period=period, fill=fill, max_fill_steps=max_fill_steps)
    issues = sensor_quality(grid.frame, grid.missing, max_missing_fraction=max_missing_fraction)
    keep = usable_sensors(grid.frame, issues)
    dropped = [s for s in grid.frame.columns if s not in keep]
    for issue in issues:
        _warn("sensor %s: %s (%s)%s", issue.sensor, issue.kind, issue.detail,
              " - left out" if issue.sensor in dropped else "")
    if not keep:
        said = "; ".join(f"{i.sensor}: {i.kind} ({i.detail})" for i in issues)
        raise DataError(f"no usable sensor: every column is constant, flat or mostly missing - {said}")
    before = _back_filled(grid.missing[keep], fill)
    return _finish(grid.frame[keep], grid.missing[keep], grid.period, issues, dropped,
                   _either(None if before is None else _late_rows(before, keep), _outages(grid.missing[keep], outage_steps)))


def say_spacing(frame: pd.DataFrame, period_s: float | None, grid: str, doing: str) -> None:
    """Warn where ``frame``'s readings (its sensor columns) are spaced more than ``SAMPLING_TOLERANCE`` off
    the grid's ``period_s`` (``grid`` names it; ``doing``: what happens to the one reading of a slot)."""
    spacing = sampling_mismatch(frame.index, period_s, frame)
    if spacing is not None:
        _warn("readings are %g s apart (median) where %s is %g s: %s", spacing, grid, period_s,
              "slots between readings are filled, not read" if spacing > period_s
              else f"several readings fall on one slot and only one of them {doing}")


def _outages(missing: pd.DataFrame, steps: int | None) -> np.ndarray | None:
    """(T,) rows in a run of more than ``steps`` slots in which no sensor reported (None: none, or no ``steps``)."""
    if steps is None or missing.shape[1] == 0:
        return None
    silent = missing.to_numpy(dtype=bool).all(axis=1)
    outage = outage_rows(silent, steps)
    if not outage.any():
        return None
    _warn("%d grid rows lie in outages (more than %d slots in a row with no reading from any sensor); windows "
          "touching them are left out, as the worker restarts its window after one", int(outage.sum()), steps)
    return outage


def _either(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
    return a if b is None else b if a is None else a | b


MANY_REPEATS = 0.1  # a share of readings repeating a timestamp that suggests several assets in one series


def first_readings(frame: pd.DataFrame, doing: str = "trained on") -> pd.DataFrame:
    """``frame`` with one row per timestamp: each sensor's first value at it, as the streaming worker keeps
    the first reading of a slot (a later one is a duplicate). Rows stamped alike that give different
    sensors (a sensor per row) are one reading, merged; a row giving a sensor an earlier row at its
    timestamp gave repeats that reading: left out, and said (``doing``: what is done with the first),
    with, when they are many, a word that the table may hold several assets under one series (no
    ``data.entity_column``)."""
    if frame.index.hasnans:  # grouping would drop those rows without a word (to_grid refuses them)
        raise DataError(f"missing timestamp (NaT) in {int(frame.index.isna().sum())} row(s)")
    alike = frame.index.duplicated(keep=False)
    if not alike.any():
        return frame
    given = frame[alike].notna()
    repeated = ((given.groupby(level=0, sort=False).cumsum() > 1) & given).any(axis=1)
    merged = frame.groupby(level=0, sort=False).first()  # each column's first value at each timestamp
    merged.index.name = frame.index.name
    n = int(repeated.sum())
    if not n:
        return merged
    many = n > MANY_REPEATS * len(frame)
    _warn("%d reading%s an earlier one's timestamp and %s left out: the first is %s, as the streaming worker "
          "keeps it%s", n, "s repeat" if n > 1 else " repeats", "are" if n > 1 else "is", doing,
          "; so many repeats suggest several assets' readings in one series: name their column with "
          "data.entity_column" if many else "")
    return merged


def leave_out_labelled(prepared: Prepared, index: pd.DatetimeIndex, labels: np.ndarray, margin_rows: int) -> Prepared:
    """``prepared`` with the grid rows of the anomalous readings (``labels``, bool, for readings at
    ``index``) and ``margin_rows`` on each side marked as gaps: no window touching them trains or
    validates, and the scaler does not see them. Anomalies must not be learnt as normal."""
    on_grid = labels_on_grid(index, np.asarray(labels, dtype=bool), prepared)
    if not on_grid.any():
        return prepared
    out = exclusion_mask(len(on_grid), np.flatnonzero(on_grid), 1, margin_rows)
    gaps = out if prepared.gaps is None else prepared.gaps | out
    log.info("%d grid rows labelled anomalous, with %d rows on each side: %d rows left out of training",
             int(on_grid.sum()), margin_rows, int(out.sum()))
    if gaps.all():
        raise DataError(f"every one of the {len(gaps)} rows is labelled anomalous, within {margin_rows} rows of "
                        f"such a row, or in a gap: no normal data to train on")
    newly = out if prepared.gaps is None else out & ~prepared.gaps  # rows a gap held out already are not counted
    return dataclasses.replace(prepared, gaps=gaps, labelled_out=prepared.labelled_out + int(newly.sum()))


def prepare_scoring(frame: pd.DataFrame, sensors: Sequence[str], period_s: float | None = None,
                    fill: str = "ffill", max_fill_steps: int | None = None,
                    fill_values: Sequence[float] | None = None, late_as_gaps: bool = False,
                    outage_steps: int | None = None) -> Prepared:
    """Grid and fill data to be scored (or trained on, in a fleet or a retrain), keeping exactly the
    model's sensors. Before a sensor's first reading, the ``ffill`` and ``linear`` policies back-fill
    it from that reading; instead, ``fill_values`` (the model's typical value per sensor) stand in there,
    as the worker and the MLflow model fill it, and ``late_as_gaps`` marks those rows as gaps (training
    data: not made up from a later reading).

    With ``fill_values`` and ``max_fill_steps`` (scoring, not ``late_as_gaps``), a sensor silent for
    longer than ``max_fill_steps`` slots while others report is filled as the worker fills it: its last
    value for ``max_fill_steps`` slots, then its typical value. Only slots without any reading, in a run
    longer than ``max_fill_steps``, stay gaps (the worker restarts its window after such an outage), and so
    do runs of more than ``outage_steps`` such slots (``prepare_training``)."""
    frame = _select(frame, sensors)
    period = pd.Timedelta(seconds=period_s) if period_s else None
    grid = to_grid(frame, period=period, fill=fill, max_fill_steps=max_fill_steps)
    values, missing = grid.frame[list(sensors)], grid.missing[list(sensors)]
    before = _back_filled(missing, fill)
    late = _late_rows(before, missing.columns) if late_as_gaps and before is not None else None
    if fill_values is not None and (before is not None or (max_fill_steps is not None and not late_as_gaps
                                                           and fill in _BACK_FILLED)):
        filled = values.to_numpy(dtype=np.float64, copy=True)
        typical = np.broadcast_to(np.asarray(fill_values, dtype=np.float64), filled.shape)
        if before is not None:
            filled[before] = typical[before]
            if not late_as_gaps:
                _warn("sensors silent from the start, their typical value standing in until their first reading "
                      "(as the worker fills them; scores there rest on made-up values), slots: %s",
                      {str(name): int(k) for name, k in zip(missing.columns, before.sum(axis=0)) if k})
        if max_fill_steps is not None and not late_as_gaps and fill in _BACK_FILLED:
            _fill_silent_sensors(filled, missing.to_numpy(dtype=bool), typical, max_fill_steps, list(missing.columns))
        values = pd.DataFrame(filled, index=values.index, columns=values.columns)
    return _finish(values, missing, grid.period, [], [], _either(late, _outages(missing, outage_steps)))


def _fill_silent_sensors(filled: np.ndarray, missing: np.ndarray, typical: np.ndarray, max_fill_steps: int,
                         sensors: Sequence[object] = ()) -> None:
    """In place: cells the grid left unfilled (a sensor's run of missing slots longer than
    ``max_fill_steps``) in slots where some sensor reported take the sensor's last value for
    ``max_fill_steps`` slots, then ``typical``, as the streaming worker fills a silent sensor."""
    left = np.isnan(filled)
    if not left.any():
        return
    no_reading = missing.all(axis=1)
    outage = outage_rows(no_reading, max_fill_steps)
    patch = left & ~outage[:, None]
    if not patch.any():
        return
    held = pd.DataFrame(np.where(missing, np.nan, filled)).ffill(limit=max_fill_steps).to_numpy()
    filled[patch] = np.where(np.isnan(held), typical, held)[patch]
    stood_in = (patch & np.isnan(held)).sum(axis=0)
    if stood_in.any():
        _warn("sensors silent for more than %d slots while others report, their typical value standing in (as the "
              "worker fills them; scores there rest on made-up values): %s", max_fill_steps,
              {str(name): int(n) for name, n in zip(sensors, stood_in) if n})


_BACK_FILLED = ("ffill", "linear")  # the grid's fill policies that back-fill a sensor's leading gap


def _back_filled(missing: pd.DataFrame, fill: str) -> np.ndarray | None:
    """(T, F) cells before their sensor's first observed value, which ``fill`` back-filled from it (None:
    none, or a policy that does not back-fill)."""
    if fill not in _BACK_FILLED:
        return None
    before = np.cumsum(~missing.to_numpy(dtype=bool), axis=0) == 0
    return before if before.any() else None


def _late_rows(before: np.ndarray, sensors: Sequence[object]) -> np.ndarray:
    """Rows before some sensor's first reading (training leaves them out); says which sensors start late."""
    starts = {str(s): int(n) for s, n in zip(sensors, before.sum(axis=0)) if n}
    _warn("sensors that start reporting late (grid rows before each one's first reading): %s; those rows are "
          "left out of training, not back-filled from a later reading", starts)
    return before.any(axis=1)


def fill_rows(values: np.ndarray) -> np.ndarray:
    """Forward- then back-fill NaNs along rows of a (T, F) array (row order = time order); a column
    with no value at all becomes 0. Used where rows are not re-gridded (benchmark protocols)."""
    frame = pd.DataFrame(np.asarray(values, dtype=np.float64))
    return frame.ffill().bfill().fillna(0.0).to_numpy()


def fill_rows_split(values: np.ndarray, train_rows: int) -> np.ndarray:
    """``fill_rows`` that never fills a training row from a later one: the first ``train_rows`` rows are
    filled on their own, the rest forward-filled on from them (a back-fill over the whole series would
    carry a test value into the training rows, and so into the scaler and the threshold)."""
    values = np.asarray(values, dtype=np.float64)
    train = fill_rows(values[:train_rows])
    if train_rows >= len(values):
        return train
    if not len(train):
        return fill_rows(values)
    rest = pd.DataFrame(np.vstack([train[-1:], values[train_rows:]])).ffill().to_numpy()[1:]
    return np.vstack([train, rest])


def select_sensors(frame: pd.DataFrame, sensors: Sequence[str] | None, source: str = "the data") -> pd.DataFrame:
    """``frame`` with only ``sensors``, in that order (all of it when None or empty); a sensor the frame
    lacks is a ``DataError`` naming ``source``. Training, the protocols and replays select alike: a
    reading must carry exactly the sensors of its entity's model (DESIGN §2)."""
    if not sensors:
        return frame
    missing = [s for s in sensors if s not in frame.columns]
    if missing:
        raise DataError(f"sensors not in {source}: {missing}; its columns are {[str(c) for c in frame.columns]}")
    return frame[list(sensors)]


def _select(frame: pd.DataFrame, sensors: Sequence[str] | None) -> pd.DataFrame:
    if any(not isinstance(c, str) for c in frame.columns):  # sensors are named by strings everywhere downstream
        frame = frame.rename(columns=str)
    if sensors:
        return select_sensors(frame, sensors)
    numeric = frame.select_dtypes(["number", "bool"])  # a bool column is a 0/1 sensor (a valve open, a pump on)
    skipped = [c for c in frame.columns if c not in numeric.columns]
    if skipped:
        log.warning("columns left out, not numbers: %s", skipped)
    if numeric.shape[1] == 0:
        raise DataError(f"no numeric sensor column in {list(frame.columns)}")
    return numeric


def _finish(frame: pd.DataFrame, missing: pd.DataFrame, period: pd.Timedelta, issues: list[SensorIssue],
            dropped: list[str], late: np.ndarray | None = None) -> Prepared:
    """``late``: rows that are gaps though filled (before a sensor's first reading, in an outage: training
    does not make them up)."""
    raw = frame.to_numpy(dtype=np.float64)
    gaps = np.isnan(raw).any(axis=1)  # what the grid's fill policy left unfilled
    if late is not None:
        gaps = gaps | late
    if gaps.any():
        _warn("%d of %d grid rows lie in gaps the fill policy does not bridge%s; windows touching them "
              "are left out", int(gaps.sum()), len(gaps),
              "" if late is None else ", an outage, or before a sensor's first reading")
    return Prepared(timestamps=pd.DatetimeIndex(frame.index), values=fill_rows(raw), sensors=list(frame.columns),
                    missing=missing.to_numpy(dtype=bool), period_s=float(period.total_seconds()),
                    issues=issues, dropped=dropped, gaps=gaps if gaps.any() else None)


def prepare_fleet(frames: Mapping[str, pd.DataFrame], window_size: int, validation_fraction: float,
                  sensors: Sequence[str] | None = None, period_s: float | None = None, fill: str = "ffill",
                  max_fill_steps: int | None = None, max_missing_fraction: float = 0.5,
                  labels: Mapping[str, np.ndarray] | None = None, margin_rows: int = 0,
                  outage_steps: int | None = None) -> Prepared:
    """One model's training data from several entities' tables (entity -> readings): a model shared by
    a fleet of one asset type. ``labels`` (entity -> ground truth, row for row with its table): each
    entity's anomalous rows, and ``margin_rows`` on each side, are left out (``leave_out_labelled``).

    Each entity is gridded on its own (one common period: ``period_s``, else the median of the
    entities' own, the lower of the middle two; entities sampled more than 25 % off it are named) and screened on its own; the sensors kept are those fit to train on in every
    entity (a sensor flat in one pump is reported, with the pump, and left out for all). Entities with
    fewer than ``2 * window_size`` rows, or none fit to train on (every sensor flat: a pump offline all
    along), are left out, with a warning. The rows are laid end to end as
    every entity's first ``1 - validation_fraction``, then every entity's last part, and training
    validates on exactly those last parts (``entity_tails``; ``train_job.validation_row``): each entity
    trains on its older rows and validates on its recent ones, not the last entities on nothing but
    validation. A stand-in row marked as a gap (``gaps``)
    sits between every two parts, so no window spans two entities or an entity's two parts."""
    if not frames:
        raise DataError("no entity to train on")
    given, frames = frames, {}
    for e, f in given.items():
        with about(f"entity {e}"):
            frames[e] = first_readings(f)
    usable: dict[str, Prepared] = {}
    unfit: dict[str, str] = {}  # entity -> why it cannot train (no usable sensor, a sensor it lacks)
    for entity, frame in frames.items():
        prepared = None
        if len(frame) >= 2 * window_size:
            try:
                with about(f"entity {entity}"):
                    prepared = prepare_training(frame, sensors=sensors, period_s=period_s, fill=fill,
                                                max_fill_steps=max_fill_steps,
                                                max_missing_fraction=max_missing_fraction, outage_steps=outage_steps)
            except DataError as exc:  # one pump offline all along must not stop the fleet's model
                unfit[entity] = str(exc)
                log.warning("entity %s: %s; left out", entity, exc)
                continue
        rows = len(frame) if prepared is None else len(prepared.values)
        if rows < 2 * window_size:
            log.warning("entity %s: %d rows, fewer than 2 windows of %d; left out", entity, rows, window_size)
        else:
            usable[entity] = prepared
    if not usable:
        raise DataError(f"no entity has {2 * window_size} rows (two windows of {window_size}) fit to train on"
                        + "".join(f"; entity {e}: {why}" for e, why in unfit.items()))
    order = list(next(iter(usable.values())).sensors)
    kept = [s for s in order if all(s in p.sensors for p in usable.values())]
    if not kept:
        raise DataError("no sensor is fit to train on in every entity: "
                        + "; ".join(f"{e}: {p.sensors}" for e, p in usable.items()))
    issues = [SensorIssue(i.sensor, i.kind, f"{e}: {i.detail}") for e, p in usable.items() for i in p.issues]
    candidates = dict.fromkeys(s for p in usable.values() for s in p.sensors + p.dropped)
    dropped = [s for s in candidates if s not in kept]
    for sensor in dropped:
        where = [e for e, p in usable.items() if sensor not in p.sensors]
        log.warning("sensor %s: left out for the whole fleet (not fit to train on in %s)", sensor, ", ".join(where))
    common = period_s or _fleet_period({e: p.period_s for e, p in usable.items()})
    grids = {}
    for e in usable:
        # its gaps were said as it was screened, on its own period: again where the shared one differs
        with about(f"entity {e}", quiet=usable[e].period_s == common):
            grids[e] = prepare_scoring(frames[e], kept, period_s=common, fill=fill, max_fill_steps=max_fill_steps,
                                       late_as_gaps=True, outage_steps=outage_steps)
    for e, grid in list(grids.items()):  # rows counted on its own period: fewer where the shared one is longer
        if len(grid.values) < 2 * window_size:
            log.warning("entity %s: %d rows on the shared grid of %g s, fewer than 2 windows of %d; left out",
                        e, len(grid.values), common, window_size)
            del grids[e]  # (not all: the shared period is one of the entities' own)
    if labels:
        grids = {e: leave_out_labelled(g, given[e].index, labels[e], margin_rows) if e in labels else g
                 for e, g in grids.items()}
    heads, tails = [], []
    for entity, grid in grids.items():
        cut = len(grid.values) - max(window_size, int(round(len(grid.values) * validation_fraction)))
        heads.append((entity, grid, 0, cut, False))
        tails.append((entity, grid, cut, len(grid.values), True))
    values, missing, gaps, stamps = [], [], [], []
    entity_tails: dict[str, list[tuple[int, int]]] = {}
    row = 0
    for k, (entity, grid, a, b, tail) in enumerate(heads + tails):
        if k:  # a stand-in between two parts: no window may touch it
            values.append(values[-1][-1:])
            missing.append(np.ones((1, len(kept)), dtype=bool))
            gaps.append(np.ones(1, dtype=bool))
            stamps.append(stamps[-1][-1:])
            row += 1
        if tail:
            entity_tails[entity] = [(row, row + b - a)]
        row += b - a
        values.append(grid.values[a:b])
        missing.append(grid.missing[a:b])
        part_gaps = grid.gaps[a:b] if grid.gaps is not None else np.zeros(b - a, dtype=bool)
        gaps.append(part_gaps)
        stamps.append(grid.timestamps[a:b])
    all_gaps = np.concatenate(gaps)
    timestamps = stamps[0].append(stamps[1:]) if len(stamps) > 1 else stamps[0]
    log.info("fleet: %d entities (%s), %d sensors, period %.3g s", len(grids), ", ".join(grids), len(kept), common)
    # a sensor that moves only in the labelled faults trains constant across the fleet: dropped for all
    return screen_kept_rows(Prepared(
        timestamps=pd.DatetimeIndex(timestamps), values=np.concatenate(values), sensors=kept,
        missing=np.concatenate(missing), period_s=common, issues=issues, dropped=dropped,
        gaps=all_gaps if all_gaps.any() else None, entities=list(grids), entity_tails=entity_tails,
        labelled_out=sum(g.labelled_out for g in grids.values())))


def _fleet_period(periods: Mapping[str, float]) -> float:
    """The period of a fleet's grid: its entities' median period, the lower of the middle two (one of
    theirs: two pumps at 1 s and 10 s do not share a grid of 5.5 s); says which entities are sampled
    more than 25 % off it (their slots are filled, or their readings several to a slot)."""
    ordered = sorted(periods.values())
    common = float(ordered[(len(ordered) - 1) // 2])
    off = {e: p for e, p in periods.items() if abs(p - common) > SAMPLING_TOLERANCE * common}
    if off:
        log.warning("fleet: the shared grid is %g s, but %s", common, "; ".join(
            f"entity {e} is sampled every {p:g} s" for e, p in off.items()) + " (set data.period_s, or train them apart)")
    return common


def label_rows(reading_ts: np.ndarray, labels: np.ndarray, grid_start: float, period_s: float,
               n_rows: int, gaps: np.ndarray | None = None) -> np.ndarray:
    """Ground truth on the grid: a slot is anomalous when a labelled reading falls on it (nearest
    slot, as the worker places readings), and so is a slot no reading fell on between two anomalous
    ones (a gap inside a labelled fault is the fault's: it does not split it in two), unless ``gaps``
    (T,) marks it as a gap the grid does not bridge (an outage: unscored, it is no part of an event).
    ``reading_ts`` and ``grid_start`` in epoch seconds."""
    slots = np.floor((np.asarray(reading_ts, dtype=np.float64) - grid_start) / period_s + 0.5).astype(np.int64)
    return labels_in_slots(slots, labels, n_rows, gaps)


def labels_in_slots(slots: np.ndarray, labels: np.ndarray, n_rows: int, gaps: np.ndarray | None = None) -> np.ndarray:
    """``label_rows`` of readings already placed: ``slots`` (int, one per reading) their grid rows."""
    out = np.zeros(n_rows, dtype=bool)
    if n_rows == 0:
        return out
    labels = np.asarray(labels, dtype=bool)
    slots = np.asarray(slots, dtype=np.int64)
    inside = (slots >= 0) & (slots < n_rows)  # halves up, as the grids round
    out[slots[inside & labels]] = True
    read = np.zeros(n_rows, dtype=bool)
    read[slots[inside]] = True
    if out.any() and not read.all():
        at = np.arange(n_rows)
        last = np.maximum.accumulate(np.where(read, at, -1))  # the slot of the latest reading at or before
        following = np.minimum.accumulate(np.where(read, at, n_rows)[::-1])[::-1]  # the next one at or after
        between = ~read & (last >= 0) & (following < n_rows)
        if gaps is not None:
            between &= ~np.asarray(gaps, dtype=bool)
        out[between] = out[last[between]] & out[following[between]]
    return out


def labels_on_grid(index: pd.DatetimeIndex, labels: np.ndarray, prepared: Prepared) -> np.ndarray:
    """``label_rows`` for readings at ``index`` (their ground truth ``labels``, bool) on the grid that
    ``prepare_scoring`` of those readings made (``prepared``)."""
    n = len(prepared.values)
    if n == 0:
        return np.zeros(0, dtype=bool)
    # in whole nanoseconds, as ``to_grid`` placed them: in float seconds a reading half-way between two
    # slots (2.1 s on a 0.2 s grid: 10.499999...) went to the earlier one, its value to the later one
    p = int(round(float(prepared.period_s) * 1e9))
    origin = int(pd.DatetimeIndex(prepared.timestamps[:1]).as_unit("ns").asi8[0])
    slots = nearest_slots(index.as_unit("ns").asi8, origin, p)
    return labels_in_slots(slots, np.asarray(labels, dtype=bool), n, prepared.gaps)


def epoch_seconds(index: pd.DatetimeIndex) -> np.ndarray:
    """Epoch seconds of a UTC DatetimeIndex, whatever its resolution (pandas 3 keeps s/ms/us/ns)."""
    return index.as_unit("ns").asi8 / 1e9
