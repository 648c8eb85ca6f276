"""Where the worker's scoring step runs: in the worker's own process, or in a child process beside it.

The worker's Kafka loop (poll, produce, flush, commit) hands each polled micro-batch to a runner and
later takes its ``BatchOutput`` back, strictly in order:

    handle = runner.submit(batches, now_s)     # right after the poll that returned them
    ...                                         # the next poll
    out = runner.result(handle)                 # this batch's outputs, to produce and commit

``ThreadRunner``: the step's decoding, windows and alerts run on the worker's thread; the forward pass
(torch, which releases the GIL) runs in a scoring thread, overlapping the next poll.

``ProcessRunner``: the whole step (decoding, windows, forward pass, alerts) runs in a child process
forked when the worker starts, fed over a pipe. kafka-python's fetch and our per-record decoding are
both Python: in one process they share one interpreter lock, so the worker's own Python took time from
its consumer. In the child it runs beside the consumer on the other core; the parent polls, hands the
record bytes over, follows the registry alias, and produces, flushes and commits what comes back.
Measured on 2 cores (README, Streaming worker): with the default network (W 10, hidden 32) at stride 4
the worker keeps 0.96-0.97 of a bare consumer's rate in a child against 0.61 in-process; with no model
at all 0.74-1.00 against 0.74-0.91. With a network 5 times as costly (W 32, hidden 64) the two are level
at stride 4, both processes being busy (its forward pass alone costs about 7 µs a reading, near what the
bare consumer spends on a reading), and the child is ahead at stride 8 and 16.

What crosses the pipe: parent -> child ``("batch", batches, now_s)``, ``("forget", partitions)``,
``("model", detector, version, replay)`` when the registry alias moved (the parent follows it, so the registry
client and its connections are never used across the fork; the detector is pickled, between our own
processes), ``("stop",)``; child -> parent ``("out", BatchOutput, entities)``, ``("swap", Swap)``,
``("error", text)`` before it exits on a failed batch. The pipe is FIFO and the child takes one message
at a time, so batches complete in order, and a model swap or a ``forget`` (partitions revoked during a
poll) applies after the batches polled before it. The worker's guarantees are unchanged: it commits a
batch only after producing its outputs; if the child fails or dies, ``result`` raises, nothing of that
batch is committed and the worker exits non-zero (its supervisor restarts it, DESIGN §3).

Fork, not spawn: the child inherits the loaded model and the step and starts in milliseconds. It is
forked before the worker creates its Kafka clients (no client threads to inherit) and, with
``gc_freeze``, after ``gc.freeze()``, so the objects both processes share stay shared. CUDA cannot be
used from a forked child, so a worker scoring on CUDA uses the thread runner; so does a worker with less
than two CPUs to use (affinity, or a cgroup quota such as a Kubernetes CPU limit): on one CPU the child
only shares it (one core, 3 paired rounds: 45-51k msg/s with a child against 46-63k without). The child
ignores SIGINT/SIGTERM (a Ctrl-C reaches the whole process group): the parent finishes the batch in hand, then
tells it to stop; if the parent dies, the pipe closes and the child exits.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import signal
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from anomaly.listing import added_removed
from anomaly.model_follower import ModelFollower
from anomaly.scoring_step import BatchOutput, PartitionBatch, ScoringModel, ScoringStep, window_shape
from anomaly.stop_flag import STOP_SIGNALS

log = logging.getLogger(__name__)

CHILD_IDLE_CHECK_S = 0.5  # a child waiting for the parent wakes this often to notice a batch that failed
CHILD_STOP_TIMEOUT_S = 30.0  # the parent waits this long for a stopping child before killing it


def cpu_budget(affinity: int, cpu_max: str | None) -> float:
    """CPUs this process may use: its CPU affinity, capped by a cgroup v2 quota (``cpu.max``: ``"max 100000"``
    or ``"<quota> <period>"``, e.g. a Kubernetes CPU limit of 1 is ``"100000 100000"``)."""
    budget = float(affinity)
    if cpu_max:
        fields = cpu_max.split()
        if len(fields) == 2 and fields[0] != "max":
            try:
                quota, period = float(fields[0]), float(fields[1])
            except ValueError:
                return budget
            if quota > 0 and period > 0:
                budget = min(budget, quota / period)
    return budget


def usable_cpus() -> float:
    """``cpu_budget`` of this process (the I/O edge: affinity and the cgroup v2 or v1 CPU quota)."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        affinity = os.cpu_count() or 1
    cpu_max = None
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:  # cgroup v2
            cpu_max = f.read()
    except OSError:
        try:  # cgroup v1: the same two figures in two files, a quota of -1 meaning none
            with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as q, open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as p:
                quota, period = q.read().strip(), p.read().strip()
            cpu_max = f"{'max' if quota.startswith('-') else quota} {period}"
        except OSError:
            pass
    return cpu_budget(affinity, cpu_max)


class ScoringFailed(RuntimeError):
    """The scoring step failed or its process died; nothing of the batch in hand may be committed."""


@dataclass(frozen=True)
class Swap:
    """A model swap a runner made: the version now serving, whether window state was kept, and where the
    worker seeks each partition back to refill the new model's windows (``ScoringStep.swap_model``)."""

    version: str
    kept: bool
    replay_from: dict[tuple[str, int], int] = field(default_factory=dict)


def refreeze_gc() -> None:
    """Collect the cyclic garbage of a swapped-out model, then freeze again.

    Why freeze at all: kafka-python allocates several objects per record, so the cyclic collector runs
    many times a second, and its full collections walk every long-lived object of the process (torch,
    MLflow and pandas leave ~400,000 after import). ``gc.freeze()`` moves what exists at start out of
    its walks; measured, a bare consumer in such a process goes from ~80k to ~120k msg/s. Frozen
    objects are still freed by reference counting; only frozen *cycles* would never be collected, so
    a model swap unfreezes, collects the old model's cycles, and freezes the new state (a model still
    held by the batch in flight is frozen once more and collected at the next swap). That one full
    collection pauses the step once per swap (≈ 140 ms on the 2-core box with torch and MLflow loaded:
    what every full collection cost the loop before the freeze)."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


class ThreadRunner:
    """The step in this process: staging on the caller's thread, the forward pass in a scoring thread.

    A batch is queued for scoring as soon as it is staged, so its forward pass also overlaps the
    previous batch's produce, flush and commit (scoring reads only the staged copy)."""

    def __init__(self, step: ScoringStep, follower: ModelFollower, serving: Callable[[Any, str], ScoringModel],
                 gc_freeze: bool) -> None:
        self.step = step
        self.follower = follower
        self.serving = serving  # (detector, version) -> the step's model, on the worker's device and precision
        self.gc_freeze = gc_freeze
        self._scorer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="anomaly-score")

    def submit(self, batches: Sequence[PartitionBatch], now_s: float) -> Any:
        staged = self.step.stage(batches, now_s=now_s)
        return staged, self._scorer.submit(self.step.score, staged)

    def result(self, handle: Any) -> BatchOutput:
        staged, scoring = handle
        return self.step.complete(staged, scoring.result())

    @property
    def entities(self) -> int:
        return self.step.windows.entities

    def set_maintenance(self, spans: Any) -> None:
        """Between batches: the maintenance periods in force (``ScoringStep.set_maintenance``)."""
        self.step.set_maintenance(spans)

    def forget_partitions(self, partitions: Sequence[tuple[str, int]]) -> None:
        dropped = self.step.forget_partitions(partitions)
        log.info("partitions revoked: %s (%d entities' windows dropped)", sorted(p for _, p in partitions), dropped)

    def follow_model(self, drain: Callable[[], None] | None = None) -> list[Swap]:
        """Between batches: swap in the version the alias moved to, if any. A version whose window buffers
        differ (sensors, window or period) is swapped in after ``drain()`` has completed every batch
        submitted, with the partitions to read again in ``Swap.replay_from`` (no ``drain``: none)."""
        keep = self.follower.current()
        new = self.follower.poll()
        if new is None:
            return []
        try:
            model = self.serving(*new)
        except Exception as exc:  # CUDA out of memory, say: the model in hand serves on (the worker exited)
            self.follower.unusable(str(new[1]), f"{type(exc).__name__}: {exc}", keep)
            return []
        replay = drain is not None and window_shape(model) != window_shape(self.step.model)
        if replay:
            drain()
        return [self._swap(model, replay)]

    def shape_of(self, detector: Any, version: str) -> tuple[tuple[str, ...], int, float]:
        """``window_shape`` of a version (read off the detector, or off the model it serves as)."""
        try:
            return window_shape(detector)
        except AttributeError:
            return window_shape(self.serving(detector, version))

    def swap(self, detector: Any, version: str, replay: bool = False) -> Swap:
        return self._swap(self.serving(detector, version), replay)

    def _swap(self, model: ScoringModel, replay: bool) -> Swap:
        version = model.version
        before = self.step.model
        kept = self.step.swap_model(model, replay=replay)
        change = sensor_change(before.sensors, model.sensors)
        ignored = getattr(model, "ignored_sensors", ())
        no_longer = [s for s in getattr(before, "ignored_sensors", ()) if s not in ignored and s not in model.sensors]
        if change or no_longer:
            read_past = [s for s in before.sensors if s in ignored]
            said = [f"reads other sensors than v{before.version} did ({change}): readings of another sensor set than "
                    f"its {', '.join(model.sensors)} go to the dead-letter topic from now on"] if change else []
            if read_past:
                said.append(f"except that they may still carry {', '.join(read_past)}, which its training left out "
                            "(read past)")
            if no_longer:
                said.append(f"readings carrying {', '.join(no_longer)} (which v{before.version}'s training had left out "
                            "and it read past) are dead letters now")
            log.warning("%s v%s: %s", self.follower.model_name, version, "; ".join(said))
        replay_from = self.step.replay_from
        log.info("now serving %s v%s (window state %s)", self.follower.model_name, version,
                 "kept" if kept else "restarted: the new model's sensors, window or period differ"
                 + ("; re-reading partitions %s from offsets %s to refill its windows"
                    % ([p for _, p in replay_from], list(replay_from.values())) if replay_from else ""))
        if self.gc_freeze:
            refreeze_gc()
        return Swap(str(version), kept, replay_from)

    def close(self) -> None:
        self._scorer.shutdown(wait=True, cancel_futures=True)


def sensor_change(before: Sequence[str], after: Sequence[str]) -> str:
    """How a model's sensor set differs from the one before it (``+added -removed``; '' for none)."""
    return added_removed([s for s in after if s not in set(before)], [s for s in before if s not in set(after)])


class ProcessRunner:
    """The step in a forked child process; the Kafka loop and the model follower stay in this one (see
    the module docstring)."""

    def __init__(self, runner: ThreadRunner, stall_s: float = 0.0) -> None:
        """``stall_s``: a child that has not answered in this many seconds while an answer is awaited (a
        batch's outputs, a swap) is stuck (stopped, deadlocked): it is killed and the wait raises
        ``ScoringFailed``; 0 = wait for ever."""
        self._conn, child_conn = multiprocessing.Pipe(duplex=True)
        # os.fork, not multiprocessing.Process: its bootstrap closes sys.stdin, which deadlocks when another
        # thread of ours is blocked reading it (the lock is copied taken); the child touches nothing but
        # the pipe and the step, and leaves with os._exit (no atexit handlers or finalizers of the parent's).
        pid = os.fork()
        if pid == 0:  # the child
            code = 1
            try:
                self._conn.close()
                code = _child_main(child_conn, runner)
            finally:
                os._exit(code)
        child_conn.close()
        self._runner = runner
        self._pid = pid
        self._stall_s = float(stall_s)
        self._gone = False  # the child died, failed or was killed: nothing more can be sent to it
        self._exit_status: int | None = None
        self._outputs: deque[tuple[BatchOutput, int]] = deque()
        self._swaps: list[Swap] = []
        self._shape = window_shape(runner.step.model)  # what the child's buffers are built for
        self._entities = 0
        self._closed = False
        log.info("scoring in child process %d", pid)

    @property
    def pid(self) -> int:
        return self._pid

    def submit(self, batches: Sequence[PartitionBatch], now_s: float) -> None:
        self._send(("batch", list(batches), now_s))

    def result(self, handle: None = None) -> BatchOutput:
        while not self._outputs:
            self._receive()
        out, self._entities = self._outputs.popleft()
        return out

    @property
    def entities(self) -> int:
        return self._entities

    def set_maintenance(self, spans: Any) -> None:
        """Tell the child (it applies them before the batches sent after them)."""
        self._send(("maintenance", {entity: list(periods) for entity, periods in spans.items()}))

    def forget_partitions(self, partitions: Sequence[tuple[str, int]]) -> None:
        """Tell the child; a child already gone has nothing to forget. This runs inside kafka-python's
        rebalance callback (also when the consumer closes after a failure), where raising would replace
        the failure with "User rebalance callback throws an error": the next batch reports the child's
        death instead."""
        if self._closed or self._gone:
            return
        try:
            self._send(("forget", list(partitions)))
        except ScoringFailed as exc:
            log.warning("revoked partitions not forwarded: %s", exc)

    def follow_model(self, drain: Callable[[], None] | None = None) -> list[Swap]:
        """Poll the follower here (the registry client stays in this process); a new version's detector
        goes to the child, which swaps it in after the batches sent before it. A version whose window
        buffers differ goes after ``drain()`` has completed every batch sent, and its swap is waited for
        (the worker seeks back before the next poll; see ``ThreadRunner.follow_model``). Returns the
        swaps the child has reported since the last call."""
        new = self._runner.follower.poll()
        if new is not None:
            shape, version = self._runner.shape_of(*new), str(new[1])
            replay = drain is not None and shape != self._shape
            if replay:
                drain()
            self._send(("model", *new, replay))
            self._shape = shape
            del new
            while replay and not any(swap.version == version for swap in self._swaps):
                self._receive()  # this version's swap (an earlier, compatible one's may be waiting too)
            if self._runner.gc_freeze:
                refreeze_gc()  # this process's copy of the previous model (the follower dropped it) may hold cycles
        while self._conn.poll():
            self._receive()
        swaps, self._swaps = self._swaps, []
        return swaps

    def close(self) -> None:
        """Stop the child after the batches sent so far; kill it if it does not go."""
        if self._closed:
            return
        self._closed = True
        try:
            self._conn.send(("stop",))
        except OSError:
            pass  # already gone
        if not self._wait(CHILD_STOP_TIMEOUT_S):
            log.warning("scoring process %d did not stop in %.0f s: killing it", self._pid, CHILD_STOP_TIMEOUT_S)
            os.kill(self._pid, signal.SIGKILL)
            self._wait(5)
        self._conn.close()

    def _wait(self, timeout_s: float) -> bool:
        """Reap the child within ``timeout_s``; whether it has exited."""
        deadline = time.monotonic() + timeout_s
        while self._exit_status is None:
            pid, status = os.waitpid(self._pid, os.WNOHANG)
            if pid:
                self._exit_status = status
            elif time.monotonic() >= deadline:
                return False
            else:
                time.sleep(0.02)
        return True

    def _send(self, message: tuple) -> None:
        try:
            self._conn.send(message)
        except OSError as exc:
            self._gone = True
            raise ScoringFailed(f"scoring process is gone ({self._describe_exit()}): {exc}") from exc

    def _receive(self) -> None:
        if self._gone:
            raise ScoringFailed(f"scoring process is gone ({self._describe_exit()})")
        try:
            if self._stall_s > 0 and not self._conn.poll(self._stall_s):
                self._gone = True
                os.kill(self._pid, signal.SIGKILL)
                self._wait(5)
                raise ScoringFailed(f"scoring process {self._pid} has not answered in {self._stall_s:g} s "
                                    "(worker.stall_s): stuck, killed it")
            message = self._conn.recv()
        except (EOFError, OSError) as exc:
            self._gone = True
            raise ScoringFailed(f"scoring process died ({self._describe_exit()})") from exc
        kind = message[0]
        if kind == "out":
            self._outputs.append((message[1], message[2]))
        elif kind == "swap":
            self._swaps.append(message[1])
        elif kind == "error":
            self._gone = True
            raise ScoringFailed(f"scoring process failed: {message[1]}")
        else:  # pragma: no cover - a protocol bug
            raise ScoringFailed(f"unexpected message from the scoring process: {kind!r}")

    def _describe_exit(self) -> str:
        if not self._wait(1):
            return "still running"
        status = self._exit_status
        if os.WIFSIGNALED(status):
            return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
        return f"exit code {os.waitstatus_to_exitcode(status)}"


def _child_main(conn, runner: ThreadRunner) -> int:
    """The child's loop. Its main thread receives and stages each batch (decode, windows) and swaps in a
    model the parent sends between batches; one finishing thread scores, completes (alerts) and sends
    back each staged batch in order, so batch i's forward pass and alerts run while batch i+1 is staged, and batch i's
    outputs go back as soon as they are ready. ``complete`` touches only the alert state, which staging
    does not (``ScoringStep``). Every message to the parent goes through that one thread, in order.
    Returns the exit code: 0 when told to stop or the parent is gone, 1 after a failure."""
    for sig in STOP_SIGNALS:  # sent to the group, they are the parent's to act on: it stops this child in order
        signal.signal(sig, signal.SIG_IGN)
    step = runner.step
    finisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="anomaly-finish")
    failure: list[str] = []

    def fail() -> None:
        """Log the exception being handled and tell the parent why (the last line), once; the main loop
        then exits non-zero and the parent commits nothing of the batch in hand."""
        text = traceback.format_exc()
        log.error("scoring process failed:\n%s", text)
        failure.append(text.strip().splitlines()[-1])
        try:
            conn.send(("error", failure[0]))
        except OSError:
            pass

    def finish(staged, entities: int) -> None:
        if failure:
            return
        try:
            conn.send(("out", step.complete(staged, step.score(staged)), entities))
        except (BrokenPipeError, ConnectionResetError):
            failure.append("the worker process is gone")
        except BaseException:
            fail()

    def tell(message: tuple) -> None:
        if not failure:
            conn.send(message)

    code = 0
    try:
        while not failure:
            if conn.poll(CHILD_IDLE_CHECK_S):
                message = conn.recv()
                kind = message[0]
                if kind == "batch":
                    _, batches, now_s = message
                    staged = step.stage(batches, now_s=now_s)
                    finisher.submit(finish, staged, step.windows.entities)
                elif kind == "model":  # between batches: those received before it keep the model they were staged for
                    finisher.submit(tell, ("swap", runner.swap(message[1], message[2], message[3])))
                elif kind == "forget":
                    runner.forget_partitions(message[1])  # staging order: batches received before it are staged
                elif kind == "maintenance":
                    runner.set_maintenance(message[1])
                elif kind == "stop":
                    break
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass  # the parent is gone (reset: it died with our answers unread): nothing to report to
    except BaseException:  # staging failed (a model error, not bad data): same as a failed batch
        finisher.shutdown(wait=True)  # the batches staged before it go back first, in order
        if not failure:
            fail()
    finally:
        try:
            finisher.shutdown(wait=True)  # the batches in hand are finished and sent (or the failure is)
        except BaseException:
            pass
        if failure:
            code = 1
        runner.close()
        conn.close()
    return code
