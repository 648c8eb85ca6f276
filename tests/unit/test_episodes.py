"""Alarm episodes (``anomaly.episodes``): hand-computed bars, the streaming form equal to the offline one
batch by batch, no warm-up, the rule stored with the threshold and read from settings, and the worker
step holding an entity to its episode."""

from __future__ import annotations

import math

import numpy as np
import pytest

from anomaly.adaptive import AdaptiveRule, adaptive_flags
from anomaly.alerts import AlertPolicy
from anomaly.config import build_settings
from anomaly.episodes import EpisodeBars, EpisodeRule, episode_bars, episode_flags
from anomaly.errors import ConfigError
from anomaly.scoring_step import ScoringStep
from anomaly.thresholds import Threshold
from anomaly.window_state import WindowPolicy
from tests.unit.test_adaptive import _batches, _faulty_series, _lasting_change, _process
from tests.unit.test_scoring_step import FakeModel, stream, T0


def test_bars_by_hand() -> None:
    """Base 2. 4 opens (bar 2); inside, the bar is the geometric mean of the episode's scores so far / 2,
    at least 2: 4 -> 2, sqrt(4*16)=8 -> 4, (4*16*16)^(1/3)=10.08 -> 5.04; 2 is under it and begins a run,
    whose windows are held aside (the bar stays 5.04, not (4*16*16*2)^(1/4)/2 = 3.36); 1 is under it too
    (k = 2): the episode ends and the bar becomes 3 x 2 (the highest of the two) = 6. 2.5 and 3.5 are
    under it; 7 opens the next episode (bar 6), whose bar is then 7 / 2, which 4 is above. A NaN is shown
    the bar in force."""
    rule = EpisodeRule(drop=2.0, settle=3.0, k=2)
    x = np.array([1, 4, 16, 16, 2, 1, 2.5, 3.5, np.nan, 7, 4], dtype=float)
    bars = episode_bars(x, 2.0, rule, window_size=1)
    level3 = (4 * 16 * 16) ** (1 / 3) / 2
    np.testing.assert_allclose(bars, [2, 2, 2, 4, level3, level3, 6, 6, 6, 6, 3.5])
    # A run broken by a window above the bar: its windows join the level with that window.
    y = np.array([4, 16, 16, 2, 40, 3], dtype=float)
    level5 = (4 * 16 * 16 * 2 * 40) ** (1 / 5) / 2
    np.testing.assert_allclose(episode_bars(y, 2.0, EpisodeRule(drop=2.0, settle=3.0, k=3), window_size=1),
                               [2, 2, 4, level3, level3, level5])
    assert episode_flags(x, 2.0, rule, window_size=1).astype(int).tolist() == [0, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1]
    # no rule, or an off one: the base alone
    assert episode_bars(x, 2.0, None, window_size=1).tolist() == [2.0] * 11
    assert episode_bars(x, 2.0, EpisodeRule(), window_size=1).tolist() == [2.0] * 11  # drop 0: off


def test_an_asset_settled_under_a_short_faults_level_ends_the_episode() -> None:
    """A fault at 10 for 30 windows, then the asset settles at 2 (over the fitted 1, under 10 / 3). The
    run at 2 held the level down under it before k came (counted in at once, 14 windows in the bar fell
    under 2) and 1,986 of the 2,000 windows after the fault were alarmed, the episode never ending. Now it
    ends after k and the settled bar (1.5 x 2) holds; the fault is flagged throughout, and a rise above
    the settled bar alarms again."""
    x = np.r_[np.full(30, 10.0), np.full(2000, 2.0), np.full(20, 4.0)]
    rule = EpisodeRule(drop=3.0, settle=1.5, k=60)
    flags = episode_flags(x, 1.0, rule, window_size=1)
    assert flags[:30].all() and not flags[30:2030].any() and flags[2030:].all()
    streamed = EpisodeBars(rule, window_size=1)
    np.testing.assert_array_equal(streamed.bars(["pump"] * len(x), x, 1.0), episode_bars(x, 1.0, rule, window_size=1))


def _window_scores(x: np.ndarray, w: int, stride: int = 1) -> np.ndarray:
    """Each window's score as a perfect model of normal gives it: the mean squared reading of the window."""
    return np.array([np.mean(x[i:i + w] ** 2) for i in range(0, len(x) - w + 1, stride)])


@pytest.mark.parametrize("stride", [1, 4])
def test_the_settled_bar_leaves_out_windows_still_holding_the_fault(stride: int) -> None:
    """A fault at +8 for 100 readings, the asset then fully back, and a second, smaller fault (+3.5) 900
    readings later, windows of 10. The windows after the fault's last window still hold its last readings
    (scores falling step by step: 6.4 ... 0.6 over normal); counted in, they set the settled bar at 1.5 x
    about 13.6, 8 x the fitted threshold, and the second fault (about 13, five times the threshold) went
    unflagged. Measured on the windows clear of the fault, the bar is back at the fitted threshold."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=3000) * 0.3
    x[1002:1102] += 8.0  # (ending where a window at stride 4 still holds two of its readings)
    x[2000:2100] += 3.5
    scores = _window_scores(x, 10, stride)
    ends = np.arange(len(scores)) * stride + 9  # the reading each window ends on
    rule = EpisodeRule(drop=3.0, settle=1.5, k=60)
    base = 2.5
    bars = episode_bars(scores, base, rule, stride, window_size=10)
    flags = scores > bars
    fault2 = (ends >= 2009) & (ends < 2100)  # windows wholly inside the second fault
    assert flags[(ends >= 1002) & (ends < 1102)].all() and flags[fault2].all()
    assert bars[(ends >= 1500) & (ends < 2000)].max() == base  # settled at the asset's own level, under the base
    assert not flags[(ends >= 1200) & (ends < 2000)].any()
    streamed = EpisodeBars(rule, stride, window_size=10)
    np.testing.assert_array_equal(streamed.bars(["pump"] * len(scores), scores, base), bars)


def test_a_run_too_short_to_clear_the_fault_settles_on_its_last_window() -> None:
    """k (3 windows) is shorter than the overlap (windows of 10 at stride 1: 9): the run's last window
    alone sets the settled bar, not its first (which holds 9 of the fault's readings)."""
    x = np.array([1, 50, 50, 4, 3, 2, 1, 1], dtype=float)
    rule = EpisodeRule(drop=2.0, settle=3.0, k=3)
    bars = episode_bars(x, 2.0, rule, window_size=10)
    assert bars[-2:].tolist() == [6.0, 6.0]  # 3 x 2 (the run 4, 3, 2's last), not 3 x 4
    assert episode_bars(x, 2.0, rule, window_size=1)[-2:].tolist() == [12.0, 12.0]  # windows of one reading: 3 x 4


def test_overlap_in_windows() -> None:
    rule = EpisodeRule(drop=2.0)
    assert [rule.overlap(10, s) for s in (1, 2, 3, 4, 9, 10, 16)] == [9, 4, 3, 2, 1, 0, 0]
    assert rule.overlap(1) == 0
    with pytest.raises(ValueError):
        rule.overlap(0)


def test_an_episode_opened_by_noise_ends_with_it() -> None:
    """Inside an episode the bar is never under the fitted threshold, so an episode that a noise window
    opened (its level near the threshold) ends after k windows of ordinary noise under it."""
    rng = np.random.default_rng(0)
    x = rng.gamma(4.0, size=3000) / 4.0  # mean 1, an occasional score above 2.5
    bars = episode_bars(x, 2.5, EpisodeRule(drop=3.0, settle=1.5, k=10), window_size=1)
    flags = x > bars
    assert (bars >= 2.5).all()
    assert flags.mean() < 2 * (x > 2.5).mean()  # about the threshold's own rate, not an endless episode


def test_a_long_fault_stays_flagged_and_the_level_after_it_is_quiet() -> None:
    """A fault twice the base lasting 2,000 windows, then a rig that settles at 1.5x the base: the fault
    is flagged to its end, the settled level not, a later rise above settle x that level again. The
    adaptive rule, by contrast, accepts the fault once it fills its span."""
    x = np.r_[np.ones(100), np.full(2000, 20.0), np.full(300, 1.5), np.full(50, 6.0)]
    flags = episode_flags(x, 2.0, EpisodeRule(drop=2.0, settle=3.0, k=5), window_size=1)
    assert not flags[:100].any() and flags[100:2100].all()
    assert not flags[2100:2400].any()  # at or under the episode's bar: not flagged (it ends 5 windows in)
    assert flags[2400:].all()  # 6 > 3 x 1.5: a new rise
    adaptive = adaptive_flags(x, 2.0, AdaptiveRule(rows=480, factor=4.0, quantile=0.5, lag=30))
    assert adaptive[100:400].all() and not adaptive[1000:2100].any()


def test_no_warm_up() -> None:
    """The same fault is flagged the same way 10 or 5,000 quiet windows after the start."""
    rng = np.random.default_rng(1)
    fault = np.r_[rng.gamma(2.0, size=400) * 10, rng.gamma(2.0, size=200)]
    rule = EpisodeRule(drop=2.0, settle=3.0, k=10)
    quiet = rng.gamma(2.0, size=5000) * 0.1
    short = episode_flags(np.r_[quiet[:10], fault], 2.0, rule, window_size=1)[10:]
    long = episode_flags(np.r_[quiet, fault], 2.0, rule, window_size=1)[5000:]
    np.testing.assert_array_equal(short, long)


def test_bars_are_causal() -> None:
    rng = np.random.default_rng(2)
    x = rng.gamma(2.0, size=600)
    x[200:300] *= 8
    rule = EpisodeRule(drop=1.5, settle=2.0, k=5)
    changed = x.copy()
    changed[350:] = rng.gamma(2.0, size=250) * 20
    a, b = episode_bars(x, 3.0, rule, window_size=1), episode_bars(changed, 3.0, rule, window_size=1)
    assert np.array_equal(a[:351], b[:351])  # row 350's bar depends on rows before it only
    assert not np.array_equal(a, b)


@pytest.mark.parametrize("stride", [1, 4])
def test_episode_bars_equal_the_offline_bars_batch_by_batch(stride: int) -> None:
    rng = np.random.default_rng(stride)
    rule = EpisodeRule(drop=2.0, settle=2.5, k=12)
    series = _faulty_series(rng)
    streaming = EpisodeBars(rule, stride, window_size=10)  # 9 windows at stride 1, 2 at stride 4 left out
    got: dict[str, list[float]] = {e: [] for e in series}
    for entities, scores in _batches(rng, series):
        for e, bar in zip(entities, streaming.bars(entities, scores, 2.0, need=scores > 6.0)):
            got[e].append(bar)
    for entity, x in series.items():
        np.testing.assert_array_equal(np.asarray(got[entity]), episode_bars(x, 2.0, rule, stride, window_size=10))
    assert streaming.entities == 4
    streaming.forget()
    assert streaming.entities == 0 and streaming.open_entities() == []


def test_episode_bars_take_each_entitys_own_base() -> None:
    rng = np.random.default_rng(11)
    rule = EpisodeRule(drop=2.0, settle=2.5, k=12)
    series = _faulty_series(rng)
    base = dict(zip(series, (0.5, 2.0, 9.0, 40.0)))
    streaming = EpisodeBars(rule, window_size=6)
    got: dict[str, list[float]] = {e: [] for e in series}
    for entities, scores in _batches(rng, series):
        for e, bar in zip(entities, streaming.bars(entities, scores, np.array([base[e] for e in entities]))):
            got[e].append(bar)
    for entity, x in series.items():
        np.testing.assert_array_equal(np.asarray(got[entity]), episode_bars(x, base[entity], rule, window_size=6))
    assert len({float(np.min(v)) for v in got.values()}) == 4


def test_rule_in_windows_params_and_checks() -> None:
    rule = EpisodeRule(drop=2.0, settle=3.0, k=15)
    assert (rule.in_windows(1), rule.in_windows(4), EpisodeRule(drop=2.0, k=1).in_windows(4)) == (15, 4, 1)
    assert EpisodeRule.from_params(rule.to_params()) == rule
    assert EpisodeRule().to_params() == {} and EpisodeRule.from_params({}) is None
    assert rule.describe() == "episodes: end 15 readings under level/2, settle x3" and EpisodeRule().describe() == "off"
    for bad in ({"drop": 1.0}, {"drop": -2.0}, {"drop": math.inf}, {"drop": 2.0, "settle": 0.0},
                {"drop": 2.0, "k": 0}, {"drop": 2.0, "k": 1.5}):
        with pytest.raises(ValueError):
            EpisodeRule(**bad)
    with pytest.raises(ValueError):
        EpisodeBars(EpisodeRule(), window_size=1)
    with pytest.raises(ValueError):
        rule.in_windows(0)


def test_rule_is_stored_with_the_threshold_as_floats() -> None:
    rule = EpisodeRule(drop=2.0, settle=3.0, k=15)
    t = Threshold("quantile", 2.0, {"q": 0.95}).with_episodes(rule)
    assert t.params == {"q": 0.95, "episode_drop": 2.0, "episode_settle": 3.0, "episode_k": 15.0}
    back = Threshold.from_dict(t.to_dict())
    assert back.episodes == rule and back.adaptive is None
    assert back.describe_rule() == rule.describe() and Threshold("quantile", 2.0).describe_rule() == "off"
    x = np.array([1, 4, 16, 16, 2, 1, 2.5, 3.5], dtype=float)
    np.testing.assert_array_equal(back.series_bars(x, window_size=1), episode_bars(x, 2.0, rule, window_size=1))
    assert back.series_flags(x, window_size=1).tolist() == episode_flags(x, 2.0, rule, window_size=1).tolist()
    assert back.with_episodes(None).params == {"q": 0.95}


def test_settings_give_the_rule_and_refuse_two_moving_bars() -> None:
    th = build_settings({}).threshold
    assert not th.episode_rule().enabled and th.rule_description() == "off"
    th = build_settings({"threshold": {"episode_drop": 2.0, "episode_k": 30}}).threshold
    assert th.episode_rule() == EpisodeRule(drop=2.0, settle=1.5, k=30)
    assert th.rule_description() == "episodes: end 30 readings under level/2, settle x1.5"
    for raw, field in (({"episode_drop": 0.5}, "threshold.episode_drop"),
                       ({"episode_drop": 2.0, "episode_settle": -1.0}, "threshold.episode_settle"),
                       ({"episode_drop": 2.0, "episode_k": 0}, "threshold.episode_k"),
                       ({"episode_drop": 2.0, "adaptive_rows": 480}, "threshold.episode_drop")):
        with pytest.raises(ConfigError) as err:
            build_settings({"threshold": raw})
        assert err.value.field == field


def test_the_worker_keeps_a_lasting_fault_open_and_closes_it_when_it_clears() -> None:
    """A step change that lasts 1,000 readings: a fixed threshold keeps the event open and so do alarm
    episodes (where the adaptive bar closes it once the level fills its span); when the change goes back
    half-way (a rig still warm), the episode ends and the event closes, and the settled level raises
    no new event."""
    base = 0.1  # FakeModel's score: mean |x - centre|; the change scores ≈ 1/3, half of it ≈ 1/6
    rule = EpisodeRule(drop=1.5, settle=2.0, k=12)
    policy = WindowPolicy(window_size=1, period_s=1.0, stride=4)
    step = ScoringStep(FakeModel(window_size=4, threshold=base, episodes=rule), policy, AlertPolicy(),
                       emit_scores=True)
    events, counts, scores = _process(step, _lasting_change())
    assert [e["status"] for e in events] == ["open"]  # 1,000 readings of fault: still open
    assert step.open_episodes() == ["pump-1"] and counts["adaptive_held"] == 0
    assert all(s["anomalous"] == (s["score"] > s["threshold"]) for s in scores)
    after = stream({"pump-1": 0}, range(1200, 2000), fault=("pump-1", range(1200, 2000), "pressure", 0.5))
    events, counts, scores = _process(step, after)
    assert [e["status"] for e in events] == ["closed"]
    assert events[0]["end_ts"] < T0 + 1200 + 12 * 4 + 8  # ends within k windows of the drop
    assert step.open_episodes() == []
    bars = np.array([s["threshold"] for s in scores])
    assert bars[-1] > base  # the settled bar: 2 x the level it ended on


def test_a_model_swap_restarts_the_episode_state() -> None:
    rule = EpisodeRule(drop=1.5, settle=2.0, k=4)
    step = ScoringStep(FakeModel(window_size=4, threshold=0.1, episodes=rule),
                       WindowPolicy(window_size=1, period_s=1.0), AlertPolicy())
    step.process(stream({"a": 0}, range(100), fault=("a", range(50, 100), "pressure", 1.0)), now_s=T0 + 200)
    assert step.open_episodes() == ["a"] and step.adaptive_entities == 1
    step.swap_model(FakeModel(window_size=4, threshold=0.1, episodes=rule, version="2"))
    assert step.open_episodes() == [] and step.adaptive_entities == 0
    assert len(step.adaptive_history("a")) == 0  # episodes keep no score history
