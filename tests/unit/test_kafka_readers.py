"""The group-less reading helpers keep their deadline even when no broker answers."""
from __future__ import annotations

import pytest
from kafka import errors as kafka_errors

from anomaly import kafka_io
from anomaly.errors import TopicError


@pytest.fixture
def unreachable(monkeypatch):
    """A ``KafkaConsumer`` that never bootstraps; records the options each one was built with."""
    built: list[dict] = []

    def consumer(**options):
        built.append(options)
        raise kafka_errors.KafkaTimeoutError("Unable to bootstrap from ['127.0.0.1:1']")

    monkeypatch.setattr(kafka_io, "KafkaConsumer", consumer)
    return built


@pytest.mark.parametrize("reader", [kafka_io.read_all, kafka_io.read_tail])
def test_a_reader_bootstraps_within_its_timeout_and_names_the_broker(reader, unreachable):
    with pytest.raises(TopicError, match="127.0.0.1:1"):
        reader("127.0.0.1:1", "t", timeout_s=1.5)
    assert unreachable[0]["bootstrap_timeout_ms"] == 1500  # not kafka-python's 30 s


@pytest.mark.parametrize("reader", [kafka_io.read_all, kafka_io.read_tail])
def test_a_shorter_bootstrap_timeout_from_client_options_is_kept(reader, unreachable):
    with pytest.raises(TopicError):
        reader("127.0.0.1:1", "t", timeout_s=10, client_options={"bootstrap_timeout_ms": 200})
    assert unreachable[0]["bootstrap_timeout_ms"] == 200
    assert unreachable[0]["group_id"] is None and unreachable[0]["allow_auto_create_topics"] is False
