"""Where the scoring step runs: the child-process runner gives the in-process step's outputs, in order,
reports failures and swaps, applies revocations in order, and exits when told or when its parent goes.
A real forked child and pipe; a numpy fake model and a fake follower (no Kafka, no MLflow)."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from anomaly.alerts import AlertPolicy
from anomaly.detector import fit_detector
from anomaly.scoring_step import DetectorModel, ScoringStep
from anomaly.step_runner import ProcessRunner, ScoringFailed, Swap, ThreadRunner, cpu_budget
from anomaly.training import TrainConfig
from anomaly.window_state import WindowPolicy
from tests.fixtures import SENSORS, normal_frame
from tests.unit.test_scoring_step import T0, TOPIC, FakeModel, run_batches, step_for, stream

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the child-process runner forks")


class FakeFollower:
    """``ModelFollower``'s surface for the runners: ``poll`` hands over ``pending`` once."""

    model_name = "pumps"

    def __init__(self) -> None:
        self.pending: tuple[object, str] | None = None

    def current(self):
        return 1.0, "1"

    def poll(self):
        new, self.pending = self.pending, None
        return new


class ExplodingModel(FakeModel):
    def score(self, windows):
        raise RuntimeError("kaboom in the forward pass")


def fake_serving(detector, version: str) -> FakeModel:
    """The runners' ``serving``: here the 'detector' is a threshold for a fake model."""
    return FakeModel(window_size=4, threshold=float(detector), version=version)


def process_runner(step: ScoringStep, follower: FakeFollower | None = None, stall_s: float = 0.0) -> ProcessRunner:
    return ProcessRunner(ThreadRunner(step, follower or FakeFollower(), fake_serving, gc_freeze=False), stall_s=stall_s)


def batches_of(records, size: int = 7):
    return [records[i:i + size] for i in range(0, len(records), size)]


def fault_stream():
    return stream({"a": 0, "b": 0, "c": 1}, range(40), fault=("b", range(20, 28), "flow", 5.0))


def exit_code(runner: ProcessRunner) -> int:
    assert runner._wait(10), "the child did not exit"
    return os.waitstatus_to_exitcode(runner._exit_status)


def test_the_child_gives_the_in_process_outputs_in_order() -> None:
    records = fault_stream()
    expected = run_batches(step_for(FakeModel(window_size=4)), records)
    assert any(out.events for out in expected), "the fault must make events, or the comparison says little"
    runner = process_runner(step_for(FakeModel(window_size=4)))
    try:
        got = []
        for batch in batches_of(records):  # submit all first: the child works ahead, results stay in order
            runner.submit(batch, now_s=T0 + 1000)
        got = [runner.result() for _ in expected]
    finally:
        runner.close()
    assert got == expected  # events, dead letters, commits, counts and latencies, batch by batch
    assert runner.entities == 3
    assert exit_code(runner) == 0


def test_a_failing_forward_pass_fails_the_batch_and_the_child_exits_non_zero() -> None:
    runner = process_runner(step_for(ExplodingModel(window_size=4)))
    try:
        runner.submit(fault_stream()[:30], now_s=T0)
        with pytest.raises(ScoringFailed, match="kaboom in the forward pass"):
            runner.result()
    finally:
        runner.close()
    assert exit_code(runner) == 1


def test_a_failure_while_staging_comes_after_the_outputs_of_the_batches_before_it() -> None:
    step = step_for(FakeModel(window_size=4))
    stage = step.stage
    staged: list[int] = []

    def stage_twice_then_fail(batches, now_s):
        if len(staged) == 2:
            raise RuntimeError("staging broke")
        staged.append(1)
        return stage(batches, now_s)

    step.stage = stage_twice_then_fail  # an instance attribute the forked child inherits
    runner = process_runner(step)
    records = fault_stream()
    try:
        for batch in batches_of(records, 30)[:3]:
            runner.submit(batch, now_s=T0)
        first, second = runner.result(), runner.result()
        with pytest.raises(ScoringFailed, match="staging broke"):
            runner.result()
    finally:
        runner.close()
    assert first.counts["consumed"] == second.counts["consumed"] == 30
    assert exit_code(runner) == 1


def test_a_child_that_dies_fails_the_batch_in_hand() -> None:
    runner = process_runner(step_for(FakeModel(window_size=4)))
    try:
        os.kill(runner.pid, 9)
        with pytest.raises(ScoringFailed, match="SIGKILL|gone|died"):
            runner.submit(fault_stream()[:30], now_s=T0)
            runner.result()
    finally:
        runner.close()


def test_the_child_leaves_the_stop_signals_to_its_parent() -> None:
    # Sent to the process group (Ctrl-C, a closed terminal, `kill -TERM -pgid`), they are the worker's to act
    # on: it finishes the batch in hand with the child, then stops it. SIGHUP killed the child outright.
    import signal

    records = fault_stream()
    runner = process_runner(step_for(FakeModel(window_size=4)))
    try:
        runner.submit(records[:20], now_s=T0 + 1000)
        runner.result()  # the child is in its loop
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            os.kill(runner.pid, sig)
        runner.submit(records[20:], now_s=T0 + 1000)
        assert runner.result().commits  # it went on scoring
    finally:
        runner.close()
    assert exit_code(runner) == 0


def test_revoking_partitions_of_a_dead_child_leaves_the_report_of_its_death_to_the_batch() -> None:
    # kafka-python runs the revocation inside poll and inside the consumer's close; raising there would
    # replace the child's death with "User rebalance callback throws an error".
    runner = process_runner(step_for(FakeModel(window_size=4)))
    try:
        os.kill(runner.pid, 9)
        assert runner._wait(10)
        runner.forget_partitions([(TOPIC, 0)])  # does not raise
        with pytest.raises(ScoringFailed, match="SIGKILL"):
            runner.submit(fault_stream()[:30], now_s=T0)
            runner.result()
        runner.forget_partitions([(TOPIC, 1)])  # nor once the death is known
    finally:
        runner.close()


def test_a_child_that_stops_answering_is_killed_after_the_stall_limit() -> None:
    runner = process_runner(step_for(FakeModel(window_size=4)), stall_s=1.5)
    try:
        runner.submit(fault_stream()[:12], now_s=T0)
        assert runner.result().counts["consumed"] == 12  # answering: no limit reached
        os.kill(runner.pid, signal.SIGSTOP)  # what a deadlock looks like from the parent
        runner.submit(fault_stream()[12:30], now_s=T0)
        started = time.monotonic()
        with pytest.raises(ScoringFailed, match=r"has not answered in 1.5 s \(worker.stall_s\)"):
            runner.result()
        waited = time.monotonic() - started
    finally:
        runner.close()
    assert 1.4 < waited < 10
    assert os.WIFSIGNALED(runner._exit_status) and os.WTERMSIG(runner._exit_status) == signal.SIGKILL


def test_a_new_version_is_swapped_in_the_child_after_the_batches_sent_before_it() -> None:
    def scoring_step() -> ScoringStep:
        return ScoringStep(FakeModel(window_size=4, version="1"), WindowPolicy(window_size=1, period_s=1.0),
                           AlertPolicy(), emit_scores=True)

    records = fault_stream()
    local = scoring_step()
    expected = [local.process(records[:60], now_s=T0 + 1000)]
    local.swap_model(fake_serving(1.0, "2"))
    expected.append(local.process(records[60:], now_s=T0 + 1000))
    follower = FakeFollower()
    runner = process_runner(scoring_step(), follower)
    try:
        runner.submit(records[:60], now_s=T0 + 1000)
        follower.pending = (1.0, "2")  # the alias moved: the parent polls, the child swaps
        swaps = runner.follow_model()
        runner.submit(records[60:], now_s=T0 + 1000)  # sent after the swap: scored by v2
        got = [runner.result(), runner.result()]
        swaps += runner.follow_model()
    finally:
        runner.close()
    assert swaps == [Swap("2", kept=True)]  # same sensors, window and period: window state kept
    assert got == expected
    versions = [{json.loads(v)["model"]["version"] for _, v in out.scores} for out in got]
    assert versions == [{"1"}, {"2"}]


@pytest.mark.parametrize("where", ["thread", "process"])
def test_a_version_with_other_windows_is_swapped_in_after_a_drain_with_partitions_to_re_read(where: str) -> None:
    def serving(detector, version: str) -> FakeModel:  # here the 'detector' is the window size
        return FakeModel(window_size=int(detector), version=version)

    def scoring_step() -> ScoringStep:
        return ScoringStep(FakeModel(window_size=4, version="1"), WindowPolicy(window_size=1, period_s=1.0),
                           AlertPolicy(), emit_scores=True)

    records = stream({"a": 0, "c": 1}, range(30))
    follower = FakeFollower()
    runner = ThreadRunner(scoring_step(), follower, serving, gc_freeze=False)
    if where == "process":
        runner = ProcessRunner(runner)
    drained = []
    try:
        handle = runner.submit(records[:40], now_s=T0 + 40)  # slots 0-19, in flight at the swap
        follower.pending = (3, "2")
        swaps = runner.follow_model(lambda: drained.append(runner.result(handle)))
        assert len(drained) == 1  # the batch in flight completed before the swap
        assert swaps == [Swap("2", kept=False, replay_from={(TOPIC, 0): 18, (TOPIC, 1): 18})]
        again = [r for r in records if r.offset >= 18]  # what the worker polls after seeking back
        out = runner.result(runner.submit(again, now_s=T0 + 40))
    finally:
        runner.close()
    ends = sorted({json.loads(v)["ts"] - T0 for _, v in out.scores})
    assert ends == list(range(20, 30)) and out.counts["replayed"] == 4 and out.counts["consumed"] == 20


def test_the_parent_waits_for_the_replaying_swap_not_for_an_earlier_ones_reply() -> None:
    import time

    def serving(detector, version: str) -> FakeModel:  # the 'detector' is the window size; v2 loads slowly
        if version == "2":
            time.sleep(0.5)
        return FakeModel(window_size=int(detector), version=version)

    follower = FakeFollower()
    runner = ProcessRunner(ThreadRunner(step_for(FakeModel(window_size=4, version="1")), follower, serving,
                                        gc_freeze=False))
    try:
        runner.result(runner.submit(stream({"a": 0}, range(20)), now_s=T0 + 20))
        follower.pending = (4, "2")  # same windows: sent, not waited for
        swaps = runner.follow_model(lambda: None)
        follower.pending = (3, "3")  # other windows: the worker must seek before its next poll
        swaps += runner.follow_model(lambda: None)
    finally:
        runner.close()
    assert swaps == [Swap("2", kept=True), Swap("3", kept=False, replay_from={(TOPIC, 0): 18})]


def test_revoked_partitions_are_forgotten_after_the_batches_polled_before() -> None:
    records = stream({"a": 0, "c": 1}, range(12))
    on_0 = [r for r in records if r.partition == 0]
    runner = process_runner(step_for(FakeModel(window_size=4)))
    try:
        runner.submit(records, now_s=T0)
        runner.forget_partitions([(TOPIC, 1)])
        runner.submit(on_0[-1:], now_s=T0)  # a duplicate: stages nothing new
        first, second = runner.result(), runner.result()
        entities = runner.entities
    finally:
        runner.close()
    assert first.counts["windows_scored"] > 0
    assert second.counts["duplicates"] == 1
    assert entities == 1  # c (partition 1) dropped; a kept


def test_the_child_exits_when_the_parent_end_closes() -> None:
    runner = process_runner(step_for(FakeModel(window_size=4)))
    runner._conn.close()  # what the parent's death does to the pipe
    assert exit_code(runner) == 0
    runner._closed = True


def test_the_child_exits_quietly_when_the_parent_dies_with_its_answers_unread(capfd) -> None:
    # a worker killed (SIGKILL, OOM) with the child's outputs still in the pipe: the child's read got
    # ECONNRESET, not EOF, and it logged "scoring process failed" with a traceback and exited 1
    import time

    records = fault_stream()
    runner = process_runner(step_for(FakeModel(window_size=4)))
    for batch in batches_of(records):
        runner.submit(batch, now_s=T0 + 1000)
    time.sleep(0.5)  # the child answers; nobody reads
    runner._conn.close()  # what the parent's death does to the pipe
    code = exit_code(runner)
    runner._closed = True
    assert "scoring process failed" not in capfd.readouterr().err
    assert code == 0


def test_a_real_detector_travels_to_the_child_and_scores_like_in_process() -> None:
    train = normal_frame(rows=300, seed=2).to_numpy()
    params = {"window_size": 8, "hidden_size": 8, "latent_size": 4}
    config = TrainConfig(epochs=1, batch_size=128, patience=5, seed=0, device="cpu", progress=False)
    v1, _, _ = fit_detector(train, SENSORS, params, config, threshold_method="quantile",
                            threshold_params={"q": 0.5}, period_s=1.0)
    v2, _, _ = fit_detector(train, SENSORS, params, TrainConfig(**{**config.__dict__, "seed": 1}),
                            threshold_method="quantile", threshold_params={"q": 0.5}, period_s=1.0)

    def serving(detector, version):
        return DetectorModel(detector, "pumps", version, "cpu")

    def step():
        return step_for(serving(v1, "1"))

    records = stream({"a": 0}, range(40))
    local = step()
    local.process(records[:20], now_s=T0)
    local.swap_model(serving(v2, "2"))
    expected = local.process(records[20:], now_s=T0)
    follower = FakeFollower()
    runner = ProcessRunner(ThreadRunner(step(), follower, serving, gc_freeze=False))
    try:
        runner.submit(records[:20], now_s=T0)
        runner.result()
        follower.pending = (v2, "2")  # pickled to the child with its weights
        runner.follow_model()
        runner.submit(records[20:], now_s=T0)
        got = runner.result()
    finally:
        runner.close()
    assert got.counts["windows_scored"] > 0
    assert got == expected


@pytest.mark.parametrize(("affinity", "cpu_max", "expected"), [
    (2, None, 2.0),  # no cgroup file
    (2, "max 100000\n", 2.0),  # no quota
    (16, "100000 100000\n", 1.0),  # a Kubernetes CPU limit of 1 on a 16-core node
    (16, "250000 100000", 2.5),
    (2, "400000 100000", 2.0),  # a quota above the affinity: the affinity
    (4, "garbage", 4.0),
])
def test_cpu_budget_is_the_affinity_capped_by_the_cgroup_quota(affinity, cpu_max, expected) -> None:
    assert cpu_budget(affinity, cpu_max) == expected


def test_sensor_change_says_what_was_added_and_removed() -> None:
    from anomaly.step_runner import sensor_change

    assert sensor_change(("temp", "pressure", "flow"), ("pressure", "temp", "flow")) == ""
    assert sensor_change(("temp", "pressure", "flow"), ("temp", "pressure", "rpm")) == "+rpm -flow"


def test_a_swap_to_a_model_of_other_sensors_is_a_warning_naming_them(caplog) -> None:
    """The swap was an INFO line saying the window state restarted; readings of the old set go to the
    dead-letter topic from then on, so the operator is told which sensors changed."""
    def serving(detector, version: str) -> FakeModel:  # the 'detector' is the sensors
        model = FakeModel(window_size=4, version=version, sensors=detector)
        model.ignored_sensors = ("flow",) if version in ("4", "4b") else ()
        return model

    step = ScoringStep(FakeModel(window_size=4, version="1"), WindowPolicy(window_size=1, period_s=1.0), AlertPolicy())
    follower = FakeFollower()
    runner = ThreadRunner(step, follower, serving, gc_freeze=False)
    try:
        follower.pending = (SENSORS, "2")
        with caplog.at_level("WARNING", logger="anomaly.step_runner"):
            runner.follow_model()
        assert not caplog.records  # the same sensors: nothing to warn of
        follower.pending = (("temp", "pressure"), "3")
        with caplog.at_level("WARNING", logger="anomaly.step_runner"):
            runner.follow_model()
        follower.pending = (SENSORS, "1b")
        with caplog.at_level("WARNING", logger="anomaly.step_runner"):
            runner.follow_model()
        follower.pending = (("temp", "pressure"), "4")  # its training left flow out: readings carrying it are read
        with caplog.at_level("WARNING", logger="anomaly.step_runner"):
            runner.follow_model()
        follower.pending = (("temp", "pressure"), "4b")
        with caplog.at_level("WARNING", logger="anomaly.step_runner"):
            runner.follow_model()
        follower.pending = (("temp", "pressure"), "5")  # the same sensors, flow no longer read past
        with caplog.at_level("WARNING", logger="anomaly.step_runner"):
            runner.follow_model()
    finally:
        runner.close()
    assert [r.getMessage() for r in caplog.records] == [
        "pumps v3: reads other sensors than v2 did (-flow): readings of another sensor set than its temp, pressure "
        "go to the dead-letter topic from now on",
        "pumps v1b: reads other sensors than v3 did (+flow): readings of another sensor set than its temp, pressure, "
        "flow go to the dead-letter topic from now on",
        "pumps v4: reads other sensors than v1b did (-flow): readings of another sensor set than its temp, pressure "
        "go to the dead-letter topic from now on; except that they may still carry flow, which its training left "
        "out (read past)",
        "pumps v5: readings carrying flow (which v4b's training had left out and it read past) are dead letters now"]


def test_maintenance_periods_reach_the_child_before_the_batches_sent_after_them() -> None:
    def scoring_step() -> ScoringStep:
        return ScoringStep(FakeModel(window_size=4, version="1"), WindowPolicy(window_size=1, period_s=1.0),
                           AlertPolicy(min_duration_windows=2, recovery_windows=2))

    records = fault_stream()  # b's flow is off in slots 20-27
    spans = {"b": [(T0 + 15.0, T0 + 23.0)]}  # the work ends while the fault goes on
    local = scoring_step()
    local.set_maintenance(spans)
    expected = [local.process(records[:60], now_s=T0 + 1000), local.process(records[60:], now_s=T0 + 1000)]
    opened = [json.loads(v)["start_ts"] - T0 for out in expected for _, v in out.events
              if json.loads(v)["status"] == "open"]
    assert len(opened) == 2 and opened[1] > 23  # cut at the end of the work: the rest is an event of its own
    runner = process_runner(scoring_step())
    try:
        runner.set_maintenance(spans)
        runner.submit(records[:60], now_s=T0 + 1000)
        runner.submit(records[60:], now_s=T0 + 1000)
        got = [runner.result(), runner.result()]
    finally:
        runner.close()
    assert got == expected
