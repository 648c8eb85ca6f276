"""``pipelines.attribution``: the SMD ranking ablation, on a small series with a known faulty sensor."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines import attribution
from tests.unit.test_protocols import _faulted, _tiny


def test_rankings_by_hand():
    rows = {"errors": np.array([[4.0, 1.0]]), "newest": np.array([[0.0, 9.0]]),
            "val_mean": np.array([8.0, 0.5]), "val_std": np.array([2.0, 0.25])}
    assert attribution.RANKINGS["window error (shipped)"](rows).tolist() == [[4.0, 1.0]]
    assert attribution.RANKINGS["newest step"](rows).tolist() == [[0.0, 9.0]]
    assert attribution.RANKINGS["over validation mean"](rows) == pytest.approx(np.array([[0.5, 2.0]]))
    assert attribution.RANKINGS["validation z-score"](rows) == pytest.approx(np.array([[-2.0, 2.0]]))


def test_every_ranking_names_a_sensor_that_jumps_and_the_table_shows_each():
    from anomaly.protocols import fit_series

    series = _faulted(np.random.default_rng(4))
    signals = attribution.signals(series, fit_series(series, _tiny()), validation_fraction=0.2)
    assert signals["errors"].shape == signals["newest"].shape == (150, 3)
    assert signals["truth"].sum() == 20 and signals["truth"][50:70, 1].all()  # rows 300..319 of 400, test from 250
    rows = attribution.evaluate([signals])
    assert set(rows) == set(attribution.RANKINGS)
    for name, r in rows.items():
        assert r["attribution_rows"] == 20 and r["hit_rate_100"] > 0.8, name
    text = attribution.markdown(rows)
    assert text.startswith("20 labelled rows") and text.count("\n| ") == 2 + len(attribution.RANKINGS)  # header, rule, a row each


def test_a_profile_that_leaves_sensors_out_is_refused():
    from anomaly.protocols import fit_series

    series = _faulted(np.random.default_rng(4))
    with pytest.raises(ValueError, match="ranks every sensor"):
        attribution.signals(series, fit_series(series, _tiny(sensors=["a", "b"])), validation_fraction=0.2)


def test_event_rankings_by_hand():
    """Three windows of one event: sensor 0 leads the first (the open), sensor 1 the peak, sensor 2 has
    the largest share on average; summed, sensor 1 leads."""
    errors = np.array([[4.0, 1.0, 3.0], [1.0, 10.0, 2.0], [0.1, 0.1, 1.0]])
    scores = np.array([1.0, 5.0, 0.5])
    r = attribution.EVENT_RANKINGS
    assert r["at open"](errors, scores, 1).tolist() == [4.0, 1.0, 3.0]  # the open sees the first window only
    assert r["at open"](errors, scores, 2).tolist() == [1.0, 10.0, 2.0]  # the peak of the first two
    assert r["peak window (shipped)"](errors, scores, 1).tolist() == [1.0, 10.0, 2.0]
    shares = r["whole event, mean share"](errors, scores, 1)
    assert shares == pytest.approx([(4 / 8 + 1 / 13 + 0.1 / 1.2) / 3, (1 / 8 + 10 / 13 + 0.1 / 1.2) / 3,
                                    (3 / 8 + 2 / 13 + 1 / 1.2) / 3])
    assert int(np.argmax(shares)) == 2
    assert r["whole event, summed error"](errors, scores, 1).tolist() == pytest.approx([5.1, 11.1, 6.0])


def test_events_are_runs_long_enough_to_open_that_hold_a_labelled_sensor():
    flags = np.array([1, 1, 0, 1, 1, 1, 0, 1, 1, 1, 0], bool)
    truth = np.zeros((11, 2), bool)
    truth[0, 0] = truth[4, 1] = True  # the first run is too short to open; the last holds no label
    m = {"flags": flags, "truth": truth, "errors": np.arange(22, dtype=float).reshape(11, 2),
         "scores": np.array([0, 0, 0, 1, 3, 2, 0, 9, 9, 9, 0], dtype=float)}
    rows = attribution.event_rows(m, min_duration=3)
    scores, event_truth = rows["peak window (shipped)"]
    assert event_truth.tolist() == [[False, True]]
    assert scores.tolist() == [[8.0, 9.0]]  # row 4, the run's peak
    assert rows["at open"][0].tolist() == [[8.0, 9.0]]
    empty = attribution.event_rows({**m, "flags": np.zeros(11, bool)}, min_duration=3)
    assert empty["at open"][0].shape == (0, 2)


def test_the_event_table_shows_each_event_ranking():
    from anomaly.protocols import fit_series

    series = _faulted(np.random.default_rng(4))
    signals = attribution.signals(series, fit_series(series, _tiny()), validation_fraction=0.2)
    events = attribution.evaluate_events([signals], min_duration=3)
    assert set(events) == set(attribution.EVENT_RANKINGS)
    for name, r in events.items():
        assert r["attribution_rows"] >= 1 and r["hit_rate_100"] == 1.0, name  # one jumping sensor, named
    text = attribution.markdown_events(events, 3)
    assert text.count("\n| ") == 2 + len(attribution.EVENT_RANKINGS)
