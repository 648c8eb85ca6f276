"""The worker's delivery check through kafka_io.deliver and its time limit, kafka_io.delivery_timeout_s."""

from __future__ import annotations

import re

import kafka.errors as kafka_errors
import pytest

from anomaly import kafka_io
from anomaly.errors import DeliveryError


class Future:
    def __init__(self, error: Exception | None = None) -> None:
        self.error, self.waited = error, None

    def get(self, timeout=None):
        self.waited = timeout
        if self.error is not None:
            raise self.error
        return "metadata"


class Producer:
    def __init__(self) -> None:
        self.flushed = None

    def flush(self, timeout=None) -> None:
        self.flushed = timeout


def test_delivered_outputs_pass_and_every_send_is_checked() -> None:
    producer, sends = Producer(), [Future(), Future()]
    kafka_io.deliver(producer, sends, 12.0, bootstrap_servers="kafka:9092", topics=["anomalies"])
    assert producer.flushed == 12.0 and [f.waited for f in sends] == [12.0, 12.0]


def test_an_output_not_delivered_says_where_and_that_nothing_is_committed() -> None:
    # kafka-python's own "KafkaTimeoutError: Timeout waiting for future" ended the worker with a traceback
    sends = [Future(), Future(kafka_errors.KafkaTimeoutError("Timeout waiting for future"))]
    with pytest.raises(DeliveryError) as caught:
        kafka_io.deliver(Producer(), sends, 125.0, bootstrap_servers=["a:9092", "b:9092"],
                         topics=["anomalies", "sensors.dlq", "anomalies"])
    said = str(caught.value)
    assert "outputs to anomalies, sensors.dlq were not delivered to the broker at a:9092,b:9092 within 125 s" in said
    assert "KafkaTimeoutError: Timeout waiting for future" in said and "nothing of their batch is committed" in said


def test_an_output_the_broker_refused_is_said_as_a_refusal_not_as_a_wait() -> None:
    # a broker restarted with its memory lost refuses the producer's id at once; the message said
    # "within 125 s", and sent the reader looking for a slow broker
    sends = [Future(kafka_errors.UnknownProducerIdError("the broker does not know this producer"))]
    with pytest.raises(DeliveryError) as caught:
        kafka_io.deliver(Producer(), sends, 125.0, bootstrap_servers="kafka:9092", topics=["anomalies"])
    said = str(caught.value)
    assert re.search(r"were not delivered to the broker at kafka:9092 \(refused after \d+\.\d s\) \(UnknownProducerIdError",
                     said), said
    assert "within 125 s" not in said


def test_the_time_limit_follows_the_producers_own() -> None:
    # The worker gave up after 30 s, inside the producer's own 120 s of retries: a broker away for 45 s
    # ended it, though the producer would have delivered when the broker came back.
    assert kafka_io.delivery_timeout_s() == 125.0
    assert kafka_io.delivery_timeout_s({"delivery_timeout_ms": 60_000}) == 65.0
