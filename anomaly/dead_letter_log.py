"""What the worker says in its log about dead letters: their reasons, counted, at most once a minute.

Every dead letter already carries its reason and original bytes on the dead-letter topic; the log is
where an operator looks first. A producer that sends a sensor the model does not read sends every
reading to the dead-letter topic, and "batch: 4 records, 0 windows, 0 events, 4 dead letters" does not
say why. So the first dead letters after a quiet spell are logged at once with their reasons, and later
ones are summed up per reason at most once every ``interval_s`` (the last ones when the worker stops).

Pure: the caller passes the clock and writes the lines.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable

MAX_REASONS = 100  # distinct reasons kept between two summaries; the rest are counted as "other reasons"
SHOWN_REASONS = 3  # reasons named in one line, most frequent first
REASON_CHARS = 300  # a reason longer than this is cut (a bad record's text can be long)


class DeadLetterLog:
    """Counts dead-letter reasons and says when to log them. ``add`` returns the line to log now, or None."""

    def __init__(self, interval_s: float = 60.0) -> None:
        self.interval_s = float(interval_s)
        self._counts: Counter[str] = Counter()
        self._other = 0
        self._since: float | None = None  # when the pending counts began
        self._last: float | None = None  # when a line was last returned

    def add(self, reasons: Iterable[str], now_s: float) -> str | None:
        for reason in reasons:
            reason = reason if len(reason) <= REASON_CHARS else reason[: REASON_CHARS - 1] + "…"
            if reason in self._counts or len(self._counts) < MAX_REASONS:
                self._counts[reason] += 1
            else:
                self._other += 1
            if self._since is None:
                self._since = now_s
        if self.pending and (self._last is None or now_s - self._last >= self.interval_s):
            return self.flush(now_s)
        return None

    @property
    def pending(self) -> int:
        """Dead letters counted and not yet logged."""
        return sum(self._counts.values()) + self._other

    def flush(self, now_s: float) -> str | None:
        """The line for every pending dead letter (None when there is none); the counts start again."""
        total = self.pending
        if not total:
            return None
        span = "" if self._since is None or now_s - self._since < 1.0 else f" in the last {now_s - self._since:.0f} s"
        top = self._counts.most_common(SHOWN_REASONS)
        rest = total - sum(n for _, n in top)
        parts = [f"{n} x {reason}" for reason, n in top]
        if rest:
            parts.append(f"{rest} with other reasons")
        self._counts.clear()
        self._other = 0
        self._since = None
        self._last = now_s
        return f"{total} dead letter{'s' if total != 1 else ''}{span}: " + "; ".join(parts)
