"""The long-running scoring worker: the Kafka loop around the pure batch step.

    poll a micro-batch -> ScoringStep.process (decode, windows, one batched forward pass, alerts)
    -> produce events, dead letters, scores -> flush the producer -> commit offsets

Guarantees (DESIGN.md §3):
- At least once, nothing lost: offsets are committed only after the producer has delivered every
  output of the batch (``flush`` then each send's result is checked), and never beyond the oldest
  reading an entity's open window still needs (``ScoringStep`` computes the positions), so a restart
  or rebalance refills the windows and no window goes unscored. Repeated outputs after a restart
  carry the same deterministic event ids.
- A failure in processing or delivery commits nothing and raises: the process exits non-zero and its
  supervisor restarts it. Bad records are data (dead letters), not crashes.
- SIGTERM/SIGINT: stop polling, finish the batch in hand, flush, commit, exit 0.
- The model is swapped only between batches, following the registry alias; window state is kept
  when the new model is compatible. A registry that cannot be reached leaves the current model.
- On a rebalance, the window state of partitions this worker loses is dropped; partitions newly
  assigned resume from their committed offsets (which never pass an open window's oldest reading), so
  windows are rebuilt from data rather than guessed. A partition kept through the rebalance keeps its
  state: kafka-python's eager protocol revokes every partition, then gives back the kept ones at the
  position they had (not the committed offset), so their windows could not be rebuilt from data. An
  eviction from the group (``on_lost``) drops the positions too, so it drops the state at once.

Where the step runs (``anomaly.step_runner``). With ``scoring_process`` (the default, on CPU with two
or more CPUs to use) the whole step runs in a child process forked at start: this process polls, hands
the record bytes over, follows the registry alias (sending a new model to the child), and produces,
flushes and commits each batch's outputs when they come back, so kafka-python's fetch and our decoding
no longer share one interpreter lock. Otherwise the step's decoding runs on this thread and the forward
pass (torch, which releases the GIL) in a scoring thread.

Overlap. Batch i+1 is submitted as soon as it is polled, so its decoding and forward pass run while
batch i's outputs are produced, flushed and committed. Batches still complete strictly in order:
batch i's alerts, outputs, flush and commit happen before batch i+1's alerts. A poll made while a
batch is in flight does not wait (``timeout_ms=0``): when no records are buffered, the batch in hand
completes at once, so a caught-up worker adds no latency. Batch i's commit positions are computed
when it is staged (staging i+1 changes nothing about them); a commit is sent only for partitions
still assigned, so a rebalance inside the poll of batch i+1 leaves the revoked partitions'
offsets where they were (their new owner re-reads from there: more re-delivery, never a gap).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from anomaly import kafka_io
from anomaly.alerts import AlertPolicy
from anomaly.dead_letter_log import DeadLetterLog
from anomaly.listing import some
from anomaly.maintenance import MaintenanceWatch, Muter, reader
from anomaly.metrics import WorkerMetrics
from anomaly.model_follower import ModelFollower
from anomaly.scoring_step import DetectorModel, PartitionBatch, ScoringStep
from anomaly.step_runner import ProcessRunner, ThreadRunner, usable_cpus
from anomaly.stop_flag import STOP_SIGNALS
from anomaly.training import resolve_device
from anomaly.window_state import WindowPolicy

log = logging.getLogger(__name__)

# The consumer may know no group coordinator for this long (its first lookup, a coordinator moving to
# another broker) before /healthz says the broker cannot be reached.
BROKER_LOST_AFTER_S = 15.0
# Closing flushes what is left (each batch's outputs were delivered before its commit; nothing, usually):
# within a Kubernetes grace period even when the broker is gone.
CLOSE_FLUSH_S = 30.0
# A join without partitions this long is trouble (/healthz degraded): joins take ≈ 3 s, rebalances seconds.
JOIN_TROUBLE_S = 60.0
# What a delivery leaves of worker.stall_s for the rest of its loop round (poll, scoring, commit).
STALL_MARGIN_S = 15.0


@dataclass(frozen=True)
class WorkerOptions:
    """Plain, typed options of one worker (built from ``Settings`` at the edge)."""

    bootstrap_servers: str
    input_topic: str
    events_topic: str
    dlq_topic: str
    scores_topic: str | None
    group_id: str
    client_options: Mapping[str, Any]
    window_policy: WindowPolicy
    alert_policy: AlertPolicy
    poll_timeout_s: float = 1.0
    max_poll_records: int = 2000
    input_partitions: int = 4
    device: str = "auto"
    precision: str = "fp32"  # forward pass: fp32, bf16 or auto (anomaly.scoring.resolve_precision)
    create_topics: bool = True  # create missing topics at start; False: require them to exist
    switch_interval_ms: float = 0.0  # sys.setswitchinterval while running; 0 = leave the interpreter's
    trace_model: bool = False  # CPU: score through a checked TorchScript trace (scoring.traced_for_scoring)
    gc_freeze: bool = False  # freeze what was built before the loop (and after a swap) out of the cyclic GC's walks
    scoring_process: bool = False  # run the step in a forked child process (anomaly.step_runner); CPU only
    max_future_s: float | None = None  # readings stamped further ahead of the clock are dead letters; None = off
    max_entities: int | None = None  # most entities held; past it those not active go; None = no cap
    partial_readings: bool = False  # a reading may carry some of the model's sensors (the others missing)
    entities: tuple[str, ...] | None = None  # glob patterns of the entities served; others skipped; None = all
    stall_s: float = 0.0  # a loop round unfinished this long: /healthz "stalled", a silent scoring child killed; 0 = never
    feedback_topic: str | None = None  # where maintenance periods are read from (anomaly feedback maintenance)
    maintenance_poll_s: float = 0.0  # how often they are re-read; 0 = off: every event is raised


@dataclass
class RunStats:
    batches: int = 0
    consumed: int = 0
    windows_scored: int = 0
    events: int = 0
    dead_letters: int = 0
    model_swaps: int = 0


def _join_trouble(joining_since: float | None, options: WorkerOptions) -> str | None:
    """What ``/healthz`` says of a consumer joining its group, without partitions, for longer than
    ``JOIN_TROUBLE_S`` (a group that does not settle: on the local Tansu broker, one whose next leader left
    mid-rebalance never does); it said ok, with no partitions, until the stuck-join renewal minutes later."""
    if joining_since is None:
        return None
    joining_s = time.monotonic() - joining_since
    if joining_s <= JOIN_TROUBLE_S:
        return None
    return f"joining group {options.group_id} for {joining_s:.0f} s without partitions (the group does not settle)"


class Worker:
    def __init__(self, options: WorkerOptions, follower: ModelFollower, metrics: WorkerMetrics | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.options = options
        self.follower = follower
        self.metrics = metrics or WorkerMetrics()
        self.clock = clock
        self.stop_event = threading.Event()
        self.stats = RunStats()
        self._broker_lost_since: float | None = None  # since when the consumer knows no group coordinator
        self._broker_lost_said = False  # that outage logged
        # a broker that cannot take our outputs in this long fails the batch (nothing committed); within the
        # stall limit, so that the delivery fails with its own error before the watchdog calls the loop stuck
        self._delivery_timeout_s = kafka_io.delivery_timeout_s(options.client_options)
        if options.stall_s > 0:
            self._delivery_timeout_s = min(self._delivery_timeout_s, max(options.stall_s - STALL_MARGIN_S, 1.0))
        self.device = resolve_device(options.device, "worker.device")
        detector, version = follower.current()
        self.step = ScoringStep(self._serving(detector, version), options.window_policy, options.alert_policy,
                                emit_scores=options.scores_topic is not None, max_future_s=options.max_future_s,
                                max_entities=options.max_entities, partial_readings=options.partial_readings,
                                entities=options.entities)
        self.metrics.set_model(follower.model_name, version)
        self.metrics.set_health("starting", model_name=follower.model_name, model_version=version)
        self.metrics.set_stall_limit(options.stall_s)
        self._consumer = None
        self._producer = None
        self._runner: ThreadRunner | ProcessRunner | None = None
        self._in_flight: tuple[Any, float, float] | None = None  # (runner handle, now_s, started)
        self._revoked: set[tuple[str, int]] = set()  # revoked since the last assignment (on_assigned decides)
        self.dead_letter_log = DeadLetterLog()
        self.muter = Muter(max_age_s=2 * options.alert_policy.max_event_s)  # events starting in maintenance: held back
        self._maintenance: MaintenanceWatch | None = None
        self._muted_said_s = -math.inf
        self._muted_since: list[str] = []  # entities of the events muted since the last line
        self._maintenance_sent = 0  # the Muter's version last passed to the step

    def _serving(self, detector, version: str) -> DetectorModel:
        """``detector`` as the scoring step's model, on this worker's device and precision."""
        model = DetectorModel(detector, self.follower.model_name, version, self.device, precision=self.options.precision,
                              trace=self.options.trace_model)
        if model.trace_tried:
            log.info("scoring v%s %s", version, "through a TorchScript trace" if model.traced else "without a trace")
        return model

    # --- lifecycle ---------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT/SIGHUP ask the loop to stop after the batch in hand (main thread only)."""
        def handler(signum, frame) -> None:
            log.info("signal %s: finishing the batch in hand, then stopping", signal.Signals(signum).name)
            self.stop_event.set()

        for sig in STOP_SIGNALS:
            signal.signal(sig, handler)

    def stop(self) -> None:
        self.stop_event.set()

    def _new_consumer(self) -> Any:
        o = self.options
        return kafka_io.make_consumer(o.bootstrap_servers, o.group_id, [o.input_topic], o.client_options,
                                      listener=kafka_io.rebalance_listener(self.on_revoked, self.on_assigned,
                                                                           self.on_lost))

    def _broker_trouble(self) -> str | None:
        """What ``/healthz`` says while the consumer has known no group coordinator for longer than
        ``BROKER_LOST_AFTER_S`` (the broker down or unreachable: kafka-python retries quietly, the loop
        goes on idling, and health said ok for as long as the outage lasted); logged when it starts and ends."""
        now = time.monotonic()
        if not kafka_io.coordinator_lost(self._consumer):
            if self._broker_lost_said:
                log.info("the Kafka group coordinator is known again (after %.0f s)", now - self._broker_lost_since)
            self._broker_lost_since, self._broker_lost_said = None, False
            return None
        if self._broker_lost_since is None:
            self._broker_lost_since = now
        lost_s = now - self._broker_lost_since
        if lost_s <= BROKER_LOST_AFTER_S:
            return None
        trouble = (f"no Kafka group coordinator for {lost_s:.0f} s: the broker at {self.options.bootstrap_servers} "
                   "cannot be reached (kafka-python retries; nothing is read meanwhile)")
        if not self._broker_lost_said:
            log.warning("%s", trouble)
            self._broker_lost_said = True
        return trouble

    def _renew_a_stuck_consumer(self, joining_since: float | None) -> float | None:
        """With no partitions: a consumer that has been joining its group for longer than a rebalance may
        take (``max_poll_interval_ms``, plus a minute) is closed and made again; returns since when it has
        been joining (None: it is a stable member, with nothing to do: more workers than partitions).
        A safety net for a join that gets no answer (kafka-python would wait for it as long as the worker
        polls). What first showed it in test runs was kafka-python throwing away answers that came between
        two polls (mended in ``kafka_io._keep_finished_joins``). It holds no partition, so there is
        nothing to commit or hand over."""
        if not kafka_io.joining(self._consumer):
            return None
        now = time.monotonic()
        if joining_since is None:
            return now
        limit_s = kafka_io.stuck_join_s(self.options.client_options)
        if now - joining_since <= limit_s:
            return joining_since
        log.warning("the consumer has been joining group %s for %.0f s with no answer; making a new one",
                    self.options.group_id, now - joining_since)
        try:
            self._consumer.close(autocommit=False)
        except Exception:
            log.debug("closing the stuck consumer failed", exc_info=True)
        self._consumer = self._new_consumer()
        return None

    def run(self, max_batches: int | None = None, idle_stop_s: float | None = None) -> RunStats:
        """Consume until stopped (or ``max_batches`` non-empty batches / ``idle_stop_s`` without
        records, for tests and benchmarks). Raises on a failed batch, having committed nothing of it."""
        o = self.options
        topics = topic_partitions(o)
        # The broker calls of the start-up run until done or until a stop (``unless_stopped``): kafka-python
        # retries an unreachable broker for bootstrap_timeout_ms, and a worker told to stop meanwhile took
        # ~28 s, past most supervisors' grace period, and exited 2 with a connection error.
        try:
            if o.create_topics:
                kafka_io.unless_stopped(self.stop_event, kafka_io.ensure_topics, o.bootstrap_servers, topics,
                                        o.client_options)
            else:  # an ACL'd cluster: the topics are an operator's; check they are there, create nothing
                kafka_io.unless_stopped(self.stop_event, kafka_io.require_topics, o.bootstrap_servers, list(topics),
                                        o.client_options)
        except kafka_io.Abandoned:
            log.info("stopped while connecting to the broker")
            self.metrics.set_health("stopping", detail="stopped")
            return self.stats
        last_records = time.monotonic()
        self._in_flight = None
        switch_interval = sys.getswitchinterval()
        failing = False
        try:
            if o.switch_interval_ms:  # the scoring thread gets the GIL back sooner after each torch call
                sys.setswitchinterval(o.switch_interval_ms / 1000.0)
            if o.gc_freeze:
                gc.freeze()  # see step_runner.refreeze_gc; before a fork, so both processes share what it froze
            # The runner first: a child is forked before the Kafka clients start their threads.
            self._runner = self._make_runner()
            if o.feedback_topic and o.maintenance_poll_s > 0:  # (a thread of its own: after the fork)
                self._maintenance = MaintenanceWatch(reader(o.bootstrap_servers, o.feedback_topic, o.client_options),
                                                     self.muter.update, o.maintenance_poll_s).start()
            self._producer = kafka_io.unless_stopped(self.stop_event, kafka_io.make_producer, o.bootstrap_servers,
                                                     o.client_options)
            self._consumer = kafka_io.unless_stopped(self.stop_event, self._new_consumer)
            joining_since: float | None = None  # since when the consumer has no partitions and is not a stable member
            while not self.stop_event.is_set():
                timeout_ms = 0 if self._in_flight is not None else int(o.poll_timeout_s * 1000)
                polled = self._consumer.poll(timeout_ms=timeout_ms, max_records=o.max_poll_records)
                batches = [PartitionBatch(tp.topic, tp.partition, [r.offset for r in rs], [r.key for r in rs],
                                          [r.value for r in rs]) for tp, rs in polled.items() if rs]
                submitted = None
                if self.muter.version != self._maintenance_sent:  # new periods: to the step before the next batch
                    self._maintenance_sent = self.muter.version
                    self._runner.set_maintenance(self.muter.spans)
                if batches:
                    started, now_s = time.perf_counter(), self.clock()
                    # Submitted at once: its forward pass runs while the batch in hand is completed.
                    submitted = (self._runner.submit(batches, now_s), now_s, started)
                if self._in_flight is not None:
                    self._drain()
                    last_records = time.monotonic()  # idle_stop_s: from the end of the work in hand, not its start
                assigned = self._consumer.assignment()  # (changed by a rebalance inside the poll only)
                if assigned:
                    joining_since = None
                if submitted is not None:
                    self._in_flight = submitted
                    last_records = time.monotonic()
                    if max_batches is not None and self.stats.batches + 1 >= max_batches:
                        break
                elif not assigned:
                    joining_since = self._renew_a_stuck_consumer(joining_since)
                    if idle_stop_s is None or not self.stats.consumed:
                        last_records = time.monotonic()  # idle time counts only once partitions are ours
                    elif time.monotonic() - last_records > idle_stop_s:
                        # ... or were: a worker that read its input and then lost its partitions to a
                        # rebalance waited for the group to settle again (minutes on the local broker)
                        break
                elif idle_stop_s is not None and time.monotonic() - last_records > idle_stop_s:
                    break
                following = time.monotonic()
                self._follow_model()
                last_records += time.monotonic() - following  # loading a promoted model is not idle time
                # the model serves on, but its alias cannot be followed; or the broker cannot be reached
                trouble = "; ".join(t for t in (self._broker_trouble(), _join_trouble(joining_since, self.options),
                                                self.follower.trouble) if t) or None
                self.metrics.set_health("degraded" if trouble else "ok", assigned_partitions=len(assigned),
                                        last_batch_ts=self.clock(), detail=trouble)
            if self.stop_event.is_set():
                self.metrics.set_health("stopping", detail="finishing the batch in hand")
            self._drain()  # stopping: finish the batch in hand (a failure above skips this)
        except kafka_io.Abandoned:  # nothing read yet: the clients made so far and the runner are closed below
            log.info("stopped while connecting to the broker")
        except BaseException:
            failing = True
            raise
        finally:
            sys.setswitchinterval(switch_interval)
            try:
                self._close()
            except Exception:
                if not failing:
                    raise
                # The failure in flight is the one to report (a dead scoring child, say), not what closing
                # the clients around it raised afterwards.
                log.exception("closing the worker after a failure failed too")
            if o.gc_freeze:
                gc.unfreeze()  # back to the collector's oldest generation, as before the run
        return self.stats

    @property
    def scoring_pid(self) -> int | None:
        """The forked scoring child's pid, when the step runs in one."""
        return self._runner.pid if isinstance(self._runner, ProcessRunner) else None

    def _make_runner(self) -> ThreadRunner | ProcessRunner:
        runner = ThreadRunner(self.step, self.follower, self._serving, self.options.gc_freeze)
        if not self.options.scoring_process:
            return runner
        if self.device.type == "cuda":
            log.info("scoring in this process: a forked child cannot use CUDA")
            return runner
        cpus = usable_cpus()
        if cpus < 2:
            log.info("scoring in this process: %.3g CPU to use, a child process would only share it", cpus)
            return runner
        return ProcessRunner(runner, stall_s=self.options.stall_s)

    # --- one batch ---------------------------------------------------------------------------
    def _complete(self, handle: Any, now_s: float, started: float) -> None:
        """Finish a submitted batch: take its outputs from the runner (the forward pass and alerts), produce,
        flush, check every send, then commit. Raises (committing nothing of the batch) if scoring or any
        delivery failed."""
        o = self.options
        out = self._runner.result(handle)
        events, muted = self.muter.keep(out.events, self.clock())
        if muted:  # not raised: not counted as events either (AnomalyEventStorm in a fleet-wide stop)
            for key, status in (("events_opened", "open"), ("events_closed", "closed")):
                out.counts[key] = out.counts.get(key, 0) - sum(1 for _, s in muted if s == status)
            self._say_muted([entity for entity, _ in muted])
        sends = [self._producer.send(o.events_topic, key=k, value=v) for k, v in events]
        sends += [self._producer.send(o.dlq_topic, key=k, value=v) for k, v in out.dead_letters]
        if o.scores_topic:
            sends += [self._producer.send(o.scores_topic, key=k, value=v) for k, v in out.scores]
        # raises if any output was not delivered: nothing is committed
        kafka_io.deliver(self._producer, sends, self._delivery_timeout_s, bootstrap_servers=o.bootstrap_servers,
                         topics=[t for t in (o.events_topic, o.dlq_topic, o.scores_topic) if t])
        commits = out.commits
        if commits:
            # Only partitions still ours: after a rebalance inside the last poll, the new owner
            # re-reads a revoked partition from its committed offset (see the module docstring).
            owned = {(tp.topic, tp.partition) for tp in self._consumer.assignment()}
            commits = {tp: offset for tp, offset in commits.items() if tp in owned}
        if commits and kafka_io.commit(self._consumer, commits):  # (skipped while the group rebalances)
            self.metrics.set_last_commit()
        counts = out.counts
        # End to end = reading timestamp -> outputs delivered and committed: the step measured up to the
        # moment the batch was staged; add the batch's own time since.
        batch_s = time.perf_counter() - started
        self.metrics.record_batch(counts, batch_s, np.asarray(out.latencies_s, dtype=np.float64) + batch_s)
        self.metrics.set_entities(self._runner.entities)
        if out.silent_sensors is not None:  # checked once a minute
            self.metrics.set_silent_sensors(out.silent_sensors)
        s = self.stats
        s.batches += 1
        s.consumed += counts.get("consumed", 0)
        s.windows_scored += counts.get("windows_scored", 0)
        s.events += len(events)
        s.dead_letters += len(out.dead_letters)
        if events or out.dead_letters:  # a batch of dead letters alone: the dead-letter log below speaks
            log.log(logging.INFO if events else logging.DEBUG, "batch: %d records, %d windows, %d events, "
                    "%d dead letters", counts.get("consumed", 0), counts.get("windows_scored", 0), len(events),
                    len(out.dead_letters))
        if out.dead_letter_reasons:
            self._say_dead_letters(self.dead_letter_log.add(out.dead_letter_reasons, self.clock(), out.dead_letter_keys))

    def _drain(self) -> None:
        """Complete the batch in flight, if any."""
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None:
            self._complete(*in_flight)

    def _say_muted(self, entities: list[str], final: bool = False) -> None:
        """Count event records held back for maintenance; say so once a minute (and when the worker stops),
        naming the entities."""
        self.metrics.events_muted.inc(len(entities))
        self._muted_since.extend(entities)
        now = time.monotonic()
        if self._muted_since and (final or now - self._muted_said_s >= 60.0):
            self._muted_said_s = now
            log.info("%d event records held back: their events started during their entity's maintenance (%s)",
                     len(self._muted_since), some(sorted(set(self._muted_since))))
            self._muted_since = []

    def _say_dead_letters(self, line: str | None) -> None:
        if line:
            log.warning("%s (to %s, each with its original bytes)", line, self.options.dlq_topic)

    def _follow_model(self) -> None:
        """Swap in a newly promoted version. One whose window buffers differ from the current model's is
        swapped in with nothing in flight, and the partitions its buffers are rebuilt from are read
        again from where its windows after the old model's last need (``ScoringStep.swap_model``)."""
        for swap in self._runner.follow_model(self._drain):
            owned = self._consumer.assignment() if swap.replay_from else set()
            for tp in owned:
                offset = swap.replay_from.get((tp.topic, tp.partition))
                if offset is not None:
                    self._consumer.seek(tp, offset)
            self.stats.model_swaps += 1
            self.metrics.model_swapped(self.follower.model_name, swap.version)
            self.metrics.set_health(model_version=swap.version)

    def _close(self) -> None:
        """Final flush and close: producer, consumer, then the runner, and health says "stopped". Every
        step runs even when one before it raises (the scoring child is never left behind); the last
        error raised is re-raised. Commits were made per batch, after delivery."""
        with contextlib.ExitStack() as later:  # its callbacks run last-registered first
            later.callback(self.metrics.set_health, "stopping", detail="stopped")
            if self._runner is not None:
                later.callback(self._runner.close)
            if self._maintenance is not None:
                later.callback(self._maintenance.stop)
            if self._consumer is not None:
                later.callback(self._consumer.close, autocommit=False)
            if self._producer is not None:
                later.callback(self._producer.close, timeout=5)
                later.callback(self._producer.flush, timeout=CLOSE_FLUSH_S)
            self._say_dead_letters(self.dead_letter_log.flush(self.clock()))
            self._say_muted([], final=True)

    # --- rebalance ---------------------------------------------------------------------------
    def on_revoked(self, partitions) -> None:
        """Noted, not yet forgotten: the eager protocol revokes every partition at each rebalance, and
        ``on_assigned`` gives back the kept ones at their fetch position, which only their state fits."""
        self._revoked.update((tp.topic, tp.partition) for tp in partitions)

    def on_lost(self, partitions) -> None:
        """Evicted from the group (session timeout, a poll too late): the client drops these partitions'
        positions, so one handed back is read again from its commit (maybe after another member moved it
        on): forgotten now, whatever the next assignment."""
        lost = sorted((tp.topic, tp.partition) for tp in partitions)
        self._revoked.difference_update(lost)
        self._forget(lost)

    def on_assigned(self, partitions) -> None:
        """The partitions revoked and not given back lose their window state; newly assigned ones start
        from their committed offsets (the consumer fetches them; this callback runs on the client's IO
        thread and must not block), so windows refill from data."""
        assigned = {(tp.topic, tp.partition) for tp in partitions}
        lost, kept = lost_and_kept(self._revoked, assigned)
        self._revoked.clear()
        self._forget(lost)
        log.info("partitions assigned: %s%s", sorted(p for _, p in assigned),
                 f" (kept through the rebalance, windows and all: {sorted(p for _, p in kept)})" if kept else "")


    def _forget(self, partitions: list[tuple[str, int]]) -> None:
        """Drop the window, alert and bar state of ``partitions`` (the runner's ``forget_partitions``)."""
        if partitions and self._runner is not None:
            self._runner.forget_partitions(partitions)


def lost_and_kept(revoked: Iterable[tuple[str, int]], assigned: Iterable[tuple[str, int]]
                  ) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Of the partitions revoked in a rebalance, those not assigned again (their state goes) and those
    assigned again (kept, state and fetch position both), each sorted (pure)."""
    revoked, assigned = set(revoked), set(assigned)
    return sorted(revoked - assigned), sorted(revoked & assigned)


def topic_partitions(o: WorkerOptions) -> dict[str, int]:
    """The topics the worker needs, with the partitions it creates them with: the input's count for the
    events and scores (keyed by entity as the input is), one for the dead letters (rare; order kept)."""
    return {o.input_topic: o.input_partitions, o.events_topic: o.input_partitions, o.dlq_topic: 1,
            **({o.scores_topic: o.input_partitions} if o.scores_topic else {})}


class StallWatchdog:
    """Watches a worker's health from a daemon thread and calls ``on_stall(detail)`` once, the first time it
    reads ``stalled`` (no loop round finished within ``worker.stall_s``; ``WorkerMetrics.health``).

    The loop cannot notice that it is stuck: a forward pass, a send to a scoring child that stopped
    reading, or a call that never returns hold it. The ``anomaly worker`` command's ``on_stall`` kills
    the scoring child and exits the process, so any supervisor restarts it (Docker's restart policy acts
    on exits, not on a failing healthcheck). Nothing is lost: offsets are committed only after delivery."""

    def __init__(self, health: Callable[[], Mapping[str, Any]], on_stall: Callable[[str], None],
                 check_every_s: float = 5.0) -> None:
        self._health, self._on_stall, self._every = health, on_stall, check_every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="anomaly-stall-watchdog", daemon=True)

    def start(self) -> "StallWatchdog":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self._every + 1)

    def _watch(self) -> None:
        while not self._stop.wait(self._every):
            doc = self._health()
            if doc.get("status") == "stalled":
                self._on_stall(str(doc.get("detail")))
                return


def options_from_settings(settings) -> WorkerOptions:
    """The edge: typed settings -> the worker's plain options."""
    k, w = settings.kafka, settings.worker
    return WorkerOptions(
        bootstrap_servers=k.bootstrap_servers, input_topic=k.input_topic, events_topic=k.events_topic,
        dlq_topic=k.dlq_topic, scores_topic=k.scores_topic, group_id=k.group_id, client_options=dict(k.client_options),
        window_policy=WindowPolicy(window_size=2, period_s=1.0, stride=w.stride, grace_slots=w.grace_slots,
                                   max_fill_steps=w.max_fill_steps),
        alert_policy=AlertPolicy(min_duration_windows=w.min_duration_windows, recovery_windows=w.recovery_windows,
                                 cooldown_s=w.cooldown_s, top_k=w.top_sensors, max_event_s=w.max_event_s),
        poll_timeout_s=w.poll_timeout_s, max_poll_records=w.max_poll_records, input_partitions=w.input_partitions,
        device=w.device, precision=w.precision, create_topics=w.create_topics,
        switch_interval_ms=w.switch_interval_ms, trace_model=w.trace_model, gc_freeze=w.gc_freeze,
        scoring_process=w.scoring_process, max_future_s=None if w.max_future_s == -1 else w.max_future_s,
        max_entities=w.max_entities, stall_s=w.stall_s, partial_readings=w.partial_readings,
        entities=tuple(w.entities) if w.entities else None, feedback_topic=k.feedback_topic or None,
        maintenance_poll_s=w.maintenance_poll_s)
