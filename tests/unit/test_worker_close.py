"""How ``Worker.run`` ends: every client and the scoring runner are closed even when closing one of them
fails, and a failure in the loop is the error reported, not what closing raised after it. Fake Kafka
clients and a fake runner (the real ones are in tests/integration/test_worker.py)."""

from __future__ import annotations

import dataclasses
import logging
from collections import namedtuple

import pytest

from anomaly import kafka_io
from anomaly.alerts import AlertPolicy
from anomaly.step_runner import ScoringFailed
from anomaly.window_state import WindowPolicy
from anomaly.worker import Worker, WorkerOptions
from tests.unit.test_scoring_step import FakeModel

TopicPartition = namedtuple("TopicPartition", "topic partition")
Record = namedtuple("Record", "offset key value")


class Closable:
    """Records ``close`` (and ``flush``) calls; raises ``fail_on``'s error from that method."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.calls: list[str] = []
        self.fail_on = fail_on

    def _call(self, name: str) -> None:
        self.calls.append(name)
        if name == self.fail_on:
            raise RuntimeError(f"{type(self).__name__}.{name} failed")

    def close(self, **_: object) -> None:
        self._call("close")


class FakeProducer(Closable):
    def flush(self, **_: object) -> None:
        self._call("flush")


class FakeConsumer(Closable):
    """Hands out one record, then nothing."""

    def __init__(self, fail_on: str | None = None) -> None:
        super().__init__(fail_on)
        self.records = {TopicPartition("readings", 0): [Record(0, b"a", b"{}")]}

    def poll(self, **_: object):
        polled, self.records = self.records, {}
        return polled

    def assignment(self):
        return {TopicPartition("readings", 0)}


class FakeRunner(Closable):
    """A runner whose scoring child has died: every result raises."""

    def submit(self, batches, now_s):
        return object()

    def result(self, handle=None):
        raise ScoringFailed("scoring process died (killed by SIGKILL)")

    def follow_model(self, drain):
        return []


class FakeFollower:
    model_name, trouble = "pumps", None

    def current(self):
        return 1.0, "1"


class FakeKafkaWorker(Worker):
    def __init__(self, runner: FakeRunner, producer: FakeProducer, consumer: FakeConsumer) -> None:
        options = WorkerOptions("127.0.0.1:1", "readings", "events", "dlq", None, "g", {},
                                WindowPolicy(window_size=1, period_s=1.0), AlertPolicy(), device="cpu")
        super().__init__(options, FakeFollower())
        self._fakes = runner, producer, consumer

    def _serving(self, detector, version):
        return FakeModel(window_size=4, threshold=float(detector), version=version)

    def _make_runner(self):
        return self._fakes[0]


@pytest.fixture
def clients(monkeypatch: pytest.MonkeyPatch):
    runner, producer, consumer = FakeRunner(), FakeProducer(), FakeConsumer()
    monkeypatch.setattr(kafka_io, "ensure_topics", lambda *a, **k: None)
    monkeypatch.setattr(kafka_io, "make_producer", lambda *a, **k: producer)
    monkeypatch.setattr(kafka_io, "make_consumer", lambda *a, **k: consumer)
    return runner, producer, consumer


def test_a_failed_batch_is_reported_even_when_closing_fails_too(clients, caplog) -> None:
    runner, producer, consumer = clients
    producer.fail_on = "close"
    worker = FakeKafkaWorker(runner, producer, consumer)
    with caplog.at_level(logging.ERROR, logger="anomaly.worker"), pytest.raises(ScoringFailed, match="died"):
        worker.run()
    assert "closing the worker after a failure failed too" in caplog.text
    assert "FakeProducer.close failed" in caplog.text
    assert consumer.calls == ["close"] and runner.calls == ["close"]  # closed after the producer's failure
    assert worker.metrics.health()["status"] == "stopping"


@pytest.mark.parametrize("failing", ["producer flush", "consumer close"])
def test_a_failure_while_closing_closes_the_rest_and_is_raised(clients, failing: str) -> None:
    runner, producer, consumer = clients
    which, method = failing.split()
    {"producer": producer, "consumer": consumer}[which].fail_on = method
    worker = FakeKafkaWorker(runner, producer, consumer)
    worker.stop()  # stopped before the first poll: nothing in flight, only the closing runs
    with pytest.raises(RuntimeError, match=f"{method} failed"):
        worker.run()
    assert producer.calls == ["flush", "close"]
    assert consumer.calls == ["close"]
    assert runner.calls == ["close"]  # the scoring child is never left behind
    assert worker.metrics.health()["status"] == "stopping"


class StuckConsumer(FakeConsumer):
    """A member whose JoinGroup is never answered: no partitions, its coordinator rebalancing for ever."""

    def __init__(self, worker_stop, polls: int) -> None:
        super().__init__()
        self.records = {}
        self._coordinator = type("Coordinator", (), {"state": "<rebalancing>"})()
        self.stop, self.polls = worker_stop, polls

    def poll(self, **_: object):
        self.polls -= 1
        if self.polls <= 0:
            self.stop()
        return {}

    def assignment(self):
        return set()


def test_a_consumer_whose_join_goes_unanswered_is_made_again(monkeypatch, caplog) -> None:
    # kafka-python awaits a JoinGroup answer for ever: once Tansu left one unanswered, the worker polled on
    # without partitions, and a test waiting for it to go idle never ended
    runner, producer = FakeRunner(), FakeProducer()
    made: list[StuckConsumer] = []
    worker = FakeKafkaWorker(runner, producer, FakeConsumer())
    monkeypatch.setattr(kafka_io, "ensure_topics", lambda *a, **k: None)
    monkeypatch.setattr(kafka_io, "make_producer", lambda *a, **k: producer)
    def consumer(*a, **k):
        made.append(StuckConsumer(worker.stop, 4 if not made else 3))
        if len(made) > 1:
            made[-1]._coordinator.state = "<stable>"  # the new member joins
        return made[-1]

    monkeypatch.setattr(kafka_io, "make_consumer", consumer)
    monkeypatch.setattr(kafka_io, "stuck_join_s", lambda client_options=None: 0.0)
    with caplog.at_level(logging.WARNING, logger="anomaly.worker"):
        worker.run()
    assert len(made) == 2 and made[0].calls == ["close"]  # the stuck one closed, a new one made
    assert "has been joining group g" in caplog.text


def test_a_stable_member_without_partitions_is_left_alone(monkeypatch) -> None:
    # more workers than partitions: a stable member with nothing assigned must not rejoin (every rejoin
    # rebalances the whole group)
    runner, producer = FakeRunner(), FakeProducer()
    made: list[StuckConsumer] = []
    worker = FakeKafkaWorker(runner, producer, FakeConsumer())

    def stable(*a, **k):
        consumer = StuckConsumer(worker.stop, 6)
        consumer._coordinator.state = "<stable>"
        made.append(consumer)
        return consumer

    monkeypatch.setattr(kafka_io, "ensure_topics", lambda *a, **k: None)
    monkeypatch.setattr(kafka_io, "make_producer", lambda *a, **k: producer)
    monkeypatch.setattr(kafka_io, "make_consumer", stable)
    monkeypatch.setattr(kafka_io, "stuck_join_s", lambda client_options=None: 0.0)
    worker.run()
    assert len(made) == 1


def test_idle_stop_counts_no_time_spent_loading_a_promoted_model(clients) -> None:
    """``idle_stop_s`` is time without records; a model load of 1 s counted as idle stopped the worker
    right after it, with the readings sent meanwhile never read."""
    import dataclasses
    import time

    runner, producer, consumer = clients
    consumer.records = {}
    polls = []
    consumer.poll = lambda **_: polls.append(time.monotonic()) or {}
    loads = []

    def follow_model(drain):
        if not loads:
            time.sleep(1.0)  # the promoted version loads
        loads.append(1)
        return []

    runner.follow_model = follow_model
    worker = FakeKafkaWorker(runner, producer, consumer)
    worker.options = dataclasses.replace(worker.options, poll_timeout_s=0.05)
    worker.run(idle_stop_s=0.5)
    assert polls[-1] - polls[1] >= 0.4  # polled on for about idle_stop_s after the load, not stopped at once


class ReadThenLost(FakeConsumer):
    """Hands out one record, then loses its partitions (a rebalance it waits in for ever)."""

    def __init__(self) -> None:
        super().__init__()
        self.polls = 0

    def poll(self, **_: object):
        self.polls += 1
        return super().poll()

    def assignment(self):
        return {TopicPartition("readings", 0)} if self.polls <= 1 else set()

    def commit(self, *a, **k) -> None:
        pass


class ScoringRunner(FakeRunner):
    entities = 1

    def result(self, handle=None):
        from anomaly.scoring_step import BatchOutput

        return BatchOutput(counts={"consumed": 1})


def test_idle_stop_counts_once_the_worker_has_read_even_without_partitions(monkeypatch) -> None:
    """A test's worker that read its input and then lost its partitions to a rebalance did not count idle
    time while it waited for the group to settle again: on the local broker that took minutes (a CI run's
    first worker test: 13 min). One that has read nothing yet still waits for partitions."""
    import time

    runner, producer, consumer = ScoringRunner(), FakeProducer(), ReadThenLost()
    monkeypatch.setattr(kafka_io, "ensure_topics", lambda *a, **k: None)
    monkeypatch.setattr(kafka_io, "make_producer", lambda *a, **k: producer)
    monkeypatch.setattr(kafka_io, "make_consumer", lambda *a, **k: consumer)
    monkeypatch.setattr(kafka_io, "joining", lambda c: False)  # a stable member left with nothing
    worker = FakeKafkaWorker(runner, producer, consumer)
    import threading

    guard = threading.Timer(10.0, worker.stop)  # without the fix it polled on for ever: stopped, then failed
    guard.start()
    started = time.monotonic()
    try:
        stats = worker.run(idle_stop_s=0.3)
    finally:
        guard.cancel()
    assert stats.consumed == 1 and time.monotonic() - started < 5 and consumer.polls > 2

class CutOffConsumer(FakeConsumer):
    """A stable member whose broker goes away for ``lost`` polls: kafka-python forgets the group coordinator."""

    def __init__(self, worker, lost: int, after: int) -> None:
        super().__init__()
        self.records = {}
        self._coordinator = type("Coordinator", (), {"group_id": "g", "coordinator_id": 0, "state": "<stable>"})()
        self.worker, self.lost, self.after, self.polls = worker, lost, after, 0
        self.health: list[dict] = []

    def poll(self, **_: object):
        import time

        self.health.append(self.worker.metrics.health())  # what the round before said
        self.polls += 1
        self._coordinator.coordinator_id = None if self.polls <= self.lost else 0
        if self.polls >= self.lost + self.after:
            self.worker.stop()
        time.sleep(0.02)
        return {}


def test_a_broker_that_cannot_be_reached_is_said_in_health_and_the_log(monkeypatch, caplog) -> None:
    # kafka-python retries quietly: a worker whose broker was down for minutes answered /healthz "ok"
    from anomaly import worker as worker_module

    runner, producer = FakeRunner(), FakeProducer()
    worker = FakeKafkaWorker(runner, producer, FakeConsumer())
    consumer = CutOffConsumer(worker, lost=15, after=3)
    monkeypatch.setattr(kafka_io, "ensure_topics", lambda *a, **k: None)
    monkeypatch.setattr(kafka_io, "make_producer", lambda *a, **k: producer)
    monkeypatch.setattr(kafka_io, "make_consumer", lambda *a, **k: consumer)
    monkeypatch.setattr(worker_module, "BROKER_LOST_AFTER_S", 0.1)
    with caplog.at_level(logging.INFO, logger="anomaly.worker"):
        worker.run()
    said = [(h["status"], h.get("detail")) for h in consumer.health[1:]]
    assert said[0] == ("ok", None)  # a moment without a coordinator (a lookup) is no outage
    lost = [detail for status, detail in said if status == "degraded"]
    assert lost and all("cannot be reached" in d and "127.0.0.1:1" in d for d in lost)
    assert said[-1] == ("ok", None)  # back once the coordinator is known again
    assert caplog.text.count("no Kafka group coordinator for") == 1  # logged once per outage
    assert "the Kafka group coordinator is known again" in caplog.text


@pytest.mark.parametrize("stall_s,client_options,expected", [
    (300.0, {}, 125.0),  # the producer's own 120 s + 5
    (120.0, {}, 105.0),  # within the stall limit: the delivery fails with its own error first
    (300.0, {"delivery_timeout_ms": 600_000}, 285.0),
    (0.0, {"delivery_timeout_ms": 600_000}, 605.0),  # no watchdog
])
def test_a_delivery_gives_up_before_the_watchdog_would(stall_s, client_options, expected) -> None:
    options = WorkerOptions("127.0.0.1:1", "readings", "events", "dlq", None, "g", client_options,
                            WindowPolicy(window_size=1, period_s=1.0), AlertPolicy(), device="cpu", stall_s=stall_s)

    class Sized(FakeKafkaWorker):
        def __init__(self) -> None:
            Worker.__init__(self, options, FakeFollower())

    assert Sized()._delivery_timeout_s == expected


def test_a_group_that_does_not_settle_is_said_in_health(monkeypatch) -> None:
    # On Tansu a group whose next leader left mid-rebalance never settles: the worker joined on and on with
    # no partitions, and /healthz said ok until the stuck-join renewal six minutes later
    import time

    from anomaly import worker as worker_module

    runner, producer = FakeRunner(), FakeProducer()
    worker = FakeKafkaWorker(runner, producer, FakeConsumer())
    health: list[dict] = []

    class Joining(StuckConsumer):
        def poll(self, **kwargs: object):
            health.append(worker.metrics.health())
            time.sleep(0.02)
            return super().poll(**kwargs)

    consumer = Joining(worker.stop, 15)
    consumer._coordinator.state = kafka_io.MemberState.REBALANCING
    monkeypatch.setattr(kafka_io, "ensure_topics", lambda *a, **k: None)
    monkeypatch.setattr(kafka_io, "make_producer", lambda *a, **k: producer)
    monkeypatch.setattr(kafka_io, "make_consumer", lambda *a, **k: consumer)
    monkeypatch.setattr(worker_module, "JOIN_TROUBLE_S", 0.1)
    worker.run()
    said = [(h["status"], h.get("detail")) for h in health[1:]]
    assert said[0] == ("ok", None)  # joining for a moment is what joining is
    assert said[-1][0] == "degraded" and "joining group g for" in said[-1][1] and "without partitions" in said[-1][1]


# --- a stop while connecting to a broker that cannot be reached --------------------------------------
@pytest.fixture
def stop_handlers_restored():
    import signal

    from anomaly.stop_flag import STOP_SIGNALS

    saved = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def _sigterm_in(seconds: float):
    import os
    import signal
    import threading

    timer = threading.Timer(seconds, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    return timer


@pytest.mark.parametrize("while_making", ["topics", "producer"])
def test_a_stop_signal_while_connecting_to_an_unreachable_broker_stops_the_worker_cleanly(
        while_making: str, monkeypatch: pytest.MonkeyPatch, stop_handlers_restored, caplog) -> None:
    # kafka-python retries an unreachable bootstrap server for bootstrap_timeout_ms (30 s by default): the
    # worker went on waiting after SIGTERM, then exited 2 with a connection error (~28 s, past most grace periods)
    runner = FakeRunner()
    worker = FakeKafkaWorker(runner, FakeProducer(), FakeConsumer())
    worker.options = dataclasses.replace(worker.options, client_options={"bootstrap_timeout_ms": 20_000})
    if while_making == "producer":
        monkeypatch.setattr(kafka_io, "ensure_topics", lambda *a, **k: None)
    worker.install_signal_handlers()
    timer = _sigterm_in(1.5)
    try:
        with caplog.at_level(logging.INFO, logger="anomaly.worker"):
            stats = worker.run()  # real clients, to 127.0.0.1:1 where nothing listens
    finally:
        timer.cancel()
    assert stats.batches == 0 and worker.stop_event.is_set()
    assert "stopped while connecting to the broker" in caplog.text
    assert runner.calls == (["close"] if while_making == "producer" else [])  # the runner is made after the topics
    assert worker.metrics.health()["status"] == "stopping"
