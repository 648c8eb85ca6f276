"""Soak benchmark of the scoring worker: does a long-running worker's memory stay flat? A script that prints
numbers, not a test.

    python -m pipelines.bench_soak [--duration S] [--fleet E] [--rate R] [--stream-period P]
                                   [--churn C] [--faults F] [--json OUT] [--quick]

Defaults: 20 minutes of wall time; 500 entities sending one reading every 10 s of stream time, played at
2,000 readings/s, so stream time runs 40 times faster than the clock (13 hours of it in the 20 minutes);
every stream hour 10 % of the entity ids are replaced by new ones (assets swapped, renamed) and 2 % of the
entities go through a fault. ``--quick``: 3 minutes, 100 entities at 1,000 readings/s and a 60 s period
(600 times faster: 30 hours of stream time).

Not exercised: adaptive thresholds (off by default), model swaps, the scores topic, maintenance periods.

Method
------
One local broker (Tansu, memory storage), a detector of the default shape fitted briefly on synthetic
pump readings (``bench_stream.fit_bench_detector``), and the real worker in a child process with the
shipped defaults (the scoring step in its own forked child; ``bench_stream``'s ``--serve-worker``), which
says every ``--sample-s`` seconds how much it has consumed and scored, how many entities it holds and the
resident memory (VmRSS) of its process and of its scoring child. This process plays the fleet: at every
tick each active id sends one reading stamped on the stream grid. Stream time starts far enough in the past
that it never runs ahead of the clock (``worker.max_future_s``), so everything the worker does by stream time
happens many times over: ids that stop sending are evicted after an hour of silence
(``scoring_step.IDLE_TIMEOUT_S``), open events are cut at every ``worker.max_event_s`` boundary, faults open
and close events, cooldowns pass.

What it reports: memory and entities held through the run, and the growth of each process's RSS over the
second half (after the first evictions, when the number of ids held has levelled off): the least-squares
slope in MB per hour of wall time and per day of stream time, and last minus first sample of that half.
A worker that keeps something per id it has ever seen, or per event, grows there; one that does not stays
flat but for the allocator's noise (a few MB).

Caveats: the broker keeps every message in memory (≈ 240 B each; not part of any figure), so the run's
length is bounded by the machine's memory (2.4 million readings in the default run, ≈ 0.6 GB). The
producer is kafka-python in this process: when it cannot keep the rate the stream just runs slower (stamps
are on the grid, not the clock); the achieved rate is reported.
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("bench_soak")

HOUR_S = 3600.0
FAULT_SHIFT = 10.0  # added to the first sensor (temp, ~1.4 std in the synthetic readings) during a fault
DEFAULTS = {"duration": 1200.0, "fleet": 500, "rate": 2000.0, "stream_period": 10.0}
QUICK = {"duration": 180.0, "fleet": 100, "rate": 1000.0, "stream_period": 60.0}


# --- the fleet (pure) ------------------------------------------------------------------------------

@dataclass
class Fleet:
    """Which ids send at each tick, and which of them are in a fault. Every ``hour_ticks`` ticks (a stream
    hour), ``churn`` of the ids are replaced by new ones (the longest-serving first) and ``faults`` of them
    get a fault of ``fault_ticks`` ticks starting somewhere in that hour. Deterministic for a seed."""

    size: int
    hour_ticks: int
    churn: float = 0.1
    faults: float = 0.02
    fault_ticks: int = 30
    seed: int = 0
    ids: list[str] = field(init=False)
    made: int = field(init=False)  # ids made so far (the next new id's number)
    replaced: int = field(init=False)  # ids retired so far
    faulted: int = field(init=False)  # faults started so far
    fault_starts: dict[int, list[str]] = field(init=False)  # tick -> ids whose fault starts then
    in_fault: dict[str, int] = field(init=False)  # id -> the tick its fault ends (exclusive)

    def __post_init__(self) -> None:
        if self.size < 1 or self.hour_ticks < 1 or self.fault_ticks < 1:
            raise ValueError("size, hour_ticks and fault_ticks must be at least 1")
        if not (0.0 <= self.churn <= 1.0 and 0.0 <= self.faults <= 1.0):
            raise ValueError("churn and faults are fractions of the fleet (0 to 1)")
        self._rng = random.Random(self.seed)
        self.ids = [f"pump-{e:06d}" for e in range(self.size)]
        self.made, self.replaced, self.faulted = self.size, 0, 0
        self.fault_starts, self.in_fault = {}, {}

    def at(self, tick: int) -> list[tuple[str, bool]]:
        """The ids that send at ``tick``, each with whether its reading is faulty; call for every tick in order."""
        if tick % self.hour_ticks == 0:
            if tick:
                self._churn()
            self._plan_faults(tick)
        for entity in self.fault_starts.pop(tick, ()):
            if entity in self.ids:  # (replaced before its fault came)
                self.in_fault[entity] = tick + self.fault_ticks
                self.faulted += 1
        for entity in [e for e, end in self.in_fault.items() if end <= tick]:
            del self.in_fault[entity]
        return [(entity, entity in self.in_fault) for entity in self.ids]

    def _churn(self) -> None:
        n = round(self.churn * self.size)
        for entity in self.ids[:n]:
            self.in_fault.pop(entity, None)
        self.ids = self.ids[n:] + [f"pump-{self.made + i:06d}" for i in range(n)]
        self.made += n
        self.replaced += n

    def _plan_faults(self, tick: int) -> None:
        n = round(self.faults * self.size)
        for entity in self._rng.sample(self.ids, n):
            start = tick + self._rng.randrange(self.hour_ticks)
            self.fault_starts.setdefault(start, []).append(entity)


# --- the figures (pure) ----------------------------------------------------------------------------

def slope_per_hour(t_s: list[float], values: list[float]) -> float:
    """Least-squares slope of ``values`` against ``t_s`` (seconds), per hour; nan with fewer than 2 points."""
    if len(t_s) < 2 or max(t_s) == min(t_s):
        return math.nan
    return float(np.polyfit(np.asarray(t_s, dtype=float), np.asarray(values, dtype=float), 1)[0]) * HOUR_S


def growth(samples: list[dict[str, Any]], key: str, from_t: float, stream_s_per_reading: float) -> dict[str, Any]:
    """How ``key`` (kB) moved over the samples at or after ``from_t`` s: first, last and peak (MB), last -
    first (MB), and least-squares slopes in MB per hour of wall time, per day of the stream time the worker
    had reached (its readings consumed times ``stream_s_per_reading``, the period over the fleet: right even
    when it lags the producer) and per 1,000 of its batches (growth per poll: the soak's polls are fewer and
    larger than a caught-up worker's over the same stream time). None where no sample has it."""
    points = [s for s in samples if s["t"] >= from_t and s.get(key) is not None]
    if not points:
        return {"first_mb": None, "last_mb": None, "peak_mb": None, "mb_per_hour": None, "mb_per_stream_day": None,
                "mb_per_1000_batches": None, "change_mb": None, "samples": 0}
    mb = [p[key] / 1024 for p in points]
    per_hour = slope_per_hour([p["t"] for p in points], mb)
    per_stream_hour = slope_per_hour([p["consumed"] * stream_s_per_reading for p in points], mb)
    per_batch_hour = slope_per_hour([p.get("batches", 0) * HOUR_S / 1000 for p in points], mb)  # "hour" = 1000
    return {"first_mb": round(mb[0], 1), "last_mb": round(mb[-1], 1), "peak_mb": round(max(mb), 1),
            "mb_per_hour": round(per_hour, 2), "mb_per_stream_day": round(per_stream_hour * 24, 2),
            "mb_per_1000_batches": round(per_batch_hour, 3), "change_mb": round(mb[-1] - mb[0], 1),
            "samples": len(points)}


def report(r: dict[str, Any]) -> str:
    def mb(v):
        return "-" if v is None else f"{v:,.1f}"

    lines = [f"bench_soak: {r['fleet']} entities, one reading each per {r['stream_period_s']:g} s of stream time, "
             f"{r['achieved_rate']:,.0f} readings/s ({r['speedup']:.0f}x the clock) for {r['wall_s'] / 60:.1f} min: "
             f"{r['stream_hours']:.1f} h of stream time",
             f"  readings {r['sent']:,}, windows scored {r['windows_scored']:,}, events {r['events']:,}, "
             f"dead letters {r['dead_letters']:,}; ids retired {r['ids_retired']:,}, evicted {r['evicted'] or 0:,}, "
             f"faults {r['faults']:,}",
             "",
             f"  {'wall min':>8} {'stream h':>8} {'consumed':>11} {'entities':>8} {'worker MB':>10} {'scoring MB':>10}"]
    for s in r["timeline"]:
        lines.append(f"  {s['t'] / 60:>8.1f} {s['consumed'] / r['fleet'] * r['stream_period_s'] / HOUR_S:>8.1f} "
                     f"{s['consumed']:>11,} "
                     f"{s['entities']:>8,} {mb(s['rss_kb'] and s['rss_kb'] / 1024):>10} "
                     f"{mb(s['scoring_rss_kb'] and s['scoring_rss_kb'] / 1024):>10}")
    lines.append("")
    lines.append(f"  second half (from {r['steady_from_s'] / 60:.1f} min):")
    for name, g in (("worker", r["worker_rss"]), ("scoring child", r["scoring_rss"])):
        if g["samples"]:
            lines.append(f"  {name:<14} {g['first_mb']:>8.1f} -> {g['last_mb']:>8.1f} MB (peak {g['peak_mb']:.1f}): "
                         f"{g['mb_per_hour']:+.2f} MB per hour, {g['mb_per_stream_day']:+.2f} MB per stream day, "
                         f"{g['mb_per_1000_batches']:+.3f} MB per 1,000 batches")
    lines.append(f"  entities held: {r['entities_min_steady']:,} to {r['entities_max_steady']:,} "
                 f"(fleet {r['fleet']:,}, plus the ids retired within the last hour of stream time, until evicted)")
    return "\n".join(lines)


def timeline(samples: list[dict[str, Any]], rows: int = 12) -> list[dict[str, Any]]:
    """About ``rows`` samples spread evenly over the run, the last one included."""
    if len(samples) <= rows:
        return list(samples)
    picks = sorted({round(i * (len(samples) - 1) / (rows - 1)) for i in range(rows)})
    return [samples[i] for i in picks]


# --- the run ---------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> dict[str, Any]:
    from anomaly import kafka_io
    from anomaly.broker import LocalBroker
    from pipelines import bench_stream as bs

    profile = QUICK if args.quick else DEFAULTS
    duration = args.duration or profile["duration"]
    fleet_size = args.fleet or profile["fleet"]
    rate = args.rate or profile["rate"]
    period = args.stream_period or profile["stream_period"]
    tick_s = fleet_size / rate  # wall seconds per tick (each id once)
    ticks = max(1, round(duration / tick_s))
    hour_ticks = max(1, round(HOUR_S / period))
    fleet = Fleet(fleet_size, hour_ticks, args.churn, args.faults, fault_ticks=args.fault_slots, seed=args.seed)
    # Stream time starts early enough to stay behind the clock to the end, even at full speed.
    start_ts = math.floor((time.time() - ticks * period - HOUR_S) / period) * period
    started = time.perf_counter()
    detector = bs.fit_bench_detector(period, 2)
    log.info("detector fitted in %.1f s (threshold %.4g)", time.perf_counter() - started, detector.threshold.value)
    values = bs.synthetic_values(5000, seed=2).tolist()
    topic = "soak"
    with tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp, LocalBroker() as broker:
        detector_dir = str(detector.save(Path(tmp) / "detector"))
        kafka_io.ensure_topics(broker.bootstrap, {topic: bs.PARTITIONS})
        child = bs.Child(broker.bootstrap, topic, detector_dir, -1, timeout_s=duration * 3 + 600,
                         sample_s=args.sample_s)
        try:
            child.wait_assigned(bs.ASSIGN_WAIT_S)
            producer = kafka_io.make_producer(broker.bootstrap)
            sent = 0
            try:
                t0 = time.perf_counter()
                for k in range(ticks):
                    delay = t0 + k * tick_s - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                    ts = start_ts + k * period
                    for i, (entity, faulty) in enumerate(fleet.at(k)):
                        row = values[(k + 7 * i) % len(values)]
                        if faulty:
                            row = [row[0] + FAULT_SHIFT, *row[1:]]
                        producer.send(topic, key=entity.encode(), value=bs.encode(entity, ts, row))
                        sent += 1
                    if k % max(1, ticks // 20) == 0:
                        log.info("tick %d of %d: %d readings sent, stream %.1f h", k, ticks, sent,
                                 k * period / HOUR_S)
                producer.flush(timeout=120)
                wall = time.perf_counter() - t0
            finally:
                producer.close(timeout=10)
            child.set_target(sent)
            result = child.finish(timeout_s=duration * 2 + 600)
        finally:
            child.kill()
    samples = child.samples
    # the second half of the fleet's play, on the worker's clock (its samples start before the first reading)
    first = next((s["t"] for s in samples if s["consumed"]), 0.0)
    steady_from = first + wall / 2
    steady = [s for s in samples if s["t"] >= steady_from]
    return {"fleet": fleet_size, "stream_period_s": period, "offered_rate": rate, "achieved_rate": sent / wall,
            "speedup": period * (sent / wall) / fleet_size, "wall_s": wall, "stream_hours": ticks * period / HOUR_S,
            "sent": sent, "consumed": result["consumed"], "windows_scored": result["windows_scored"],
            "events": result["events"], "dead_letters": result["dead_letters"], "ids_retired": fleet.replaced,
            "faults": fleet.faulted, "churn_per_hour": args.churn, "faults_per_hour": args.faults,
            "steady_from_s": steady_from, "evicted": result.get("evicted"), "batches": (samples or [{}])[-1].get("batches"),
            "worker_rss": growth(samples, "rss_kb", steady_from, period / fleet_size),
            "scoring_rss": growth(samples, "scoring_rss_kb", steady_from, period / fleet_size),
            "entities_min_steady": min((s["entities"] for s in steady), default=0),
            "entities_max_steady": max((s["entities"] for s in steady), default=0),
            "timeline": timeline(samples), "samples": samples}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipelines.bench_soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, help="wall seconds the fleet plays (default 1200; --quick 180)")
    p.add_argument("--fleet", type=int, help="entities sending at any time (default 500; --quick 100)")
    p.add_argument("--rate", type=float, help="readings per second of wall time (default 2,000; --quick 1,000)")
    p.add_argument("--stream-period", type=float, help="stream seconds between an entity's readings, the model's "
                                                       "sampling period (default 10; --quick 60)")
    p.add_argument("--churn", type=float, default=0.1, help="fraction of the ids replaced by new ones every stream "
                                                            "hour (default 0.1)")
    p.add_argument("--faults", type=float, default=0.02, help="fraction of the fleet that goes through a fault every "
                                                             "stream hour (default 0.02)")
    p.add_argument("--fault-slots", type=int, default=30, help="readings a fault lasts (default 30)")
    p.add_argument("--sample-s", type=float, default=5.0, help="seconds between the worker's samples (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="3 minutes, 100 entities, 30 h of stream time")
    p.add_argument("--json", metavar="OUT", help="write the results (every sample too) as one JSON object here")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    for name in ("duration", "fleet", "rate", "stream_period", "sample_s", "fault_slots"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0")
    for name in ("churn", "faults"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            p.error(f"--{name} must be between 0 and 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    logging.getLogger("kafka").setLevel(logging.ERROR)
    result = run(args)
    print(report(result))
    if args.json:
        from pipelines.bench_stream import write_json

        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
