"""The worker's dead-letter log lines (``anomaly.dead_letter_log``): reasons counted, at most once per interval."""

from __future__ import annotations

from anomaly.dead_letter_log import MAX_REASONS, REASON_CHARS, DeadLetterLog


def test_the_first_dead_letters_are_logged_at_once_with_their_reasons():
    log = DeadLetterLog(interval_s=60)
    line = log.add(["not JSON: x", "not JSON: x", "values is empty: no sensor readings"], now_s=100.0)
    assert line == "3 dead letters: 2 x not JSON: x; 1 x values is empty: no sensor readings"
    assert log.pending == 0


def test_later_ones_are_summed_up_once_per_interval_and_flushed_at_the_end():
    log = DeadLetterLog(interval_s=60)
    assert log.add(["a"], 0.0) == "1 dead letter: 1 x a"
    assert log.add(["b"], 10.0) is None and log.add(["b", "c"], 30.0) is None
    assert log.pending == 3
    assert log.add(["b"], 61.0) == "4 dead letters in the last 51 s: 3 x b; 1 x c"
    assert log.add(["d"], 70.0) is None
    assert log.flush(75.0) == "1 dead letter in the last 5 s: 1 x d"
    assert log.flush(76.0) is None and log.add([], 200.0) is None


def test_many_reasons_are_bounded_and_named_most_frequent_first():
    log = DeadLetterLog(interval_s=60)
    log.add(["first"], 0.0)
    # "common" is kept (seen before the table filled); the reasons past MAX_REASONS distinct ones are "other".
    reasons = ["common"] * 5 + [f"values.s{i} is not a number" for i in range(MAX_REASONS + 50)] + ["x" * 1000]
    assert log.add(reasons, 1.0) is None
    line = log.flush(2.0)
    assert line.startswith(f"{len(reasons)} dead letters in the last 1 s: 5 x common; 1 x values.s0 is not a number")
    assert line.endswith(f"{len(reasons) - 7} with other reasons")  # 5 common, s0, s1 named
    log.add(["y" * 1000], 100.0)
    assert len(log.flush(101.0) or "") < REASON_CHARS + 40
