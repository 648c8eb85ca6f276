"""The adaptive threshold: the rule by hand, the streaming form against the offline one, how it is
stored with a threshold and configured, and what the worker's batch step does with it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from anomaly.adaptive import AdaptiveRule, TrailingBars, adaptive_bars, adaptive_flags
from anomaly.alerts import AlertPolicy
from anomaly.codec import decode_event
from anomaly.config import build_settings
from anomaly.errors import ConfigError
from anomaly.scoring_step import ScoringStep
from anomaly.thresholds import Threshold
from anomaly.window_state import WindowPolicy
from tests.unit.test_scoring_step import T0, FakeModel, stream


def test_rule_in_windows_by_hand() -> None:
    rule = AdaptiveRule(rows=480, lag=30)
    assert rule.in_windows(1) == (480, 30)
    # stride 4: windows whose last reading is 31..510 readings back: 8·4=32 .. 127·4=508 -> 120 windows, 7 skipped
    assert rule.in_windows(4) == (120, 7)
    assert AdaptiveRule(rows=3, lag=0).in_windows(4) == (1, 0)  # never an empty span
    with pytest.raises(ValueError):
        rule.in_windows(0)


def test_bars_by_hand() -> None:
    scores = np.array([1, 1, 1, 1, 4, 4, 4, 4, 4, 4], dtype=float)
    rule = AdaptiveRule(rows=3, factor=1.5, quantile=0.5, lag=0)
    # row 3 sees 1,1,1 -> 1.5 < base 2; row 6 sees 1,4,4 -> median 4 -> 6
    assert adaptive_bars(scores, 2.0, rule).tolist() == [2, 2, 2, 2, 2, 2, 6, 6, 6, 6]
    assert adaptive_flags(scores, 2.0, rule).tolist() == [False] * 4 + [True] * 2 + [False] * 4
    lagged = AdaptiveRule(rows=3, factor=1.5, quantile=0.5, lag=1)
    assert adaptive_bars(scores, 2.0, lagged).tolist() == [2, 2, 2, 2, 2, 2, 2, 6, 6, 6]
    # no rule, or an off one: the base alone
    assert adaptive_bars(scores, 2.0, None).tolist() == [2.0] * 10
    assert adaptive_bars(scores, 2.0, AdaptiveRule(rows=0)).tolist() == [2.0] * 10
    # NaN is never flagged and does not enter the history: the span skips it
    with_nan = np.array([1, np.nan, 1, 1, 8, 8], dtype=float)
    bars = adaptive_bars(with_nan, 0.5, AdaptiveRule(rows=2, factor=2.0, quantile=0.5, lag=0))
    assert bars.tolist() == [0.5, 0.5, 0.5, 2.0, 2.0, 9.0]
    assert adaptive_flags(with_nan, 0.5, AdaptiveRule(rows=2, factor=2.0, quantile=0.5, lag=0)).tolist() == [
        True, False, True, False, True, False]


def test_bars_are_causal() -> None:
    rng = np.random.default_rng(0)
    scores = rng.gamma(2.0, size=400)
    rule = AdaptiveRule(rows=40, factor=2.0, quantile=0.5, lag=5)
    changed = scores.copy()
    changed[250:] *= 10
    a, b = adaptive_bars(scores, 3.0, rule), adaptive_bars(changed, 3.0, rule)
    assert np.array_equal(a[:256], b[:256])  # row 255's span ends at row 249
    assert not np.array_equal(a[256:], b[256:])


def _faulty_series(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Four entities' gamma scores of different lengths and scales, each with a fault, then a lasting
    change, and a few NaNs."""
    series = {}
    for i, entity in enumerate(["a", "b", "c", "d"]):
        x = rng.gamma(2.0, size=400 + 100 * i) * (1 + i)
        x[200:260] += 20  # a fault, then a lasting change
        x[300:] += 5 * (1 + i)
        x[rng.integers(0, len(x), 5)] = np.nan
        series[entity] = x
    return series


def _batches(rng: np.random.Generator, series: dict[str, np.ndarray]) -> list[tuple[list[str], np.ndarray]]:
    """The entities' scores interleaved at random (each entity's own order kept), cut into random batches."""
    labels = np.concatenate([[e] * len(v) for e, v in series.items()])
    order = np.array(labels)[rng.permutation(len(labels))]  # which entity comes next
    pos = dict.fromkeys(series, 0)
    entities, values = [], []
    for e in order.tolist():
        entities.append(e)
        values.append(series[e][pos[e]])
        pos[e] += 1
    cuts = np.sort(rng.choice(np.arange(1, len(values)), size=25, replace=False))
    bounds = [0, *cuts.tolist(), len(values)]
    return [(entities[a:b], np.asarray(values[a:b])) for a, b in zip(bounds[:-1], bounds[1:])]


@pytest.mark.parametrize("stride", [1, 4])
def test_trailing_bars_equal_the_offline_bars_batch_by_batch(stride: int) -> None:
    rng = np.random.default_rng(stride)
    rule = AdaptiveRule(rows=120, factor=3.0, quantile=0.5, lag=10)
    series = _faulty_series(rng)
    trailing = TrailingBars(rule, stride, capacity=1)  # also grows its arrays
    got: dict[str, list[float]] = {e: [] for e in series}
    asked: dict[str, list[float]] = {e: [] for e in series}
    need_only = TrailingBars(rule, stride)
    for entities, scores in _batches(rng, series):
        for e, bar in zip(entities, trailing.bars(entities, scores, 2.0)):
            got[e].append(bar)
        need = scores > 6.0
        for e, bar, n in zip(entities, need_only.bars(entities, scores, 2.0, need), need):
            asked[e].append((bar, n))
    for entity, x in series.items():
        want = adaptive_bars(x, 2.0, rule, stride)
        np.testing.assert_array_equal(np.asarray(got[entity]), want)
        bars, needed = map(np.asarray, zip(*asked[entity]))
        np.testing.assert_array_equal(bars[needed], want[needed])  # asked: the true bar
        assert (bars[~needed] == 2.0).all()  # not asked: the base, never a look at the history
        span, lag = rule.in_windows(stride)
        held = trailing.history(entity)
        finite = x[np.isfinite(x)]
        np.testing.assert_array_equal(held, finite[-(span + lag):])
    assert trailing.entities == 4
    trailing.forget()
    assert trailing.entities == 0 and trailing.history("a").size == 0


def test_trailing_bars_take_each_entitys_own_base() -> None:
    # A fleet model with per-entity fitted values: each entity's bar rises from its own base, exactly as
    # the offline bars of its series with that base (Threshold.for_entity(e).series_bars).
    rng = np.random.default_rng(7)
    rule = AdaptiveRule(rows=120, factor=3.0, quantile=0.5, lag=10)
    series = _faulty_series(rng)
    base = dict(zip(series, (0.5, 2.0, 9.0, 40.0)))
    trailing = TrailingBars(rule)
    got: dict[str, list[float]] = {e: [] for e in series}
    for entities, scores in _batches(rng, series):
        own = np.array([base[e] for e in entities])
        for e, bar in zip(entities, trailing.bars(entities, scores, own, need=scores > own)):
            got[e].append(bar)
    for entity, x in series.items():
        want = adaptive_bars(x, base[entity], rule)
        bars = np.asarray(got[entity])
        asked = x > base[entity]
        np.testing.assert_array_equal(bars[asked], want[asked])
        assert (bars[~asked] == base[entity]).all()
    assert len({float(np.min(v)) for v in got.values()}) == 4  # four different floors


def test_rule_is_stored_with_the_threshold_as_floats() -> None:
    rule = AdaptiveRule(rows=480, factor=4.0, quantile=0.5, lag=30)
    plain = Threshold("quantile", 1.5, {"q": 0.95})
    stored = plain.with_adaptive(rule)
    assert stored.adaptive == rule and plain.adaptive is None
    again = Threshold.from_dict(json.loads(json.dumps(stored.to_dict())))
    assert again == stored and again.adaptive == rule
    assert stored.with_adaptive(None) == plain and stored.with_adaptive(AdaptiveRule(rows=0)) == plain
    scores = np.r_[np.full(600, 1.0), np.full(50, 10.0), np.full(600, 5.0)]
    flags = stored.series_flags(scores, window_size=10)
    assert flags[600:650].all()  # the fault: the trailing median is still 1
    # the changed level alarms until it is over half the trailing 480 rows (190 more rows, + the lag 30)
    assert flags[650:].sum() == 220 and not flags[870:].any() and (scores[650:] > 1.5).all()
    assert plain.series_flags(scores, window_size=10).sum() == 650


@pytest.mark.parametrize("field,value", [("adaptive_rows", -1), ("adaptive_factor", 0.0),
                                         ("adaptive_quantile", 1.0), ("adaptive_lag", -3)])
def test_bad_adaptive_settings_name_the_field(field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=f"threshold.{field}"):
        build_settings({"threshold": {field: value}})


def test_settings_give_the_rule() -> None:
    assert not build_settings({}).threshold.adaptive_rule().enabled  # off unless asked for
    rule = build_settings({"threshold": {"adaptive_rows": 240, "adaptive_factor": 3.0}}).threshold.adaptive_rule()
    assert rule == AdaptiveRule(rows=240, factor=3.0, quantile=0.5, lag=30)


def _lasting_change(entity: str = "pump-1") -> list:
    """Normal for 200 slots, then one sensor 1.0 higher for good (a rig that stays changed)."""
    return stream({entity: 0}, range(0, 1200), fault=(entity, range(200, 1200), "pressure", 1.0))


def _process(step: ScoringStep, records: list, size: int = 50) -> tuple[list[dict], dict[str, int], list[dict]]:
    events, scores, counts = [], [], dict.fromkeys(("adaptive_held", "windows_scored"), 0)
    for i in range(0, len(records), size):
        out = step.process(records[i:i + size], now_s=T0 + 2000)
        events += [json.loads(v) for _, v in out.events]
        scores += [json.loads(v) for _, v in out.scores]
        for key in counts:
            counts[key] += out.counts[key]
    return events, counts, scores


def test_the_worker_closes_an_event_once_a_changed_level_is_the_entitys_normal() -> None:
    base = 0.1  # FakeModel's score: mean |x - centre|; the change scores ≈ 1/3
    rule = AdaptiveRule(rows=200, factor=2.0, quantile=0.5, lag=20)
    policy = WindowPolicy(window_size=1, period_s=1.0, stride=4)
    fixed = ScoringStep(FakeModel(window_size=4, threshold=base), policy, AlertPolicy())
    events, counts, _ = _process(fixed, _lasting_change())
    assert [e["status"] for e in events] == ["open"] and counts["adaptive_held"] == 0  # open for good

    adaptive = ScoringStep(FakeModel(window_size=4, threshold=base, adaptive=rule), policy, AlertPolicy(),
                           emit_scores=True)
    events, counts, scores = _process(adaptive, _lasting_change())
    assert [e["status"] for e in events] == ["open", "closed"]
    opened, closed = events
    assert opened["start_ts"] == pytest.approx(T0 + 200, abs=8)  # the change is still reported at once
    assert closed["end_ts"] < T0 + 200 + 20 + 200  # and closes once the level fills the trailing span
    assert counts["adaptive_held"] > 100
    bars = np.array([s["threshold"] for s in scores])
    assert bars.min() == base and bars.max() > base  # the records carry the bar in force
    assert all(s["anomalous"] == (s["score"] > s["threshold"]) for s in scores)
    assert len(adaptive.adaptive_history("pump-1")) == sum(rule.in_windows(4))


def test_a_model_swap_or_reset_restarts_the_history() -> None:
    rule = AdaptiveRule(rows=40, factor=2.0, quantile=0.5, lag=4)
    step = ScoringStep(FakeModel(window_size=4, adaptive=rule), WindowPolicy(window_size=1, period_s=1.0),
                       AlertPolicy())
    step.process(stream({"a": 0}, range(100)), now_s=T0 + 200)
    assert len(step.adaptive_history("a")) == 44
    step.swap_model(FakeModel(window_size=4, adaptive=rule, version="2"))  # compatible: windows kept
    assert len(step.adaptive_history("a")) == 0
    step.process(stream({"a": 0}, range(100, 110)), now_s=T0 + 200)
    assert len(step.adaptive_history("a")) == 10
    step.reset()
    assert len(step.adaptive_history("a")) == 0
    step.swap_model(FakeModel(window_size=4, version="3"))  # a fixed threshold: no history at all
    step.process(stream({"a": 0}, range(110, 130)), now_s=T0 + 200)
    assert len(step.adaptive_history("a")) == 0


def test_a_batch_staged_for_the_old_model_neither_reads_nor_feeds_the_new_history() -> None:
    rule = AdaptiveRule(rows=8, factor=2.0, quantile=0.5, lag=0)
    step = ScoringStep(FakeModel(window_size=4, adaptive=rule), WindowPolicy(window_size=1, period_s=1.0),
                       AlertPolicy())
    staged = step.stage(stream({"a": 0}, range(20)), now_s=T0 + 100)
    step.swap_model(FakeModel(window_size=4, adaptive=rule, version="2"))
    step.complete(staged, step.score(staged))
    assert len(step.adaptive_history("a")) == 0


def test_a_batch_staged_for_the_old_model_is_held_to_the_old_models_moving_bar() -> None:
    # a's level 3 is accepted by the rule (bar 1.5 x 3); a batch staged before a swap and completed after
    # it is still judged by the old model's bar, not by the fitted value alone (which opened an event).
    from tests.unit.test_scoring_step import reading_record

    rule = AdaptiveRule(rows=5, factor=1.5, quantile=0.5, lag=0)
    high = {"temp": 70.0, "pressure": 10.0, "flow": 5.0}  # score 3, above the fitted 1.0
    step = ScoringStep(FakeModel(window_size=1, adaptive=rule), WindowPolicy(window_size=1, period_s=1.0),
                       AlertPolicy(min_duration_windows=2, cooldown_s=0.0))
    step.process([reading_record("a", t, t, values=high) for t in range(20)], now_s=T0 + 20)
    staged = step.stage([reading_record("a", t, t, values=high) for t in range(20, 25)], now_s=T0 + 25)
    step.swap_model(FakeModel(window_size=1, adaptive=rule, version="2"))
    out = step.complete(staged, step.score(staged))
    assert [decode_event(v)["status"] for _, v in out.events if decode_event(v)["status"] == "open"] == []
    assert out.counts["adaptive_held"] == 5
    assert len(step.adaptive_history("a")) == 0  # the new model's history is untouched


def test_prune_drops_silent_entities_and_keeps_the_others_exact() -> None:
    rule = AdaptiveRule(rows=20, factor=2.0, quantile=0.5, lag=2)
    rng = np.random.default_rng(3)
    a, b = rng.gamma(2.0, size=200), rng.gamma(2.0, size=50)
    trailing = TrailingBars(rule)
    got = list(trailing.bars(["b"] * 50, b, 1.0, end_ts=np.arange(50.0)))  # b: stream time 0..49
    got_a = list(trailing.bars(["a"] * 100, a[:100], 1.0, end_ts=np.arange(100.0, 200.0)))
    assert trailing.prune(older_than=60.0) == 1 and trailing.entities == 1
    assert trailing.history("b").size == 0 and trailing.history("a").size == 22
    got_a += list(trailing.bars(["a"] * 100, a[100:], 1.0, end_ts=np.arange(200.0, 300.0)))
    np.testing.assert_array_equal(got_a, adaptive_bars(a, 1.0, rule))  # a's bars as if nothing happened
    assert got == list(adaptive_bars(b, 1.0, rule))
    assert trailing.prune(older_than=0.0) == 0


def test_the_worker_prunes_histories_of_entities_that_went_silent(monkeypatch: pytest.MonkeyPatch) -> None:
    import anomaly.scoring_step as scoring_step

    monkeypatch.setattr(scoring_step, "PRUNE_BARS_MIN", 8)
    rule = AdaptiveRule(rows=8, factor=2.0, quantile=0.5, lag=0)
    step = ScoringStep(FakeModel(window_size=4, adaptive=rule), WindowPolicy(window_size=1, period_s=1.0),
                       AlertPolicy(), idle_timeout_s=100.0)
    for generation in range(6):  # 6 waves of 10 entities, each silent after its 20 slots
        names = {f"g{generation}-{i}": 0 for i in range(10)}
        slots = range(generation * 200, generation * 200 + 20)
        step.process(stream(names, slots), now_s=T0 + 2000)
        assert step.adaptive_entities <= 20  # never more than the last two waves
    assert len(step.adaptive_history("g5-0")) == 8 and len(step.adaptive_history("g0-0")) == 0


def test_prune_measures_each_stream_by_its_own_clock() -> None:
    from anomaly.episodes import EpisodeBars, EpisodeRule

    for bars in (TrailingBars(AdaptiveRule(rows=4, lag=0)), EpisodeBars(EpisodeRule(drop=2.0, k=3), window_size=1)):
        bars.bars(["lagging", "idle"], np.ones(2), 1.0, end_ts=np.array([100.0, 100.0]), streams=np.array([0, 1]))
        bars.bars(["live"], np.ones(1), 1.0, end_ts=np.array([9_000.0]), streams=np.array([1]))
        bars.bars(["unknown"], np.ones(1), 1.0, end_ts=np.array([0.0]), streams=np.array([7]))
        # stream 0 (a backlog being replayed) is at 150 by its own clock, stream 1 at 9,000: only "idle",
        # silent on stream 1 for 8,900 s, goes; a stream without a clock keeps its entities
        assert bars.prune({0: 150.0 - 3600, 1: 9_000.0 - 3600}) == 1
        assert bars.entities == 3
        assert bars.prune(9_000.0 - 3600) == 2 and bars.entities == 1  # one clock for all: the old rule


def test_the_worker_keeps_the_history_of_a_lagging_partitions_entities(monkeypatch: pytest.MonkeyPatch) -> None:
    # Partition 0 replays a backlog at T0 while partition 1 is live 2 h ahead, in the same batches: a's
    # history must survive the prune (measured by the batch's newest window it was wiped, and a level the
    # rule had accepted alarmed again).
    import anomaly.scoring_step as scoring_step
    from tests.unit.test_scoring_step import reading_record

    monkeypatch.setattr(scoring_step, "PRUNE_BARS_MIN", 2)
    rule = AdaptiveRule(rows=5, factor=1.5, quantile=0.5, lag=0)
    step = ScoringStep(FakeModel(window_size=1, adaptive=rule), WindowPolicy(window_size=1, period_s=1.0),
                       AlertPolicy(min_duration_windows=1), idle_timeout_s=3600.0)
    high = {"temp": 70.0, "pressure": 10.0, "flow": 5.0}  # score 3: above the fitted 1.0
    step.process([reading_record("a", t, t, 0, values=high) for t in range(20)], now_s=T0)
    assert len(step.adaptive_history("a")) == 5
    live = [reading_record(e, 7200 + i, i, 1) for i, e in enumerate(("b", "c"))]
    out = step.process([reading_record("a", t, t, 0, values=high) for t in range(20, 22)] + live, now_s=T0)
    assert len(step.adaptive_history("a")) == 5
    out = step.process([reading_record("a", t, t, 0, values=high) for t in range(22, 26)], now_s=T0)
    assert out.events == []  # a's level stays accepted


def test_offline_bars_are_the_same_computed_in_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    import anomaly.adaptive as adaptive

    x = np.random.default_rng(5).gamma(2.0, size=700)
    rule = AdaptiveRule(rows=50, factor=2.0, quantile=0.7, lag=3)
    whole = adaptive_bars(x, 1.0, rule)
    monkeypatch.setattr(adaptive, "_BLOCK", 7)  # many blocks, the last one short
    np.testing.assert_array_equal(adaptive_bars(x, 1.0, rule), whole)
    assert (whole[53:] > 1.0).any() and (whole[:53] == 1.0).all()
