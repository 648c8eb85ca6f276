"""A live console view of the anomaly events topic: one line when an event opens, one when it closes.

Owns: following a topic from its beginning without a consumer group (it must not take partitions
from the workers, and commits nothing), decoding event records, and rendering them as short lines
with the top sensors. ``format_event`` is pure; ``EventFeed`` is the Kafka adapter (a thread).

    feed = EventFeed("127.0.0.1:9092", "anomalies", on_line=print)
    feed.start(); ...; feed.stop()
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any

log = logging.getLogger(__name__)

POLL_MS = 500  # short polls: stop() is noticed within half a second
TOP_SENSORS = 3  # sensors named per line


def _clock(ts: Any) -> str:
    try:
        return datetime.fromtimestamp(float(ts), tz=timezone.utc).strftime("%m-%d %H:%M:%S")  # UTC, with the day
    except (TypeError, ValueError, OverflowError, OSError):
        return "--:-- --:--:--"


def duration(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _num(value: Any) -> str:
    try:
        return f"{float(value):.4g}"
    except (TypeError, ValueError):
        return "?"


def format_event(event: Mapping[str, Any], top: int = TOP_SENSORS, reopened: bool = False) -> str:
    """One console line for an anomaly event (the events topic's JSON, README "message formats").

    ``OPEN  ``/``CLOSED`` with the entity, the stream time, the peak score against the threshold,
    the model version, the start of the event's id (what `anomaly feedback` takes) and the top sensors with
    their share and actual vs expected values.
    ``reopened``: an open event seen closed before (a crossing within the cooldown re-opened it) is
    ``REOPEN`` (its time is still the start of the event).
    """
    status = str(event.get("status", "?")).upper()
    entity = str(event.get("entity", "?"))
    model = event.get("model") or {}
    version = model.get("version", "?") if isinstance(model, Mapping) else "?"
    sensors = event.get("sensors") or []
    named = []
    for item in list(sensors)[:top]:
        if not isinstance(item, Mapping):
            continue
        share = item.get("share")
        share_txt = f" {100 * float(share):.0f}%" if isinstance(share, (int, float)) else ""
        actual = "null" if item.get("filled") is True else _num(item.get("actual"))  # the sensor sent no value
        named.append(f"{item.get('sensor', '?')}{share_txt} ({actual} vs {_num(item.get('expected'))})")
    if status == "CLOSED":
        when = _clock(event.get("end_ts"))
        span = f"lasted {duration(float(event.get('end_ts', 0) or 0) - float(event.get('start_ts', 0) or 0))}, "
        if event.get("continued") is True:  # cut at worker.max_event_s: the anomaly goes on as a new event
            span = f"{span}continues, "
    else:
        if reopened and status == "OPEN":
            status = "REOPEN"
        when = _clock(event.get("start_ts"))
        span = ""
    head = f"{when}  {status:<6} {entity:<10}"
    body = (f"{span}peak {_num(event.get('peak_score'))} > {_num(event.get('threshold'))}, "
            f"{event.get('windows', '?')} windows, model v{version}"
            + (f", id {event['event_id'][:8]}" if isinstance(event.get("event_id"), str) else ""))
    tail = f"  top: {', '.join(named)}" if named else ""
    return f"{head} {body}{tail}"


COUNTED_MAX = 100_000  # events the feed remembers having counted (it runs as long as `anomaly up` does)


class EventFeed:
    """Follows ``topic`` from the beginning in a daemon thread and calls ``on_line`` per event (with
    ``annotate(event)`` appended in brackets when given).

    Counts events by status (``counts``) and opened events by entity (``entities``), each event id once
    per status: an event re-sent after a worker's restart, or re-opened within its cooldown, is one
    event (its line is shown again). Records that are not event JSON are skipped and logged (the events
    topic is ours; this is a viewer, not a validator).
    """

    def __init__(self, bootstrap_servers: str, topic: str, on_line: Callable[[str], None] = print,
                 client_options: Mapping[str, Any] | None = None,
                 annotate: Callable[[Mapping[str, Any]], str] | None = None, from_end: bool = False) -> None:
        """``from_end``: show only events written after the feed starts (a shared broker's topic holds
        earlier sessions' events); otherwise the topic from its beginning."""
        self.bootstrap_servers, self.topic = bootstrap_servers, topic
        self.from_end = from_end
        self.on_line = on_line
        self.annotate = annotate  # an extra note per event (``anomaly up``: does SKAB label a fault there?)
        self.client_options = dict(client_options or {})
        self.counts: Counter[str] = Counter()
        self._anonymous = itertools.count()
        self.entities: Counter[str] = Counter()
        # (event_id, status) already counted, the newest COUNTED_MAX of them (a re-delivered copy comes soon)
        self._counted: OrderedDict[tuple[str, str], None] = OrderedDict()
        # event_id -> its first open message, the newest COUNTED_MAX: a copy of it re-sent after a worker's
        # restart is that opening shown again, not a re-opening
        self._first_open: OrderedDict[str, dict] = OrderedDict()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def start(self) -> "EventFeed":
        self._thread = threading.Thread(target=self._run, name="event-feed", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def handle(self, value: bytes) -> None:
        """Decode one record value and show it (the thread calls this; tests may too)."""
        try:
            event = json.loads(value)
        except (TypeError, ValueError, RecursionError):  # TypeError: a tombstone; RecursionError: nested too deep
            log.warning("event feed: a record on %s is not JSON; skipped", self.topic)
            return
        if not isinstance(event, dict) or not isinstance(event.get("entity"), str) or not event["entity"] \
                or event.get("status") not in ("open", "closed"):
            log.warning("event feed: a record on %s is not an event (no entity or status); skipped", self.topic)
            return
        # no id (not the worker's record): one of its own (a dict's id() is reused once it is freed, and
        # other events then counted as one, or showed as re-opened)
        event_id = str(event.get("event_id") or f"(no id) {next(self._anonymous)}")
        try:
            reopened = (event_id, "closed") in self._counted and event != self._first_open.get(event_id)
            line = format_event(event, reopened=reopened)
            note = self.annotate(event) if self.annotate is not None else ""
        except Exception as exc:  # one odd record must not end the feed (a viewer, not a validator)
            log.warning("event feed: a record on %s is not an event we can show (%s); skipped", self.topic, exc)
            return
        key = (event_id, str(event["status"]))
        if key not in self._counted:
            self._counted[key] = None
            if len(self._counted) > COUNTED_MAX:
                self._counted.popitem(last=False)
            self.counts[key[1]] += 1
            if key[1] == "open":
                self.entities[event["entity"]] += 1
                self._first_open[event_id] = event
                if len(self._first_open) > COUNTED_MAX:
                    self._first_open.popitem(last=False)
        self.on_line(line + (f"  [{note}]" if note else ""))

    def _run(self) -> None:
        from kafka import KafkaConsumer, TopicPartition

        from anomaly.kafka_io import check_tls_files, consumer_options

        options = consumer_options(self.bootstrap_servers, None, client_options=self.client_options)
        options.update(group_id=None, enable_auto_commit=False)
        consumer = None
        try:
            check_tls_files(options)
            consumer = KafkaConsumer(**options)
            partitions = None
            while not self._stop.is_set() and not partitions:
                partitions = consumer.partitions_for_topic(self.topic)
                if not partitions:
                    time.sleep(0.5)
            if not partitions:
                return
            tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
            consumer.assign(tps)
            if self.from_end:
                consumer.seek_to_end(*tps)
            else:
                consumer.seek_to_beginning(*tps)
            while not self._stop.is_set():
                for records in consumer.poll(timeout_ms=POLL_MS).values():
                    for record in records:
                        self.handle(record.value)
        except Exception as exc:  # a viewer must not take the stack down; say why it stopped
            self.error = exc
            log.error("event feed on %s stopped: %s", self.topic, exc)
        finally:
            if consumer is not None:
                consumer.close(autocommit=False)
