"""The Kafka adapter and the local broker against a real Tansu broker (the session ``kafka_broker``).

Each group join costs ≈ 3 s on Tansu with our session timeout (DESIGN §5); tests keep joins few.
"""

from __future__ import annotations

import os
import socket
import time

import pytest
from kafka import KafkaConsumer, OffsetAndMetadata, TopicPartition

from anomaly import kafka_io
from anomaly.broker import HOST, BrokerError, LocalBroker, free_port
from anomaly.codec import Reading, decode_reading, encode_reading
from anomaly.errors import ConfigError, TopicError
from anomaly.kafka_io import (committed_offsets, consumer_options, ensure_topics, make_admin, make_consumer,
                              make_producer, producer_options, read_all, require_topics, wait_for_assignment)

pytestmark = pytest.mark.integration

JOIN_TIMEOUT_S = 60.0  # ≈ 3 s expected, in 3 s rounds (9 s seen on a loaded machine)


def readings(n: int, entities: int = 3) -> list[Reading]:
    return [Reading(entity=f"pump-{i % entities}", ts=1_763_719_200.0 + i,
                    values={"temp": 70.0 + i, "flow": None if i % 4 == 0 else float(i)}) for i in range(n)]


def produce(bootstrap: str, topic: str, items: list[Reading]) -> None:
    producer = make_producer(bootstrap)
    try:
        for reading in items:
            producer.send(topic, key=reading.entity.encode(), value=encode_reading(reading))
        producer.flush(timeout=10)
    finally:
        producer.close()


def poll_until(consumer: KafkaConsumer, count: int, timeout_s: float = 10.0) -> list:
    records: list = []
    deadline = time.monotonic() + timeout_s
    while len(records) < count and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=200).values():
            records.extend(batch)
    return records


# --- produce and read back -----------------------------------------------------------------------

def test_produced_readings_read_back_intact(kafka_broker: str, topic_name: str) -> None:
    assert ensure_topics(kafka_broker, {topic_name: 2}) == {topic_name: 2}
    sent = readings(200)
    produce(kafka_broker, topic_name, sent)

    records = read_all(kafka_broker, topic_name, timeout_s=15, idle_s=1.0)

    assert len(records) == len(sent)
    decoded = [decode_reading(r.value) for r in records]
    assert all(isinstance(d, Reading) for d in decoded)
    assert sorted(decoded, key=lambda d: d.ts) == sent
    for record, reading in zip(records, decoded):
        assert record.key == reading.entity.encode()  # key = entity id (DESIGN §2)
    by_entity: dict[bytes, set[int]] = {}
    for record in records:
        by_entity.setdefault(record.key, set()).add(record.partition)
    assert all(len(parts) == 1 for parts in by_entity.values())  # one entity, one partition
    for partition in {r.partition for r in records}:  # per-partition order is the send order
        ts = [decode_reading(r.value).ts for r in records if r.partition == partition]
        assert ts == sorted(ts)


def test_read_all_hands_batches_over_in_partition_order_and_a_strict_read_cut_short_says_so(
        kafka_broker: str, topic_name: str, monkeypatch) -> None:
    assert ensure_topics(kafka_broker, {topic_name: 2}) == {topic_name: 2}
    sent = readings(200)
    produce(kafka_broker, topic_name, sent)
    batches: list[list] = []
    assert read_all(kafka_broker, topic_name, timeout_s=15, idle_s=1.0, on_records=batches.append, strict=True) == []
    got = [r for batch in batches for r in batch]
    assert len(got) == len(sent)  # handed over, none kept
    for partition in {r.partition for r in got}:
        offsets = [r.offset for r in got if r.partition == partition]
        assert offsets == sorted(offsets)
    # a read whose time runs out before the partitions' ends: strict says so instead of passing a part off
    monkeypatch.setattr(kafka_io, "_POLL_STEP_MS", 1)
    real_poll = kafka_io.KafkaConsumer.poll
    monkeypatch.setattr(kafka_io.KafkaConsumer, "poll", lambda self, timeout_ms=0, **kw: (time.sleep(0.2), {})[1])
    with pytest.raises(TopicError, match="stopped at its time limit with 2 partition"):
        read_all(kafka_broker, topic_name, timeout_s=3, idle_s=0.5, strict=True)
    assert read_all(kafka_broker, topic_name, timeout_s=3, idle_s=0.5) == []  # not strict: what it read
    monkeypatch.setattr(kafka_io.KafkaConsumer, "poll", real_poll)


def test_read_all_of_a_missing_topic_is_empty_and_does_not_create_it(kafka_broker: str, topic_name: str) -> None:
    assert read_all(kafka_broker, topic_name, timeout_s=1.0, idle_s=0.2) == []
    with make_admin(kafka_broker) as admin:
        assert topic_name not in admin.list_topics()


# --- consumer groups and committed offsets -------------------------------------------------------

def test_group_resumes_after_the_committed_offset(kafka_broker: str, topic_name: str) -> None:
    ensure_topics(kafka_broker, {topic_name: 2})
    items = readings(12, entities=1)  # one entity → every record in one partition
    produce(kafka_broker, topic_name, items)
    group = f"{topic_name}-group"
    assert committed_offsets(kafka_broker, group, topic_name) == {0: None, 1: None}

    first = make_consumer(kafka_broker, group, [topic_name])
    try:
        started = time.monotonic()
        assignment = wait_for_assignment(first, JOIN_TIMEOUT_S)
        join_s = time.monotonic() - started
        assert assignment == {TopicPartition(topic_name, 0), TopicPartition(topic_name, 1)}
        records = poll_until(first, len(items))
        # wait_for_assignment rewound whatever its polls fetched: nothing was skipped.
        assert [r.offset for r in records] == list(range(len(items)))
        partition = records[0].partition
        assert all(r.partition == partition for r in records)
        # Process 5, then commit "the next offset to read" for them only (manual commit).
        first.commit({TopicPartition(topic_name, partition): OffsetAndMetadata(records[4].offset + 1, "", -1)})
    finally:
        first.close(autocommit=False)
    assert join_s < 20, f"group join took {join_s:.1f} s: session_timeout_ms default not applied?"

    offsets = committed_offsets(kafka_broker, group, topic_name)
    assert offsets[partition] == 5
    assert offsets[1 - partition] is None  # never committed

    second = make_consumer(kafka_broker, group, [topic_name])
    try:
        wait_for_assignment(second, JOIN_TIMEOUT_S)
        resumed = poll_until(second, len(items) - 5)
    finally:
        second.close(autocommit=False)  # autocommit is off anyway; nothing new is committed
    assert [r.offset for r in resumed] == list(range(5, len(items)))
    assert [decode_reading(r.value) for r in resumed] == items[5:]
    assert committed_offsets(kafka_broker, group, topic_name)[partition] == 5


def test_committed_offsets_of_an_unknown_topic_is_empty(kafka_broker: str, topic_name: str) -> None:
    assert committed_offsets(kafka_broker, "nobody", topic_name) == {}


def test_wait_for_assignment_times_out_clearly_and_can_be_retried(kafka_broker: str, topic_name: str) -> None:
    ensure_topics(kafka_broker, {topic_name: 1})
    consumer = make_consumer(kafka_broker, f"{topic_name}-g", [topic_name])
    try:
        with pytest.raises(TimeoutError, match="no partitions assigned"):
            wait_for_assignment(consumer, 0.2)  # shorter than the ≈ 3 s join
        # Finish the join before closing: a consumer closed mid-join makes close() and Tansu's
        # shutdown each wait ≈ 3-5 s for the pending join.
        assert wait_for_assignment(consumer, JOIN_TIMEOUT_S) == {TopicPartition(topic_name, 0)}
    finally:
        consumer.close(autocommit=False)


def test_a_join_answered_between_polls_is_taken_not_sent_again(kafka_broker: str, topic_name: str) -> None:
    """kafka-python 3.0.12 threw away a join answered while its consumer was not inside ``poll`` and sent
    a new one: a consumer busy longer than the join between short polls (a worker scoring a batch) never
    got its partitions. Here each pause outlasts the broker's ≈ 3 s join, so every answer lands between
    polls; the second poll must take it."""
    assert kafka_io.KEEPS_FINISHED_JOINS
    ensure_topics(kafka_broker, {topic_name: 2})
    consumer = make_consumer(kafka_broker, f"{topic_name}-g", [topic_name])
    try:
        polls = 0
        while not consumer.assignment() and polls < 4:
            if polls:
                time.sleep(4.0)
            consumer.poll(timeout_ms=100)
            polls += 1
        assert consumer.assignment() == {TopicPartition(topic_name, 0), TopicPartition(topic_name, 1)}
        assert polls == 2  # the first sent the join, the second took its answer
    finally:
        consumer.close(autocommit=False)


# --- topics --------------------------------------------------------------------------------------

def test_require_topics_checks_without_creating(kafka_broker: str, topic_name: str) -> None:
    present, absent = f"{topic_name}-here", f"{topic_name}-absent"
    ensure_topics(kafka_broker, {present: 2})
    assert require_topics(kafka_broker, [present]) == {present: 2}
    with pytest.raises(TopicError, match=absent) as err:
        require_topics(kafka_broker, [present, absent])
    assert present not in str(err.value).split("exist:")[1].split(";")[0]  # only the missing one is named
    with make_admin(kafka_broker) as admin:
        assert absent not in set(admin.list_topics())  # nothing was created


def test_ensure_topics_is_idempotent_and_creates_the_partitions_asked(kafka_broker: str, topic_name: str) -> None:
    topics = {f"{topic_name}-a": 3, f"{topic_name}-b": 1}
    assert ensure_topics(kafka_broker, topics) == topics
    assert ensure_topics(kafka_broker, topics) == topics  # exists → fine, unchanged
    # An existing topic is left as it is, even when another count is asked (and the real one is returned).
    assert ensure_topics(kafka_broker, {f"{topic_name}-a": 5}) == {f"{topic_name}-a": 3}
    with make_admin(kafka_broker) as admin:
        described = {t["name"]: len(t["partitions"]) for t in admin.describe_topics(list(topics))}
    assert described == topics


def test_ensure_topics_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        ensure_topics("127.0.0.1:1", {"t": 0})


# --- options -------------------------------------------------------------------------------------

def test_defaults_are_the_documented_ones() -> None:
    consumer = consumer_options("a:9092, b:9092", "g")
    assert consumer["bootstrap_servers"] == ["a:9092", "b:9092"]
    assert consumer["group_id"] == "g"
    assert consumer["enable_auto_commit"] is False
    assert consumer["auto_offset_reset"] == "earliest"
    assert (consumer["session_timeout_ms"], consumer["heartbeat_interval_ms"]) == (6000, 2000)
    producer = producer_options(["a:9092"])
    assert (producer["acks"], producer["linger_ms"], producer["batch_size"]) == ("all", 20, 256 * 1024)
    assert "value_serializer" not in producer and "value_deserializer" not in consumer


def test_client_options_override_and_are_routed_per_client() -> None:
    shared = {"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN", "linger_ms": 5,
              "max_poll_records": 50, "fetch_max_wait_ms": 100}
    consumer = consumer_options("k:9092", "g", client_options=shared)
    producer = producer_options("k:9092", client_options=shared)
    admin = kafka_io.admin_options("k:9092", client_options=shared)
    assert consumer["security_protocol"] == producer["security_protocol"] == admin["security_protocol"] == "SASL_SSL"
    assert consumer["fetch_max_wait_ms"] == 100 and consumer["max_poll_records"] == 50
    assert "linger_ms" not in consumer and producer["linger_ms"] == 5
    assert "max_poll_records" not in producer and "linger_ms" not in admin
    with pytest.raises(ConfigError, match="kafka.client_options.*lingr_ms"):
        producer_options("k:9092", client_options={"lingr_ms": 5})
    with pytest.raises(ConfigError, match="bootstrap_servers"):
        consumer_options(" , ", "g")


def test_client_options_reach_real_clients(kafka_broker: str, topic_name: str) -> None:
    options = {"client_id": "anomaly-test", "linger_ms": 0, "request_timeout_ms": 20000,
               "session_timeout_ms": 10000, "heartbeat_interval_ms": 3000}
    producer = make_producer(kafka_broker, options)
    consumer = make_consumer(kafka_broker, f"{topic_name}-g", [topic_name], options)
    try:
        assert (producer.config["client_id"], producer.config["linger_ms"], producer.config["request_timeout_ms"],
                producer.config["enable_idempotence"]) == ("anomaly-test", 0, 20000, True)
        assert producer.config["batch_size"] == 256 * 1024  # a default that was not overridden
        assert (consumer.config["client_id"], consumer.config["session_timeout_ms"]) == ("anomaly-test", 10000)
        assert consumer.config["enable_auto_commit"] is False
        producer.send(topic_name, key=b"k", value=b"v").get(timeout=10)  # the local broker takes idempotence
    finally:
        producer.close()
        consumer.close(autocommit=False)
    assert [r.value for r in read_all(kafka_broker, topic_name, timeout_s=5, idle_s=0.5)] == [b"v"]


# --- the local broker itself ---------------------------------------------------------------------

def test_port_in_use_is_a_clear_error(kafka_broker: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blocker:
        blocker.bind((HOST, 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        with pytest.raises(BrokerError, match=f"port {port} .*already in use"):
            LocalBroker(port=port).start()


def test_stop_leaves_no_process_and_no_temporary_log(kafka_broker: str) -> None:
    broker = LocalBroker(port=free_port())
    with broker:
        pid = broker.pid
        log_path = broker.log_path
        assert pid is not None and broker.is_running() and log_path is not None and log_path.exists()
        with make_admin(broker.bootstrap) as admin:
            admin.list_topics()
    assert not broker.is_running() and broker.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # reaped, gone
    assert not log_path.exists()
    broker.stop()  # idempotent
