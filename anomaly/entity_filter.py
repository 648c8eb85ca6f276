"""Which entities a worker serves (``worker.entities``): glob patterns on the entity id. Pure.

Several asset types may publish into one input topic (one gateway, one topic). Each type's workers then
read it in their own consumer group and serve their own entities: readings of the others are skipped,
not dead-lettered (every other type's reading was a dead letter, half the topic with two types, and the
dead-letter alert fired for good). The retrain reads the same entities from the topic.
"""

from __future__ import annotations

import fnmatch
import heapq
import re
from collections.abc import Callable, Sequence

import numpy as np

from anomaly.codec import DecodedBatch

CACHE_MAX = 100_000  # entity ids whose answer is kept (a fleet's worth; a junk id per reading cannot grow it)


class EntityFilter:
    """``filter(entity)``: whether ``entity`` matches one of ``patterns`` (``fnmatch``: ``*``, ``?``,
    ``[...]``; case-sensitive, as entity ids are)."""

    def __init__(self, patterns: Sequence[str]) -> None:
        if not patterns:
            raise ValueError("an entity filter needs at least one pattern")
        self.patterns = tuple(patterns)
        self._match = re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in self.patterns)).match
        self._seen: dict[str, bool] = {}

    def __call__(self, entity: str) -> bool:
        served = self._seen.get(entity)
        if served is None:
            served = self._match(entity) is not None
            if len(self._seen) < CACHE_MAX:
                self._seen[entity] = served
        return served

    def __repr__(self) -> str:
        return f"EntityFilter({list(self.patterns)!r})"


def only_served(decoded: DecodedBatch, key_of: Callable[[int], bytes | None], served: EntityFilter
                ) -> tuple[DecodedBatch, list[int]]:
    """``decoded`` without the records of entities ``served`` leaves out, and their input positions.

    A good reading is judged by its entity; a bad record by its Kafka key (the entity id, by the input
    contract: ``key_of(position)``, asked of bad records only), so another type's malformed record is its
    own workers' dead letter, not this one's; a bad record without a key, or whose key is not UTF-8, stays
    a dead letter here. The skipped readings' stamps stay in ``foreign`` (stream time still passes on their
    partition, as it does for a reading of another sensor set)."""
    skipped: list[int] = []
    keep = np.fromiter(map(served, decoded.entities), dtype=bool, count=len(decoded.entities))
    foreign = decoded.foreign
    if not keep.all():
        gone = np.flatnonzero(~keep)
        positions = decoded.index[gone].tolist()  # ascending, as ``foreign``'s: merged, not sorted again
        skipped.extend(positions)
        extra = list(zip(positions, decoded.ts[gone].tolist()))
        foreign = list(heapq.merge(foreign, extra)) if foreign else extra
    bad = []
    for i, reason in decoded.bad:
        key = key_of(i)
        if key is not None:
            try:
                entity = bytes(key).decode("utf-8")
            except UnicodeDecodeError:
                entity = None
            if entity is not None and not served(entity):
                skipped.append(i)
                continue
        bad.append((i, reason))
    if not skipped:
        return decoded, skipped
    where = np.flatnonzero(keep)
    out = DecodedBatch(index=decoded.index[where], entities=[decoded.entities[j] for j in where.tolist()],
                       ts=decoded.ts[where], values=decoded.values[where], bad=bad, foreign=foreign)
    return out, sorted(skipped)
