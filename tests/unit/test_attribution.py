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
