"""What the worker says in its log about dead letters: their reasons, counted, at most once a minute.

Every dead letter already carries its reason and original bytes on the dead-letter topic; the log is
where an operator looks first. A producer that sends a sensor the model does not read sends every
reading to the dead-letter topic, and "batch: 4 records, 0 windows, 0 events, 4 dead letters" does not
say why. So dead letters of a kind not logged before are logged at once, with their reasons, and the
rest are summed up per kind at most once every ``interval_s`` (the last ones when the worker stops). A
kind is what a reason says before the bad value it quotes, with its numbers and sensor names taken out
("ts is 604 s ahead ..." and "ts is 605 s ahead ..." are one kind, as are "values.temp is not a number:
'abc'" and "values.flow is not a number: 'n/a'"; each kind is shown by its first example), so a stream of
reasons that differ only in what they quote neither hides another kind nor uses up the table of kinds.

Pure: the caller passes the clock and writes the lines.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Iterable

MAX_REASONS = 100  # distinct reasons kept between two summaries; the rest are counted as "other reasons"
SHOWN_REASONS = 3  # reasons named in one line, most frequent first
SHOWN_NEW = 10  # besides them, kinds never logged before named in one line (first seen first)
SHOWN_KEYS = 3  # record keys (entity ids, by the input contract) named per kind in one line
KEY_CHARS = 60  # a key longer than this is cut
REASON_CHARS = 300  # a reason longer than this is cut (a bad record's text can be long)
_NUMBER = re.compile(r"0x[0-9a-fA-F]+|\d+(?:\.\d+)?(?:e[-+]?\d+)?")  # hex too: "invalid byte 0xff" / "0xfe"


# "values.<sensor> is not a number" / "is not finite" / "is too large ...": the sensor named by the producer,
# spaces and all ("Volume Flow RateRMS")
_SENSOR = re.compile(r"\bvalues\..*?(?= is (?:not|too) )")


def reason_kind(reason: str) -> str:
    """What dead letters of one kind have in common: ``reason`` up to its first ``": "`` (after it comes
    the bad value or the detail: "not UTF-8: invalid byte 0xff ...", "... is not a number: 'abc'"), its
    numbers replaced by ``#`` and a sensor named as ``values.<name>`` by ``values.*``."""
    head = reason.split(": ", 1)[0]
    return _SENSOR.sub("values.*", _NUMBER.sub("#", head))


class DeadLetterLog:
    """Counts dead-letter reasons and says when to log them. ``add`` returns the line to log now, or None."""

    def __init__(self, interval_s: float = 60.0) -> None:
        self.interval_s = float(interval_s)
        self._counts: Counter[str] = Counter()  # kind -> dead letters
        self._example: dict[str, str] = {}  # kind -> its first reason since the last line
        self._alike: set[str] = set()  # kinds with more than one reason since the last line
        self._keys: dict[str, list[str]] = {}  # kind -> the first SHOWN_KEYS distinct record keys since the last line
        self._more_keys: set[str] = set()  # kinds with more distinct keys than those
        self._logged: set[str] = set()  # kinds named in a line already (bounded by MAX_REASONS)
        self._other = 0
        self._since: float | None = None  # when the pending counts began
        self._last: float | None = None  # when a line was last returned

    def add(self, reasons: Iterable[str], now_s: float, keys: Iterable[str | None] | None = None) -> str | None:
        """Count ``reasons`` (one per dead letter); ``keys``: each one's record key (the entity id, by the input
        contract; None: none), named in the line beside its kind (which asset of a fleet sends them)."""
        new_kind = False
        keys = iter(keys) if keys is not None else None
        for reason in reasons:
            key = next(keys, None) if keys is not None else None
            reason = reason if len(reason) <= REASON_CHARS else reason[: REASON_CHARS - 1] + "…"
            kind = reason_kind(reason)
            if kind in self._counts or len(self._counts) < MAX_REASONS:
                self._counts[kind] += 1
                if self._example.setdefault(kind, reason) != reason:
                    self._alike.add(kind)
                if key is not None:
                    named = self._keys.setdefault(kind, [])
                    key = key if len(key) <= KEY_CHARS else key[: KEY_CHARS - 1] + "…"
                    if key not in named:
                        if len(named) < SHOWN_KEYS:
                            named.append(key)
                        else:
                            self._more_keys.add(kind)
                new_kind = new_kind or (kind not in self._logged and len(self._logged) < MAX_REASONS)
            else:
                self._other += 1
            if self._since is None:
                self._since = now_s
        if self.pending and (new_kind or self._last is None or now_s - self._last >= self.interval_s):
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
        named = {kind for kind, _ in top}
        # and kinds never named before, however rare (news; at most SHOWN_NEW of them in one line)
        top += [(kind, n) for kind, n in self._counts.items()
                if kind not in named and kind not in self._logged][:SHOWN_NEW]
        rest = total - sum(n for _, n in top)
        parts = [f"{n} x {self._example[kind]}" + (" (and alike)" if kind in self._alike else "") + self._keyed(kind)
                 for kind, n in top]
        if rest:
            parts.append(f"{rest} with other reasons")
        if len(self._logged) < MAX_REASONS:  # every pending kind has had its line (named, or one of too many)
            self._logged.update(self._counts)
        self._counts.clear()
        self._example.clear()
        self._alike.clear()
        self._keys.clear()
        self._more_keys.clear()
        self._other = 0
        self._since = None
        self._last = now_s
        return f"{total} dead letter{'s' if total != 1 else ''}{span}: " + "; ".join(parts)

    def _keyed(self, kind: str) -> str:
        named = self._keys.get(kind)
        if not named:
            return ""
        return f" [keys {', '.join(map(repr, named))}{' and others' if kind in self._more_keys else ''}]"
