"""Loaders against the real files in shared/datasets (numbers "checked" in its README)."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from anomaly.datasets import SKAB_GROUPS, SKAB_SENSORS, LabelledSeries, load_dataset, load_nab, load_skab, load_skab_anomaly_free, load_smd
from anomaly.errors import DataError
from tests.fixtures import need_dataset


def _need(name: str) -> Path:
    return need_dataset(name)


@pytest.fixture(scope="module")
def skab() -> list[LabelledSeries]:
    return load_skab(_need("skab"))


@pytest.fixture(scope="module")
def nab() -> list[LabelledSeries]:
    return load_nab(_need("nab"))


def test_skab_checked_numbers(skab):
    assert len(skab) == 34
    assert sum(len(s.frame) for s in skab) == 37_401
    assert sum(int(s.labels.sum()) for s in skab) == 13_067
    assert sum(int(s.meta["changepoint"].sum()) for s in skab) == 129
    assert sum(len(s.test) for s in skab) == 23_801
    assert sum(int(s.test_labels.sum()) for s in skab) == 12_771
    assert all(s.train_rows == 400 and len(s.train) == 400 for s in skab)


def test_skab_names_order_and_columns(skab):
    names = [s.name for s in skab]
    assert names == ([f"valve1/{i}" for i in range(16)] + [f"valve2/{i}" for i in range(4)]
                     + [f"other/{i}" for i in range(1, 15)])
    s = skab[0]
    assert list(s.frame.columns) == ["Accelerometer1RMS", "Accelerometer2RMS", "Current", "Pressure", "Temperature",
                                     "Thermocouple", "Voltage", "Volume Flow RateRMS"]
    assert (s.frame.dtypes == np.float64).all()
    assert s.frame.index.name == "ts" and str(s.frame.index.tz) == "UTC"
    assert s.frame.index[0] == pd.Timestamp("2020-03-09 10:14:33", tz="UTC")
    assert s.labels.dtype == bool and len(s.labels) == len(s.frame) == len(s.meta["changepoint"])
    assert int(next(x for x in skab if x.name == "other/2").labels[:400].sum()) == 296  # contaminated train


def test_skab_anomaly_free():
    frame = load_skab_anomaly_free(_need("skab"))
    assert frame.shape == (9_405, 8)
    assert "Volume Flow RateRMS" in frame.columns


def test_nab_checked_numbers(nab):
    assert len(nab) == 58
    assert sum(len(s.frame) for s in nab) == 365_558
    assert sum(len(s.meta["windows"]) for s in nab) == 116
    for s in nab:
        n = len(s.frame)
        assert list(s.frame.columns) == ["value"] and s.frame["value"].dtype == np.float64
        assert s.train_rows == s.meta["probation_rows"] == min(int(np.floor(0.15 * n)), 750)
        expected = np.zeros(n, bool)
        for start, end in s.meta["windows"]:
            assert 0 <= start <= end < n
            expected[start:end + 1] = True
        np.testing.assert_array_equal(s.labels, expected)


def test_nab_window_rows_match_timestamps(nab):
    s = next(x for x in nab if x.name == "realKnownCause/machine_temperature_system_failure.csv")
    assert len(s.meta["windows"]) == 4
    start, end = s.meta["windows"][0]
    assert s.frame.index[start] == pd.Timestamp("2013-12-10 06:25:00", tz="UTC")
    assert s.frame.index[end] == pd.Timestamp("2013-12-12 05:35:00", tz="UTC")
    assert [x.name for x in nab] == sorted(x.name for x in nab)


def test_nab_window_off_the_rows_is_a_data_error(tmp_path):
    (tmp_path / "data" / "cat").mkdir(parents=True)
    (tmp_path / "labels").mkdir()
    (tmp_path / "data" / "cat" / "f.csv").write_text("timestamp,value\n2020-01-01 00:00:00,1\n2020-01-01 00:05:00,2\n")
    (tmp_path / "labels" / "combined_windows.json").write_text(
        '{"cat/f.csv": [["2020-01-01 00:00:00.000000", "2020-01-01 00:04:00.000000"]]}')
    with pytest.raises(DataError, match="00:04:00"):
        load_nab(tmp_path)


@pytest.mark.parametrize("second", [["2020-01-01 00:05:00.000000", "2020-01-01 00:12:00.000000"],  # overlaps
                                    ["2020-01-01 00:01:00.000000", "2020-01-01 00:03:00.000000"]])  # before it
def test_nab_windows_out_of_order_or_overlapping_are_a_data_error(tmp_path, second):
    # they were taken as the union of labels, then refused by the scorer with a traceback after every
    # file had been trained
    (tmp_path / "data" / "cat").mkdir(parents=True)
    (tmp_path / "labels").mkdir()
    rows = [f"2020-01-01 00:{m:02d}:00,{m}" for m in range(20)]
    (tmp_path / "data" / "cat" / "f.csv").write_text("timestamp,value\n" + "\n".join(rows) + "\n")
    first = ["2020-01-01 00:04:00.000000", "2020-01-01 00:08:00.000000"]
    (tmp_path / "labels" / "combined_windows.json").write_text(json.dumps({"cat/f.csv": [first, second]}))
    with pytest.raises(DataError, match="cat/f.csv: window .* starts at or before the previous window's end"):
        load_nab(tmp_path)


def test_a_skab_file_without_rows_after_the_training_part_is_a_data_error(tmp_path):
    # it was trained, scored on no rows and counted as a file, its labelled rows dropped without a word
    for group in SKAB_GROUPS:
        (tmp_path / "data" / group).mkdir(parents=True)
    folder = tmp_path / "data" / "valve1"
    stamps = pd.date_range("2020-01-01", periods=400, freq="1s").strftime("%Y-%m-%d %H:%M:%S")
    frame = pd.DataFrame({"datetime": stamps, **{c: 1.0 for c in SKAB_SENSORS}, "anomaly": 0.0, "changepoint": 0.0})
    frame.to_csv(folder / "0.csv", sep=";", index=False)
    with pytest.raises(DataError, match="400 rows; the SKAB protocol trains on the first 400"):
        load_skab(tmp_path)


def test_a_nab_window_ending_on_a_repeated_timestamp_ends_at_its_first_row(tmp_path):
    # NAB's sweeper finds a window's right edge with timestamps.index (the first row with that time) and
    # leaves the window there; the loader took the last such row, so a detection on the repeat counted
    # as a true positive (standard raw +0.21) where NAB counts a false one (-1.03).
    (tmp_path / "data" / "cat").mkdir(parents=True)
    (tmp_path / "labels").mkdir()
    rows = [f"2020-01-01 00:{min(m, 20) if m < 21 else m - 1:02d}:00,{m}" for m in range(41)]  # 20 and 21 repeat
    (tmp_path / "data" / "cat" / "f.csv").write_text("timestamp,value\n" + "\n".join(rows) + "\n")
    (tmp_path / "labels" / "combined_windows.json").write_text(
        '{"cat/f.csv": [["2020-01-01 00:15:00.000000", "2020-01-01 00:20:00.000000"]]}')
    (s,) = load_nab(tmp_path)
    assert s.frame.index[20] == s.frame.index[21] and s.meta["windows"] == [(15, 20)]
    assert not s.labels[21]


def test_smd_one_machine():
    (s,) = load_smd(_need("smd"), machines=["machine-1-2"])
    assert s.name == "machine-1-2"
    assert s.train_rows == 23_694 and len(s.train) == 23_694
    assert len(s.test) == 23_694 == s.meta["test_rows"]
    assert list(s.frame.columns) == [f"m{i:02d}" for i in range(38)]
    assert not s.labels[: s.train_rows].any()
    assert round(100 * s.test_labels.mean(), 2) == 2.29
    assert s.frame.index[0] == pd.Timestamp("2019-01-01", tz="UTC")
    assert s.frame.index[-1] - s.frame.index[0] == pd.Timedelta(minutes=len(s.frame) - 1)
    start, end, dims = s.meta["interpretation"][0]  # file line "4629-4688:9,10,11,13,15,18"
    assert (start, end, dims) == (4629 + 23_694, 4688 + 23_694, [8, 9, 10, 12, 14, 17])
    assert s.labels[start:end].all()


def test_smd_unknown_machine():
    with pytest.raises(DataError, match="machine-9-9"):
        load_smd(_need("smd"), machines=["machine-9-9"])


def test_load_dataset_dispatch_and_layout_errors(tmp_path):
    with pytest.raises(DataError, match="skab, nab, smd"):
        load_dataset("kdd", tmp_path)
    for name in ("skab", "nab", "smd"):
        with pytest.raises(DataError, match="expected"):
            load_dataset(name, tmp_path)


def test_series_train_test_split():
    index = pd.date_range("2020-01-01", periods=5, freq="1s", tz="UTC", name="ts")
    s = LabelledSeries("x", pd.DataFrame({"a": np.arange(5.0)}, index=index),
                       np.array([0, 0, 1, 0, 1], bool), train_rows=2)
    assert len(s.train) == 2 and len(s.test) == 3
    np.testing.assert_array_equal(s.test_labels, [True, False, True])
    assert LabelledSeries("y", s.frame, None).test_labels is None


def test_smd_bad_cells_are_named_by_line_and_column_counted_from_1(tmp_path):
    for part in ("train", "test", "test_label"):
        (tmp_path / part).mkdir()
    (tmp_path / "train" / "machine-1-1.txt").write_text("1,2\n3,\n5,6\n")
    (tmp_path / "test" / "machine-1-1.txt").write_text("1,2\n3,4\n5,6\n")
    (tmp_path / "test_label" / "machine-1-1.txt").write_text("0\n0\n2\n")
    with pytest.raises(DataError, match="empty value at line 2, column 2"):
        load_smd(tmp_path)
    (tmp_path / "train" / "machine-1-1.txt").write_text("1,2\n3,4\n5,6\n")
    with pytest.raises(DataError, match="must be 0 or 1, got 2.0 at data row 3"):
        load_smd(tmp_path)
