"""The thin adapter between our code and kafka-python: client options, clients, topics, offsets.

Owns: the option defaults every client gets (and why), building ``KafkaConsumer`` / ``KafkaProducer`` /
``KafkaAdminClient`` from plain typed arguments plus a pass-through ``client_options`` mapping (TLS,
SASL or any other kafka-python option from the configuration), idempotent topic creation, waiting
for a group assignment, and read-only helpers for tests, lag and replays: ``committed_offsets``,
``read_all`` and ``read_tail``; and one fix to kafka-python 3.0.12 itself (a group join answered
between two polls was thrown away: ``_keep_finished_joins``).

Must not: decide anything about messages. Values and keys cross this seam as raw ``bytes``;
``anomaly.codec`` turns them into readings, events and dead letters (kafka-python's serializer
callables are deprecated and hide errors inside the client). This module and ``anomaly.broker`` are
the only ones that import ``kafka``.

Code to Kafka's semantics, not Tansu's quirks (DESIGN §5): nothing here uses timestamp seeks, and
``end_offsets`` (which the local broker reports as its last batch's base offset + 1) only in
``read_tail``, which reads from well before it and so gets the newest records from either.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import kafka.errors as kafka_errors
from kafka import (ConsumerRebalanceListener, KafkaAdminClient, KafkaConsumer, KafkaProducer,
                   TopicPartition)
from kafka.consumer.fetcher import ConsumerRecord
from kafka.net.sasl import SASL_MECHANISMS as _SASL_MECHANISMS
from kafka.protocol.consumer.offsets import IsolationLevel
from kafka.structs import MemberState, OffsetAndMetadata

from anomaly.config import bootstrap_list
from anomaly.errors import ConfigError, DeliveryError, TopicError

log = logging.getLogger(__name__)

__all__ = [
    "CONSUMER_DEFAULTS", "PRODUCER_DEFAULTS", "Abandoned", "ConsumerRecord", "TopicError", "TopicPartition",
    "admin_options", "committed_offsets", "consumer_options", "ensure_topics", "make_admin", "require_topics",
    "coordinator_lost", "deliver", "delivery_timeout_s", "joining", "make_consumer", "make_producer",
    "producer_options", "read_all", "read_tail", "stuck_join_s", "unless_stopped", "wait_for_assignment",
]

CONSUMER_DEFAULTS: Mapping[str, Any] = MappingProxyType({
    # We commit ourselves, only after the outputs a batch caused are delivered (DESIGN §3).
    "enable_auto_commit": False,
    # A new group starts at the oldest reading: skipping data silently is worse than re-reading it.
    "auto_offset_reset": "earliest",
    # Tansu holds a group join for session_timeout_ms / 2: the 45 s default makes a consumer wait
    # ≈ 23 s for partitions, 6 s makes it ≈ 3 s. 6 s is also Kafka's group.min.session.timeout.ms.
    "session_timeout_ms": 6000,
    # Kafka's rule of thumb: at most a third of the session timeout, so one lost heartbeat is survivable.
    "heartbeat_interval_ms": 2000,
    # Tansu answers a fetch only after fetch_max_wait_ms even when data is there (Kafka answers as soon
    # as fetch_min_bytes arrive): the 500 ms default became the worker's latency floor; 50 ms keeps
    # idle polling cheap and latency low (measured: p50 136 -> 33 ms at 1,000 readings/s).
    "fetch_max_wait_ms": 50,
    # A consumer never makes the topic it reads: the worker makes or checks its topics at start with the
    # partitions it is set up for. kafka-python's default (true) let a cluster with auto-creation on (the
    # broker default) re-make a deleted input topic with the broker's default partition count, and the
    # drift check make the scores topic before the workers did.
    "allow_auto_create_topics": False,
})

PRODUCER_DEFAULTS: Mapping[str, Any] = MappingProxyType({
    # An event or dead letter counts as delivered only when every in-sync replica has it (DESIGN §3).
    "acks": "all",
    # Said, not left to kafka-python's default: it turned idempotence off without a word for acks 1,
    # retries 0 or more than 5 requests in flight, and a retried batch could then land after the next
    # one (an entity's `closed` before its `open`) or twice. Asked for, it refuses those instead.
    "enable_idempotence": True,
    # Measured (DESIGN §5): 20 ms linger and 256 KiB batches lift kafka-python from ≈ 18k to ≈ 33k msg/s.
    "linger_ms": 20,
    "batch_size": 256 * 1024,
})

# Read-only helpers use their own consumers; they must not create the topic they look at.
_NO_AUTO_CREATE = {"allow_auto_create_topics": False}
_POLL_STEP_MS = 100  # short polls in the waiting helpers, so their deadlines are kept


# --- options -------------------------------------------------------------------------------------

_CLIENT_KEYS: Mapping[str, frozenset[str]] = MappingProxyType({
    "consumer": frozenset(KafkaConsumer.DEFAULT_CONFIG),
    "producer": frozenset(KafkaProducer.DEFAULT_CONFIG),
    "admin": frozenset(KafkaAdminClient.DEFAULT_CONFIG),
})


TLS_FILE_OPTIONS = ("ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_crlfile")

_DEFAULTS: Mapping[str, Any] = MappingProxyType({
    **KafkaAdminClient.DEFAULT_CONFIG, **KafkaProducer.DEFAULT_CONFIG, **KafkaConsumer.DEFAULT_CONFIG})

# The values kafka-python takes for its named options: it checks none of security_protocol's (anything but
# exactly SSL or SASL_SSL is plaintext: "sasl_ssl" connected unencrypted and unauthenticated).
_CHOICES: Mapping[str, tuple[Any, ...]] = MappingProxyType({
    "security_protocol": ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"),
    "sasl_mechanism": (None, *sorted(_SASL_MECHANISMS)),
    "compression_type": tuple(KafkaProducer._COMPRESSORS),
    "acks": (0, 1, -1, "all"),
})


def _offset_reset_ok(value: Any) -> bool:
    """kafka-python's own reading: ``earliest``, ``latest`` or ``none`` in any case (``none``: fail where the
    group has no committed offset), or the old ``smallest`` / ``largest``."""
    return isinstance(value, str) and (value in ("smallest", "largest")
                                       or value.upper() in ("EARLIEST", "LATEST", "NONE"))


def _isolation_ok(value: Any) -> bool:
    """As kafka-python reads it (its enum's name in any case, ``-`` for ``_``, or its number)."""
    try:
        IsolationLevel.build_from(value)
    except (ValueError, KeyError, TypeError, AttributeError):
        return False
    return not isinstance(value, bool)


# Options whose values kafka-python reads more loosely than a list of choices: checked as it reads them.
_READERS: Mapping[str, tuple[Callable[[Any], bool], str]] = MappingProxyType({
    "auto_offset_reset": (_offset_reset_ok, "earliest, latest or none"),
    "isolation_level": (_isolation_ok, "read_uncommitted or read_committed"),
})


def check_client_option_values(client_options: Mapping[str, Any]) -> None:
    """``ConfigError`` naming an option of ``client_options`` whose value kafka-python cannot use: one not
    among its choices (``_CHOICES``), or of another type than its default (a number, a boolean, a
    string). A number given as a string ("30000", from a Secret written by hand) failed with a
    ``TypeError`` traceback from inside the client."""
    for key, value in client_options.items():
        field = f"kafka.client_options.{key}"
        if key in _READERS:
            ok_value, says = _READERS[key]
            if not ok_value(value):
                raise ConfigError(field, f"must be {says}, got {value!r}")
            continue
        if key in _CHOICES:
            if not any(value == c and type(value) is type(c) for c in _CHOICES[key]):
                choices = ", ".join("null" if c is None else repr(c) for c in _CHOICES[key])
                raise ConfigError(field, f"must be one of {choices} (exactly; case matters), got {value!r}")
            continue
        if key == "bootstrap_servers":  # kafka-python takes "host:port" or a list of them
            ok = isinstance(value, str) or (isinstance(value, (list, tuple)) and value
                                            and all(isinstance(v, str) for v in value))
            if not ok:
                raise ConfigError(field, f"must be a host:port string or a list of them, got {value!r}")
            continue
        default = _DEFAULTS.get(key)
        if isinstance(default, bool):
            ok, kind = isinstance(value, bool), "true or false"
        elif isinstance(default, (int, float)):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
            kind = "a number"
        elif isinstance(default, str):
            ok, kind = isinstance(value, str), "a string"
        else:
            continue  # no default to go by (None: a path, a name, a list of options)
        if not ok:
            raise ConfigError(field, f"must be {kind} (kafka-python's default is {default!r}), got {value!r}")


def check_tls_files(options: Mapping[str, Any]) -> None:
    """``ConfigError`` naming a TLS file of a client's ``options`` that is not there or cannot be read:
    kafka-python fails the handshake, and the error asked whether the broker was reachable."""
    for key in TLS_FILE_OPTIONS:
        path = options.get(key)
        if path and not (os.path.isfile(path) and os.access(path, os.R_OK)):
            why = "cannot be read" if os.path.isfile(path) else "is not a file here"
            raise ConfigError(f"kafka.client_options.{key}", f"{path} {why} (mount it at that path, or fix it)")


def _pass_through(kind: str, client_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``client_options`` that a ``kind`` client accepts.

    One mapping is handed to every client (config: ``kafka.client_options``), so an option that only
    another kind of client knows (``linger_ms`` for a consumer) is left out for this one; an option no
    kafka-python client knows is a typo and raises ``ConfigError``.
    """
    if not client_options:
        return {}
    known = frozenset().union(*_CLIENT_KEYS.values())
    unknown = sorted(str(key) for key in client_options if key not in known)
    if unknown:
        raise ConfigError("kafka.client_options", f"unknown kafka-python option(s): {', '.join(unknown)}")
    check_client_option_values(client_options)
    accepted = _CLIENT_KEYS[kind]
    skipped = sorted(key for key in client_options if key not in accepted)
    if skipped:
        log.debug("client_options not used by the %s: %s", kind, ", ".join(skipped))
    return {key: value for key, value in client_options.items() if key in accepted}


def consumer_options(bootstrap_servers: str | Sequence[str], group_id: str | None, *,
                     client_id: str | None = None, max_poll_records: int | None = None,
                     client_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """kafka-python ``KafkaConsumer`` kwargs: our defaults, the typed arguments, then ``client_options``.

    ``client_options`` wins over everything (TLS, SASL, timeouts) but ``enable_auto_commit`` for a group:
    true there is a ``ConfigError`` (the service commits after delivering).
    """
    options: dict[str, Any] = {"bootstrap_servers": bootstrap_list(bootstrap_servers), "group_id": group_id,
                               **CONSUMER_DEFAULTS}
    if client_id is not None:
        options["client_id"] = client_id
    if max_poll_records is not None:
        options["max_poll_records"] = int(max_poll_records)
    options.update(_pass_through("consumer", client_options))
    if group_id is not None and options.get("enable_auto_commit"):
        raise ConfigError("kafka.client_options.enable_auto_commit",
                          "must be false: a group's offsets are committed by the service, each once the outputs of its "
                          "reading are delivered (at-least-once); auto-commit commits what was polled, before")
    return options


def producer_options(bootstrap_servers: str | Sequence[str], *, client_id: str | None = None,
                     client_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """kafka-python ``KafkaProducer`` kwargs: our defaults, the typed arguments, then ``client_options``."""
    options: dict[str, Any] = {"bootstrap_servers": bootstrap_list(bootstrap_servers), **PRODUCER_DEFAULTS}
    if client_id is not None:
        options["client_id"] = client_id
    options.update(_pass_through("producer", client_options))
    _refuse_unsafe_delivery(options)
    return options


def _refuse_unsafe_delivery(options: Mapping[str, Any]) -> None:
    """A ``ConfigError`` naming the producer option that would lose outputs or reorder them (DESIGN §3: an
    input offset is committed once the outputs of its reading are delivered; an entity's events in order)."""
    field = "kafka.client_options."
    if str(options.get("acks")) in ("0", "1"):
        raise ConfigError(field + "acks", f"must be 'all' (or -1), got {options['acks']!r}: a reading's offset is "
                                          "committed once its outputs are acknowledged, and 0 or 1 acknowledges "
                                          "what a broker failure can still lose")
    if options.get("transactional_id") is not None:
        raise ConfigError(field + "transactional_id", "is not used: the service writes no transactions (its "
                                                      "outputs are idempotent by event id), and every send would fail")
    in_flight = options.get("max_in_flight_requests_per_connection", 5)
    if not options.get("enable_idempotence", True):
        if in_flight != 1:
            raise ConfigError(field + "enable_idempotence", "false needs max_in_flight_requests_per_connection = 1 "
                                                            f"(got {in_flight}): a retried batch could land after the "
                                                            "next one, an entity's closed event before its open")
        return
    if options.get("retries") == 0:
        raise ConfigError(field + "retries", "must not be 0 with idempotence (the default): set enable_idempotence "
                                             "= false and max_in_flight_requests_per_connection = 1 to do without")
    if isinstance(in_flight, int) and in_flight > 5:
        raise ConfigError(field + "max_in_flight_requests_per_connection",
                          f"at most 5 with idempotence (the default), got {in_flight}")


def admin_options(bootstrap_servers: str | Sequence[str], *,
                  client_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """kafka-python ``KafkaAdminClient`` kwargs: bootstrap servers, then ``client_options``."""
    options: dict[str, Any] = {"bootstrap_servers": bootstrap_list(bootstrap_servers)}
    options.update(_pass_through("admin", client_options))
    return options


# --- clients -------------------------------------------------------------------------------------

def make_consumer(bootstrap_servers: str | Sequence[str], group_id: str, topics: Iterable[str],
                  client_options: Mapping[str, Any] | None = None, *,
                  listener: ConsumerRebalanceListener | None = None) -> KafkaConsumer:
    """A consumer in ``group_id`` subscribed to ``topics``; records carry raw ``bytes``.

    Nothing is assigned until the first ``poll`` joins the group (≈ 3 s on Tansu with our defaults);
    ``wait_for_assignment`` blocks for it. ``listener`` sees revocations (commit what is done there).
    """
    topic_list = list(topics)
    if not topic_list:
        raise ValueError("make_consumer needs at least one topic")
    consumer = _connect("a consumer", bootstrap_servers, KafkaConsumer,
                        consumer_options(bootstrap_servers, group_id, client_options=client_options))
    try:
        if listener is None:
            consumer.subscribe(topic_list)
        else:
            consumer.subscribe(topic_list, listener=listener)
    except BaseException:
        consumer.close(autocommit=False)
        raise
    return consumer


def make_producer(bootstrap_servers: str | Sequence[str],
                  client_options: Mapping[str, Any] | None = None) -> KafkaProducer:
    """A producer taking ``bytes`` keys and values (encode with ``anomaly.codec`` first)."""
    return _connect("a producer", bootstrap_servers, KafkaProducer,
                    producer_options(bootstrap_servers, client_options=client_options))


def make_admin(bootstrap_servers: str | Sequence[str],
               client_options: Mapping[str, Any] | None = None) -> KafkaAdminClient:
    """An admin client (connects eagerly; ``TopicError`` if no broker answers within ``bootstrap_timeout_ms``)."""
    return _connect("an admin client", bootstrap_servers, KafkaAdminClient,
                    admin_options(bootstrap_servers, client_options=client_options))


def _connect(what: str, bootstrap_servers: str | Sequence[str], factory: Any, options: Mapping[str, Any]) -> Any:
    """``factory(**options)``; a broker that cannot be reached is a ``TopicError`` saying so (kafka-python
    raises a bootstrap timeout, with a traceback the operator has no use for)."""
    check_tls_files(options)
    try:
        return factory(**options)
    except (TypeError, ValueError, AssertionError, kafka_errors.KafkaConfigurationError) as exc:
        # what check_client_option_values cannot see: options that do not go together (SASL without a
        # mechanism), a value kafka-python refuses; the field, not a traceback from inside the client
        raise ConfigError("kafka.client_options", f"kafka-python cannot make {what} with these options: "
                          f"{type(exc).__name__}: {exc}") from exc
    except (kafka_errors.KafkaTimeoutError, kafka_errors.KafkaConnectionError,
            kafka_errors.MetadataEmptyBrokerList) as exc:
        raise TopicError(f"cannot connect {what} to {_servers(bootstrap_servers)}: {exc} (is the broker running and reachable? "
                         "`anomaly broker` starts a local one; kafka.bootstrap_servers sets where)") from exc


def _servers(bootstrap_servers: str | Sequence[str]) -> str:
    """``bootstrap_servers`` as a message shows them: ``host:port,host:port``."""
    return bootstrap_servers if isinstance(bootstrap_servers, str) else ",".join(bootstrap_servers)


class Abandoned(Exception):
    """``unless_stopped`` gave up waiting: its stop was asked first."""


def unless_stopped(stop: threading.Event, call: Callable[..., Any], *args: Any, poll_s: float = 0.1,
                   **kwargs: Any) -> Any:
    """``call(*args, **kwargs)`` (connecting to the broker) run on a helper thread and waited for until it
    returns or until ``stop`` is set (``Abandoned``; a client it makes after that is closed by its thread).
    Its error is re-raised. kafka-python retries an unreachable broker inside a client's constructor for
    ``bootstrap_timeout_ms`` (30 s by default), which nothing else cuts short: a worker told to stop then took
    ~28 s and exited 2 with a connection error, and a scheduler whose drift check was connecting ~31 s."""
    guard = threading.Lock()
    done = threading.Event()
    outcome: dict[str, Any] = {}

    def make() -> None:
        try:
            client, error = call(*args, **kwargs), None
        except Exception as exc:
            client, error = None, exc
        with guard:
            if outcome.get("abandoned"):
                if callable(getattr(client, "close", None)):
                    try:
                        client.close()
                    except Exception:
                        log.debug("closing a client made after its wait was abandoned failed", exc_info=True)
                return
            outcome.update(client=client, error=error)
            done.set()

    threading.Thread(target=make, name="kafka-connect", daemon=True).start()
    while not done.wait(poll_s):
        if stop.is_set():
            with guard:
                if not done.is_set():
                    outcome["abandoned"] = True
                    raise Abandoned("stopped while connecting to the broker")
    if outcome["error"] is not None:
        raise outcome["error"]
    return outcome["client"]


# --- topics --------------------------------------------------------------------------------------

def ensure_topics(bootstrap_servers: str | Sequence[str], topics: Mapping[str, int],
                  client_options: Mapping[str, Any] | None = None, *, replication_factor: int = -1,
                  timeout_s: float = 10.0) -> dict[str, int]:
    """Create the topics that do not exist yet (name → partitions); the partition count each one has.

    Idempotent: a topic that already exists is fine and left as it is, even when its partition count
    differs from the one asked (a warning is logged; adding partitions moves keys between partitions,
    so it is an operator's decision). ``replication_factor=-1`` means the broker's default. Waits until
    every topic has a leader for each partition. Raises ``TopicError`` for any other refusal.
    """
    if not topics:
        return {}
    for name, partitions in topics.items():
        if not name or int(partitions) < 1:
            raise ValueError(f"topic {name!r}: need a name and >= 1 partitions, got {partitions!r}")
    with make_admin(bootstrap_servers, client_options) as admin:
        request = {name: {"num_partitions": int(partitions), "replication_factor": replication_factor}
                   for name, partitions in topics.items()}
        response = admin.create_topics(request, raise_errors=False)
        for result in response["topics"]:
            error = kafka_errors.for_code(result["error_code"])
            if error is kafka_errors.NoError:
                log.info("created topic %s with %d partitions", result["name"], topics[result["name"]])
            elif error is not kafka_errors.TopicAlreadyExistsError:
                message = result.get("error_message") or error.__name__
                raise TopicError(f"cannot create topic {result['name']!r}: {message}")
        try:
            admin.wait_for_topics(list(topics), timeout_ms=int(timeout_s * 1000))
        except kafka_errors.KafkaTimeoutError as exc:
            raise TopicError(f"topics not ready within {timeout_s:.0f} s: {exc}") from exc
        counts = _partition_counts(admin, list(topics))
    for name, asked in topics.items():
        if counts.get(name) != int(asked):
            log.warning("topic %s has %s partitions, %d were asked for; left as it is", name, counts.get(name), asked)
    return counts


def require_topics(bootstrap_servers: str | Sequence[str], topics: Sequence[str],
                   client_options: Mapping[str, Any] | None = None) -> dict[str, int]:
    """The partition count of each of ``topics``, which must all exist already (nothing is created: for
    clusters where this client may not create topics). Raises ``TopicError`` naming the missing ones."""
    with make_admin(bootstrap_servers, client_options) as admin:
        counts = _partition_counts(admin, list(topics))
    missing = [name for name in topics if name not in counts]
    if missing:
        raise TopicError(f"topics do not exist: {', '.join(missing)}; create them first, or set "
                         f"worker.create_topics = true where this client may create topics")
    return counts


def _partition_counts(admin: KafkaAdminClient, topics: list[str]) -> dict[str, int]:
    """Partition count of each topic that exists (unknown topics are left out)."""
    counts: dict[str, int] = {}
    for info in admin.describe_topics(topics):
        if info.get("error_code", 0) == 0:
            counts[info["name"]] = len(info.get("partitions") or [])
    return counts


# --- consumers -----------------------------------------------------------------------------------

class _FinishedJoin:
    """A group join that finished while no ``poll`` was waiting for it, shown to kafka-python as still in
    flight so that its ``join_group_async`` takes the answer (see ``_keep_finished_joins``)."""

    __slots__ = ("_task",)
    is_done = False

    def __init__(self, task: Any) -> None:
        self._task = task

    def add_callback(self, f: Any, *args: Any, **kwargs: Any) -> _FinishedJoin:
        self._task.add_callback(f, *args, **kwargs)  # a finished future calls it at once
        return self

    def add_errback(self, f: Any, *args: Any, **kwargs: Any) -> _FinishedJoin:
        self._task.add_errback(f, *args, **kwargs)
        return self

    def __await__(self) -> Any:
        return self._task.__await__()


def _keep_finished_joins() -> bool:
    """Make kafka-python 3.0.12 take the answer of a group join that finished between two polls; whether
    its code needed it (and so was changed).

    Its ``join_group_async`` keeps a join attempt in flight across polls (a ``poll`` shorter than the
    join gives up waiting, the next one waits again), but starts a new attempt in place of one that has
    finished: a join answered while the consumer was not inside ``poll`` (scoring a batch, or between
    two short polls) was thrown away and a new JoinGroup sent. When the broker holds each join longer
    than a poll (Tansu ≈ 3 s, Kafka's group.initial.rebalance.delay.ms 3 s for a new group, a rebalance
    waiting for its members), the answers kept landing between polls: a test worker went two minutes
    without partitions, and a member re-sending JoinGroup restarts its group's rebalance. The finished
    attempt is handed back as one in flight, so the waiting code takes its answer (or its error) as it
    does for an attempt it waited for."""
    from kafka.coordinator.base import BaseCoordinator

    join = BaseCoordinator.join_group_async
    if getattr(join, "keeps_finished_joins", False):
        return True
    try:
        source = inspect.getsource(join)
    except (OSError, TypeError):
        return False
    if "self._join_task is None or self._join_task.is_done" not in source:
        return False  # another kafka-python: its own code stands

    @functools.wraps(join)
    async def join_group_async(self: Any, timeout_ms: Any = None) -> Any:
        task = self._join_task
        if task is not None and task.is_done:
            self._join_task = _FinishedJoin(task)
        try:
            return await join(self, timeout_ms)
        finally:
            if isinstance(self._join_task, _FinishedJoin):  # not taken (no rejoin needed after all): dropped,
                self._join_task = None  # as kafka-python did, rather than answering a later join with it

    join_group_async.keeps_finished_joins = True  # type: ignore[attr-defined]
    BaseCoordinator.join_group_async = join_group_async  # type: ignore[method-assign]
    return True


KEEPS_FINISHED_JOINS = _keep_finished_joins()


def wait_for_assignment(consumer: KafkaConsumer, timeout_s: float) -> set[TopicPartition]:
    """Poll until the group gives ``consumer`` partitions; the assignment. ``TimeoutError`` if it does not.

    Joining happens inside ``poll``, which may also return records; their partitions are rewound to
    the first returned offset, so the next ``poll`` returns them again and nothing is skipped.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        assignment = set(consumer.assignment())
        if assignment:
            return assignment
        remaining_ms = int((deadline - time.monotonic()) * 1000)
        if remaining_ms <= 0:
            raise TimeoutError(f"no partitions assigned within {timeout_s:.1f} s "
                               f"(subscription {sorted(consumer.subscription() or ())})")
        batch = consumer.poll(timeout_ms=min(_POLL_STEP_MS, remaining_ms), max_records=1)
        for tp, records in batch.items():
            if records:
                consumer.seek(tp, min(record.offset for record in records))


def committed_offsets(bootstrap_servers: str | Sequence[str], group_id: str, topic: str,
                      client_options: Mapping[str, Any] | None = None) -> dict[int, int | None]:
    """The offsets ``group_id`` has committed on the broker for each partition of ``topic``.

    Partition → next offset to read, or ``None`` where the group never committed. An unknown topic
    gives ``{}``. For tests (assert on the broker itself) and lag reporting.
    """
    with make_admin(bootstrap_servers, client_options) as admin:
        infos = [info for info in admin.describe_topics([topic]) if info.get("name") == topic]
        if not infos or infos[0].get("error_code", 0) != 0:
            return {}
        partitions = sorted(p["partition_index"] for p in infos[0].get("partitions") or [])
        if not partitions:
            return {}
        response = admin.list_group_offsets({group_id: [TopicPartition(topic, p) for p in partitions]})
    found = response.get(group_id, {})
    offsets: dict[int, int | None] = {}
    for p in partitions:
        meta = found.get(TopicPartition(topic, p))
        offsets[p] = meta.offset if meta is not None and meta.offset >= 0 else None
    return offsets


def _reader(bootstrap_servers: str | Sequence[str], timeout_s: float,
            client_options: Mapping[str, Any] | None) -> KafkaConsumer:
    """A consumer in no group, committing nothing, creating no topic, that gives up bootstrapping
    within ``timeout_s`` (kafka-python waits 30 s) unless ``client_options`` asks for less; a broker
    that cannot be reached is a ``TopicError``."""
    options = consumer_options(bootstrap_servers, None, client_options=client_options)
    options.update(group_id=None, enable_auto_commit=False, **_NO_AUTO_CREATE)
    options["bootstrap_timeout_ms"] = min(int(options.get("bootstrap_timeout_ms", 30_000)),
                                          max(int(timeout_s * 1000), 1))
    return _connect("a consumer", bootstrap_servers, KafkaConsumer, options)


def read_all(bootstrap_servers: str | Sequence[str], topic: str, timeout_s: float = 10.0, idle_s: float = 1.0,
             client_options: Mapping[str, Any] | None = None, topic_wait_s: float | None = None,
             on_records: Callable[[list[ConsumerRecord]], None] | None = None, strict: bool = False
             ) -> list[ConsumerRecord]:
    """Every record of ``topic`` from the beginning, without a consumer group, sorted by partition/offset.
    ``on_records``: each polled batch goes to it instead (each partition's records in offset order, the
    partitions interleaved), and none is kept: a reader that folds them holds no copy of the topic.
    ``strict``: a read that ``timeout_s`` stops before every partition's end offset (as the broker gave
    it when the read began) is a ``TopicError`` saying so, not a part of the topic passed off as all of it.

    Reads at least up to the end offsets the broker gave when it began, then stops when no new record
    came for ``idle_s`` (or at ``timeout_s`` in all). It does not take the end offsets for the last
    record: Tansu's are its last batch's base + 1 (DESIGN §5). A topic that does not appear
    within ``timeout_s`` (or ``topic_wait_s``, when given: a topic that may well not exist) gives ``[]``;
    the topic is never created by reading it. A broker that cannot be reached within ``timeout_s`` is a
    ``TopicError``.
    """
    deadline = time.monotonic() + timeout_s
    consumer = _reader(bootstrap_servers, timeout_s, client_options)
    try:
        partitions = consumer.partitions_for_topic(topic)
        appear_by = deadline if topic_wait_s is None else min(deadline, time.monotonic() + topic_wait_s)
        while not partitions and time.monotonic() < appear_by:
            time.sleep(_POLL_STEP_MS / 1000)
            partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            return []
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        first, end = _offsets(consumer, tps, deadline)
        records = _poll_until_idle(consumer, deadline, idle_s, {tp: end[tp] for tp in tps if end[tp] > first[tp]},
                                   on_records, strict=f"{topic} ({timeout_s:g} s)" if strict else None)
    finally:
        consumer.close(autocommit=False)
    return records


def _offsets(consumer: Any, tps: Sequence[TopicPartition], deadline: float) -> tuple[dict, dict]:
    """The beginning and end offsets of ``tps``, asked within the monotonic ``deadline`` (kafka-python
    would wait its request timeout)."""
    wait_ms = max(int((deadline - time.monotonic()) * 1000), 1)
    return consumer.beginning_offsets(tps, timeout_ms=wait_ms), consumer.end_offsets(tps, timeout_ms=wait_ms)


def _poll_until_idle(consumer: Any, deadline: float, idle_s: float, ends: Mapping[TopicPartition, int],
                     on_records: Callable[[list[ConsumerRecord]], None] | None = None,
                     strict: str | None = None) -> list[ConsumerRecord]:
    """What ``consumer`` polls until no new record came for ``idle_s`` (or the monotonic ``deadline``),
    sorted by partition/offset.

    The idle clock starts only once the consumer's position on every partition of ``ends`` has
    reached its end offset there (read before polling), so a broker slow to answer the first fetch
    does not pass for an empty topic; after that, ``idle_s`` only waits for records written since.
    ``strict`` (what is read, for the message): the deadline reached with a partition short of its end
    offset is a ``TopicError``.
    """
    records: list[ConsumerRecord] = []
    take = records.extend if on_records is None else on_records
    behind = dict(ends)
    last_record_at = time.monotonic()
    while True:
        now = time.monotonic()
        if now >= deadline or (not behind and now - last_record_at >= idle_s):
            if strict is not None and behind and now >= deadline:
                raise TopicError(f"the read of {strict} stopped at its time limit with {len(behind)} partition(s) "
                                 f"not read to their end (partitions {sorted(tp.partition for tp in behind)})")
            break
        step_ms = int(min(_POLL_STEP_MS, (deadline - now) * 1000, idle_s * 1000)) or 1
        for part in consumer.poll(timeout_ms=step_ms).values():
            if part:
                take(part)
                last_record_at = time.monotonic()
        if behind:
            behind = still_behind(consumer, behind)
            if not behind:
                last_record_at = time.monotonic()
    records.sort(key=lambda record: (record.partition, record.offset))
    return records


def still_behind(consumer: Any, ends: Mapping[Any, int]) -> dict[Any, int]:
    """The partitions of ``ends`` (partition -> an end offset read earlier) whose position ``consumer``
    has not brought to it yet (a position not known yet counts as behind); asks nothing of the broker."""
    return {tp: end for tp, end in ends.items() if (consumer.position(tp, timeout_ms=0) or 0) < end}


def read_tail(bootstrap_servers: str | Sequence[str], topic: str, records: int = 64, timeout_s: float = 10.0,
              idle_s: float = 0.5, client_options: Mapping[str, Any] | None = None) -> list[ConsumerRecord]:
    """The newest records of each partition of ``topic`` (about ``records`` of each, from that many
    before its end offset; on Tansu, whose end offset is its last batch's base + 1, the last batch and
    the ``records - 1`` before its base), without a consumer group, sorted by partition/offset.

    Stops when no new record came for ``idle_s`` (or at ``timeout_s`` in all). A topic that does not
    exist gives ``[]`` (it is not created); a broker that cannot be reached within ``timeout_s`` is a
    ``TopicError``.
    """
    deadline = time.monotonic() + timeout_s
    consumer = _reader(bootstrap_servers, timeout_s, client_options)
    try:
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            return []
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        first, end = _offsets(consumer, tps, deadline)
        wanted = [tp for tp in tps if end[tp] > first[tp]]
        if not wanted:
            return []
        consumer.assign(wanted)
        for tp in wanted:
            consumer.seek(tp, max(first[tp], end[tp] - max(int(records), 1)))
        return _poll_until_idle(consumer, deadline, idle_s, {tp: end[tp] for tp in wanted})
    finally:
        consumer.close(autocommit=False)


def joining(consumer: Any) -> bool:
    """Whether ``consumer`` is not (yet, or no longer) a stable member of its group: between a JoinGroup
    and the assignment. Reads kafka-python's coordinator state (``_coordinator.state``, of the pinned
    3.0.12); False where a client has none (a fake, another version): then nothing is renewed."""
    state = getattr(getattr(consumer, "_coordinator", None), "state", None)
    return state in (MemberState.UNJOINED, MemberState.REBALANCING)


def coordinator_lost(consumer: Any) -> bool:
    """Whether ``consumer`` knows no coordinator for its group: kafka-python forgets it when the broker
    cannot be reached (and before the first lookup). Reads ``_coordinator.coordinator_id`` of the pinned
    3.0.12 without touching the connection; False where a client has none (a fake, a consumer in no group)."""
    coordinator = getattr(consumer, "_coordinator", None)
    return coordinator is not None and getattr(coordinator, "group_id", None) is not None \
        and getattr(coordinator, "coordinator_id", 0) is None


def stuck_join_s(client_options: Mapping[str, Any] | None = None) -> float:
    """How long a join may go unanswered before the consumer is taken as stuck: a rebalance may wait
    ``max_poll_interval_ms`` for the slowest member (kafka-python's 300 s unless set), plus a minute."""
    options = {**CONSUMER_DEFAULTS, **(client_options or {})}
    return float(options.get("max_poll_interval_ms", 300_000)) / 1000 + 60.0


def delivery_timeout_s(client_options: Mapping[str, Any] | None = None) -> float:
    """How long a batch's outputs may take to be delivered: the producer's own ``delivery_timeout_ms``
    (kafka-python's 120 s unless set; it retries within it), plus 5 s for the last answer to come back.
    The worker gave up after 30 s, and a broker away for 45 s ended it with a traceback though the
    producer would have delivered when the broker came back."""
    options = {**KafkaProducer.DEFAULT_CONFIG, **PRODUCER_DEFAULTS, **_pass_through("producer", client_options)}
    return float(options.get("delivery_timeout_ms", 120_000)) / 1000 + 5.0


def deliver(producer: Any, sends: Sequence[Any], timeout_s: float, *, bootstrap_servers: str | Sequence[str],
            topics: Iterable[str]) -> None:
    """Flush ``producer`` and check every send's future; ``DeliveryError`` naming the topics, the broker
    and the cause when any was not delivered within ``timeout_s`` (kafka-python's own error said only
    "Timeout waiting for future", from inside the client)."""
    started = time.monotonic()
    try:
        producer.flush(timeout=timeout_s)
        for future in sends:
            future.get(timeout=timeout_s)
    except kafka_errors.KafkaError as exc:
        # a refusal is said as one (it came at once: "within 125 s" sent the reader looking for a slow broker)
        when = (f"within {timeout_s:.0f} s" if isinstance(exc, kafka_errors.KafkaTimeoutError)
                else f"(refused after {time.monotonic() - started:.1f} s)")
        raise DeliveryError(
            f"outputs to {', '.join(sorted(set(topics)))} were not delivered to the broker at "
            f"{_servers(bootstrap_servers)} {when} ({type(exc).__name__}: {exc}); nothing of their batch is "
            "committed, and a restart reads it again") from exc


def offsets_to_commit(commits: Mapping[tuple[str, int], int]) -> dict[TopicPartition, OffsetAndMetadata]:
    """``{(topic, partition): next offset}`` as kafka-python's commit argument."""
    return {TopicPartition(topic, int(partition)): OffsetAndMetadata(int(offset), "", -1)
            for (topic, partition), offset in commits.items()}


def commit(consumer: Any, commits: Mapping[tuple[str, int], int]) -> bool:
    """Commit ``{(topic, partition): next offset}``; False, with a warning, where the group is rebalancing
    (``RebalanceInProgressError``, ``CommitFailedError``: kafka-python runs the revocation inside a poll
    and leaves the group mid-rebalance while the worker completes the batch in hand). The batch's outputs
    are delivered by then, so skipping its commit is safe: a partition that stays with this worker is
    committed with its next batch, and one that moves is re-read by its new owner from the last commit
    (outputs repeated under the same ids, none lost). Any other error raises."""
    try:
        consumer.commit(offsets_to_commit(commits))
    except (kafka_errors.RebalanceInProgressError, kafka_errors.CommitFailedError) as exc:
        log.warning("commit of %d partition(s) skipped: the consumer group is rebalancing (%s); their "
                    "next owner re-reads from the last commit", len(commits), type(exc).__name__)
        return False
    return True


def rebalance_listener(on_revoked: Callable[[Any], None], on_assigned: Callable[[Any], None],
                       on_lost: Callable[[Any], None] | None = None) -> ConsumerRebalanceListener:
    """A ConsumerRebalanceListener calling plain functions (so callers need not import kafka). ``on_lost``:
    partitions taken by an eviction from the group (session timeout, a poll too late, an unknown member
    id), whose fetch positions the client drops; ``on_revoked`` when not given, as kafka-python does."""

    class _Listener(ConsumerRebalanceListener):
        def on_partitions_revoked(self, revoked) -> None:
            on_revoked(revoked)

        def on_partitions_assigned(self, assigned) -> None:
            on_assigned(assigned)

        def on_partitions_lost(self, lost) -> None:
            (on_lost or on_revoked)(lost)

    return _Listener()
