"""The group-less reading helpers keep their deadline even when no broker answers."""
from __future__ import annotations

import time
from collections import namedtuple

import pytest
from kafka import TopicPartition
from kafka import errors as kafka_errors

from anomaly import kafka_io
from anomaly.errors import ConfigError, TopicError


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


class _SlowBroker:
    """A group-less consumer over one partition holding ``count`` records whose first fetches come
    back empty for ``silent_s`` (a loaded broker), then all records at once."""

    def __init__(self, count: int, silent_s: float) -> None:
        self.tp = TopicPartition("t", 0)
        self.count, self.ready_at, self.next = count, time.monotonic() + silent_s, 0
        self.closed = False

    def partitions_for_topic(self, topic):
        return {0}

    def assign(self, tps):
        pass

    def seek_to_beginning(self, *tps):
        self.next = 0

    def seek(self, tp, offset):
        self.next = offset

    def beginning_offsets(self, tps, timeout_ms=None):
        return {tp: 0 for tp in tps}

    def end_offsets(self, tps, timeout_ms=None):
        return {tp: self.count for tp in tps}

    def poll(self, timeout_ms):
        if time.monotonic() < self.ready_at or self.next >= self.count:
            time.sleep(timeout_ms / 1000)
            return {}
        batch = [ConsumerRecord("t", 0, offset) for offset in range(self.next, self.count)]
        self.next = self.count
        return {self.tp: batch}

    def position(self, tp, timeout_ms=None):
        return self.next

    def close(self, autocommit=True):
        self.closed = True


ConsumerRecord = namedtuple("ConsumerRecord", "topic partition offset")


@pytest.mark.parametrize("reader", [kafka_io.read_all, kafka_io.read_tail])
def test_a_first_fetch_slower_than_idle_s_does_not_pass_for_an_empty_topic(reader, monkeypatch):
    broker = _SlowBroker(count=5, silent_s=0.6)
    monkeypatch.setattr(kafka_io, "_reader", lambda *args: broker)
    records = reader("127.0.0.1:9092", "t", timeout_s=5, idle_s=0.2)
    assert [record.offset for record in records] == [0, 1, 2, 3, 4] and broker.closed


def test_an_idle_topic_still_ends_the_read_after_idle_s(monkeypatch):
    broker = _SlowBroker(count=0, silent_s=0)
    monkeypatch.setattr(kafka_io, "_reader", lambda *args: broker)
    started = time.monotonic()
    assert kafka_io.read_all("127.0.0.1:9092", "t", timeout_s=5, idle_s=0.2) == []
    assert time.monotonic() - started < 2


@pytest.mark.parametrize("key", ["ssl_cafile", "ssl_certfile"])
def test_a_tls_file_that_is_not_there_is_a_config_error_naming_it(key, tmp_path, monkeypatch):
    """A CA file not mounted in the container: the handshake failed and the error asked whether the broker
    was running and reachable, the file named only in a warning before it. Now no client is made."""
    from anomaly import retrain
    from anomaly.errors import ConfigError

    made = []
    monkeypatch.setattr(kafka_io, "KafkaConsumer", lambda **options: made.append(options))
    monkeypatch.setattr(kafka_io, "KafkaProducer", lambda **options: made.append(options))
    missing = str(tmp_path / "kafka-ca.crt")
    options = {"security_protocol": "SSL", key: missing}
    for connect in (lambda: kafka_io.make_producer("b:9092", options),
                    lambda: kafka_io.make_consumer("b:9092", "g", ["t"], options),
                    lambda: list(retrain.topic_readings("b:9092", "t", 0.1, 1.0, options))):
        with pytest.raises(ConfigError, match=f"kafka.client_options.{key}: {missing} is not a file here"):
            connect()
    assert made == []
    (tmp_path / "kafka-ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    kafka_io.make_producer("b:9092", options)
    assert made[0][key] == missing


@pytest.mark.parametrize("options, field, says", [
    ({"request_timeout_ms": "30000"}, "request_timeout_ms", "must be a number"),  # a Secret written by hand
    ({"security_protocol": "sasl_ssl"}, "security_protocol", "must be one of .*case matters"),  # was plaintext, no SASL
    ({"sasl_mechanism": "scram-sha-512"}, "sasl_mechanism", "must be one of"),
    ({"acks": "1"}, "acks", "must be one of 0, 1, -1, 'all'"),
    ({"enable_idempotence": 1}, "enable_idempotence", "must be true or false"),
    ({"compression_type": "brotli"}, "compression_type", "must be one of"),
    ({"auto_offset_reset": "oldest"}, "auto_offset_reset", "must be earliest, latest or none"),
    ({"isolation_level": "serializable"}, "isolation_level", "must be read_uncommitted or read_committed"),
    ({"request_timeout_ms": float("nan")}, "request_timeout_ms", "must be a number"),
])
def test_a_client_option_value_kafka_python_cannot_use_is_a_config_error_naming_it(options, field, says, monkeypatch):
    """kafka-python checks none of these: a number as a string failed with a TypeError traceback inside
    the client, and a security_protocol other than exactly SSL or SASL_SSL silently meant plaintext with
    no SASL. Now no client is made, and the error names the option."""
    from anomaly.errors import ConfigError

    made = []
    monkeypatch.setattr(kafka_io, "KafkaProducer", lambda **kw: made.append(kw))
    monkeypatch.setattr(kafka_io, "KafkaConsumer", lambda **kw: made.append(kw))
    for connect in (lambda: kafka_io.make_producer("b:9092", options),
                    lambda: kafka_io.make_consumer("b:9092", "g", ["t"], options)):
        with pytest.raises(ConfigError, match=f"kafka.client_options.{field}: {says}"):
            connect()
    assert made == []


def test_client_option_values_kafka_python_takes_pass():
    good = {"security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512", "sasl_plain_username": "u",
            "sasl_plain_password": "p", "acks": "all", "retries": 5, "consumer_timeout_ms": 1000,
            "enable_idempotence": False, "compression_type": None, "request_timeout_ms": 40000.0,
            "ssl_cafile": "/etc/ca.crt", "client_id": "worker-1", "auto_offset_reset": "earliest",
            "bootstrap_servers": ["kafka-0:9093", "kafka-1:9093"]}
    kafka_io.check_client_option_values(good)
    # read as kafka-python reads them: "none" (fail without a committed offset), any case, the enum's number
    for loose in ({"auto_offset_reset": "none"}, {"auto_offset_reset": "EARLIEST"}, {"auto_offset_reset": "largest"},
                  {"isolation_level": "READ_COMMITTED"}, {"isolation_level": 1}, {"isolation_level": "read-committed"}):
        kafka_io.check_client_option_values(loose)


def test_options_kafka_python_refuses_together_are_a_config_error(monkeypatch):
    from anomaly.errors import ConfigError

    def refuse(**kw):
        raise AssertionError("sasl_mechanism required when security_protocol is SASL_SSL")

    monkeypatch.setattr(kafka_io, "KafkaProducer", refuse)
    with pytest.raises(ConfigError, match="kafka.client_options: kafka-python cannot make a producer .*AssertionError"):
        kafka_io.make_producer("b:9092", {"security_protocol": "SASL_SSL"})


@pytest.mark.parametrize("options, field", [
    ({"acks": 0}, "acks"), ({"acks": 1}, "acks"), ({"acks": "1"}, "acks"), ({"retries": 0}, "retries"),
    ({"max_in_flight_requests_per_connection": 10}, "max_in_flight_requests_per_connection"),
    ({"enable_idempotence": False}, "enable_idempotence"),
    ({"transactional_id": "anomaly"}, "transactional_id"),
])
def test_producer_options_that_lose_or_reorder_outputs_are_a_config_error_naming_them(options, field, monkeypatch):
    # kafka-python turned idempotence off without a word for acks 1, retries 0 or in-flight above 5, and
    # took acks 0 (a made-up success): offsets were committed past events a broker failure lost, and a
    # retried batch could put an entity's closed before its open
    made = []
    monkeypatch.setattr(kafka_io, "KafkaProducer", lambda **kw: made.append(kw))
    with pytest.raises(ConfigError, match=f"kafka.client_options.{field}"):
        kafka_io.make_producer("b:9092", options)
    assert made == []


def test_producer_defaults_ask_for_idempotence_and_one_request_in_flight_may_do_without():
    assert kafka_io.producer_options("b:9092")["enable_idempotence"] is True
    options = kafka_io.producer_options("b:9092", client_options={"enable_idempotence": False,
                                                                  "max_in_flight_requests_per_connection": 1})
    assert options["enable_idempotence"] is False  # a cluster without IdempotentWrite: order kept by one in flight


def test_a_group_consumer_refuses_auto_commit():
    with pytest.raises(ConfigError, match="kafka.client_options.enable_auto_commit"):
        kafka_io.consumer_options("b:9092", "anomaly-worker", client_options={"enable_auto_commit": True})
    assert kafka_io.consumer_options("b:9092", None, client_options={"enable_auto_commit": True})  # no group: nothing


# --- unless_stopped: a client's bootstrap that a stop does not wait for ------------------------------
class Blocking:
    """A client factory that blocks until released, then makes a client that records its close."""

    def __init__(self, fail: Exception | None = None) -> None:
        import threading

        self.release, self.fail, self.made = threading.Event(), fail, []

    def __call__(self, **options):
        self.release.wait(10)
        if self.fail is not None:
            raise self.fail
        client = type("Client", (), {"closed": False, "options": options,
                                     "close": lambda self: setattr(self, "closed", True)})()
        self.made.append(client)
        return client


def test_unless_stopped_returns_the_client_or_raises_its_error() -> None:
    import threading

    factory = Blocking()
    factory.release.set()
    client = kafka_io.unless_stopped(threading.Event(), factory, bootstrap_servers="b:9092")
    assert client.options == {"bootstrap_servers": "b:9092"} and not client.closed
    failing = Blocking(fail=kafka_errors.KafkaTimeoutError("Unable to bootstrap"))
    failing.release.set()
    with pytest.raises(kafka_errors.KafkaTimeoutError, match="bootstrap"):
        kafka_io.unless_stopped(threading.Event(), failing)


def test_unless_stopped_gives_up_at_the_stop_and_closes_a_client_made_after() -> None:
    import threading

    factory, stop = Blocking(), threading.Event()
    threading.Timer(0.3, stop.set).start()
    with pytest.raises(kafka_io.Abandoned):
        kafka_io.unless_stopped(stop, factory)  # before, the caller waited for the bootstrap's end
    assert factory.made == []
    factory.release.set()  # the bootstrap ends after all: nobody takes the client, so its thread closes it
    deadline = time.monotonic() + 5
    while not factory.made or not factory.made[0].closed:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_the_drift_reader_stops_connecting_to_an_unreachable_broker_when_interrupted() -> None:
    # the scheduler's stop interrupts the drift check: it waited ~30 s for kafka-python's bootstrap to fail
    import threading

    from anomaly.scheduler import ScoreReader

    reader = ScoreReader("127.0.0.1:1", "scores", "drift", {"bootstrap_timeout_ms": 20_000})
    outcome: list[object] = []

    def read() -> None:
        try:
            outcome.append(reader.read(10, idle_s=0.1))
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=read)
    thread.start()
    time.sleep(1.0)
    reader.interrupt()
    thread.join(10)  # well inside the 20 s the bootstrap would take
    assert not thread.is_alive() and isinstance(outcome[0], kafka_io.Abandoned)
    reader.close()


def test_no_consumer_makes_the_topic_it_reads_unless_told_to():
    """A cluster with auto-creation on (the broker default) re-made a deleted input topic with its default
    partition count when the worker's consumer asked for it; the drift check made the scores topic."""
    assert kafka_io.consumer_options("k:9092", "anomaly-worker")["allow_auto_create_topics"] is False
    assert kafka_io.consumer_options("k:9092", None)["allow_auto_create_topics"] is False
    told = kafka_io.consumer_options("k:9092", "g", client_options={"allow_auto_create_topics": True})
    assert told["allow_auto_create_topics"] is True
