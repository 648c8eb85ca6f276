"""What a rebalance does to window state: partitions lost forget theirs, partitions kept keep it (kafka-python's
eager protocol revokes every partition, then gives the kept ones back at their fetch position). A fake runner;
the real broker's rebalance is in tests/integration/test_worker.py."""

from __future__ import annotations

from anomaly.worker import lost_and_kept
from tests.unit.test_worker_close import FakeConsumer, FakeKafkaWorker, FakeProducer, FakeRunner, TopicPartition


class ForgettingRunner(FakeRunner):
    def __init__(self) -> None:
        super().__init__()
        self.forgotten: list[list[tuple[str, int]]] = []

    def forget_partitions(self, partitions) -> None:
        self.forgotten.append(list(partitions))


def test_lost_and_kept_split_the_revoked_partitions():
    assert lost_and_kept([("t", 0), ("t", 1), ("t", 2)], [("t", 2), ("t", 0), ("t", 5)]) == ([("t", 1)], [("t", 0), ("t", 2)])
    assert lost_and_kept([], [("t", 0)]) == ([], [])


def test_a_rebalance_forgets_only_the_partitions_not_given_back():
    runner = ForgettingRunner()
    worker = FakeKafkaWorker(runner, FakeProducer(), FakeConsumer())
    worker._runner = runner
    worker.on_revoked([TopicPartition("readings", 0), TopicPartition("readings", 1)])
    assert runner.forgotten == []  # not yet: which come back is known at the assignment
    worker.on_assigned([TopicPartition("readings", 1)])
    assert runner.forgotten == [[("readings", 0)]]
    worker.on_revoked([TopicPartition("readings", 1)])  # the other member leaves: 1 is revoked and given back
    worker.on_assigned([TopicPartition("readings", 0), TopicPartition("readings", 1)])
    assert runner.forgotten == [[("readings", 0)]]  # partition 1's windows were kept both times


def test_partitions_lost_by_an_eviction_are_forgotten_even_when_handed_back():
    """An eviction (session timeout, a poll too late) drops the client's positions: a partition handed back is
    read again from its commit, perhaps after another member moved it on, so its old windows do not fit."""
    from anomaly import kafka_io

    runner = ForgettingRunner()
    worker = FakeKafkaWorker(runner, FakeProducer(), FakeConsumer())
    worker._runner = runner
    listener = kafka_io.rebalance_listener(worker.on_revoked, worker.on_assigned, worker.on_lost)
    listener.on_partitions_lost({TopicPartition("readings", 0)})
    assert runner.forgotten == [[("readings", 0)]]
    listener.on_partitions_assigned({TopicPartition("readings", 0)})
    assert runner.forgotten == [[("readings", 0)]]  # nothing more to forget
    calls = []
    plain = kafka_io.rebalance_listener(calls.append, lambda assigned: None)  # no on_lost: revoked, as kafka-python
    plain.on_partitions_lost({TopicPartition("readings", 1)})
    assert calls == [{TopicPartition("readings", 1)}]
