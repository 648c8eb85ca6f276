"""Wide tables on disk (CSV or Parquet) to and from the package's in-memory form. File I/O only.

This module owns reading a table of readings (one row per timestamp, one column per sensor) and
turning it into the form every other module expects:

- the index is a ``DatetimeIndex`` named ``"ts"``, always **UTC, tz-aware**. Naive timestamps (no
  offset in the text, as in SKAB and NAB) are taken to be UTC; strings with an offset are converted;
- every other column is ``float64`` (sensors and label columns alike), except ``"entity"`` when an
  entity column was named, which holds the entity ids as strings, as written; a column of text alone,
  of times, or with a blank CSV header (pandas' row numbers) is left out (with a warning) unless it was
  named as a sensor; numbers with a decimal comma or thousands separator are refused, not left out;
- rows keep the file's order: duplicated, late or out-of-order readings are the sampling grid's
  business (``anomaly.grid``), not this module's.

It must not resample, fill, scale or judge sensors; it converts or refuses (``DataError`` naming the
file and the column).

Timestamps may be:
- strings: RFC 3339 / ISO 8601 (``2026-11-21T10:00:00.250Z``, ``...+01:00``) or
  ``YYYY-MM-DD hh:mm:ss[.ffffff]``;
- numbers: epoch **seconds** or **milliseconds**, decided once per column by magnitude: if the
  largest absolute value is at least ``1e11`` the column is milliseconds (``1e11`` s would be the year
  5138, ``1e11`` ms is March 1973), otherwise seconds. Fractions are kept, to the microsecond.
  Whole numbers that read as dates (``20240131``, ``202401311230``, ``20240131123000``) or years
  (``2019``, ``2020``) are refused, not read as 1970 seconds or 1976 or 2611 milliseconds; numbers
  that look like spreadsheet serial dates (``45000.25``: days since 1899-12-30) are read as seconds,
  with a warning (a fast logger's elapsed seconds can look the same);
- already datetimes (Parquet): naive ones are taken as UTC, aware ones converted to UTC. A Parquet
  file's ``DatetimeIndex`` is its time, before any column; an index may be named like a column.

Infinite readings are treated as missing (NaN) with a logged warning; the stream contract calls
them bad records, and a table should not be refused whole for one of them.
"""

from __future__ import annotations

import csv
import logging
import math
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from pandas.api import types as ptypes

from anomaly.codec import MAX_ABS_VALUE, too_large_to_score
from anomaly.errors import DataError

log = logging.getLogger(__name__)

TIMESTAMP_CANDIDATES: tuple[str, ...] = ("timestamp", "ts", "datetime", "time", "date")
"""Column names tried, in this order and case-insensitively, when no timestamp column is named."""

LABEL_COLUMNS: tuple[str, ...] = ("anomaly", "changepoint", "label")
"""Columns that carry ground truth, not readings (see ``split_labels``)."""

EPOCH_MS_THRESHOLD = 1e11  # |epoch| >= this is milliseconds: 1e11 s is year 5138, 1e11 ms is 1973

INDEX_NAME = "ts"
ENTITY_COLUMN = "entity"

_PARQUET_SUFFIXES = (".parquet", ".pq", ".parq")
_CSV_SUFFIXES = (".csv", ".txt", ".tsv")


def read_table(path: str | Path, *, timestamp_col: str | None = None, entity_col: str | None = None,
               sensors: Sequence[str] | None = None, labels: Sequence[str] = (),
               timezone: str | None = None) -> pd.DataFrame:
    """Read a wide CSV (``,``, ``;`` or tab, sniffed from the first lines) or Parquet table (by suffix).

    Returns a frame indexed by UTC ``DatetimeIndex`` ``"ts"`` whose columns are float64 readings (and
    label columns, if any; see ``split_labels``), plus ``"entity"`` (str) when ``entity_col`` is given;
    entity ids are kept as written (``007`` stays ``007``); a column named ``entity`` is the entity column
    when ``entity_col`` is not given. ``sensors`` restricts the readings to those
    columns, in that order (label columns present in the file are still kept); without it every other
    column is converted, and a column of text alone (a site name, a comment) is left out with a warning.
    Label columns (``LABEL_COLUMNS`` and ``labels``) may also hold true/false/yes/no (1.0/0.0).
    ``timezone`` (IANA): where timestamps are written without an offset, the zone they are local time of.

    Raises ``DataError`` for an unreadable file, one without data rows, a missing or unparseable timestamp column, a missing
    entity or sensor column, a sensor column that is not numeric (naming the column), or a label that is
    neither a number nor true/false/yes/no.
    """
    path = Path(path)
    raw = _read_raw(path, text_columns=[entity_col if entity_col is not None else ENTITY_COLUMN])
    if entity_col is None and ENTITY_COLUMN in raw.columns and ENTITY_COLUMN not in (timestamp_col, *(sensors or ())):
        # A fleet file without data.entity_column: its entities' rows on one grid would overwrite each
        # other slot by slot (a numeric id would even be read as a sensor). Read as the model's pyfunc does.
        entity_col = ENTITY_COLUMN
        log.info("%s: column %r read as the entity column (data.entity_column)", path, ENTITY_COLUMN)
    if raw.shape[1] == 0:
        raise DataError(f"{path}: no columns")
    if raw.shape[0] == 0:
        raise DataError(f"{path}: no data rows (a header only)")
    ts_name = _timestamp_column(raw, path, timestamp_col)
    index = _parse_timestamps(raw[ts_name] if ts_name is not None else raw.index.to_series(), path,
                              ts_name or "<index>", timezone)

    if entity_col is not None and entity_col not in raw.columns:
        raise DataError(f"{path}: no entity column {entity_col!r}; columns are {list(raw.columns)}")
    taken = {c for c in (ts_name, entity_col) if c is not None}
    label_names = {str(c).lower() for c in (*LABEL_COLUMNS, *labels)}
    is_label = [c for c in raw.columns if str(c).lower() in label_names and c not in taken]
    if sensors is not None:
        absent = [s for s in sensors if s not in raw.columns]
        if absent:
            raise DataError(f"{path}: sensor column(s) {absent} not found; columns are {list(raw.columns)}")
        value_cols = [*sensors, *(c for c in is_label if c not in sensors)]
    else:
        value_cols = [c for c in raw.columns if c not in taken]
        unnamed = [c for c in value_cols if c in raw.attrs.get(_BLANK_NAMES, ())]
        if unnamed:
            log.warning("%s: columns with no name in the header left out (row numbers written by pandas' to_csv?): "
                        "%s; name them in data.sensors to read them", path, [str(c) for c in unnamed])
        text = [c for c in value_cols if c not in is_label and c not in unnamed and _not_readings(raw[c], path, str(c))]
        if text:
            log.warning("%s: columns left out, text or times rather than readings: %s", path, [str(c) for c in text])
        value_cols = [c for c in value_cols if c not in text and c not in unnamed]

    out: dict[str, object] = {}
    if entity_col is not None:
        entity = raw[entity_col]
        if entity.isna().any():
            row = int(np.flatnonzero(entity.isna().to_numpy())[0])
            raise DataError(f"{path}: column {entity_col!r}: empty entity id at data row {row + 1}")
        out[ENTITY_COLUMN] = entity.astype(str).to_numpy()
    for col in value_cols:
        if str(col) == ENTITY_COLUMN and entity_col is not None:
            raise DataError(f"{path}: column {col!r} clashes with the entity column's name {ENTITY_COLUMN!r}")
        out[str(col)] = _label_values(raw[col], path, str(col)) if col in is_label else _numeric(raw[col], path, str(col))
    frame = pd.DataFrame(out, index=index)
    if entity_col is not None:
        frame[ENTITY_COLUMN] = frame[ENTITY_COLUMN].astype(str)
    return frame


def split_labels(frame: pd.DataFrame, label_cols: Sequence[str] = LABEL_COLUMNS) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split off ground-truth columns: ``(everything else, label columns)``, same index.

    Names match case-insensitively; the label frame keeps the file's spelling and may have no columns.
    The ``"entity"`` column, if any, stays with the first frame.
    """
    wanted = {c.lower() for c in label_cols}
    labels = [c for c in frame.columns if str(c).lower() in wanted]
    return frame.drop(columns=labels), frame[labels]


def truth_column(columns: Sequence[object], label_field: str) -> object | None:
    """The column of a table's ground truth, or None: ``label_field`` (``retrain.label_field``) if the
    table has it, else ``anomaly``, else ``label``, matched case-insensitively (``changepoint`` marks a
    moment, not the anomalous rows)."""
    by_name = {str(c).lower(): c for c in columns}
    return next((by_name[n.lower()] for n in (label_field, "anomaly", "label") if n.lower() in by_name), None)


def write_columns(frame: pd.DataFrame, path: str | Path) -> None:
    """Write ``frame``'s columns (not its index) as CSV or Parquet by ``path``'s suffix, as
    ``read_table`` reads them: ``.tsv`` tab-separated, ``.csv``/``.txt`` comma-separated; ``DataError``
    for any other suffix (check with ``table_suffix_problem`` before the work that fills it)."""
    path = Path(path)
    suffix = _writable_suffix(path)
    if suffix in _PARQUET_SUFFIXES:
        frame.to_parquet(path, index=False)
    else:
        frame.to_csv(path, index=False, sep="\t" if suffix == ".tsv" else ",")


def table_suffix_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot name a table file to write (None: it can), by its suffix."""
    suffix = Path(path).suffix.lower()
    if suffix in _PARQUET_SUFFIXES or suffix in _CSV_SUFFIXES:
        return None
    return f"unknown table format {Path(path).suffix or '(no suffix)'!r}; use .csv, .tsv or .parquet"


def _writable_suffix(path: Path) -> str:
    """``path``'s suffix, lower case; ``DataError`` with ``table_suffix_problem``'s reason when no table
    format has it."""
    problem = table_suffix_problem(path)
    if problem:
        raise DataError(f"{path}: {problem}")
    return path.suffix.lower()


def write_table(frame: pd.DataFrame, path: str | Path) -> None:
    """Write ``frame`` (indexed by a ``DatetimeIndex``) as CSV or Parquet, by suffix as ``write_columns``
    (``.tsv`` tab-separated), in a form ``read_table`` reads back unchanged: the index becomes a ``"ts"``
    column, in UTC (a naive index is taken as UTC); CSV timestamps are RFC 3339 with microseconds and ``Z``."""
    path = Path(path)
    suffix = _writable_suffix(path)
    if not isinstance(frame.index, pd.DatetimeIndex):
        raise DataError(f"{path}: write_table needs a DatetimeIndex, got {type(frame.index).__name__}")
    index = frame.index.tz_localize("UTC") if frame.index.tz is None else frame.index.tz_convert("UTC")
    if INDEX_NAME in frame.columns:
        raise DataError(f"{path}: column {INDEX_NAME!r} clashes with the timestamp column written from the index")
    out = frame.copy()
    out.index = index
    if suffix in _PARQUET_SUFFIXES:
        out.index.name = INDEX_NAME
        out.reset_index().to_parquet(path, index=False)
    else:
        out.index = pd.Index(index.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), name=INDEX_NAME)
        out.to_csv(path, index=True, sep="\t" if suffix == ".tsv" else ",")


# --- helpers -------------------------------------------------------------------------------------

def _read_raw(path: Path, text_columns: Sequence[str] = ()) -> pd.DataFrame:
    """The file as pandas reads it; ``text_columns`` (CSV) are read as text, not converted to numbers."""
    if path.is_dir():
        raise DataError(f"{path}: a folder, not a table file (.csv or .parquet)")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix in _PARQUET_SUFFIXES:
            raw = pd.read_parquet(path)
            # a frame saved with a (ts, entity) index, or with its entity ids as the index: those are columns
            # here (they went unseen: a fleet read as one series, its entities overwriting each other)
            named = raw.index.name is not None and not isinstance(raw.index, pd.DatetimeIndex)
            return raw.reset_index() if isinstance(raw.index, pd.MultiIndex) or named else raw
        if suffix in _CSV_SUFFIXES:
            sep, names = _csv_layout(path)
            _refuse_repeated_names(path, [n.strip() for n in names])
            text = {n for n in names if n.strip() in set(text_columns)}
            dtype = {c: str for c in text} or None
            # an entity id is missing only when its cell is empty: "NA" (North America), "None" and "null" are
            # ids, which pandas' default missing-value strings turned into "empty entity id" errors
            na = {n: ([""] if n in text else list(_NA_STRINGS)) for n in names} if text else None
            raw = pd.read_csv(path, sep=sep, engine="c", dtype=dtype, keep_default_na=not text, na_values=na)
            if not isinstance(raw.index, pd.RangeIndex):
                # Data lines with a field more than the header: pandas made the first column the index
                # and moved every name one column left (a's readings read as the times, and nothing said).
                if len(raw.columns) and raw.iloc[:, -1].isna().all():  # a separator ending every line
                    raw = pd.read_csv(path, sep=sep, engine="c", dtype=dtype, index_col=False,
                                      keep_default_na=not text, na_values=na)
                else:
                    raise DataError(f"{path}: the data lines have more fields than the header's {len(names)} "
                                    f"names; name every column in the header")
            raw.attrs[_BLANK_NAMES] = [c for i, c in enumerate(raw.columns)
                                       if i < len(names) and not names[i].strip() and str(c).startswith("Unnamed: ")]
            # "timestamp, a, b": names as written, without the spaces around them (data.sensors = ["a"])
            return raw.rename(columns={c: c.strip() for c in raw.columns if isinstance(c, str) and c != c.strip()})
    except DataError:
        raise
    except Exception as exc:  # parser errors of several kinds: one message for the operator
        raise DataError(f"{path}: cannot read table: {exc}") from exc
    raise DataError(f"{path}: {table_suffix_problem(path)}")


try:  # the strings pandas reads as missing by default ("", "NA", "NaN", "null", "n/a", ...)
    from pandas._libs.parsers import STR_NA_VALUES as _NA_STRINGS
except ImportError:  # pragma: no cover - a pandas without it
    _NA_STRINGS = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
                   "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}
_BLANK_NAMES = "anomaly.blank_names"  # raw.attrs key: CSV columns with a blank header (pandas: "Unnamed: i")

_SNIFF_LINES = 20  # data lines read, beside the header, to tell the separator


def _csv_layout(path: Path) -> tuple[str, list[str]]:
    """The separator and the header's names. The separator: of ``,``, ``;`` and tab, the one that splits
    the header and the first data lines into the same number (> 1) of fields, the most fields if several
    do (a ``;`` file whose column names hold commas, ``Flow, l/min``, is not comma-separated); failing
    that, the header's most frequent (``,`` on a tie)."""
    with path.open("r", encoding="utf-8-sig", errors="replace", newline="") as fh:
        header = fh.readline()
        while header and not header.strip():  # blank lines before the header: pandas skips them too
            header = fh.readline()
        lines = [header] + [line for line in (fh.readline() for _ in range(_SNIFF_LINES)) if line.strip()]
    if not header.strip():
        raise DataError(f"{path}: empty file (no header line)")
    even = []
    for sep in (",", ";", "\t"):
        widths = {len(row) for row in csv.reader(lines, delimiter=sep)}
        if len(widths) == 1 and min(widths) > 1:
            even.append((min(widths), -(",", ";", "\t").index(sep), sep))
    sep = max(even)[2] if even else max((",", ";", "\t"), key=header.count)
    return sep, next(csv.reader([header], delimiter=sep), [])


def _refuse_repeated_names(path: Path, names: Sequence[str]) -> None:
    """A header naming a column twice is a ``DataError`` (pandas would read the second ``a`` as a sensor
    ``a.1`` of its own, without a word)."""
    repeated = sorted(n for n, count in Counter(names).items() if count > 1 and n.strip())  # blank: "Unnamed: i"
    if repeated:
        raise DataError(f"{path}: the header names {', '.join(map(repr, repeated))} more than once; "
                        "give each column its own name")


def _timestamp_column(raw: pd.DataFrame, path: Path, named: str | None) -> str | None:
    """The timestamp column's name; ``None`` means "use the frame's index" (Parquet): a ``DatetimeIndex``
    is the table's time whatever its columns are called, and an index is found by its name as a column is."""
    index_name = None if isinstance(raw.index, pd.RangeIndex) or raw.index.name is None else str(raw.index.name)
    if named is not None:
        if named in raw.columns:
            return named
        if index_name == named:
            return None
        raise DataError(f"{path}: no timestamp column {named!r}; columns are {list(raw.columns)}"
                        + (f" (index: {index_name!r})" if index_name is not None else ""))
    if isinstance(raw.index, pd.DatetimeIndex):  # written as the frame's index: pandas' own way to say "the time"
        return None
    if index_name is not None and index_name.lower() in TIMESTAMP_CANDIDATES:
        return None
    for cand in TIMESTAMP_CANDIDATES:
        if cand in raw.columns:
            return cand
        spelled = [c for c in raw.columns if str(c).lower() == cand]
        if spelled:
            return spelled[0]
    raise DataError(f"{path}: no timestamp column found (tried {', '.join(TIMESTAMP_CANDIDATES)}); "
                    f"columns are {list(raw.columns)}; name it with data.timestamp_column")


def _parse_timestamps(col: pd.Series, path: Path, name: str, timezone: str | None = None) -> pd.DatetimeIndex:
    where = f"{path}: timestamp column {name!r}"
    if timezone is not None and not ptypes.is_numeric_dtype(col.dtype) and not ptypes.is_bool_dtype(col.dtype):
        local = _local_timestamps(col, where, timezone)
        if local is not None:
            return local.rename(INDEX_NAME)
    if ptypes.is_datetime64_any_dtype(col.dtype):
        parsed = pd.DatetimeIndex(col)
        parsed = parsed.tz_localize("UTC") if parsed.tz is None else parsed.tz_convert("UTC")
    elif ptypes.is_bool_dtype(col.dtype):
        raise DataError(f"{where}: booleans are not timestamps")
    elif ptypes.is_numeric_dtype(col.dtype):
        values = col.to_numpy(dtype=np.float64)
        finite = values[np.isfinite(values)]
        unit = "ms" if finite.size and np.abs(finite).max() >= EPOCH_MS_THRESHOLD else "s"
        if _yyyymmdd(finite):
            raise DataError(f"{where}: numbers like {int(finite[0])} look like YYYYMMDD[hhmmss] dates, not epoch "
                            f"{'seconds (1970)' if unit == 's' else 'milliseconds'}; write them as dates "
                            "(2024-01-31 12:30:00) or RFC 3339")
        if _years(finite):
            raise DataError(f"{where}: numbers like {int(finite[0])} look like years, not epoch seconds (the first "
                            "half hour of 1970); write the times as dates (2024-01-31 12:30:00) or RFC 3339")
        if _spreadsheet_days(finite):
            log.warning("%s: numbers like %.6g with steps under 1 look like spreadsheet serial dates (days since "
                        "1899-12-30), which are read here as epoch seconds of 1 January 1970, a day's readings "
                        "about a second apart; write the times as dates (2024-01-31 12:30:00) or RFC 3339",
                        where, finite[0])
        if finite.size and np.abs(finite).max() >= EPOCH_MS_THRESHOLD * 1000:  # the year 5138 in ms
            raise DataError(f"{where}: epoch numbers up to {np.abs(finite).max():.6g} are neither seconds nor "
                            "milliseconds (micro- or nanoseconds?); write them as seconds, milliseconds or RFC 3339")
        try:
            # to whole microseconds: 1700000000.1 s is 1700000000.0999999 as a float
            micros = np.round(values * (1e6 if unit == "s" else 1e3))
            parsed = pd.DatetimeIndex(pd.to_datetime(micros, unit="us", utc=True))
        except (ValueError, OverflowError) as exc:
            raise DataError(f"{where}: epoch {unit} out of range: {exc}") from exc
    else:
        try:
            parsed = pd.DatetimeIndex(pd.to_datetime(col, utc=True, format="ISO8601"))
        except (ValueError, TypeError) as exc:
            raise DataError(f"{where}: {_bad_timestamp(col) or exc}") from exc
    if parsed.isna().any():
        row = int(np.flatnonzero(parsed.isna())[0])
        raise DataError(f"{where}: missing timestamp at data row {row + 1}")
    return parsed.rename(INDEX_NAME)


def _local_timestamps(col: pd.Series, where: str, timezone: str) -> pd.DatetimeIndex | None:
    """``col``'s timestamps read as local time of ``timezone``, in UTC, when none carries an offset (None
    otherwise: those with one are exact). A repeated hour where clocks go back is told apart by the
    order of the rows (pandas' ``ambiguous="infer"``); a time in the hour skipped where they go forward
    is an error naming it, as is a repeated hour the order cannot settle."""
    if ptypes.is_datetime64_any_dtype(col.dtype):
        parsed = pd.DatetimeIndex(col)
    else:
        try:
            parsed = pd.DatetimeIndex(pd.to_datetime(col, format="ISO8601"))
        except (ValueError, TypeError):  # mixed offsets, or not timestamps: the UTC reading says which
            return None
    if parsed.tz is not None:
        return None
    try:
        return parsed.tz_localize(timezone, ambiguous="infer", nonexistent="raise").tz_convert("UTC")
    except ValueError as exc:  # pandas says which time, and advises arguments no command takes
        said = str(exc).split(". Try", 1)[0]
        if "nonexistent" in said:
            raise DataError(f"{where}: {said} in {timezone} (clocks went forward there): is it local time of "
                            "data.timezone?") from None
        raise DataError(f"{where}: {said} (a repeated hour where clocks went back in {timezone}, which the "
                        "rows' order cannot settle): sort the table by time, or write offsets (+01:00)") from None


def _bad_timestamp(col: pd.Series) -> str | None:
    """Which cell of ``col`` is not a timestamp, said as a person would fix it (pandas' own message
    advises ``format=`` arguments no command takes, and may quote a good cell); None: none found alone."""
    numbers = pd.to_numeric(col, errors="coerce")
    if numbers.notna().sum() * 2 > col.notna().sum():  # mostly numbers: epoch seconds or milliseconds
        for row, (cell, number) in enumerate(zip(col.tolist(), numbers.tolist())):
            if pd.notna(cell) and math.isnan(number):
                return f"cell {str(cell)[:60]!r} at data row {row + 1} is not a number, in a column of epoch numbers"
    try:
        coerced = pd.to_datetime(col, utc=True, format="ISO8601", errors="coerce")
    except (ValueError, TypeError):
        return None
    bad = np.flatnonzero(coerced.isna().to_numpy() & col.notna().to_numpy())
    if not bad.size:
        return None
    row = int(bad[0])
    return (f"cell {str(col.iloc[row])[:60]!r} at data row {row + 1} is not an RFC 3339 or 'YYYY-MM-DD hh:mm:ss' "
            "timestamp (a column of epoch seconds or milliseconds must hold numbers only)")


def _yyyymmdd(finite: np.ndarray) -> bool:
    """Whether epoch numbers are all whole numbers of eight digits that read as dates (20240131: 1970-04
    to 1973-03 as seconds, where no real table starts), or of twelve or fourteen that read as date and
    time (202401311230: 1973-1976 as milliseconds; 20240131123000: after 2286)."""
    if not finite.size or (finite != np.floor(finite)).any():
        return False
    for low, layout in ((1e7, "%Y%m%d"), (1e11, "%Y%m%d%H%M"), (1e13, "%Y%m%d%H%M%S")):
        if finite.min() >= low and finite.max() < low * 10:
            text = pd.Series(finite.astype(np.int64).astype(str))
            return bool(pd.to_datetime(text, format=layout, errors="coerce").notna().all())
    return False


def _years(finite: np.ndarray) -> bool:
    """Whether epoch numbers are all whole numbers from 1900 to 2100, several of them: years (as seconds,
    half an hour of 1970-01-01, where no real table lies)."""
    return bool(finite.size > 1 and (finite == np.floor(finite)).all() and finite.min() >= 1900
                and finite.max() <= 2100 and np.unique(finite).size > 1)


def _spreadsheet_days(finite: np.ndarray) -> bool:
    """Whether epoch numbers look like spreadsheet serial dates: all from 20000 to 80000 (1954 to 2119 as days
    since 1899-12-30; 5.5 to 22 hours into 1970 as seconds), not all whole, the median step under 1 (under
    a day as dates; as seconds, readings faster than once a second, which a file starting that early in
    1970 rarely holds). Said, not refused: elapsed seconds of a fast logger can look the same."""
    if finite.size < 3 or finite.min() < 20000 or finite.max() > 80000 or (finite == np.floor(finite)).all():
        return False
    steps = np.diff(np.sort(finite))
    steps = steps[steps > 0]
    return bool(steps.size and np.median(steps) < 1.0)


def _not_readings(col: pd.Series, path: Path, name: str) -> bool:
    """Whether a column holds no reading at all: text alone (a name, a comment) or times. Numbers
    written with a decimal comma (or a thousands separator) are refused, naming the column."""
    if ptypes.is_datetime64_any_dtype(col.dtype):
        return True
    if isinstance(col.dtype, pd.CategoricalDtype):
        col = col.astype(object)
    if not (ptypes.is_object_dtype(col.dtype) or ptypes.is_string_dtype(col.dtype)):
        return False
    present = col.dropna()
    if not len(present) or not pd.to_numeric(present, errors="coerce").isna().all():
        return False
    if _comma_numbers(present).notna().all():
        raise DataError(f"{path}: column {name!r} {_COMMA_HINT} (e.g. {present.iloc[0]!r}); write a decimal point "
                        "and no separator")
    return True


_COMMA_HINT = "holds numbers written with a decimal comma or thousands separator"


def _comma_numbers(cells: pd.Series) -> pd.Series:
    """Text cells read as numbers written with a decimal comma (``5,12``; ``1.013,2`` with ``.`` grouping
    thousands) or with ``,`` grouping thousands (``1,234,567``); NaN where neither reads."""
    text = cells.astype(str).str.strip()
    european = text.where(text.str.fullmatch(r"[-+]?(\d{1,3}(\.\d{3})+|\d+),\d+"))
    grouped = text.where(text.str.fullmatch(r"[-+]?\d{1,3}(,\d{3})+(\.\d+)?"))
    european = pd.to_numeric(european.str.replace(".", "", regex=False).str.replace(",", ".", regex=False),
                             errors="coerce")
    return european.where(european.notna(), pd.to_numeric(grouped.str.replace(",", "", regex=False), errors="coerce"))


def parse_label(value: Any) -> bool | None:
    """Ground truth from a JSON value or a table cell: true/false, a number (non-zero = anomalous), or
    "1"/"0"/"true"/"false"/"yes"/"no"; None for anything else (missing, NaN, unknown text)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float, np.integer, np.floating)):
        return None if not math.isfinite(float(value)) else float(value) != 0.0
    if isinstance(value, str):
        return {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}.get(
            value.strip().lower())
    return None


def _label_values(col: pd.Series, path: Path, name: str) -> np.ndarray:
    """A ground-truth column as float64: numbers as they are, text as ``parse_label`` reads it (1.0/0.0),
    blank NaN; other text is refused by ``_numeric``, naming the cell."""
    if ptypes.is_bool_dtype(col.dtype) or ptypes.is_numeric_dtype(col.dtype) or not _any_text(col):
        return _numeric(col, path, name, ids_hint=False)
    return _numeric(col.map(lambda v: _label_word(v) if isinstance(v, str) else v), path, name, ids_hint=False)


def _label_word(text: str) -> float | str:
    if not text.strip():
        return np.nan
    label = parse_label(text)
    return text if label is None else float(label)


def _any_text(col: pd.Series) -> bool:
    return bool(col.map(lambda v: isinstance(v, str)).any())


def _numeric(col: pd.Series, path: Path, name: str, ids_hint: bool = True) -> np.ndarray:
    """``col`` as float64, or ``DataError`` naming the column and its first non-number (``ids_hint``: and,
    for a column half text or more, that asset ids go in the entity column; not for ground truth)."""
    if ptypes.is_bool_dtype(col.dtype) or ptypes.is_numeric_dtype(col.dtype):
        values = col.to_numpy(dtype=np.float64, na_value=np.nan)
    else:
        if ptypes.is_datetime64_any_dtype(col.dtype) or ptypes.is_timedelta64_dtype(col.dtype):
            raise DataError(f"{path}: column {name!r} holds {col.dtype} values, not numbers")
        coerced = pd.to_numeric(col, errors="coerce")
        bad = coerced.isna() & col.notna()
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            comma = isinstance(col.iloc[row], str) and bool(_comma_numbers(col.iloc[row:row + 1]).notna().all())
            ids = ids_hint and not comma and bad.sum() * 2 >= col.notna().sum()  # half text or more: names, not faulty readings
            raise DataError(f"{path}: column {name!r} is not numeric (e.g. {col.iloc[row]!r} at data row {row + 1})"
                            + (f"; it {_COMMA_HINT}" if comma else "")
                            + ("; if it names assets, name it with data.entity_column" if ids else ""))
        values = coerced.to_numpy(dtype=np.float64, na_value=np.nan)
    wild = too_large_to_score(values)  # ±inf, or too large to score (the worker dead-letters both)
    if wild.any():
        log.warning("%s: column %r: %d infinite or out-of-range (|value| >= %g) value(s) treated as missing",
                    path, name, int(wild.sum()), MAX_ABS_VALUE)
        values = np.where(wild, np.nan, values)
    return values
