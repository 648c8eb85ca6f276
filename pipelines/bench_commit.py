"""What ``WindowStore.commit_offsets`` costs per batch against placing the batch, by entities held. A script
that prints numbers, not a test.

    python -m pipelines.bench_commit [--entities 100,1000,10000,50000] [--batch 500] [--rounds 200]

Each entity first gets 12 readings (a window of 10 and more), then batches of ``--batch`` readings come
one per entity, round robin (the worst case for a store of many entities: every reading a different
entity); per batch it times ``add`` of every reading plus ``ready_batch`` against ``commit_offsets``, after
5 warm-up batches (the first ones build the commit heaps). No Kafka, no model: the window store alone.
"""

from __future__ import annotations

import argparse
import sys
import time

from anomaly.codec import Reading
from anomaly.window_state import WindowPolicy, WindowStore

START_TS = 1_700_000_000.0
SENSORS = ("a", "b", "c")


def measure(entities: int, batch: int, rounds: int, partitions: int = 4) -> tuple[float, float]:
    """(add + ready_batch, commit_offsets) in ms per batch, averaged over ``rounds`` batches."""
    store = WindowStore(WindowPolicy(window_size=10, period_s=1.0, stride=1), SENSORS, [0.0] * len(SENSORS))
    values = {"a": 1.0, "b": 2.0, "c": 3.0}
    offset = 0
    for t in range(12):
        for e in range(entities):
            store.add(f"e{e}", Reading(f"e{e}", START_TS + t, values), e % partitions, offset)
            offset += 1
    store.ready_batch()
    last = {p: offset for p in range(partitions)}
    store.commit_offsets(last)
    work = commit = 0.0
    k = 0
    for r in range(rounds + 5):
        started = time.perf_counter()
        for _ in range(batch):
            e, t = k % entities, 12 + k // entities
            k += 1
            store.add(f"e{e}", Reading(f"e{e}", START_TS + t, values), e % partitions, offset)
            offset += 1
        store.ready_batch()
        placed = time.perf_counter()
        store.commit_offsets(last)
        done = time.perf_counter()
        if r >= 5:
            work += placed - started
            commit += done - placed
    return work / rounds * 1000, commit / rounds * 1000


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.bench_commit", description=__doc__.split("\n\n")[0])
    p.add_argument("--entities", default="100,1000,10000,50000", help="entity counts, comma-separated")
    p.add_argument("--batch", type=int, default=500, help="readings per batch (default 500)")
    p.add_argument("--rounds", type=int, default=200, help="batches timed per count (default 200)")
    args = p.parse_args(argv)
    counts = [int(c) for c in args.entities.split(",") if c.strip()]
    if not counts or min(counts) < 1 or args.batch < 1 or args.rounds < 1:
        p.error("--entities, --batch and --rounds must be positive")
    print(f"{'entities':>9} {'add + ready, ms':>16} {'commit_offsets, ms':>19}   (per {args.batch}-reading batch)")
    for n in counts:
        work, commit = measure(n, args.batch, args.rounds)
        print(f"{n:>9,} {work:>16.2f} {commit:>19.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
