"""The worker's dead-letter log lines (``anomaly.dead_letter_log``): reasons counted by kind, a new kind
at once, the rest at most once per interval."""

from __future__ import annotations

from anomaly.dead_letter_log import MAX_REASONS, REASON_CHARS, DeadLetterLog, reason_kind


def test_the_first_dead_letters_are_logged_at_once_with_their_reasons():
    log = DeadLetterLog(interval_s=60)
    line = log.add(["not JSON: x", "not JSON: x", "values is empty: no sensor readings"], now_s=100.0)
    assert line == "3 dead letters: 2 x not JSON: x; 1 x values is empty: no sensor readings"
    assert log.pending == 0


def test_known_kinds_are_summed_up_once_per_interval_a_new_kind_at_once_and_the_rest_at_the_end():
    log = DeadLetterLog(interval_s=60)
    assert log.add(["a"], 0.0) == "1 dead letter: 1 x a"
    assert log.add(["a"], 10.0) is None and log.add(["a", "a"], 30.0) is None  # a known kind waits
    assert log.pending == 3
    assert log.add(["b"], 40.0) == "4 dead letters in the last 30 s: 3 x a; 1 x b"  # a new kind: at once
    assert log.add(["b"], 50.0) is None
    assert log.add(["a"], 101.0) == "2 dead letters in the last 51 s: 1 x b; 1 x a"  # the interval passed
    assert log.add(["a"], 110.0) is None
    assert log.flush(115.0) == "1 dead letter in the last 5 s: 1 x a"
    assert log.flush(116.0) is None and log.add([], 200.0) is None


def test_reasons_that_differ_only_in_numbers_are_one_kind():
    assert reason_kind("ts is 604 s ahead (more than 600)") == reason_kind("ts is 1.5e3 s ahead (more than 600)")
    log = DeadLetterLog(interval_s=60)
    ahead = [f"ts is {600 + i} s ahead of the worker's clock" for i in range(200)]
    sensors = ["sensor set does not match the entity's model: unknown ['Temperature']"] * 30
    line = log.add(ahead + sensors, 0.0)
    assert line == ("230 dead letters: 200 x ts is 600 s ahead of the worker's clock (and alike); "
                    "30 x sensor set does not match the entity's model: unknown ['Temperature']")


def test_bytes_written_in_hex_are_numbers_too():
    """Every byte value was a kind of its own: a stream of binary garbage logged a line per new byte."""
    assert reason_kind("not UTF-8: invalid byte 0xff at position 3") == \
        reason_kind("not UTF-8: invalid byte 0xFE at position 12")
    log = DeadLetterLog(interval_s=60)
    assert log.add(["not UTF-8: invalid byte 0xff at position 0"], 0.0) is not None
    assert log.add(["not UTF-8: invalid byte 0xfe at position 0"], 1.0) is None  # known kind: waits


def test_many_kinds_are_bounded_and_named_most_frequent_first():
    log = DeadLetterLog(interval_s=60)
    log.add(["first"], 0.0)
    # "common" is kept (seen before the table filled); the kinds past MAX_REASONS distinct ones are "other".
    reasons = ["common"] * 5 + [f"s{chr(65 + i % 26)}{chr(65 + i // 26)} is bad" for i in range(MAX_REASONS + 50)]
    line = log.add(reasons + ["x" * 1000], 1.0)  # new kinds: logged at once
    assert line.startswith(f"{len(reasons) + 1} dead letters: 5 x common; 1 x sAA is bad")
    # 5 common, sAA, sBA (the most frequent) and the next 10 kinds never logged before, sCA .. sLA, named
    assert "1 x sLA is bad; " in line and line.endswith(f"{len(reasons) + 1 - 17} with other reasons")
    log.add(["y" * 1000], 100.0)
    assert len(log.flush(101.0) or "") < REASON_CHARS + 40


def test_a_rare_new_kind_is_named_at_once_and_the_summary_keeps_its_interval():
    log = DeadLetterLog(interval_s=60)
    common = ["not JSON"] * 50 + ["values.temp is bad"] * 50 + ["sensor set differs"] * 50
    log.add(common, 0.0)
    line = log.add(common + ["entity is not a non-empty string"], 10.0)  # a 4th kind: news, though rare
    assert line is not None and line.endswith("; 1 x entity is not a non-empty string")
    assert log.add(common + ["entity is not a non-empty string"], 20.0) is None  # known now: waits
    assert log.add(common, 30.0) is None and log.add(common, 71.0) is not None  # once the interval passed


def test_reasons_that_differ_in_the_value_they_quote_are_one_kind():
    # each quoted value was a kind of its own: 100 of them filled the table for good, and a kind seen after
    # that (binary garbage) was neither logged at once nor named, but summed into "other reasons"
    assert reason_kind("values.temp is not a number: 'abc'") == reason_kind("values.flow is not a number: 'n/a'")
    assert reason_kind("ts is not a valid date/time: 'yesterday' (no)") == \
        reason_kind("ts is not a valid date/time: 'soon' (no)")
    assert reason_kind("values.temp is not a number: 'abc'") != reason_kind("values.temp is not finite: inf")
    log = DeadLetterLog(interval_s=60)
    quoted = [f"values.s{i} is not a number: '{chr(97 + i % 26) * (1 + i // 26)}'" for i in range(150)]
    assert log.add(quoted, 0.0) == "150 dead letters: 150 x values.s0 is not a number: 'a' (and alike)"
    line = log.add(["not UTF-8: invalid byte 0xff at position 3"], 1.0)
    assert line == "1 dead letter: 1 x not UTF-8: invalid byte 0xff at position 3"  # new: at once, by name


def test_a_sensor_name_with_spaces_is_left_out_of_the_kind_whole():
    # SKAB's "Volume Flow RateRMS": only "values.Volume" was replaced, so each spaced name was a kind of its
    # own, and 100 of them filled the table for good
    kinds = {reason_kind(f"values.{name} is not a number: 'n/a'")
             for name in ("Current", "Volume Flow RateRMS", "Inlet Temp", "a b c d")}
    assert kinds == {"values.* is not a number"}
    assert reason_kind("values.Inlet Temp is not finite: NaN") == "values.* is not finite"
    assert reason_kind("values.Inlet Temp is too large to score (|value| >= 1e+15): 2e+20") == \
        "values.* is too large to score (|value| >= #)"
    assert reason_kind("values is empty") == "values is empty"
    log = DeadLetterLog(interval_s=60)
    log.add([f"values.sensor {i} is not a number: 'n/a'" for i in range(150)], 0.0)
    line = log.add(["not UTF-8: invalid byte 0xff at position 3"], 1.0)
    assert line == "1 dead letter: 1 x not UTF-8: invalid byte 0xff at position 3"


def test_each_kind_names_the_record_keys_it_came_with():
    """One pump of 150 after a firmware update: 0.67 % dead letters, under the fleet-wide alert, and the line
    did not say which asset sends them."""
    log = DeadLetterLog(interval_s=60)
    mismatch = "sensor set does not match the entity's model: unknown ['vibration']"
    line = log.add([mismatch, mismatch, "not JSON: x"], 0.0, keys=["pump-000", "pump-000", None])
    assert line == f"3 dead letters: 2 x {mismatch} [keys 'pump-000']; 1 x not JSON: x"
    keys = [f"pump-{i:03d}" for i in range(5)]
    assert log.add([mismatch] * 5, 10.0, keys=keys) is None  # a known kind waits for the interval
    assert log.flush(20.0) == (f"5 dead letters in the last 10 s: 5 x {mismatch} "
                               "[keys 'pump-000', 'pump-001', 'pump-002' and others]")
    assert log.add(["not JSON: y"], 100.0) == "1 dead letter: 1 x not JSON: y"  # no keys given: none named
    assert log.add([mismatch], 200.0, keys=["p" * 100]) == f"1 dead letter: 1 x {mismatch} [keys '{'p' * 59}…']"
