"""Streaming benchmark of the scoring worker: throughput against a bare consumer, end-to-end latency at
a fixed offered rate, and peak memory by entity count. A script that prints numbers, not a test.

    python -m pipelines.bench_stream [--json OUT] [--quick] [--messages N] [--rate R] [--fleet E]
                                     [--duration S] [--entities 1,100,10000] [--rounds K]
                                     [--decompose] [--torch-threads T] [--client-options JSON]   # experiments

Defaults: 200k readings of 100 entities; 5,000 readings/s for 20 s; 1, 100 and 10,000 entities
(≈ 3 min on 2 idle cores with one torch thread, ≈ 9 min as shipped on a busy box). ``--quick``:
20k readings, 1,000/s for 5 s, 1, 10 and 100 entities (≈ 1 minute).

Everything runs in one process tree against ONE local broker (``LocalBroker``, Tansu, memory storage)
that the script starts and stops itself. No MLflow: a small detector is fitted in-process
(``fit_detector`` on synthetic 3-sensor data; window and network shape are ``ModelSettings``' defaults,
W=10, hidden 32, latent 8, or with ``--model-profile`` a dataset profile's, e.g. ``smd`` for the old
defaults W=32, hidden 64, latent 16; two epochs) and served through a ``ModelFollower`` whose resolver and
loader are fakes, so what is measured is the worker, not the registry. The model's sampling period is
``fleet / rate`` seconds, so that at the offered rate every entity sends one reading per grid slot.

Method
------
1. Throughput. N readings of E entities (on the grid, in time order, keyed by entity) are loaded into a
   4-partition input topic FIRST (the load rate is reported: kafka-python's producer is the limit),
   then consumed twice from the beginning, each in its own consumer group:
   - ``raw_msgs_per_s``: a bare kafka-python consumer that only decodes each value with ``orjson.loads``
     (the JSON decoder the worker uses: the same decoder on both sides; CRC checks on, as in the worker;
     the process's objects frozen out of the garbage collector, as the worker's ``gc_freeze`` does);
   - ``worker_msgs_per_s``: the real ``Worker`` (config defaults: stride, max_poll_records, scores
     topic off, the scoring step in a forked child process where two CPUs or more can be used;
     ``--in-process`` keeps it in the worker's process) with decode, windows, batched forward pass,
     alerts, event production, flush, commits.
   Both clocks run from the first non-empty poll to the moment all N are processed, so the ≈ 3 s group
   join (DESIGN §5) is excluded from both. The two alternate ``--rounds`` times (default 3) over the same
   topic, each round in new groups; the figures are the best round of each side and ``ratio`` = best
   worker / best raw (target ≥ 0.8): on a machine shared with other jobs the slowest rounds measure the
   neighbours, and alternating lets a change of load hit both sides. ``ratio_median_round`` is the median
   of the rounds' own ratios, steadier when the raw consumer has one lucky round. Every round is in the
   JSON (``throughput_detail.rounds``, with the load average after it).
2. Latency. A worker runs live in a child process; once it has its partitions, this process plays the
   sensors: every period (``fleet / rate`` s, on the grid) each of the E entities sends one reading
   whose ``ts`` is the wall-clock time of the send (``time.time()``), for ``duration`` seconds (a
   reading the producer cannot send within 0.45 period of its tick is skipped and counted, see
   ``phase_latency``). A window's latency is the time its batch finished (outputs produced and
   flushed, offsets committed) minus its end timestamp, the grid slot time ≈ the reading's send time
   (``ScoringStep``'s ``latencies_s`` plus the rest of the batch after the step's ``now_s``).
   Target: p99 < 100 ms + one stride (stride × period). The stride never enters this figure: a window
   is queued as soon as the reading of its (stride-aligned) end slot arrives, so the allowance is slack
   here (it is detection delay, onset to first scored window); ``latency_p99_ms`` is also judged against
   a flat 100 ms in the report. A worker slower than the offered rate builds a backlog and its latency
   grows with the run: the JSON's ``latency_detail`` has its live rate. ``p99_ms_at_batch_start`` is
   the step's own view (``now`` taken when the batch was staged, before decoding and scoring); the
   worker's ``end_to_end_seconds`` metric adds the rest of the batch, like this figure.
3. Memory. For each entity count a fresh worker child consumes a topic in which every entity sends
   W + 8 readings (enough for a compaction of its ring buffer; 9 windows each at stride 1, 2 at the
   default stride 4), then exits;
   ``peak_rss_mb`` is the child's own peak RSS (``VmHWM`` of /proc/self/status, read as it finishes;
   plus its scoring child's, read before that stops: an over-count of the pages the two share, so
   ``memory_detail`` also has their proportional shares, ``pss_at_end_mb``;
   not the broker's, not this process's; ``ru_maxrss`` of a fork+exec'd child is not usable, see
   ``Child``). ``rss_baseline_mb`` is the child's RSS with everything imported
   (torch, kafka-python, the worker's modules), the worker built and the model warmed up, before it
   consumes anything, read before the scoring child is forked, so it is the parent's alone: compare it
   with ``memory_detail``'s parent peak, not with ``peak_rss_mb`` (both processes' peaks added).

Caveats
-------
- On a small machine the broker, the producer and the consumer share the cores (2 where this was
  written): the raw rate is kafka-python's CPU limit on a loaded box, and the worker's forward pass
  competes with Tansu for the same cores; the workers use ``worker.torch_threads`` (1 by default;
  ``--torch-threads`` overrides it, to see what more costs: on a busy
  2-core machine torch's OpenMP threads wait on each other and a forward pass can take ~1 s whatever
  its batch size). ``loadavg_start``/``loadavg_end`` in the JSON say how busy the machine was; other
  processes' load changes every figure here, so compare runs taken under similar load.
- Tansu keeps every message in memory (≈ 240 B of RSS per message, DESIGN §5) and never frees it in
  this run; its memory is not part of any figure here. Its fetch and group behaviour is not Apache
  Kafka's: absolute numbers are for comparing versions on one machine, not capacity planning.
- The sensors' producer runs in this process with ``linger_ms`` = ``--producer-linger-ms`` (default 0):
  a producer's linger is latency the worker never sees, so it is kept out of the measurement.
- Latencies are measured after a model warm-up in the child (a long-running worker is warm); the
  first windows of the run are included.
- On Tansu the consumer's ``fetch_max_wait_ms`` shows up in the latency of a caught-up worker (Tansu
  answers a fetch only after it, Apache Kafka as soon as ``fetch_min_bytes`` are there): kafka-python's
  500 ms default gave p50 136 ms at 1,000/s, so the consumers run with 50 ms (``kafka_io.CONSUMER_DEFAULTS``;
  33 ms p50); ``--client-options`` tries other values.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from anomaly.cli import non_negative_int

from anomaly.synthetic import pump_values

log = logging.getLogger("bench_stream")

SENSORS = ("temp", "pressure", "flow")
START_TS = 1_790_000_000.0  # stream time of the pre-loaded topics (fixed, so runs are comparable)
MODEL_NAME = "bench"
RESULT_PREFIX = "RESULT "
SAMPLE_PREFIX = "SAMPLE "  # a serving child's periodic figures (``--sample-s``), one JSON object per line
_SAY_LOCK = threading.Lock()  # a serving child's lines come from three threads: one whole line at a time
ASSIGNED_LINE = "ASSIGNED"
ASSIGN_WAIT_S = 180.0  # a child imports torch, then joins the group: 3 s on a quiet box, 17 s seen on a loaded one
PARTITIONS = 4
RATIO_TARGET = 0.8
LATENCY_BUDGET_MS = 100.0  # plus one stride (stride × period)

DEFAULTS = {"messages": 200_000, "rate": 5_000.0, "duration": 20.0, "entities": "1,100,10000", "fleet": 100,
            "epochs": 2, "rounds": 3}
QUICK = {"messages": 20_000, "rate": 1_000.0, "duration": 5.0, "entities": "1,10,100", "fleet": 100,
         "epochs": 1, "rounds": 1}


# --- data and model --------------------------------------------------------------------------------

def synthetic_values(rows: int, seed: int = 0) -> np.ndarray:
    """(rows, 3) healthy pump readings (``anomaly.synthetic``, the tests' ``normal_frame`` too)."""
    return pump_values(rows, seed)


def bench_model_params(profile: str = "default") -> dict[str, Any]:
    """The network shape measured: ``ModelSettings`` defaults, or a dataset profile's (``protocols.PROFILES``)."""
    from anomaly.config import ModelSettings

    if profile == "default":
        return ModelSettings().model_params()
    from anomaly.protocols import PROFILES

    return ModelSettings(**PROFILES[profile]["model"]).model_params()


def fit_bench_detector(period_s: float, epochs: int, profile: str = "default", adaptive_rows: int = 0):
    """A detector of the production shape (ModelSettings defaults, or ``profile``'s), fitted briefly on
    synthetic data; with ``adaptive_rows`` its threshold carries that adaptive rule (the other
    ``[threshold] adaptive_*`` defaults), so the worker keeps every entity's trailing scores."""
    import torch

    from anomaly.config import ThresholdSettings
    from anomaly.detector import fit_detector
    from anomaly.training import TrainConfig

    threshold = ThresholdSettings()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # fitting is not measured; one thread is quickest on a small, busy machine
    try:
        detector, _, _ = fit_detector(synthetic_values(3000, seed=1), SENSORS, bench_model_params(profile),
                                      TrainConfig(epochs=epochs, device="cpu", progress=False, patience=epochs),
                                      threshold_method=threshold.method, threshold_params=threshold.policy_params(),
                                      period_s=period_s)
    finally:
        torch.set_num_threads(threads)
    if adaptive_rows:
        from dataclasses import replace

        detector.threshold = detector.threshold.with_adaptive(replace(threshold, adaptive_rows=adaptive_rows)
                                                              .adaptive_rule())
    return detector


def fake_follower(detector, check_interval_s: float):
    """A ModelFollower serving ``detector`` as bench@champion v1, without a registry."""
    from anomaly.model_follower import ModelFollower

    return ModelFollower(MODEL_NAME, "champion", check_interval_s=check_interval_s,
                         loader=lambda name, version: (detector, version), resolver=lambda name, alias: "1")


class StandInModel:
    """The served model's shape (sensors, window, grid, threshold) with another forward pass, for
    ``--decompose``: ``"none"`` returns zero scores at once (what the worker costs without a model);
    ``"busy"`` spends ``us_per_window`` µs per window in ONE torch matmul, which holds Python's lock only
    to start (what the forward pass costs in CPU alone, without its Python between torch calls)."""

    def __init__(self, model, kind: str, us_per_window: float = 0.0) -> None:
        import torch

        if kind not in ("none", "busy"):
            raise ValueError(f"unknown stand-in {kind!r}")
        self.kind, self.us_per_window = kind, us_per_window
        for name in ("sensors", "window_size", "period_s", "threshold", "adaptive", "fill_values"):
            setattr(self, name, getattr(model, name))
        self.name, self.version = model.name, f"{model.version}-{kind}"
        self._b = torch.randn(512, 512)
        self._us_per_row = _matmul_us_per_row(self._b) if kind == "busy" else 0.0

    def score(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        import torch

        n, f = len(windows), len(self.sensors)
        if self.kind == "busy" and n:
            torch.mm(torch.ones(max(1, round(n * self.us_per_window / self._us_per_row)), 512), self._b)
        return np.zeros(n), np.zeros((n, f)), np.zeros((n, f))


def _matmul_us_per_row(b) -> float:
    """µs per row of an (R, 512) @ (512, 512) float32 matmul on this machine (best of 5)."""
    import torch

    a = torch.ones(4096, 512)
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - started)
    return best / 4096 * 1e6


def served_model(detector, trace: bool):
    """``detector`` as a ``DetectorModel`` on the worker's default device and precision (``trace``: through
    the checked TorchScript trace, as the worker's ``trace_model`` default serves it)."""
    from anomaly.config import WorkerSettings
    from anomaly.scoring_step import DetectorModel
    from anomaly.training import resolve_device

    return DetectorModel(detector, MODEL_NAME, "1", resolve_device("auto"), precision=WorkerSettings().precision,
                         trace=trace)


def sample_windows(model, n: int) -> np.ndarray:
    """``n`` windows (N, W, F) of healthy synthetic readings for ``model``."""
    base = synthetic_values(model.window_size + 8)
    return np.stack([base[i % 8: i % 8 + model.window_size] for i in range(n)])


def forward_us_per_window(detector, windows: int = 1250) -> float:
    """The served model's forward pass (``DetectorModel.score``) per window at a worker-sized batch, best
    of 3, in µs: what the ``busy`` stand-in spends."""
    from anomaly.config import WorkerSettings

    model = served_model(detector, trace=WorkerSettings().trace_model)
    batch = sample_windows(model, windows)
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        model.score(batch)
        best = min(best, time.perf_counter() - started)
    return best / windows * 1e6


def encode(entity: str, ts: float, row) -> bytes:
    """A reading in the input contract (codec.encode_reading's JSON, without building a Reading)."""
    return json.dumps({"entity": entity, "ts": ts, "values": dict(zip(SENSORS, row))},
                      separators=(",", ":")).encode()


def fleet_messages(entities: int, count: int, period_s: float, values: np.ndarray) -> list[tuple[bytes, bytes]]:
    """``count`` readings of ``entities`` entities on the grid in time order (slot by slot, each
    entity once per slot), keyed by entity; entity ``e`` replays ``values`` from row ``7 e``."""
    names = [f"pump-{e:05d}" for e in range(entities)]
    keys = [n.encode() for n in names]
    rows = values.tolist()
    out: list[tuple[bytes, bytes]] = []
    k = 0
    while len(out) < count:
        ts = START_TS + k * period_s
        for e in range(entities):
            out.append((keys[e], encode(names[e], ts, rows[(k + 7 * e) % len(rows)])))
            if len(out) == count:
                break
        k += 1
    return out


# --- Kafka helpers ---------------------------------------------------------------------------------

def load_topic(bootstrap: str, topic: str, messages: list[tuple[bytes, bytes]]) -> float:
    """Produce pre-encoded messages as fast as the producer goes; returns messages per second."""
    from anomaly import kafka_io

    kafka_io.ensure_topics(bootstrap, {topic: PARTITIONS})
    producer = kafka_io.make_producer(bootstrap)
    try:
        started = time.perf_counter()
        futures = [producer.send(topic, key=k, value=v) for k, v in messages]
        producer.flush(timeout=120)
        seconds = time.perf_counter() - started
    finally:
        producer.close(timeout=10)
    failed = sum(1 for f in futures if f.failed())
    if failed:
        raise RuntimeError(f"loading {topic}: {failed} of {len(messages)} sends failed")
    return len(messages) / seconds


def raw_consume(bootstrap: str, topic: str, n: int, max_poll_records: int, timeout_s: float,
                client_options: dict[str, Any] | None = None, round_: int = 0) -> dict[str, Any]:
    """A bare consumer in a group of its own for the round (the worker's consumer options,
    ``--client-options`` included, and ``max_poll_records``): poll and JSON-decode every value with
    ``orjson.loads``, the worker's decoder, until ``n`` are read. A new group each round, as the worker's:
    with auto-commit turned on by ``--client-options`` a shared one began round 2 at the end."""
    from anomaly import kafka_io

    consumer = kafka_io.make_consumer(bootstrap, f"{topic}.raw.{round_}", [topic], client_options)
    count, first, deadline = 0, None, time.monotonic() + timeout_s
    loads = orjson.loads  # the worker's decoder (anomaly.codec.decode_batch): the same on both sides
    # What this process built so far (torch, MLflow, the fitted model) is frozen out of the cyclic
    # collector's walks, as the worker does at start (worker.gc_freeze): a bare consumer in a fresh
    # process would not carry them, and carrying them costs it about a third of its rate.
    gc.freeze()
    try:
        while count < n and time.monotonic() < deadline:
            polled = consumer.poll(timeout_ms=1000, max_records=max_poll_records)
            if polled and first is None:
                first = time.perf_counter()
            for batch in polled.values():
                for record in batch:
                    loads(record.value)
                    count += 1
        done = time.perf_counter()
    finally:
        gc.unfreeze()
        consumer.close(autocommit=False)
    if count < n or first is None:
        raise RuntimeError(f"raw consumer read {count} of {n} records within {timeout_s:.0f} s")
    return {"msgs_per_s": count / (done - first), "seconds": done - first, "consumed": count}


@dataclass(frozen=True)
class Tuning:
    """Departures from the shipped defaults, for experiments (none by default): torch threads in the
    workers and extra kafka-python options (``kafka.client_options``) for the workers' clients."""

    torch_threads: int | None = None
    client_options: dict[str, Any] = field(default_factory=dict)
    in_process: bool = False  # worker.scoring_process = false: the step in the worker's own process

    def child_args(self) -> list[str]:
        args = ["--torch-threads", str(self.torch_threads)] if self.torch_threads else []
        args += ["--in-process"] if self.in_process else []
        return args + (["--client-options", json.dumps(self.client_options)] if self.client_options else [])

    def apply(self) -> None:
        if self.torch_threads:
            import torch

            torch.set_num_threads(self.torch_threads)


def worker_settings(bootstrap: str, topic: str, group: str, tuning: Tuning = Tuning()):
    from anomaly.config import build_settings

    return build_settings({"kafka": {"bootstrap_servers": bootstrap, "input_topic": topic,
                                     "events_topic": f"{topic}.events", "dlq_topic": f"{topic}.dlq",
                                     "scores_topic": None, "group_id": group,
                                     "client_options": dict(tuning.client_options)},
                           **({"worker": {"scoring_process": False}} if tuning.in_process else {})})


def make_bench_worker(detector, bootstrap: str, topic: str, group: str, tuning: Tuning = Tuning(), **kw):
    """The real Worker (options from config defaults), observed by a subclass: see ``_bench_worker_class``."""
    from anomaly.worker import options_from_settings

    settings = worker_settings(bootstrap, topic, group, tuning)
    follower = fake_follower(detector, settings.worker.model_check_interval_s)
    return _bench_worker_class()(options_from_settings(settings), follower, **kw)


def _bench_worker_class():
    from anomaly.worker import Worker

    class BenchWorker(Worker):
        """``Worker`` that times its batches, stops once ``target`` records are processed (``None``: not
        known yet, see ``set_target``), optionally collects per-window latencies, and reports its
        partition assignment. What the worker does is unchanged."""

        def __init__(self, options, follower, target: int | None, collect_latency: bool = False,
                     on_assigned_hook=None) -> None:
            super().__init__(options, follower)
            self.target = target
            self.first_batch_at: float | None = None
            self.last_batch_at: float | None = None
            self.done_at: float | None = None
            self._done_lock = threading.Lock()
            self.entities_at_end = 0
            self.counts: Counter = Counter()
            self.latency_full = array("d")  # batch finished - window end_ts
            self.latency_step = array("d")  # the step's now_s - window end_ts (the worker metric's view)
            self._collect = collect_latency
            self._hook = on_assigned_hook
            self._last: list[float] | None = None  # the latencies of the batch being completed
            self.scoring_kb: dict[str, int | None] = {}  # its VmHWM and Pss, read when the target is reached
            self.main_pss_kb: int | None = None

        def _make_runner(self):
            runner = super()._make_runner()  # (the scoring child's pid: Worker.scoring_pid)
            submit, result = runner.submit, runner.result

            def timed_submit(batches, now_s):
                if self.first_batch_at is None:  # the first non-empty poll, as the raw consumer's clock
                    self.first_batch_at = time.perf_counter()
                return submit(batches, now_s)

            def counted_result(handle=None):
                out = result(handle)
                self._last = out.latencies_s
                self.counts.update(out.counts)
                return out

            # Instance attributes: the worker calls self._runner.submit and self._runner.result.
            runner.submit, runner.result = timed_submit, counted_result
            return runner

        def _complete(self, handle, now_s, started) -> None:
            super()._complete(handle, now_s, started)
            if self._collect and self._last is not None:
                lat = self._last
                extra = self.clock() - now_s
                self.latency_step.extend(lat)
                self.latency_full.extend(x + extra for x in lat)
            self._last = None
            self.last_batch_at = time.perf_counter()
            self._check_done()

        def set_target(self, target: int) -> None:
            """Set the target late (from another thread); stops at once if it is already reached."""
            self.target = target
            self._check_done()

        def _check_done(self) -> None:
            with self._done_lock:
                if self.done_at is None and self.target is not None and self.stats.consumed >= self.target:
                    self.done_at = self.last_batch_at
                    self.entities_at_end = self._runner.entities  # closing revokes partitions, dropping them
                    if self.scoring_pid is not None:  # still running: its figures before it stops
                        self.scoring_kb = {"vmhwm": _rss_kb("VmHWM", self.scoring_pid),
                                           "pss": _rss_kb("Pss", self.scoring_pid, "smaps_rollup")}
                        self.main_pss_kb = _rss_kb("Pss", None, "smaps_rollup")
                    self.stop()

        def on_assigned(self, partitions) -> None:
            super().on_assigned(partitions)
            if self._hook is not None and partitions:
                self._hook()

    return BenchWorker


def run_worker(worker, timeout_s: float) -> None:
    """Run ``worker`` until it reaches its target; a watchdog stops it at ``timeout_s``."""
    timer = threading.Timer(timeout_s, worker.stop)
    timer.daemon = True
    timer.start()
    try:
        worker.run()
    finally:
        timer.cancel()
    if worker.done_at is None:
        raise RuntimeError(f"worker processed {worker.stats.consumed} of {worker.target} records "
                           f"within {timeout_s:.0f} s")


def warm_up(detector) -> None:
    """One forward pass per typical batch size, so the first real batch does not pay torch's set-up."""
    model = served_model(detector, trace=False)
    for n in (1, 100):
        model.score(sample_windows(model, n))


def percentiles_ms(values) -> dict[str, float | None]:
    if not len(values):
        return {"p50": None, "p90": None, "p99": None, "max": None}
    a = np.frombuffer(values, dtype=np.float64) * 1000 if isinstance(values, array) else np.asarray(values) * 1000
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "max": float(a.max())}


def _rss_kb(field: str = "VmRSS", pid: int | None = None, file: str = "status") -> int | None:
    """A kB figure of /proc/<pid>/<file> (this process by default): VmRSS, VmHWM (status), Pss (smaps_rollup)."""
    try:
        for line in Path(f"/proc/{pid or 'self'}/{file}").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


# --- the child: one worker in its own process ------------------------------------------------------

def say(line: str) -> None:
    """One line on stdout, whole (never glued to another thread's), flushed."""
    with _SAY_LOCK:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def serve_worker(args: argparse.Namespace) -> int:
    """Internal mode (``--serve-worker``): one BenchWorker on ``--topic``; prints ``ASSIGNED`` when it
    has partitions and ``RESULT {json}`` at the end."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s child %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.ERROR)  # "task blocked the event loop" on a busy machine
    from anomaly.detector import Detector

    tuning = tuning_from_args(args)
    tuning.apply()
    detector = Detector.load(args.detector_dir)

    def assigned() -> None:
        say(ASSIGNED_LINE)

    target = args.expect if args.expect >= 0 else None  # -1: the parent writes it to stdin when known
    worker = make_bench_worker(detector, args.bootstrap, args.topic, args.group, tuning, target=target,
                               collect_latency=args.latency, on_assigned_hook=assigned)
    if target is None:
        def read_target() -> None:
            line = sys.stdin.readline()
            if line.strip():
                worker.set_target(int(line))

        threading.Thread(target=read_target, daemon=True).start()
    warm_up(detector)
    baseline_kb, hwm_before_kb = _rss_kb(), _rss_kb("VmHWM")  # everything imported, built and warm
    if args.sample_s:
        threading.Thread(target=print_samples, args=(worker, args.sample_s), daemon=True).start()
    run_worker(worker, args.timeout)
    s = worker.stats
    result = {"consumed": s.consumed, "windows_scored": s.windows_scored, "events": s.events,
              "dead_letters": s.dead_letters, "entities": worker.entities_at_end,
              "late": worker.counts["late"], "duplicates": worker.counts["duplicates"],
              "resets": worker.counts["resets"], "evicted": worker.counts["evicted"],
              "msgs_per_s": s.consumed / (worker.done_at - worker.first_batch_at),
              "baseline_rss_kb": baseline_kb, "hwm_before_run_kb": hwm_before_kb, "vmhwm_kb": _rss_kb("VmHWM"),
              "scoring_vmhwm_kb": worker.scoring_kb.get("vmhwm"), "scoring_pss_kb": worker.scoring_kb.get("pss"),
              "main_pss_kb": worker.main_pss_kb,
              "seconds": worker.done_at - worker.first_batch_at,
              "latency_ms": percentiles_ms(worker.latency_full),
              "latency_at_batch_start_ms": percentiles_ms(worker.latency_step),
              "latency_windows": len(worker.latency_full)}
    say(RESULT_PREFIX + json.dumps(result))
    return 0


def worker_sample(worker, started: float) -> dict[str, Any]:
    """What a serving child says of itself now: seconds since ``started``, work done, entities held, and the
    resident memory of the worker's process and of its scoring child (kB; None: none, or gone)."""
    s = worker.stats
    runner = getattr(worker, "_runner", None)
    pid = worker.scoring_pid
    return {"t": time.monotonic() - started, "consumed": s.consumed, "windows_scored": s.windows_scored,
            "events": s.events, "dead_letters": s.dead_letters, "batches": s.batches,
            "entities": runner.entities if runner is not None else 0,
            "rss_kb": _rss_kb(), "scoring_rss_kb": _rss_kb(pid=pid) if pid is not None else None}


def print_samples(worker, every_s: float) -> None:
    """``SAMPLE {json}`` on stdout every ``every_s`` seconds until the worker is done (a daemon thread)."""
    started = time.monotonic()
    while worker.done_at is None:
        say(SAMPLE_PREFIX + json.dumps(worker_sample(worker, started)))
        time.sleep(every_s)


class Child:
    """A ``--serve-worker`` child process. Its peak RSS is the VmHWM it reads itself just before it exits:
    ``ru_maxrss`` from ``os.wait4`` / ``RUSAGE_CHILDREN`` would not do, because Linux carries the
    high-water mark of the pre-exec address space (a copy of this ~0.5 GB process) into the child's
    rusage, so every child would report at least this process's RSS. With ``sample_s`` the child also says
    every ``sample_s`` seconds what it has done and holds and its memory (``samples``; ``worker_sample``)."""

    def __init__(self, bootstrap: str, topic: str, detector_dir: str, expect: int, timeout_s: float,
                 latency: bool = False, tuning: Tuning = Tuning(), sample_s: float = 0.0) -> None:
        self.log = tempfile.NamedTemporaryFile(prefix="bench-worker-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "pipelines.bench_stream", "--serve-worker", "--bootstrap", bootstrap,
               "--topic", topic, "--group", f"{topic}.worker", "--detector-dir", detector_dir,
               "--expect", str(expect), "--timeout", str(timeout_s)] + (["--latency"] if latency else [])
        cmd += tuning.child_args() + (["--sample-s", str(sample_s)] if sample_s else [])
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     cwd=Path(__file__).resolve().parent.parent)
        self.result: dict[str, Any] | None = None
        self.samples: list[dict[str, Any]] = []  # its SAMPLE lines (``sample_s``), as they came
        self.maxrss_kb: int | None = None

    def wait_assigned(self, timeout_s: float) -> None:
        """Block until the child's worker has partitions (its stdout says so)."""
        found = threading.Event()

        def reader() -> None:
            for line in self.proc.stdout:  # type: ignore[union-attr]
                try:
                    if line.strip() == ASSIGNED_LINE:
                        found.set()
                    elif line.startswith(RESULT_PREFIX):
                        self.result = json.loads(line[len(RESULT_PREFIX):])
                    elif line.startswith(SAMPLE_PREFIX):
                        self.samples.append(json.loads(line[len(SAMPLE_PREFIX):]))
                except ValueError:  # not one of our lines after all (a library's output): read on
                    log.warning("worker child: a line that is not what it says: %.200s", line)

        self._reader = threading.Thread(target=reader, daemon=True)
        self._reader.start()
        if not found.wait(timeout_s):
            self.kill()
            raise RuntimeError(f"worker child got no partitions within {timeout_s:.0f} s{self._tail()}")

    def set_target(self, expect: int) -> None:
        """Tell a child started with ``expect=-1`` how many records to process."""
        self.proc.stdin.write(f"{expect}\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]

    def finish(self, timeout_s: float) -> dict[str, Any]:
        """Wait for the child to exit (reaping it ourselves for its rusage); its result."""
        deadline = time.monotonic() + timeout_s
        while True:
            pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"worker child did not finish within {timeout_s:.0f} s{self._tail()}")
            time.sleep(0.05)
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        self.maxrss_kb = usage.ru_maxrss  # kilobytes on Linux; includes the pre-exec parent copy (see above)
        self._reader.join(10)
        if self.proc.returncode != 0 or self.result is None:
            raise RuntimeError(f"worker child exited {self.proc.returncode} without a result{self._tail()}")
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)
        return self.result

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def _tail(self) -> str:
        try:
            return "\n--- child log ---\n" + Path(self.log.name).read_text()[-3000:]
        except OSError:
            return ""


# --- the phases ------------------------------------------------------------------------------------

def check_scored(stats: Any, n: int) -> None:
    """A throughput round counts only if the worker did the work: no dead letter (a clock far behind the
    readings' fixed timestamps would dead-letter them all, and a fast, meaningless rate would follow) and
    windows scored."""
    if stats.dead_letters or not stats.windows_scored:
        raise RuntimeError(f"the worker dead-lettered {stats.dead_letters} of {n} readings and scored "
                           f"{stats.windows_scored} windows: this rate would not measure scoring (is the clock "
                           "behind the benchmark's fixed timestamps?)")


def phase_throughput(bootstrap: str, detector, n: int, fleet: int, period_s: float, values: np.ndarray,
                     tuning: Tuning, out: dict[str, Any], n_rounds: int = 3, decompose: bool = False) -> None:
    """Raw consumer and worker alternately, ``n_rounds`` times each over the same topic (a new group
    each time); the best rate of each side and the ratio of the bests (see the module docstring).
    ``decompose``: each round also runs the worker with the ``busy`` and ``none`` stand-ins."""
    topic = "bench.throughput"
    messages = fleet_messages(fleet, n, period_s, values)
    out["load_msgs_per_s"] = load_topic(bootstrap, topic, messages)
    out["message_bytes"] = round(sum(len(v) for _, v in messages) / len(messages), 1)
    del messages
    log.info("loaded %d readings at %.0f msg/s", n, out["load_msgs_per_s"])
    settings = worker_settings(bootstrap, topic, "unused")
    timeout = 60 + n / 200
    warm_up(detector)
    rounds = []
    for r in range(n_rounds):  # alternate, so a change in the machine's load hits both alike
        raw = raw_consume(bootstrap, topic, n, settings.worker.max_poll_records, timeout, tuning.client_options, r)
        log.info("round %d: raw consumer %.0f msg/s", r + 1, raw["msgs_per_s"])
        worker = make_bench_worker(detector, bootstrap, topic, f"{topic}.worker.{r}", tuning, target=n)
        run_worker(worker, timeout)
        seconds = worker.done_at - worker.first_batch_at
        rate = worker.stats.consumed / seconds
        rounds.append({"raw_msgs_per_s": raw["msgs_per_s"], "raw_seconds": raw["seconds"], "worker_msgs_per_s": rate,
                       "worker_seconds": seconds, "ratio": rate / raw["msgs_per_s"],
                       "windows_scored": worker.stats.windows_scored, "events": worker.stats.events,
                       "batches": worker.stats.batches, "dead_letters": worker.stats.dead_letters,
                       "loadavg": list(os.getloadavg())})
        log.info("round %d: worker %.0f msg/s (%d windows, %d events, %d batches)", r + 1, rate,
                 worker.stats.windows_scored, worker.stats.events, worker.stats.batches)
        check_scored(worker.stats, n)
        for kind in (("busy", "none") if decompose else ()):
            worker = make_bench_worker(detector, bootstrap, topic, f"{topic}.{kind}.{r}", tuning, target=n)
            worker.step.swap_model(StandInModel(worker.step.model, kind, out.get("forward_us_per_window", 0.0)))
            run_worker(worker, timeout)
            stand_in = worker.stats.consumed / (worker.done_at - worker.first_batch_at)
            rounds[-1][f"worker_{kind}_msgs_per_s"] = stand_in
            rounds[-1][f"ratio_{kind}"] = stand_in / raw["msgs_per_s"]
            log.info("round %d: worker with the %s stand-in %.0f msg/s", r + 1, kind, stand_in)
    best_raw = max(rounds, key=lambda x: x["raw_msgs_per_s"])
    best_worker = max(rounds, key=lambda x: x["worker_msgs_per_s"])
    out["raw_msgs_per_s"] = best_raw["raw_msgs_per_s"]
    out["worker_msgs_per_s"] = best_worker["worker_msgs_per_s"]
    out["ratio"] = out["worker_msgs_per_s"] / out["raw_msgs_per_s"]
    # Each round's own ratio (worker and raw consumer minutes apart): steadier against this VM's swings
    # in speed than the ratio of the two bests, which pairs the raw consumer's luckiest round.
    out["ratio_median_round"] = float(np.median([x["ratio"] for x in rounds]))
    out["throughput_detail"] = {**{k: best_worker[k] for k in ("worker_seconds", "windows_scored", "events",
                                                               "batches", "dead_letters")},
                                "raw_seconds": best_raw["raw_seconds"], "rounds": rounds}
    for kind in (("busy", "none") if decompose else ()):
        best = max(x[f"worker_{kind}_msgs_per_s"] for x in rounds)
        out["decomposition"][f"worker_{kind}_msgs_per_s"] = best
        out["decomposition"][f"ratio_{kind}"] = best / out["raw_msgs_per_s"]


def phase_latency(bootstrap: str, detector_dir: str, fleet: int, rate: float, duration: float,
                  values: np.ndarray, linger_ms: int, tuning: Tuning, out: dict[str, Any]) -> None:
    """The sensors: at every grid tick each entity sends one reading stamped with its send time. A
    reading that could not be sent within 0.45 period of its tick is skipped (its stamp would round
    into the next slot and collide with the next reading): an overloaded producer lowers the achieved
    rate and leaves one-slot gaps (which the worker fills) instead of making duplicates."""
    from anomaly import kafka_io

    topic = "bench.latency"
    period = fleet / rate
    ticks = max(1, round(duration / period))
    offered = ticks * fleet
    kafka_io.ensure_topics(bootstrap, {topic: PARTITIONS})
    # A worker slower than the offered rate drains its backlog after the producer stops: allow for 200 msg/s.
    drain_s = 60 + offered / 200
    child = Child(bootstrap, topic, detector_dir, -1, timeout_s=duration + drain_s, latency=True, tuning=tuning)
    try:
        child.wait_assigned(ASSIGN_WAIT_S)
        time.sleep(0.5)  # let it fetch its (empty) committed offsets and start fetching
        names = [f"pump-{e:05d}" for e in range(fleet)]
        keys = [n.encode() for n in names]
        rows = values.tolist()
        producer = kafka_io.make_producer(bootstrap, {"linger_ms": linger_ms})
        behind, sent = 0.0, 0
        try:
            t0 = (math.floor(time.time() / period) + 2) * period  # ticks on the grid: stamps land near slot centres
            started = time.perf_counter()
            for k in range(ticks):
                tick = t0 + k * period
                delay = tick - time.time()
                if delay > 0:
                    time.sleep(delay)
                else:
                    behind = max(behind, -delay)
                cutoff = tick + 0.45 * period
                for i in range(fleet):
                    e = (i + k) % fleet  # rotate who goes first, so skips (if any) are spread over entities
                    ts = time.time()
                    if ts >= cutoff:
                        break
                    producer.send(topic, key=keys[e], value=encode(names[e], ts, rows[(k + 7 * e) % len(rows)]))
                    sent += 1
            producer.flush(timeout=60)
            sent_s = time.perf_counter() - started
        finally:
            producer.close(timeout=10)
        child.set_target(sent)
        result = child.finish(timeout_s=drain_s + 30)
    finally:
        child.kill()
    out["p50_ms"] = result["latency_ms"]["p50"]
    out["p99_ms"] = result["latency_ms"]["p99"]
    out["latency_detail"] = {"p90_ms": result["latency_ms"]["p90"], "max_ms": result["latency_ms"]["max"],
                             "p50_ms_at_batch_start": result["latency_at_batch_start_ms"]["p50"],
                             "p99_ms_at_batch_start": result["latency_at_batch_start_ms"]["p99"],
                             "windows": result["latency_windows"], "readings_offered": offered, "readings_sent": sent,
                             "achieved_rate": sent / sent_s, "producer_max_behind_ms": behind * 1000,
                             "duplicates": result["duplicates"], "late": result["late"], "resets": result["resets"],
                             "events": result["events"], "producer_linger_ms": linger_ms,
                             "worker_msgs_per_s": result["msgs_per_s"], "worker_seconds": result["seconds"]}
    if sent < offered:
        log.warning("latency: the producer sent %d of %d readings (%.0f/s of %.0f/s offered): the machine is "
                    "too busy for this rate", sent, offered, sent / sent_s, rate)
    log.info("latency: p50 %.1f ms, p99 %.1f ms over %d windows", out["p50_ms"] or -1, out["p99_ms"] or -1,
             result["latency_windows"])


def phase_memory(bootstrap: str, detector_dir: str, counts: list[int], window: int, period_s: float,
                 values: np.ndarray, tuning: Tuning, out: dict[str, Any]) -> None:
    per_entity = window + 8
    peaks, baselines, detail = {}, {}, {}
    for count in counts:
        topic = f"bench.memory.{count}"
        n = count * per_entity
        rate = load_topic(bootstrap, topic, fleet_messages(count, n, period_s, values))
        child = Child(bootstrap, topic, detector_dir, n, timeout_s=120 + n / 200, tuning=tuning)
        try:
            child.wait_assigned(ASSIGN_WAIT_S)
            result = child.finish(timeout_s=150 + n / 200)
        finally:
            child.kill()
        # Both processes' peaks when the step runs in a child: an over-count, as the pages they share
        # (forked: libraries, the model) are in both; the detail has their proportional shares (Pss).
        peaks[str(count)] = _mb(result["vmhwm_kb"] + (result["scoring_vmhwm_kb"] or 0))
        baselines[str(count)] = _mb(result["baseline_rss_kb"] or 0)
        detail[str(count)] = {"readings": n, "load_msgs_per_s": round(rate), "entities_held": result["entities"],
                              "hwm_before_run_mb": _mb(result["hwm_before_run_kb"] or 0),
                              "windows_scored": result["windows_scored"], "worker_msgs_per_s": round(result["msgs_per_s"]),
                              "main_peak_mb": _mb(result["vmhwm_kb"]),
                              "scoring_peak_mb": _mb(result["scoring_vmhwm_kb"]),
                              "pss_at_end_mb": _mb((result["main_pss_kb"] or 0) + (result["scoring_pss_kb"] or 0)
                                                   if result["scoring_pss_kb"] else None)}
        log.info("memory: %d entities -> peak %.1f MiB (baseline %.1f MiB)", count, peaks[str(count)],
                 baselines[str(count)])
    out["peak_rss_mb"] = peaks
    out["rss_baseline_mb"] = baselines
    out["memory_detail"] = {"readings_per_entity": per_entity, **detail}


def _mb(kb: int | None) -> float | None:
    return None if kb is None else round(kb / 1024, 1)


# --- report ----------------------------------------------------------------------------------------

def report(r: dict[str, Any]) -> str:
    def f(v, fmt="{:,.0f}"):
        return "n/a" if v is None else fmt.format(v)

    budget = r["latency_target_ms"]
    ratio_ok = r["ratio"] is not None and r["ratio"] >= RATIO_TARGET
    lat_ok = r["p99_ms"] is not None and r["p99_ms"] < budget
    lines = [
        f"bench_stream: {r['messages']:,} readings, {r['entities']} entities, model W {r['window_size']} / hidden "
        f"{r['hidden_size']} / latent {r['latent_size']} ({r.get('model_profile', 'default')}), stride {r['stride']}, period "
        f"{r['period_s'] * 1000:.1f} ms, {r['cpu_count']} CPUs, torch {r['torch']} on {r['device']} "
        f"({r['torch_threads']} torch threads, {r.get('precision', 'fp32')}; kafka-python CRC-32C in "
        f"{'C' if r.get('crc32c_c_extension') else 'pure Python'})"
        + (f"; tuning {json.dumps(r['tuning'])}" if any(r["tuning"].values()) else ""),
        "",
        f"  {'load (producer)':<28}{f(r['load_msgs_per_s']):>12} msg/s",
        f"  {'raw consumer (orjson.loads)':<28}{f(r['raw_msgs_per_s']):>12} msg/s",
        f"  {'worker':<28}{f(r['worker_msgs_per_s']):>12} msg/s",
        f"  {'ratio worker/raw':<28}{f(r['ratio'], '{:.2f}'):>12}        target >= {RATIO_TARGET}   "
        f"{'PASS' if ratio_ok else 'FAIL'}",
        f"  {'latency p50 @ ' + f(r['offered_rate']) + '/s':<28}{f(r['p50_ms'], '{:.1f}'):>12} ms",
        f"  {'latency p99':<28}{f(r['p99_ms'], '{:.1f}'):>12} ms     target < {budget:.0f} ms  "
        f"{'PASS' if lat_ok else 'FAIL'}   (flat {LATENCY_BUDGET_MS:.0f} ms, no stride allowance: "
        f"{'PASS' if r['p99_ms'] is not None and r['p99_ms'] < LATENCY_BUDGET_MS else 'FAIL'})",
    ]
    d = r.get("decomposition")
    if d:
        lines.append(f"  {'worker, busy stand-in':<28}{f(d.get('worker_busy_msgs_per_s')):>12} msg/s"
                     f"     ratio {f(d.get('ratio_busy'), '{:.2f}')} (forward's CPU, {d['forward_us_per_window']:.1f} "
                     f"µs/window, without its Python)")
        lines.append(f"  {'worker, no model':<28}{f(d.get('worker_none_msgs_per_s')):>12} msg/s"
                     f"     ratio {f(d.get('ratio_none'), '{:.2f}')}")
    for count, peak in r.get("peak_rss_mb", {}).items():
        lines.append(f"  {'peak RSS, ' + f(int(count)) + ' entities':<28}{peak:>12.1f} MiB"
                     f"     (baseline {r['rss_baseline_mb'][count]:.1f} MiB)")
    lines.append(f"  total {r['seconds']:.0f} s")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    import kafka.record.util as kafka_record_util

    from anomaly.broker import LocalBroker
    from anomaly.config import WorkerSettings
    from anomaly.scoring import resolve_precision
    from anomaly.step_runner import usable_cpus
    from anomaly.training import resolve_device

    started = time.perf_counter()
    tuning = tuning_from_args(args)
    tuning.apply()
    profile = QUICK if args.quick else DEFAULTS
    n = args.messages or profile["messages"]
    rate = args.rate or profile["rate"]
    duration = args.duration or profile["duration"]
    fleet = args.fleet or profile["fleet"]
    counts = [int(c) for c in (args.entities or profile["entities"]).split(",") if c.strip()]
    period = fleet / rate
    stride = WorkerSettings().stride
    shape = bench_model_params(args.model_profile)
    out: dict[str, Any] = {
        "raw_msgs_per_s": None, "worker_msgs_per_s": None, "ratio": None, "ratio_median_round": None,
        "p50_ms": None, "p99_ms": None,
        "peak_rss_mb": {}, "messages": n, "entities": fleet, "stride": stride, "period_s": period,
        "offered_rate": rate, "duration_s": duration, "load_msgs_per_s": None,
        "latency_target_ms": LATENCY_BUDGET_MS + stride * period * 1000,
        "cpu_count": os.cpu_count(), "cpus_usable": usable_cpus(),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "device": str(resolve_device("auto")),
        "precision": resolve_precision(WorkerSettings().precision, resolve_device("auto")),
        "crc32c_c_extension": kafka_record_util.crc32c_c is not None,  # kafka-python's CRC check in C, not Python
        "python": platform.python_version(), "model_profile": args.model_profile,
        "adaptive_rows": args.adaptive_rows,
        **{k: shape[k] for k in ("window_size", "hidden_size", "latent_size")},
        "quick": bool(args.quick), "loadavg_start": list(os.getloadavg()),
        "tuning": {"torch_threads": tuning.torch_threads, "client_options": tuning.client_options,
                   "in_process": tuning.in_process},
    }
    detector = fit_bench_detector(period, args.epochs or profile["epochs"], args.model_profile, args.adaptive_rows)
    log.info("detector fitted in %.1f s (threshold %.4g)", time.perf_counter() - started, detector.threshold.value)
    values = synthetic_values(5000, seed=2)
    with tempfile.TemporaryDirectory(prefix="bench-stream-") as tmp:
        detector_dir = str(detector.save(Path(tmp) / "detector"))
        with LocalBroker() as broker:
            if args.decompose:
                out["forward_us_per_window"] = forward_us_per_window(detector)
                out["decomposition"] = {"forward_us_per_window": out["forward_us_per_window"]}
            phase_throughput(broker.bootstrap, detector, n, fleet, period, values, tuning, out,
                             args.rounds or profile["rounds"], decompose=args.decompose)
            phase_latency(broker.bootstrap, detector_dir, fleet, rate, duration, values, args.producer_linger_ms,
                          tuning, out)
            phase_memory(broker.bootstrap, detector_dir, counts, detector.window_size, period, values,
                         tuning, out)
    out["loadavg_end"] = list(os.getloadavg())
    out["seconds"] = time.perf_counter() - started
    out["targets"] = {"ratio": out["ratio"] is not None and out["ratio"] >= RATIO_TARGET,
                      "p99": out["p99_ms"] is not None and out["p99_ms"] < out["latency_target_ms"]}
    return out


def tuning_from_args(args: argparse.Namespace) -> Tuning:
    """Unset options take the shipped defaults (``worker.torch_threads``), so the default run measures
    the worker as ``anomaly worker`` runs it."""
    from anomaly.config import WorkerSettings

    threads = args.torch_threads if args.torch_threads is not None else (WorkerSettings().torch_threads or None)
    return Tuning(threads, json.loads(args.client_options) if args.client_options else {}, args.in_process)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipelines.bench_stream", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", metavar="OUT", help="write the results as one JSON object here")
    p.add_argument("--quick", action="store_true", help="a small run (≈ 1 minute): 20k readings, 1,000/s for 5 s, "
                                                        "1, 10 and 100 entities")
    p.add_argument("--messages", type=int, help="readings in the throughput topic (default 200,000)")
    p.add_argument("--rate", type=float, help="offered readings per second in the latency run (default 5,000)")
    p.add_argument("--duration", type=float, help="seconds of the latency run (default 20)")
    p.add_argument("--fleet", type=int, help="entities in the throughput and latency runs (default 100)")
    p.add_argument("--entities", help="entity counts of the memory runs, comma-separated (default 1,100,10000)")
    p.add_argument("--epochs", type=int, help="training epochs of the benchmark's detector (default 2)")
    p.add_argument("--rounds", type=int, help="throughput rounds, raw and worker alternately; best of each "
                                             "(default 3, --quick 1)")
    p.add_argument("--decompose", action="store_true", help="each throughput round also runs the worker with a "
                                                          "GIL-free stand-in of the forward pass's cost and with "
                                                          "no model: where the worker's time goes")
    p.add_argument("--producer-linger-ms", type=int, default=0, help="linger of the sensors' producer (default 0)")
    p.add_argument("--torch-threads", type=int, help="experiment: torch.set_num_threads in the workers "
                                                     "(default: worker.torch_threads, 1)")
    p.add_argument("--model-profile", choices=("default", "skab", "nab", "smd"), default="default",
                   help="network shape of the benchmark's detector: the [model] defaults (W 10, hidden 32, latent "
                        "8), or a dataset profile's (skab: W 10, hidden 32, latent 8; smd: W 32, hidden 64, latent 16)")
    p.add_argument("--adaptive-rows", type=non_negative_int, default=0, help="the detector's threshold adapts to each entity's "
                                                                "last N readings' scores ([threshold] adaptive_rows; "
                                                                "default 0: a fixed threshold, the shipped default)")
    p.add_argument("--in-process", action="store_true", help="experiment: worker.scoring_process = false (decode, "
                                                             "windows, scoring and alerts in the worker's own process)")
    p.add_argument("--client-options", metavar="JSON", help="experiment: extra kafka-python options for the "
                                                            "workers' clients, e.g. '{\"fetch_max_wait_ms\": 10}'")
    p.add_argument("-v", "--verbose", action="store_true")
    # internal: one worker in a child process
    p.add_argument("--serve-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--bootstrap", help=argparse.SUPPRESS)
    p.add_argument("--topic", help=argparse.SUPPRESS)
    p.add_argument("--group", help=argparse.SUPPRESS)
    p.add_argument("--detector-dir", help=argparse.SUPPRESS)
    p.add_argument("--expect", type=int, help=argparse.SUPPRESS)
    p.add_argument("--timeout", type=float, default=300.0, help=argparse.SUPPRESS)
    p.add_argument("--latency", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--sample-s", type=float, default=0.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.sample_s < 0:
        p.error("--sample-s must be >= 0")
    for name in ("messages", "rate", "duration", "fleet", "epochs", "rounds", "torch_threads"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0")
    if args.client_options:
        try:
            options = json.loads(args.client_options)
        except json.JSONDecodeError as exc:
            p.error(f"--client-options is not JSON: {exc}")
        if not isinstance(options, dict):
            p.error("--client-options must be a JSON object")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_worker:
        return serve_worker(args)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    logging.getLogger("kafka").setLevel(logging.ERROR)  # "task blocked the event loop" on a busy machine
    result = run(args)
    print(report(result))
    if args.json:
        write_json(args.json, result)
    return 0


def write_json(path: str | Path, result: dict[str, Any]) -> None:
    """A benchmark's results as one JSON object (keys sorted), its folder made if missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n", encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
