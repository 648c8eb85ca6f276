"""Operators' verdicts on Kafka: sending one, reading them all back, finding the event one is about.

The pure side (the message, which verdict is in force, what it labels) is ``anomaly.feedback``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from anomaly import feedback, kafka_io
from anomaly.codec import decode_event
from anomaly.errors import DataError, DeliveryError
from anomaly.listing import some

log = logging.getLogger(__name__)

READ_TIMEOUT_S = 120.0  # longest read of the feedback or events topic
IDLE_S = 1.0  # a read ends this long after the last record (once at the end offsets it began with)
TOPIC_WAIT_S = 1.0  # a feedback topic nobody has written to yet does not exist (one metadata answer says so)
SEND_TIMEOUT_S = 30.0
PARTITIONS = 1  # verdicts are few; one partition keeps them in the order they were given


def read_verdicts(bootstrap_servers: str, topic: str, client_options: Mapping[str, Any] | None = None, *,
                  timeout_s: float = READ_TIMEOUT_S) -> tuple[list[feedback.Verdict], list[str]]:
    """Every verdict on ``topic`` in topic order (no topic: none), and why each record that is none was
    left out (logged). ``TopicError`` when the broker cannot be reached."""
    records = kafka_io.read_all(bootstrap_servers, topic, timeout_s=timeout_s, idle_s=IDLE_S,
                                client_options=client_options, topic_wait_s=TOPIC_WAIT_S)
    verdicts: list[feedback.Verdict] = []
    bad: list[str] = []
    for record in records:
        if record.value is None and record.key:  # a tombstone (compaction's delete) takes its key's verdict back
            verdicts.append(feedback.withdrawn(bytes(record.key).decode("utf-8", "replace")))
            continue
        verdict = feedback.decode(record.value)
        if isinstance(verdict, str):
            bad.append(f"partition {record.partition} offset {record.offset}: {verdict}")
        else:
            verdicts.append(verdict)
    if bad:
        log.warning("%d record(s) of %s are not verdicts and were left out: %s", len(bad), topic, some(bad, 3))
    return verdicts, bad


def read_events(bootstrap_servers: str, events_topic: str, client_options: Mapping[str, Any] | None = None, *,
                timeout_s: float = READ_TIMEOUT_S, containing: str | None = None,
                on_event: Callable[[dict[str, Any], float | None, bytes], None] | None = None, strict: bool = False
                ) -> list[tuple[dict[str, Any], float | None]]:
    """Every event record on ``events_topic`` (no topic: none), decoded, each with when it was written (its
    Kafka timestamp in epoch seconds; None where the broker gave none); only those whose bytes hold
    ``containing`` when given. Records that are not event JSON are passed over. Each partition's records
    come in offset order (one event's records share a key, so a partition). ``on_event``: each goes to it
    as it is read instead, with its bytes, and none is kept (``anomaly events`` folds the topic this way). ``strict``: a
    read that ``timeout_s`` cuts short is a ``TopicError`` (``kafka_io.read_all``)."""
    out: list[tuple[dict[str, Any], float | None]] = []
    take = on_event or (lambda event, written_s, raw: out.append((event, written_s)))
    needle = containing.encode() if containing is not None else None

    def records(batch: list[Any]) -> None:
        for record in batch:
            if record.value is None or (needle is not None and needle not in record.value):
                continue
            try:
                event = decode_event(record.value)
            except DataError:
                continue
            stamp = getattr(record, "timestamp", None)
            take(event, stamp / 1000.0 if isinstance(stamp, int) and stamp >= 0 else None, bytes(record.value))

    kafka_io.read_all(bootstrap_servers, events_topic, timeout_s=timeout_s, idle_s=IDLE_S,
                      client_options=client_options, topic_wait_s=TOPIC_WAIT_S, on_records=records, strict=strict)
    return out


def find_event(bootstrap_servers: str, events_topic: str, event_id: str,
               client_options: Mapping[str, Any] | None = None, *,
               timeout_s: float = READ_TIMEOUT_S) -> Mapping[str, Any] | None:
    """The event ``event_id`` (or the start of its id) on ``events_topic``: its last record
    (``feedback.find_event``), or None."""
    events = read_events(bootstrap_servers, events_topic, client_options, timeout_s=timeout_s, containing=event_id)
    return feedback.find_event((event for event, _ in events), event_id)


def send(bootstrap_servers: str, topic: str, verdict: feedback.Verdict,
         client_options: Mapping[str, Any] | None = None, *, create: bool = True,
         timeout_s: float = SEND_TIMEOUT_S) -> None:
    """Send one verdict (keyed by its ``feedback_id``), the topic created first when missing and
    ``create`` (else it must exist); ``DeliveryError`` if the broker did not take it."""
    if create:
        kafka_io.ensure_topics(bootstrap_servers, {topic: PARTITIONS}, client_options)
    else:
        kafka_io.require_topics(bootstrap_servers, [topic], client_options)
    producer = kafka_io.make_producer(bootstrap_servers, client_options)
    started = time.monotonic()
    try:
        future = producer.send(topic, key=verdict.feedback_id.encode("utf-8"), value=feedback.encode(verdict))
        producer.flush(timeout=timeout_s)
        future.get(timeout=timeout_s)
    except kafka_io.kafka_errors.KafkaError as exc:
        when = (f"within {timeout_s:.0f} s" if isinstance(exc, kafka_io.kafka_errors.KafkaTimeoutError)
                else f"(refused after {time.monotonic() - started:.1f} s)")
        raise DeliveryError(f"the verdict was not delivered to {topic} on {bootstrap_servers} {when} "
                            f"({type(exc).__name__}: {exc}); nothing was recorded") from exc
    finally:
        producer.close(timeout=5)


def in_force(verdicts: Sequence[feedback.Verdict], entity: str | None = None) -> list[feedback.Verdict]:
    """The verdicts in force (``feedback.latest``), of ``entity`` only when given."""
    return [v for v in feedback.latest(verdicts) if entity is None or v.entity == entity]
