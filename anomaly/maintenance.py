"""Maintenance periods in the worker: no event is raised for an entity while it is in maintenance.

An operator puts an entity in maintenance with ``anomaly feedback maintenance --entity pump-7 --start ...
--end ...`` (a verdict on ``kafka.feedback_topic``, ``anomaly.feedback``; the end may lie ahead). Its
readings are still scored (and on the scores topic, when enabled), but an event that *starts* inside one
of its maintenance periods is muted: none of its records (open, closed) goes to the events topic. An
event that began before the period keeps going and closes as it would: its open record was sent. The
decision is taken once per event, at its open record (``Muter.mutes``), so a period given or withdrawn while
an event is open does not leave an opened event without its close; a close whose open this worker did not
see (a restart, a partition moved to it) is sent. An anomaly that starts in a period and goes on past
its end is cut there by the scoring step (``AlertTracker.maintenance``, the periods passed on by the
worker) and goes on as a new event, which is raised.

``MaintenanceWatch`` reads the feedback topic as the worker starts, then again every
``worker.maintenance_poll_s`` in a thread of its own (the poll loop never waits on it) and hands the periods in force to the ``Muter``. The retrain leaves
maintenance readings out of training and of its comparison (``retrain._cycle``).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

log = logging.getLogger(__name__)

Spans = Mapping[str, Sequence[tuple[float, float]]]


class Muter:
    """Which event records to hold back: those of events that start in their entity's maintenance.

    ``max_age_s``: an event seen open whose close has not come this long after its start (its entity's
    partition moved to another worker, say) is forgotten; a worker cuts every event at
    ``worker.max_event_s``, so a live one is never older."""

    def __init__(self, max_age_s: float = 7200.0) -> None:
        self._spans: dict[str, tuple[tuple[float, float], ...]] = {}
        self._open: dict[str, tuple[bool, float]] = {}  # event id -> (held back, start), seen open, not yet closed
        self.max_age_s = float(max_age_s)
        self.muted = 0  # event records held back so far
        self.version = 0  # how many times the periods were updated (the worker passes them on when it moves)

    def update(self, spans: Spans) -> None:
        """The maintenance periods in force now (entity -> (start, end) epoch seconds, inclusive); ``version``
        moves only when they change (the worker passes them on to its scoring step then)."""
        spans = {entity: tuple(map(tuple, periods)) for entity, periods in spans.items() if periods}
        if spans != self._spans:
            self._spans = spans
            self.version += 1

    @property
    def spans(self) -> dict[str, tuple[tuple[float, float], ...]]:
        """The maintenance periods in force."""
        return self._spans

    @property
    def entities(self) -> int:
        """Entities with a maintenance period in force."""
        return len(self._spans)

    def in_maintenance(self, entity: str, ts: float) -> bool:
        return any(start <= ts <= end for start, end in self._spans.get(entity, ()))

    def mutes(self, event: Mapping[str, Any]) -> bool:
        """Whether ``event`` (a decoded event record) is held back; counts it. An event's first record
        decides for all of its records: an ``open`` one by its start, a ``closed`` one whose open this worker
        did not see (a restart, a partition moved) is sent (a close without its open is harmless downstream,
        an open without its close is an alarm that never ends)."""
        eid = event.get("event_id")
        closed = event.get("status") == "closed"
        seen = None
        if isinstance(eid, str):
            seen = self._open.pop(eid, None) if closed else self._open.get(eid)
        if seen is not None:
            decided = seen[0]
        elif closed:
            decided = False
        else:
            entity, start = event.get("entity"), event.get("start_ts")
            known = isinstance(entity, str) and isinstance(start, (int, float)) and not isinstance(start, bool)
            decided = known and self.in_maintenance(entity, float(start))
            if isinstance(eid, str):
                self._open[eid] = (decided, float(start) if known else 0.0)
        self.muted += decided
        return decided

    def keep(self, events: Sequence[tuple[bytes, bytes]], now_s: float | None = None
             ) -> tuple[list[tuple[bytes, bytes]], list[tuple[str, str]]]:
        """``events`` (key, encoded record) without the muted ones, and the (entity, status) of those muted.
        Every event record is looked at, periods in force or not: an open let through before a period was
        given must not have its close held back."""
        kept, muted = [], []
        for key, value in events:
            try:
                event = json.loads(value)
            except ValueError:  # not ours to judge: sent
                kept.append((key, value))
                continue
            if isinstance(event, dict) and self.mutes(event):
                muted.append((str(event.get("entity")), str(event.get("status"))))
            else:
                kept.append((key, value))
        if now_s is not None and len(self._open) > 1000:
            self._open = {eid: seen for eid, seen in self._open.items() if now_s - seen[1] <= self.max_age_s}
        return kept, muted


class MaintenanceWatch:
    """Re-reads the feedback topic every ``every_s`` in a daemon thread and hands ``on_spans`` the
    maintenance periods in force (``feedback.maintenance``); a read that fails is a warning (once until a
    read succeeds again), and the periods known stay in force."""

    def __init__(self, read: Callable[[], Spans], on_spans: Callable[[Spans], None], every_s: float) -> None:
        self._read, self._on_spans, self.every_s = read, on_spans, float(every_s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="anomaly-maintenance", daemon=True)
        self._failing = False
        self.reads = 0  # successful reads so far

    def start(self) -> "MaintenanceWatch":
        """One read now (the first batch is judged with the periods already given), then one every
        ``every_s`` in the thread."""
        self.refresh()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def refresh(self) -> bool:
        """One read; whether it succeeded."""
        try:
            spans = self._read()
        except Exception as exc:  # noqa: BLE001 - a broker outage must not stop the worker
            if not self._failing:
                log.warning("cannot read the maintenance periods (%s); those known stay in force, trying again every "
                            "%.0f s", exc, self.every_s)
            self._failing = True
            return False
        if self._failing:
            log.info("maintenance periods read again")
        self._failing = False
        self.reads += 1
        self._on_spans(spans)
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.refresh()


def reader(bootstrap_servers: str, topic: str, client_options: Mapping[str, Any] | None = None) -> Callable[[], Spans]:
    """What ``MaintenanceWatch`` calls: the maintenance periods in force on ``topic``."""
    from anomaly import feedback, feedback_topic

    def read() -> Spans:
        given, _ = feedback_topic.read_verdicts(bootstrap_servers, topic, client_options)
        return feedback.maintenance(given)

    return read
