"""What the figures draw, checked on the artists (no image comparison)."""

import numpy as np
import pytest

from anomaly import plots


def _spans(ax) -> list[tuple[float, float]]:
    """(start, width) of each shaded run: the polygons of the axes' collections (one artist for them all)."""
    xs = [path.vertices[:, 0] for c in ax.collections for path in c.get_paths()]
    return [(round(float(x.min()), 6), round(float(x.max() - x.min()), 6)) for x in xs]


def test_thousands_of_runs_are_one_artist():
    # an axvspan each: 5,000 runs on five panels took 30 s and 400 MB to draw
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    plots._shade(ax, np.arange(10_000.0), np.arange(10_000) % 2 == 1, "red")
    assert len(ax.collections) == 1 and len(_spans(ax)) == 5_000 and not ax.patches
    plots.close(fig)


def test_a_flagged_row_is_shaded_up_to_the_next_row_even_alone_and_at_the_end():
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    plots._shade(ax, np.arange(10.0), np.array([0, 0, 1, 0, 1, 1, 1, 0, 0, 1]), "red")
    assert _spans(ax) == [(2.0, 1.0), (4.0, 3.0), (9.0, 1.0)]  # the last row takes the step before it
    plots.close(fig)
    fig, ax = plt.subplots()
    plots._shade(ax, np.array([5.0]), np.array([True]), "red")  # one row, no step to take: a line
    assert not ax.patches and len(ax.lines) == 1
    plots.close(fig)


def test_timestamps_are_shaded_in_their_own_units():
    import matplotlib.pyplot as plt

    x = np.array(["2026-01-01T00:00", "2026-01-01T00:10", "2026-01-01T00:20"], dtype="datetime64[ns]")
    fig, ax = plt.subplots()
    plots._shade(ax, x, np.array([0, 1, 0]), "red")
    (start, width), = _spans(ax)
    assert width == pytest.approx(10 / (24 * 60), abs=1e-6)  # ten minutes, in matplotlib's days
    plots.close(fig)


def test_the_score_panel_draws_the_bar_in_force_at_each_row():
    scores = np.r_[np.nan, np.linspace(0.1, 2.0, 9)]
    bars = np.r_[np.nan, np.full(4, 0.5), np.full(5, 1.5)]  # e.g. an episode's bar, risen mid-way
    fig = plots.anomaly_overlay(np.arange(10.0), np.ones((10, 1)), ["x"], scores, bars, flags=scores > bars)
    score_ax = fig.axes[-1]
    dashed = [line for line in score_ax.lines if line.get_linestyle() == "--"]
    assert len(dashed) == 1
    np.testing.assert_array_equal(dashed[0].get_ydata(), bars)
    plots.close(fig)
    fig = plots.anomaly_overlay(np.arange(10.0), np.ones((10, 1)), ["x"], scores, 0.5)  # one bar: a level line
    (level,) = [line for line in fig.axes[-1].lines if line.get_linestyle() == "--"]
    assert list(level.get_ydata()) == [0.5, 0.5]
    plots.close(fig)


def test_the_error_distribution_draws_each_bin_as_a_fraction_of_its_group():
    """Half the windows at 0.5, half at 2000: both bars equally tall (a density on log bins drew the
    high half, where the threshold is, 4,000 times lower)."""
    scores = np.r_[np.full(500, 0.5), np.full(500, 2000.0)]
    fig = plots.error_distribution(scores, 3000.0, test_scores=np.full(10, 2000.0))
    ax = fig.axes[0]
    heights = [p.get_height() for p in ax.patches if p.get_height() > 0]
    assert sorted(round(h, 6) for h in heights) == [0.5, 0.5, 1.0]  # validation's two bins; the 10 scored in one
    assert ax.get_ylabel() == "fraction of windows in the bin"
    assert [t.get_text() for t in ax.get_legend().get_texts()][:2] == ["validation (normal): 1,000", "scored data: 10"]
    plots.close(fig)


def test_a_one_epoch_loss_curve_shows_its_points_on_whole_epochs():
    fig = plots.loss_curves([0.5], [0.6], best_epoch=1)
    ax = fig.axes[0]
    assert all(line.get_marker() == "o" for line in ax.lines[:2])
    assert ax.get_xlim() == (0.5, 1.5)
    plots.close(fig)


def test_an_overlay_with_reconstructions_draws_the_worst_reconstructed_sensors_first_and_says_so():
    """``score --record`` and ``evaluate`` pass no order: the sensor behind the alarms was left out
    when it was not among the first four columns."""
    rng = np.random.default_rng(0)
    values = rng.normal(size=(50, 6)) * [1, 1, 1, 1, 100, 1]  # sensor 4 on a wide scale, well reconstructed
    expected = values.copy()
    expected[:, 5] += 3.0  # sensor 5 badly reconstructed throughout
    expected[40:, 3] += 50.0  # sensor 3 far off where the rows are flagged
    flags = np.r_[np.zeros(40, bool), np.ones(10, bool)]
    assert plots.error_order(values, expected, flags)[:2] == [3, 5]
    assert plots.error_order(values, expected)[:2] == [3, 5]
    fig = plots.anomaly_overlay(np.arange(50.0), values, ["a", "b", "c", "d", "e", "Volume Flow RateRMS"],
                                np.arange(50.0), 5.0, flags=flags, expected=expected)
    labels = [ax.get_ylabel() for ax in fig.axes]
    assert labels[:2] == ["d", "Volume Flow\nRateRMS"] and len(labels) == 5
    assert "the 4 of 6 sensors with the largest error" in fig._suptitle.get_text()
    plots.close(fig)
    fig = plots.anomaly_overlay(np.arange(50.0), values, list("abcdef"), np.arange(50.0), 5.0)  # nothing to rank by
    assert [ax.get_ylabel() for ax in fig.axes] == ["a", "b", "c", "d", "score"]
    assert "the first 4 of 6 sensors" in fig._suptitle.get_text()
    plots.close(fig)


def test_error_order_copes_with_nan_and_constant_sensors():
    values = np.c_[np.ones(10), np.full(10, np.nan), np.arange(10.0)]
    expected = np.c_[np.full(10, 2.0), np.zeros(10), np.arange(10.0) + 0.5]
    assert plots.error_order(values, expected) == [0, 2, 1]  # the all-NaN sensor has no gap to measure: last


def test_the_comparison_draws_each_metric_on_its_own_scale_with_values_and_the_gate():
    metrics = {"champion v1": {"mean_error": 5000.0, "false_alarm_rate": 0.163},
               "challenger v2": {"mean_error": 4000.0, "false_alarm_rate": 0.252}}
    fig = plots.comparison_bars(metrics, "hold-out comparison: kept", {"false_alarm_rate": (0.168, "allowed up to")})
    panels = {ax.get_title(): ax for ax in fig.axes}
    assert set(panels) == {"mean_error", "false_alarm_rate"}
    far = panels["false_alarm_rate"]
    assert [round(p.get_height(), 3) for p in far.patches] == [0.163, 0.252]
    assert far.get_ylim()[1] < 1  # its own scale: the rates are not flattened under the errors
    assert [t.get_text() for t in far.texts] == ["0.163", "0.252"]
    (gate,) = [line for line in far.lines if line.get_linestyle() == "--"]
    assert list(gate.get_ydata()) == [0.168, 0.168]
    plots.close(fig)


def test_the_gate_limits_are_the_bars_decide_holds_the_challenger_to():
    from anomaly.config import RetrainSettings
    from anomaly.retrain import gate_limits

    rt = RetrainSettings(min_improvement=0.1, max_false_alarm_increase=0.005, max_event_f1_decrease=0.02)
    limits = gate_limits({"champion.mean_error": 5000.0, "champion.false_alarm_rate": 0.163,
                          "champion.event_f1": 0.5, "challenger.mean_error": 1.0}, rt)
    assert limits["mean_error"][0] == pytest.approx(4500.0) and limits["false_alarm_rate"][0] == pytest.approx(0.168)
    assert limits["event_f1"][0] == pytest.approx(0.48)
    assert gate_limits({}, rt) == {}


def test_the_contribution_map_shows_the_blamed_sensors_first_then_those_with_the_largest_share():
    n, f = 300, 30
    shares = np.full((n, f), 1.0 / f)
    shares[100:150, 5] = 0.9  # sensor 5 drives the flagged stretch
    flags = np.zeros(n, dtype=bool)
    flags[100:150] = True
    blamed = np.zeros((n, f), dtype=bool)
    blamed[100:150, 12] = True  # the label blames 12
    names = [f"m{i:02d}" for i in range(f)]
    fig = plots.contribution_map(np.arange(n, dtype=float), shares, names, flags=flags, blamed=blamed, max_sensors=8)
    strip, heat = fig.axes[0], fig.axes[1]
    assert [t.get_text() for t in heat.get_yticklabels()][:2] == ["m12", "m05"] and len(heat.get_yticklabels()) == 8
    marks = heat.collections[0].get_offsets()
    assert len(marks) == 50 and set(np.asarray(marks)[:, 1].tolist()) == {0.0}  # on m12's row, at its 50 rows
    assert len(strip.collections) == 1  # the flagged stretch, one shaded run
    assert "the 8 of 30 with the largest share, the blamed ones first" in fig._suptitle.get_text()
    plots.close(fig)
    plain = plots.contribution_map(np.arange(n, dtype=float), shares, names)  # no flags, no labels
    assert [t.get_text() for t in plain.axes[1].get_yticklabels()][0] == "m05" and not plain.axes[1].collections
    plots.close(plain)
