import numpy as np
import pandas as pd
import pytest

from anomaly.errors import DataError
from anomaly.tables import read_table, split_labels, write_table


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_semicolon_csv_naive_timestamps_become_utc_floats(tmp_path):
    path = _write(tmp_path, "skab_like.csv",
                  "datetime;Volume Flow RateRMS;Current;anomaly\n"
                  "2020-03-09 10:14:33;32;1.5;0.0\n"
                  "2020-03-09 10:14:34;33.5;1.25;1.0\n")
    frame = read_table(path)
    assert frame.index.name == "ts"
    assert str(frame.index.tz) == "UTC"
    assert list(frame.index) == [pd.Timestamp("2020-03-09 10:14:33", tz="UTC"), pd.Timestamp("2020-03-09 10:14:34", tz="UTC")]
    assert list(frame.columns) == ["Volume Flow RateRMS", "Current", "anomaly"]
    assert (frame.dtypes == np.float64).all()
    np.testing.assert_array_equal(frame["Volume Flow RateRMS"], [32.0, 33.5])


def test_rfc3339_offsets_are_converted_to_utc(tmp_path):
    path = _write(tmp_path, "a.csv", "ts,temp\n2026-11-21T10:00:00.250Z,1\n2026-11-21T11:00:01+01:00,2\n")
    frame = read_table(path)
    assert list(frame.index) == [pd.Timestamp("2026-11-21 10:00:00.250", tz="UTC"),
                                 pd.Timestamp("2026-11-21 10:00:01", tz="UTC")]


@pytest.mark.parametrize("values, expected", [
    (["1700000000", "1700000001.5"], ["2023-11-14 22:13:20", "2023-11-14 22:13:21.5"]),  # seconds
    (["1700000000000", "1700000001500"], ["2023-11-14 22:13:20", "2023-11-14 22:13:21.5"]),  # milliseconds
])
def test_epoch_seconds_vs_milliseconds_by_magnitude(tmp_path, values, expected):
    path = _write(tmp_path, "e.csv", "timestamp,x\n" + "".join(f"{v},{i}\n" for i, v in enumerate(values)))
    frame = read_table(path)
    assert list(frame.index) == [pd.Timestamp(e, tz="UTC") for e in expected]


def test_timestamp_autodetect_order_and_explicit_name(tmp_path):
    path = _write(tmp_path, "t.csv", "date,Timestamp,x\n2020-01-01,2021-01-01 00:00:00,1\n")
    frame = read_table(path, sensors=["x"])  # "timestamp" (any case) comes before "date"
    assert frame.index[0] == pd.Timestamp("2021-01-01", tz="UTC")
    assert list(frame.columns) == ["x"]
    frame = read_table(path, timestamp_col="date", sensors=["x"])
    assert frame.index[0] == pd.Timestamp("2020-01-01", tz="UTC")


def test_non_numeric_sensor_names_file_and_column(tmp_path):
    path = _write(tmp_path, "bad.csv", "timestamp,temp,pressure\n2020-01-01 00:00:00,1.0,high\n2020-01-01 00:00:01,2.0,1.1\n")
    with pytest.raises(DataError, match=r"bad\.csv.*'pressure'.*'high'"):
        read_table(path)


def test_a_file_with_a_header_only_is_a_data_error_naming_it(tmp_path):
    path = _write(tmp_path, "empty.csv", "timestamp,temp,pressure\n")
    with pytest.raises(DataError, match=r"empty\.csv: no data rows"):
        read_table(path)


def test_missing_timestamp_column_is_a_data_error(tmp_path):
    path = _write(tmp_path, "n.csv", "when,x\n1,2\n")
    with pytest.raises(DataError, match="no timestamp column"):
        read_table(path)
    with pytest.raises(DataError, match="'stamp'"):
        read_table(path, timestamp_col="stamp")


def test_unparseable_timestamp_is_a_data_error(tmp_path):
    path = _write(tmp_path, "u.csv", "timestamp,x\nyesterday,2\n")
    with pytest.raises(DataError, match="'timestamp'"):
        read_table(path)


def test_entity_and_sensor_selection(tmp_path):
    path = _write(tmp_path, "e.csv", "ts,site,b,a,label\n"
                                     "2020-01-01 00:00:00,pump-7,1,2,0\n"
                                     "2020-01-01 00:00:00,pump-8,3,4,1\n")
    frame = read_table(path, entity_col="site", sensors=["a"])
    assert list(frame.columns) == ["entity", "a", "label"]
    assert list(frame["entity"]) == ["pump-7", "pump-8"]
    np.testing.assert_array_equal(frame["a"], [2.0, 4.0])
    with pytest.raises(DataError, match=r"\['nope'\]"):
        read_table(path, entity_col="site", sensors=["nope"])
    with pytest.raises(DataError, match="'nope'"):
        read_table(path, entity_col="nope")


def test_empty_values_are_nan_and_inf_is_missing(tmp_path):
    path = _write(tmp_path, "m.csv", "ts,x,y\n2020-01-01 00:00:00,,inf\n2020-01-01 00:00:01,2,3\n")
    frame = read_table(path)
    assert np.isnan(frame["x"].iloc[0]) and np.isnan(frame["y"].iloc[0])
    assert frame["y"].iloc[1] == 3.0


def test_values_too_large_to_score_are_missing_and_counted(tmp_path, caplog):
    # The worker dead-letters |value| >= 1e15 (float32 scoring); a file's such cell is a missing reading,
    # as inf is (1.8e308, a common "invalid" marker, gave NaN scores: never an alarm).
    path = _write(tmp_path, "w.csv", "ts,x,y\n2020-01-01 00:00:00,1.7976931348623157e308,9.99e14\n"
                                     "2020-01-01 00:00:01,-1e15,-inf\n2020-01-01 00:00:02,2,3\n")
    with caplog.at_level("WARNING", logger="anomaly.tables"):
        frame = read_table(path)
    assert frame["x"].isna().tolist() == [True, True, False] and frame["y"].isna().tolist() == [False, True, False]
    assert frame["y"].iloc[0] == 9.99e14
    said = [r.getMessage() for r in caplog.records]
    assert any("'x': 2 infinite or out-of-range" in m for m in said)
    assert any("'y': 1 infinite or out-of-range" in m for m in said)


def test_a_column_named_twice_is_refused(tmp_path):
    # pandas read the second as a sensor "a.1" of its own
    path = _write(tmp_path, "d.csv", "ts;a;b;a\n2020-01-01 00:00:00;1;2;3\n2020-01-01 00:00:01;1;2;3\n")
    with pytest.raises(DataError, match="names 'a' more than once"):
        read_table(path)


def test_rows_keep_file_order(tmp_path):
    path = _write(tmp_path, "o.csv", "ts,x\n2020-01-01 00:00:02,2\n2020-01-01 00:00:01,1\n2020-01-01 00:00:02,3\n")
    frame = read_table(path)
    np.testing.assert_array_equal(frame["x"], [2.0, 1.0, 3.0])
    assert frame.index[0] == frame.index[2]


def test_split_labels():
    index = pd.DatetimeIndex(pd.to_datetime(["2020-01-01"], utc=True), name="ts")
    frame = pd.DataFrame({"a": [1.0], "Anomaly": [0.0], "changepoint": [1.0]}, index=index)
    sensors, labels = split_labels(frame)
    assert list(sensors.columns) == ["a"]
    assert list(labels.columns) == ["Anomaly", "changepoint"]
    sensors, labels = split_labels(frame[["a"]])
    assert labels.shape == (1, 0)


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_write_read_round_trip(tmp_path, suffix):
    index = pd.DatetimeIndex(["2020-01-01 00:00:00", "2020-01-01 00:00:00.250", "2020-01-01 00:00:01"],
                             name="ts").tz_localize("UTC")
    frame = pd.DataFrame({"temp": [1.5, np.nan, -3.25], "Volume Flow RateRMS": [0.1, 0.2, 0.3]}, index=index)
    path = tmp_path / f"t{suffix}"
    write_table(frame, path)
    back = read_table(path)
    pd.testing.assert_frame_equal(back, frame, check_index_type=False, check_freq=False)
    assert back.index.equals(frame.index)


def test_parquet_with_naive_datetimes_and_entity(tmp_path):
    raw = pd.DataFrame({"time": pd.to_datetime(["2020-01-01 00:00:00", "2020-01-01 00:00:01"]),
                        "unit": ["a", "b"], "x": [1, 2]})
    path = tmp_path / "raw.parquet"
    raw.to_parquet(path, index=False)
    frame = read_table(path, entity_col="unit")
    assert frame.index[1] == pd.Timestamp("2020-01-01 00:00:01", tz="UTC")
    assert list(frame.columns) == ["entity", "x"]
    assert frame["x"].dtype == np.float64


def test_unknown_suffix_and_missing_file(tmp_path):
    with pytest.raises(DataError, match="unknown table format"):
        read_table(_write(tmp_path, "x.xlsx", "a"))
    with pytest.raises(DataError, match="no such file"):
        read_table(tmp_path / "absent.csv")


def test_a_tab_separated_table_reads_like_a_csv(tmp_path):
    from anomaly.tables import read_table

    path = tmp_path / "readings.tsv"
    path.write_text("ts\tx\ty\n2026-01-01T00:00:00Z\t1\t2\n2026-01-01T00:00:01Z\t3\t4\n")
    frame = read_table(path)
    assert list(frame.columns) == ["x", "y"] and frame["y"].tolist() == [2.0, 4.0]


def test_a_column_of_text_alone_is_left_out_and_a_mixed_one_refused(tmp_path, caplog):
    path = _write(tmp_path, "t.csv", "ts,site,temp,note\n2020-01-01 00:00:00,plant-1,1.5,\n"
                                     "2020-01-01 00:00:01,plant-1,1.6,checked\n")
    frame = read_table(path)
    assert list(frame.columns) == ["temp"] and "['site', 'note']" in caplog.text
    with pytest.raises(DataError, match="'site'.*'plant-1'"):  # named as a sensor: it must be numbers
        read_table(path, sensors=["site"])
    mixed = _write(tmp_path, "m.csv", "ts,temp\n2020-01-01 00:00:00,1.5\n2020-01-01 00:00:01,ERR\n")
    with pytest.raises(DataError, match="'temp'.*'ERR'"):  # readings with a fault code: not left out quietly
        read_table(mixed)


def test_labels_may_be_words_and_the_configured_label_column_is_a_label(tmp_path):
    path = _write(tmp_path, "l.csv", "ts,x,anomaly,fault\n2020-01-01 00:00:00,1,no,False\n"
                                     "2020-01-01 00:00:01,2,YES,true\n2020-01-01 00:00:02,3,,no\n")
    frame = read_table(path, labels=("fault",))
    np.testing.assert_array_equal(frame["anomaly"], [0.0, 1.0, np.nan])
    np.testing.assert_array_equal(frame["fault"], [0.0, 1.0, 0.0])
    bad = _write(tmp_path, "b.csv", "ts,x,anomaly\n2020-01-01 00:00:00,1,maybe\n")
    with pytest.raises(DataError, match="'anomaly'.*'maybe'"):
        read_table(bad)


def test_entity_ids_are_kept_as_written(tmp_path):
    path = _write(tmp_path, "ids.csv", "ts,unit,x\n2020-01-01 00:00:00,001,1\n2020-01-01 00:00:00,0007,2\n"
                                       "2020-01-01 00:00:00,7,3\n2020-01-01 00:00:00,7.0,4\n")
    frame = read_table(path, entity_col="unit")
    assert list(frame["entity"]) == ["001", "0007", "7", "7.0"]


def test_a_column_named_entity_is_the_entity_column_unless_another_is_named(tmp_path):
    # Before, a fleet file without data.entity_column put its entities on one grid, where each slot kept
    # one of them (a text id was left out with a warning; a numeric one was read as a sensor).
    path = _write(tmp_path, "fleet.csv", "ts,entity,x\n2020-01-01 00:00:00,1,1\n2020-01-01 00:00:00,2,5\n"
                                         "2020-01-01 00:00:01,1,2\n")
    frame = read_table(path)
    assert list(frame.columns) == ["entity", "x"] and list(frame["entity"]) == ["1", "2", "1"]
    text = _write(tmp_path, "named.csv", "ts,entity,x\n2020-01-01 00:00:00,pump-1,1\n2020-01-01 00:00:00,pump-2,5\n")
    assert list(read_table(text)["entity"]) == ["pump-1", "pump-2"]
    other = _write(tmp_path, "other.csv", "ts,unit,entity\n2020-01-01 00:00:00,a,1\n2020-01-01 00:00:00,b,2\n")
    with pytest.raises(DataError, match="clashes with the entity column"):
        read_table(other, entity_col="unit")  # a named entity column wins; 'entity' is then a clash, as before
    assert list(read_table(other, sensors=["entity"])["entity"]) == [1.0, 2.0]  # asked for as a sensor: one


def test_a_semicolon_table_whose_column_names_hold_commas(tmp_path):
    path = _write(tmp_path, "s.csv", "ts;Flow, l/min;Temp, C\n2024-01-01 00:00:00;1.5;20\n2024-01-01 00:00:01;1.6;21\n")
    frame = read_table(path)
    assert list(frame.columns) == ["Flow, l/min", "Temp, C"]
    np.testing.assert_array_equal(frame["Temp, C"], [20.0, 21.0])


@pytest.mark.parametrize("name, sep", [("s.csv", ","), ("s.tsv", "\t"), ("s.parquet", None)])
def test_write_columns_writes_what_its_suffix_says(tmp_path, name, sep):
    """A .tsv is tab-separated (it was comma-separated under a .tsv name); what is written reads back."""
    from anomaly.tables import write_columns

    frame = pd.DataFrame({"ts": ["2026-01-01T00:00:00Z", "2026-01-01T00:00:01Z"], "score": [0.5, 1.5]})
    path = tmp_path / name
    write_columns(frame, path)
    if sep is None:
        assert pd.read_parquet(path).equals(frame)
    else:
        assert path.read_text().splitlines()[0] == sep.join(["ts", "score"])
        assert pd.read_csv(path, sep=sep).equals(frame)


def test_write_columns_refuses_a_suffix_it_cannot_write(tmp_path):
    from anomaly.tables import table_suffix_problem, write_columns

    assert table_suffix_problem("out.XLSX") == "unknown table format '.XLSX'; use .csv, .tsv or .parquet"
    assert "(no suffix)" in table_suffix_problem("scores")
    with pytest.raises(DataError, match="unknown table format"):
        write_columns(pd.DataFrame({"a": [1]}), tmp_path / "x.xlsx")
    assert not (tmp_path / "x.xlsx").exists()


def test_write_table_and_read_table_share_the_suffix_rule(tmp_path):
    # write_table wrote commas into a .tsv and refused .xlsx only after copying the frame; read_table named
    # only .csv and .parquet though it reads .tsv too
    frame = pd.DataFrame({"x": [1.5, 2.5]}, index=pd.date_range("2024-01-01", periods=2, freq="s", tz="UTC"))
    path = tmp_path / "out.tsv"
    write_table(frame, path)
    assert path.read_text().splitlines()[0] == "ts\tx"
    back = read_table(path)
    assert list(back["x"]) == [1.5, 2.5] and list(back.index) == list(frame.index)
    message = "unknown table format '.xlsx'; use .csv, .tsv or .parquet"
    with pytest.raises(DataError, match=message):
        write_table(frame, tmp_path / "out.xlsx")
    assert not (tmp_path / "out.xlsx").exists()
    with pytest.raises(DataError, match=message):
        read_table(_write(tmp_path, "in.xlsx", "a"))


# --- tables as other tools write them (audit of session 29) ----------------------------------------

def test_a_parquet_files_datetime_index_is_its_time_even_beside_a_date_column(tmp_path):
    """The index pandas wrote (``df.to_parquet()`` of a frame indexed by time) used to lose to a ``date``
    column: three days of one-minute readings became three rows; naming the index was refused."""
    ts = pd.date_range("2024-01-01", periods=6, freq="min", name="ts")
    raw = pd.DataFrame({"date": ts.normalize(), "temp": np.arange(6.0)}, index=ts)
    path = tmp_path / "indexed.parquet"
    raw.to_parquet(path)
    frame = read_table(path)
    assert list(frame.index) == list(ts.tz_localize("UTC"))
    assert list(frame.columns) == ["temp"]  # the date column is a time, not a reading: left out
    assert list(read_table(path, timestamp_col="ts").index) == list(ts.tz_localize("UTC"))
    assert list(read_table(path, timestamp_col="date").index) == list(ts.normalize().tz_localize("UTC"))


def test_the_row_number_column_of_a_pandas_csv_is_left_out(tmp_path, caplog):
    """``DataFrame.to_csv()`` writes the row numbers under a blank header: they were trained as a sensor."""
    path = _write(tmp_path, "p.csv", ",ts,temp\n0,2020-01-01 00:00:00,1.5\n1,2020-01-01 00:00:01,1.6\n")
    frame = read_table(path)
    assert list(frame.columns) == ["temp"] and "no name in the header" in caplog.text


@pytest.mark.parametrize("cells", [["5,12", "5,25"], ["1,234", "1,250"], ["1.013,2", "1.014,5"],
                                   ["1,234,567", "1,234,999"]])  # European, and several groups
def test_numbers_with_a_decimal_comma_or_thousands_separator_are_refused_not_left_out(tmp_path, cells):
    """A ``;`` file with ``5,12`` (a decimal comma) lost the sensor as "text" and trained on the others."""
    path = _write(tmp_path, "euro.csv", "ts;flow;volt\n" + "".join(
        f"2020-01-01 00:00:0{i};{c};230\n" for i, c in enumerate(cells)))
    with pytest.raises(DataError, match=r"euro\.csv.*'flow'.*decimal comma or thousands separator"):
        read_table(path)


def test_fractional_epoch_seconds_keep_their_microseconds(tmp_path):
    path = _write(tmp_path, "e.csv", "timestamp,x\n1700000000.1,1\n1700000000.2,2\n1700000000.3,3\n")
    frame = read_table(path)
    assert list(frame.index) == [pd.Timestamp("2023-11-14 22:13:20.1", tz="UTC") + pd.Timedelta(milliseconds=100 * i)
                                 for i in range(3)]


def test_a_categorical_text_column_of_a_parquet_file_is_left_out_like_text(tmp_path):
    raw = pd.DataFrame({"ts": pd.date_range("2024-01-01", periods=2, freq="s"),
                        "site": pd.Categorical(["x", "x"]), "temp": [1.0, 2.0]})
    path = tmp_path / "c.parquet"
    raw.to_parquet(path, index=False)
    assert list(read_table(path).columns) == ["temp"]


def test_yyyymmdd_numbers_are_not_read_as_epoch_seconds(tmp_path):
    """``20240101`` as epoch seconds is 1970-08-21: daily data became one-second data in 1970."""
    path = _write(tmp_path, "d.csv", "date,x\n20240101,1\n20240102,2\n")
    with pytest.raises(DataError, match="YYYYMMDD"):
        read_table(path)


@pytest.mark.parametrize("stamps", [("20240131123000", "20240131123001"), ("202401311230", "202401311231")])
def test_yyyymmddhhmm_numbers_are_not_read_as_epoch_milliseconds(tmp_path, stamps):
    path = _write(tmp_path, "d.csv", f"date,x\n{stamps[0]},1\n{stamps[1]},2\n")
    with pytest.raises(DataError, match="YYYYMMDD"):
        read_table(path)


def test_a_column_of_asset_ids_points_at_the_entity_column(tmp_path):
    """Ids like pump-1 beside 007 made the column look mixed: "not numeric", with no word of data.entity_column."""
    path = _write(tmp_path, "fleet.csv", "ts,asset,temp\n2020-01-01 00:00:00,pump-1,1\n2020-01-01 00:00:00,007,2\n"
                                         "2020-01-01 00:00:01,pump-1,3\n2020-01-01 00:00:01,007,4\n")
    with pytest.raises(DataError, match=r"'asset' is not numeric.*data\.entity_column"):
        read_table(path)


def test_addresses_versions_and_dotted_dates_are_text_not_comma_numbers(tmp_path, caplog):
    """Stripping every dot made 10.0.0.1, 1.2.3 and 31.01.2024 read as numbers with a decimal comma:
    the whole file was refused where the column used to be left out as text."""
    path = _write(tmp_path, "t.csv", "ts,ip,firmware,date_de,temp\n"
                                     "2020-01-01 00:00:00,10.0.0.1,1.2.3,31.01.2024,1.5\n"
                                     "2020-01-01 00:00:01,10.0.0.2,1.2.4,01.02.2024,1.6\n")
    assert list(read_table(path).columns) == ["temp"]


def test_a_label_column_of_words_is_not_taken_for_asset_ids(tmp_path):
    path = _write(tmp_path, "l.csv", "ts,x,label\n2020-01-01 00:00:00,1,normal\n2020-01-01 00:00:01,2,fault\n")
    with pytest.raises(DataError, match="'label'") as err:
        read_table(path)
    assert "entity_column" not in str(err.value)


def test_blank_lines_before_the_header_are_skipped_as_pandas_skips_them(tmp_path):
    # the layout sniffer took the first line for the header: "empty file (no header line)"
    path = tmp_path / "blank.csv"
    path.write_text("\n\n  \ntimestamp;a;b\n2024-01-01 00:00:00;1;2\n2024-01-01 00:00:01;3;4\n")
    frame = read_table(path)
    assert list(frame.columns) == ["a", "b"] and frame["b"].tolist() == [2.0, 4.0]
    empty = tmp_path / "empty.csv"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="empty file"):
        read_table(empty)


@pytest.mark.parametrize("cells, bad", [(["2024-01-01 00:00:00", "01/01/2024 00:00:01"], "'01/01/2024 00:00:01' at data row 2"),
                                        (["1700000000", "1700000001", "soon"], "'soon' at data row 3")])
def test_a_bad_timestamp_cell_is_named(tmp_path, cells, bad):
    # pandas' message advised format= arguments no command takes, and could quote a good cell
    path = tmp_path / "t.csv"
    path.write_text("timestamp,a\n" + "".join(f"{c},{i}\n" for i, c in enumerate(cells)))
    with pytest.raises(DataError, match=bad) as raised:
        read_table(path)
    assert "format=" not in str(raised.value)


def test_spaces_around_header_names_are_not_part_of_them(tmp_path):
    # "timestamp, a, b" named the sensors " a" and " b": data.sensors = ["a"] was "not found"
    path = tmp_path / "spaced.csv"
    path.write_text("timestamp, a , b\n2024-01-01 00:00:00, 1, 2\n2024-01-01 00:00:01, 3, 4\n")
    frame = read_table(path, sensors=["a"])
    assert list(frame.columns) == ["a"] and frame["a"].tolist() == [1.0, 3.0]
    clash = tmp_path / "clash.csv"
    clash.write_text("timestamp,a, a\n2024-01-01 00:00:00,1,2\n")
    with pytest.raises(DataError, match="more than once"):
        read_table(clash)


def test_a_parquet_frame_indexed_by_time_and_entity_is_read(tmp_path):
    # "no timestamp column found; columns are ['a']": the index's levels went unseen
    stamps = pd.date_range("2024-01-01", periods=3, freq="1s", tz="UTC")
    frame = pd.DataFrame({"ts": list(stamps) * 2, "entity": ["p1"] * 3 + ["p2"] * 3, "a": range(6)})
    path = tmp_path / "multi.parquet"
    frame.set_index(["ts", "entity"]).to_parquet(path)
    read = read_table(path, entity_col="entity")
    assert sorted(read.columns) == ["a", "entity"] and len(read) == 6
    assert read.index[0] == stamps[0] and set(read["entity"]) == {"p1", "p2"}


def test_data_rows_are_counted_from_1_the_first_under_the_header(tmp_path):
    """A person opening the file counts the first row under the header as row 1."""
    with pytest.raises(DataError, match=r"'oops' at data row 1\)"):
        read_table(_write(tmp_path, "a.csv", "ts,temp\n1700000000,oops\n1700000001,2\n"))
    with pytest.raises(DataError, match="empty entity id at data row 2"):
        read_table(_write(tmp_path, "b.csv", "ts,entity,temp\n1700000000,p1,1\n1700000001,,2\n"), entity_col="entity")


@pytest.mark.parametrize("sep", [",", ";"])
def test_a_separator_ending_every_data_line_does_not_shift_the_columns(tmp_path, sep):
    # logger and spreadsheet exports end each line with a separator the header lacks: pandas made the first
    # column the index and moved every name one left (a's readings read as 1970 times, b's as a), silently
    path = tmp_path / "trailing.csv"
    path.write_text(f"ts{sep}a{sep}b\n" + "".join(f"2024-01-01 00:00:0{i}{sep}{10 + i}{sep}{20 + i}{sep}\n"
                                                  for i in range(3)))
    frame = read_table(path)
    assert list(frame.columns) == ["a", "b"]
    assert frame["a"].tolist() == [10, 11, 12] and frame["b"].tolist() == [20, 21, 22]
    assert str(frame.index[0]).startswith("2024-01-01 00:00:00")


def test_data_lines_with_a_value_the_header_does_not_name_are_refused(tmp_path):
    path = tmp_path / "extra.csv"
    path.write_text("ts,a,b\n" + "".join(f"2024-01-01 00:00:0{i},{10 + i},{20 + i},9\n" for i in range(3)))
    with pytest.raises(DataError, match="more fields than the header's 3 names"):
        read_table(path)


def test_a_parquet_fleet_saved_with_its_entities_as_the_index_keeps_them(tmp_path):
    ts = pd.date_range("2024-01-01", periods=3, freq="s", tz="UTC")
    frame = pd.DataFrame({"ts": list(ts) * 2, "entity": ["p1"] * 3 + ["p2"] * 3, "a": [1.0, 2, 3, 100, 200, 300]})
    path = tmp_path / "fleet.parquet"
    frame.set_index("entity").to_parquet(path)
    got = read_table(path, entity_col="entity")
    assert sorted(got["entity"].unique()) == ["p1", "p2"] and got["a"].tolist() == [1.0, 2, 3, 100, 200, 300]


def test_entity_ids_pandas_would_read_as_missing_are_ids(tmp_path):
    # "NA" (North America), "None", "null": pandas' default missing-value strings made them "empty entity id"
    path = tmp_path / "regions.csv"
    path.write_text("ts,region,a\n" + "".join(f"2024-01-01 00:00:0{i},{region},{i}\n"
                                              for i, region in enumerate(["EU", "NA", "None", "null"])) +
                    "2024-01-01 00:00:05,EU,NA\n")
    frame = read_table(path, entity_col="region")
    assert frame["entity"].tolist() == ["EU", "NA", "None", "null", "EU"]
    assert frame["a"].iloc[:4].tolist() == [0, 1, 2, 3] and np.isnan(frame["a"].iloc[4])  # a value's "NA": missing


@pytest.mark.parametrize("start", ["2024-10-27 00:00", "2024-03-31 00:00"], ids=["clocks-back", "clocks-forward"])
def test_a_local_time_logger_s_file_is_read_in_data_timezone_across_a_dst_change(tmp_path, start):
    """Naive timestamps are UTC unless data.timezone names their zone: a Berlin logger's file where clocks
    went back had 24 readings on 20 distinct stamps (the repeated hour's second pass dropped), and one
    where they went forward a made-up hour-long outage."""
    true = pd.date_range(pd.Timestamp(start, tz="Europe/Berlin"), periods=24, freq="15min")
    path = tmp_path / "logger.csv"
    pd.DataFrame({"ts": true.tz_localize(None).strftime("%Y-%m-%d %H:%M:%S"),  # as the logger writes them
                  "a": np.arange(24.0)}).to_csv(path, index=False)
    frame = read_table(path, timezone="Europe/Berlin")
    assert list(frame.index) == list(true.tz_convert("UTC"))  # every reading at its true instant, in order
    assert np.diff(frame.index.as_unit("ns").asi8).tolist() == [15 * 60 * 10**9] * 23  # no hole, no repeat
    naive = read_table(path)  # without the setting: read as UTC, as before
    assert naive.index.nunique() == (20 if "10-27" in start else 24)


def test_data_timezone_leaves_stamps_with_an_offset_and_names_an_impossible_local_time(tmp_path):
    path = tmp_path / "offsets.csv"
    path.write_text("ts,a\n2024-10-27T02:30:00+02:00,1\n2024-10-27T02:30:00+01:00,2\n")
    assert read_table(path, timezone="America/Chicago").index.tolist() == [
        pd.Timestamp("2024-10-27T00:30:00Z"), pd.Timestamp("2024-10-27T01:30:00Z")]
    path.write_text("ts,a\n2024-03-31 01:45:00,1\n2024-03-31 02:30:00,2\n")  # 02:30 did not happen in Berlin
    with pytest.raises(DataError, match=r"2024-03-31 02:30:00 is a nonexistent time.*Europe/Berlin"):
        read_table(path, timezone="Europe/Berlin")


def test_data_timezone_must_be_an_iana_zone():
    from anomaly.config import build_settings
    from anomaly.errors import ConfigError

    assert build_settings({"data": {"timezone": "Europe/Berlin"}}).data.timezone == "Europe/Berlin"
    with pytest.raises(ConfigError) as err:
        build_settings({"data": {"timezone": "Mars/Olympus"}})
    assert err.value.field == "data.timezone" and "IANA" in str(err.value)


def test_years_as_timestamps_are_refused_and_spreadsheet_days_said(tmp_path, caplog):
    # a column of years, or Excel's serial dates, read as epoch seconds: a table of 1970-01-01, its
    # readings a second apart (or less), trained on and scored as if so, and nothing said
    from anomaly.tables import read_table

    years = tmp_path / "years.csv"
    years.write_text("date,temp\n2019,1.0\n2020,2.0\n2021,3.0\n")
    with pytest.raises(DataError, match="numbers like 2019 look like years"):
        read_table(years)
    days = tmp_path / "excel.csv"
    days.write_text("time,temp\n" + "".join(f"{45000 + i / 1440:.6f},{i}\n" for i in range(20)))
    frame = read_table(days)
    assert len(frame) == 20 and "look like spreadsheet serial dates" in caplog.text
    caplog.clear()
    elapsed = tmp_path / "elapsed.csv"  # elapsed seconds from 0, whole: read as they are, nothing said
    elapsed.write_text("time,temp\n" + "".join(f"{i},{i}\n" for i in range(0, 3000, 100)))
    assert len(read_table(elapsed)) == 30 and "spreadsheet" not in caplog.text
