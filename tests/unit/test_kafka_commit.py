"""The worker's commit through kafka_io.commit: a rebalance skips it, anything else raises."""

from __future__ import annotations

import kafka.errors as kafka_errors
import pytest

from anomaly import kafka_io


class Consumer:
    def __init__(self, error: Exception | None = None) -> None:
        self.error, self.committed = error, []

    def commit(self, offsets) -> None:
        if self.error is not None:
            raise self.error
        self.committed.append({(tp.topic, tp.partition): meta.offset for tp, meta in offsets.items()})


def test_a_commit_is_sent_as_kafka_offsets() -> None:
    consumer = Consumer()
    assert kafka_io.commit(consumer, {("sensors", 0): 12, ("sensors", 3): 40}) is True
    assert consumer.committed == [{("sensors", 0): 12, ("sensors", 3): 40}]


@pytest.mark.parametrize("error", [kafka_errors.RebalanceInProgressError(), kafka_errors.CommitFailedError()])
def test_a_commit_while_the_group_rebalances_is_skipped_with_a_warning(error, caplog) -> None:
    # The batch's outputs are delivered; the partitions' next owner re-reads from the last commit.
    assert kafka_io.commit(Consumer(error), {("sensors", 0): 12}) is False
    assert "rebalancing" in caplog.text


def test_any_other_commit_error_raises() -> None:
    with pytest.raises(kafka_errors.KafkaTimeoutError):
        kafka_io.commit(Consumer(kafka_errors.KafkaTimeoutError()), {("sensors", 0): 12})
