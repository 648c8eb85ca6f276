"""Loaders for the labelled benchmark datasets (SKAB, NAB, SMD), exactly as described in
``shared/datasets/README.md``. File I/O only.

This module owns turning each dataset's files into ``LabelledSeries``: readings, per-row labels and
the row where the dataset's own protocol says training ends. It must not grid, fill, scale, train or
score (rows are returned as the files have them, so the published protocols are reproduced row for
row); evaluation lives in ``anomaly.protocols`` / ``anomaly.evaluation``.

Conventions shared by all loaders:
- ``frame`` is indexed by a UTC ``DatetimeIndex`` ``"ts"``. SKAB and NAB timestamps have no zone
  and are taken to be UTC; SMD has none at all and gets a synthetic one (see ``load_smd``).
- Series come in a stable order: SKAB ``valve1``, ``valve2``, ``other``, files in numeric order;
  NAB by ``"<category>/<file>.csv"``; SMD by machine number.
- ``data_dir`` is the dataset's folder (``.../datasets/skab``); for SKAB and NAB its ``data/``
  sub-folder is accepted as well.
- A layout or file that does not match the README raises ``DataError`` saying what was expected.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from anomaly.errors import DataError
from anomaly.tables import read_table

DATASETS: tuple[str, ...] = ("skab", "nab", "smd")

SKAB_SENSORS: tuple[str, ...] = ("Accelerometer1RMS", "Accelerometer2RMS", "Current", "Pressure", "Temperature",
                                 "Thermocouple", "Voltage", "Volume Flow RateRMS")
SKAB_GROUPS: tuple[str, ...] = ("valve1", "valve2", "other")  # the README's order
SKAB_TRAIN_ROWS = 400  # official protocol: train_test_split(train_size=400, shuffle=False) per file

NAB_PROBATION_FRACTION = 0.15  # NAB: probationary period = min(floor(0.15 * N), 750) rows
NAB_PROBATION_MAX_ROWS = 750

SMD_START = pd.Timestamp("2019-01-01", tz="UTC")  # synthetic: the files carry no timestamps
SMD_PERIOD = pd.Timedelta(minutes=1)  # per Su et al. 2019: 1-minute sampling


@dataclass
class LabelledSeries:
    """One benchmark series: readings, per-row labels and the protocol's train/test boundary."""

    name: str  # e.g. "valve1/0", "realTweets/Twitter_volume_AAPL.csv", "machine-1-2"
    frame: pd.DataFrame  # (T, F) float64, index: DatetimeIndex "ts" (UTC), one column per sensor
    labels: np.ndarray | None  # (T,) bool, True = anomalous row; None = unlabelled
    train_rows: int = 0  # the first ``train_rows`` rows are the protocol's training part
    meta: dict[str, Any] = field(default_factory=dict)  # dataset-specific extras (see each loader)

    @property
    def train(self) -> pd.DataFrame:
        return self.frame.iloc[: self.train_rows]

    @property
    def test(self) -> pd.DataFrame:
        return self.frame.iloc[self.train_rows:]

    @property
    def test_labels(self) -> np.ndarray | None:
        return None if self.labels is None else self.labels[self.train_rows:]


def load_dataset(name: str, data_dir: str | Path) -> list[LabelledSeries]:
    """Dispatch on ``"skab"``, ``"nab"`` or ``"smd"`` (case-insensitive)."""
    loaders = {"skab": load_skab, "nab": load_nab, "smd": load_smd}
    key = str(name).lower()
    if key not in loaders:
        raise DataError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    return loaders[key](data_dir)


# --- SKAB ----------------------------------------------------------------------------------------

def load_skab(data_dir: str | Path) -> list[LabelledSeries]:
    """The 34 labelled SKAB files, ``valve1/0..15``, ``valve2/0..3``, ``other/1..14``.

    ``frame``: the 8 sensors under their real header names; ``labels``: ``anomaly``;
    ``train_rows``: 400 (the official protocol; ``other/2`` has anomalies among them);
    ``meta``: ``changepoint`` (bool per row), ``path``.
    """
    root = _skab_root(data_dir)
    series: list[LabelledSeries] = []
    for group in SKAB_GROUPS:
        for path in sorted((root / group).glob("*.csv"), key=_natural_key):
            frame = read_table(path, timestamp_col="datetime")
            _require_columns(frame, path, (*SKAB_SENSORS, "anomaly", "changepoint"))
            anomaly = _binary(frame["anomaly"].to_numpy(), path, "anomaly")
            changepoint = _binary(frame["changepoint"].to_numpy(), path, "changepoint")
            if len(frame) <= SKAB_TRAIN_ROWS:  # SKAB trains on the first 400 rows and scores the rest
                raise DataError(f"{path}: {len(frame)} rows; the SKAB protocol trains on the first "
                                f"{SKAB_TRAIN_ROWS} and scores the rest, so a file needs more")
            series.append(LabelledSeries(name=f"{group}/{path.stem}", frame=frame[list(SKAB_SENSORS)].copy(),
                                         labels=anomaly, train_rows=SKAB_TRAIN_ROWS,
                                         meta={"changepoint": changepoint, "path": str(path)}))
    if not series:
        raise DataError(f"{root}: no SKAB files; expected {', '.join(f'{g}/*.csv' for g in SKAB_GROUPS)}")
    return series


WHERE_DATASETS = "; point --data-dir at the dataset's folder, or set ANOMALY_DATASETS to the folder that holds it"

# The SKAB experiments `anomaly up` replays as its fleet, and whose normal parts (one entity each) `anomaly
# train --dataset skab` trains on by default: two valve-1 and two valve-2 runs, one operating point (all 34 together make a model
# too loose to flag valve1/0's fault; SKAB's separate anomaly-free recording is at another operating point).
SKAB_FLEET: tuple[str, ...] = ("valve1/0", "valve1/1", "valve2/0", "valve2/1")


def load_skab_anomaly_free(data_dir: str | Path) -> pd.DataFrame:
    """SKAB's ``anomaly-free/anomaly-free.csv``: 8 sensor columns, UTC index ``"ts"``."""
    root = _skab_root(data_dir)
    path = root / "anomaly-free" / "anomaly-free.csv"
    if not path.is_file():
        raise DataError(f"{path}: missing; expected SKAB's anomaly-free/anomaly-free.csv under {root}")
    frame = read_table(path, timestamp_col="datetime")
    _require_columns(frame, path, SKAB_SENSORS)
    return frame[list(SKAB_SENSORS)].copy()


def _skab_root(data_dir: str | Path) -> Path:
    base = Path(data_dir)
    for root in (base / "data", base):
        if all((root / g).is_dir() for g in SKAB_GROUPS):
            return root
    what = "not a SKAB folder" if base.is_dir() else "no such folder"
    raise DataError(f"{base}: {what}; expected {base}/data/{{{','.join(SKAB_GROUPS)}}}/*.csv "
                    f"(or those folders directly in {base}){WHERE_DATASETS}")


# --- NAB -----------------------------------------------------------------------------------------

def load_nab(data_dir: str | Path) -> list[LabelledSeries]:
    """The 58 NAB files with ``labels/combined_windows.json`` as ground truth.

    ``frame``: one column ``"value"``; ``labels``: rows inside any window; ``train_rows``: the
    probationary period ``min(floor(0.15 N), 750)``; ``meta``: ``windows`` (list of inclusive
    ``(start_row, end_row)``), ``probation_rows``, ``category``, ``path``. A window bound must equal a
    row's timestamp; with duplicated timestamps both bounds take the first such row (NAB's ``timestamps.index``).
    """
    base = Path(data_dir)
    data_root, windows_path = base / "data", base / "labels" / "combined_windows.json"
    if not data_root.is_dir() and base.name == "data" and (base.parent / "labels").is_dir():
        data_root, windows_path = base, base.parent / "labels" / "combined_windows.json"
    if not data_root.is_dir() or not windows_path.is_file():
        raise DataError(f"{base}: not a NAB folder; expected {base}/data/<category>/<file>.csv and "
                        f"{base}/labels/combined_windows.json{WHERE_DATASETS}")
    try:
        all_windows: dict[str, list[list[str]]] = json.loads(windows_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{windows_path}: unreadable: {exc}") from exc

    files = sorted(data_root.glob("*/*.csv"), key=lambda p: f"{p.parent.name}/{p.name}")
    if not files:
        raise DataError(f"{data_root}: no <category>/<file>.csv files")
    names = {f"{p.parent.name}/{p.name}" for p in files}
    orphans = sorted(set(all_windows) - names)
    if orphans:
        raise DataError(f"{windows_path}: windows for files that are not in {data_root}: {orphans[:5]}")

    series: list[LabelledSeries] = []
    for path in files:
        name = f"{path.parent.name}/{path.name}"
        if name not in all_windows:
            raise DataError(f"{windows_path}: no entry for {name} (files without anomalies map to [])")
        frame = read_table(path, timestamp_col="timestamp")
        _require_columns(frame, path, ("value",))
        frame = frame[["value"]].copy()
        n = len(frame)
        windows = _nab_rows(frame.index, all_windows[name], path, windows_path)
        labels = np.zeros(n, dtype=bool)
        for start, end in windows:
            labels[start:end + 1] = True
        probation = min(int(np.floor(NAB_PROBATION_FRACTION * n)), NAB_PROBATION_MAX_ROWS)
        series.append(LabelledSeries(name=name, frame=frame, labels=labels, train_rows=probation,
                                     meta={"windows": windows, "probation_rows": probation,
                                           "category": path.parent.name, "path": str(path)}))
    return series


def _nab_rows(index: pd.DatetimeIndex, windows: list[list[str]], path: Path, windows_path: Path) -> list[tuple[int, int]]:
    """Window timestamps to inclusive row ranges; every bound must be a row's exact timestamp (its first
    row where a timestamp repeats, as NAB's ``timestamps.index``: the window ends at that row)."""
    ns = index.as_unit("ns").asi8
    out: list[tuple[int, int]] = []
    for window in windows:
        if len(window) != 2:
            raise DataError(f"{windows_path}: {path.parent.name}/{path.name}: window {window!r} is not [start, end]")
        try:
            start_ts, end_ts = (pd.Timestamp(w, tz="UTC") for w in window)
        except (ValueError, TypeError) as exc:
            raise DataError(f"{windows_path}: {path.parent.name}/{path.name}: bad window timestamp in {window!r}") from exc
        starts = np.flatnonzero(ns == start_ts.as_unit("ns").value)
        ends = np.flatnonzero(ns == end_ts.as_unit("ns").value)
        if starts.size == 0 or ends.size == 0:
            bad = window[0] if starts.size == 0 else window[1]
            raise DataError(f"{windows_path}: window bound {bad} matches no row of {path} (column 'timestamp')")
        start, end = int(starts[0]), int(ends[0])
        if end < start:
            raise DataError(f"{windows_path}: window {window!r} ends (row {end}) before it starts (row {start}) in {path}")
        if out and start <= out[-1][1]:  # NAB's scorer takes each window as one anomaly: they may not overlap
            raise DataError(f"{windows_path}: {path.parent.name}/{path.name}: window {window!r} (rows {start}-{end}) "
                            f"starts at or before the previous window's end (row {out[-1][1]}); windows must be "
                            "in time order and disjoint")
        out.append((start, end))
    return out


# --- SMD -----------------------------------------------------------------------------------------

def load_smd(data_dir: str | Path, machines: Sequence[str] | None = None) -> list[LabelledSeries]:
    """SMD machines (default: every machine in ``train/``), one series each.

    ``frame``: train rows followed by test rows, columns ``m00`` .. ``m37``, on a **synthetic** UTC
    index of 1-minute steps from 2019-01-01 00:00 (the files have no timestamps; the test part starts
    one minute after the last train row). ``train_rows``: the train file's row count. ``labels``:
    False for train rows (upstream gives none; assumed normal) then ``test_label``. ``meta``:
    ``interpretation`` = list of ``(start, end_exclusive, [0-based columns])`` in **full-frame row
    coordinates** (the file's test-row indices plus ``train_rows``; empty if the file is absent),
    ``test_rows``, ``paths``.
    """
    base = Path(data_dir)
    if not all((base / d).is_dir() for d in ("train", "test", "test_label")):
        raise DataError(f"{base}: not an SMD folder; expected {base}/train/, test/ and test_label/ "
                        f"holding machine-<g>-<n>.txt (and optionally interpretation_label/){WHERE_DATASETS}")
    available = sorted((p.stem for p in (base / "train").glob("machine-*.txt")), key=_natural_key)
    if machines is None:
        machines = available
        if not machines:
            raise DataError(f"{base}/train: no machine-<g>-<n>.txt files")
    unknown = [m for m in machines if m not in available]
    if unknown:
        raise DataError(f"{base}: unknown SMD machine(s) {unknown}; available: {', '.join(available)}")
    return [_load_smd_machine(base, m) for m in machines]


def _load_smd_machine(base: Path, machine: str) -> LabelledSeries:
    paths = {part: base / part / f"{machine}.txt" for part in ("train", "test", "test_label", "interpretation_label")}
    for part in ("train", "test", "test_label"):
        if not paths[part].is_file():
            raise DataError(f"{paths[part]}: missing; every SMD machine needs train/, test/ and test_label/ files")
    train = _smd_matrix(paths["train"])
    test = _smd_matrix(paths["test"])
    if train.shape[1] != test.shape[1]:
        raise DataError(f"{paths['test']}: {test.shape[1]} columns, but {paths['train']} has {train.shape[1]}")
    test_label = _smd_matrix(paths["test_label"])
    if test_label.shape[1] != 1 or len(test_label) != len(test):
        raise DataError(f"{paths['test_label']}: expected one 0/1 column with {len(test)} rows (one per test row), "
                        f"got {test_label.shape}")
    labels = np.r_[np.zeros(len(train), dtype=bool), _binary(test_label[:, 0], paths["test_label"], "label")]
    n_train, n_cols = len(train), train.shape[1]
    index = pd.date_range(SMD_START, periods=n_train + len(test), freq=SMD_PERIOD, name="ts")
    frame = pd.DataFrame(np.vstack([train, test]), index=index, columns=[f"m{i:02d}" for i in range(n_cols)])
    interpretation = (_smd_interpretation(paths["interpretation_label"], len(test), n_cols, n_train)
                      if paths["interpretation_label"].is_file() else [])
    return LabelledSeries(name=machine, frame=frame, labels=labels, train_rows=n_train,
                          meta={"interpretation": interpretation, "test_rows": len(test),
                                "paths": {k: str(v) for k, v in paths.items() if v.is_file()}})


def _smd_matrix(path: Path) -> np.ndarray:
    """A headerless comma-separated numeric file as a 2-D float64 array (pandas' C parser: fast)."""
    try:
        frame = pd.read_csv(path, header=None, dtype=np.float64, engine="c")
    except (ValueError, pd.errors.ParserError) as exc:
        raise DataError(f"{path}: not a headerless table of numbers: {exc}") from exc
    if frame.isna().to_numpy().any():
        row, col = (int(v[0]) for v in np.nonzero(frame.isna().to_numpy()))
        raise DataError(f"{path}: empty value at line {row + 1}, column {col + 1}")
    return frame.to_numpy()


_INTERPRETATION_LINE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*:\s*(\d+(?:\s*,\s*\d+)*)\s*$")


def _smd_interpretation(path: Path, n_test: int, n_cols: int, offset: int) -> list[tuple[int, int, list[int]]]:
    """``start-end:d1,d2`` lines (test rows ``start..end-1``, 1-based columns) as full-frame rows and
    0-based columns."""
    out: list[tuple[int, int, list[int]]] = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        m = _INTERPRETATION_LINE.match(line)
        if not m:
            raise DataError(f"{path}:{lineno}: expected 'start-end:d1,d2,...', got {line!r}")
        start, end = int(m.group(1)), int(m.group(2))
        dims = [int(d) for d in m.group(3).split(",")]
        if not 0 <= start < end <= n_test:
            raise DataError(f"{path}:{lineno}: rows {start}-{end} outside the {n_test} test rows")
        if not all(1 <= d <= n_cols for d in dims):
            raise DataError(f"{path}:{lineno}: column numbers {dims} outside 1..{n_cols}")
        out.append((start + offset, end + offset, [d - 1 for d in dims]))
    return out


# --- shared helpers ------------------------------------------------------------------------------

def _natural_key(path_or_name: Path | str) -> list[Any]:
    """``"10"`` after ``"9"``: digit runs compare as numbers."""
    name = path_or_name.stem if isinstance(path_or_name, Path) else str(path_or_name)
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _require_columns(frame: pd.DataFrame, path: Path, columns: Sequence[str]) -> None:
    absent = [c for c in columns if c not in frame.columns]
    if absent:
        raise DataError(f"{path}: missing column(s) {absent}; expected {list(columns)}, found {list(frame.columns)}")


def _binary(values: np.ndarray, path: Path, column: str) -> np.ndarray:
    """A 0/1 label column as bool; anything else is a ``DataError`` naming the column."""
    values = np.asarray(values, dtype=np.float64)
    bad = ~np.isin(values, (0.0, 1.0))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(f"{path}: column {column!r} must be 0 or 1, got {float(values[row])!r} at data row {row + 1}")
    return values == 1.0
