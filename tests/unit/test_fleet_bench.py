"""pipelines.fleet's pure parts: the figures of flags against labels, and the table."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.fleet import flag_metrics, table


def test_flag_metrics_pool_the_series_and_keep_each_series_f1() -> None:
    labels = [np.array([0, 1, 1, 0, 0], bool), np.array([0, 0, 0, 1, 1, 0], bool)]
    flags = [np.array([0, 1, 0, 0, 1], bool), np.array([0, 0, 0, 0, 0, 0], bool)]
    scores = [np.array([0.1, 0.9, 0.8, 0.2, 0.3]), np.array([0.1, 0.2, 0.1, 0.7, 0.9, 0.3])]
    m = flag_metrics(labels, flags, scores)
    # pooled: tp 1, fp 1, fn 1 + 2 = 3
    assert m["precision"] == pytest.approx(0.5) and m["recall"] == pytest.approx(0.25)
    assert m["f1"] == pytest.approx(2 * 0.5 * 0.25 / 0.75)
    assert m["per_series_f1"] == pytest.approx([2 / 4, 0.0])  # 2tp / (2tp + fp + fn): 2 / (2 + 1 + 1)
    assert m["f1_best_mean"] == pytest.approx(1.0)  # each series' scores rank its labels perfectly
    assert m["event_recall"] == pytest.approx(0.5) and m["event_precision"] == pytest.approx(0.5)


def test_the_table_lists_own_then_shared_then_the_per_series_row() -> None:
    row = {"f1": 0.25, "precision": 0.5, "recall": 0.125, "f1_best_mean": 0.5, "event_f1": 0.4}
    text = table({"own": row, "shared": {**row, "f1": 0.05}}, {**row, "f1": 0.3})
    lines = text.splitlines()
    assert lines[2].startswith("| one for the fleet | each series' own | 0.250 |")
    assert lines[3].startswith("| one for the fleet | shared | 0.050 |")
    assert lines[4].startswith("| one per series (the benchmark table's row) | its own | 0.300 |")
    assert len(table({"own": row, "shared": row}, None).splitlines()) == 4


def test_the_benchmarks_row_is_shown_only_for_the_same_number_of_series(caplog) -> None:
    # a --limit benchmark's row was printed as "the benchmark table's row" beside a run over every machine
    from pathlib import Path

    from pipelines.fleet import comparable_row

    row = {"f1": 0.3, "machines": 2}
    assert comparable_row(row, 2, Path("b.json")) is row
    assert comparable_row(row, 6, Path("b.json")) is None and "covers 2 series, this run 6" in caplog.text
    assert comparable_row(None, 6, Path("b.json")) is None
