"""Follow a registry alias (``@champion`` by default) and hand the worker each newly promoted version.

Owns: loading the model the alias points to at start, checking the alias at most every
``check_interval_s``, loading a version the alias moved to (forwards or back: a rollback is followed
too), and surviving a registry that cannot be reached or a version that will not load: the failure is
logged and counted, ``poll`` returns ``None`` and the current model stays in use. A version that
failed to load is retried only after an exponential back-off (2, 4, 8 ... × ``check_interval_s``,
capped at ``MAX_BACKOFF_S``), not on every check.

Must not: swap anything itself or touch Kafka. The worker calls ``poll()`` between batches and swaps
when it returns a model (DESIGN §3: swaps only between batches, window state kept). It talks to MLflow
only through ``anomaly.registry`` (``alias_version``, ``load_detector``), injected for tests.

    follower = ModelFollower("pump", "champion", check_interval_s=30)
    detector, version = follower.current()
    ...                                     # between batches:
    if (new := follower.poll()) is not None:
        detector, version = new
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from anomaly import registry
from anomaly.detector import Detector
from anomaly.errors import RegistryError
from anomaly.redaction import masked

log = logging.getLogger(__name__)

DEFAULT_CHECK_INTERVAL_S = 30.0  # a promotion is live within half a minute; one cheap registry call per check
# A version that failed to load n times is retried after 2**n check intervals, at most this long:
# artifacts are immutable, so a broken version stays broken, but an artifact-store blip heals.
MAX_BACKOFF_S = 900.0
MIN_BACKOFF_S = 1.0  # the back-off's unit when check_interval_s is 0 (tests, or checking every batch)
# How long ``poll`` waits for the registry's answer before leaving the check to finish on its own thread:
# a registry that hangs (an MLflow server stopped mid-request) held the worker's loop ≈ 33 s a check (the
# client's timeout and retries), its batches ≈ one a minute, though the model in hand serves on.
CHECK_WAIT_S = 1.0
# A check unanswered this long is trouble (/healthz degraded): a registry a little slower than the wait is not.
SLOW_CHECK_S = 10.0

Loader = Callable[[str, str], tuple[Detector, str]]
Resolver = Callable[[str, str], str | None]


@dataclass
class _Failure:
    """Back-off state of a version that failed to load."""

    count: int
    retry_at: float
    error: str
    what: str = "failed to load"  # or "cannot be served"


class _Check:
    """One look at where the alias points, on its own (daemon) thread: the version, or what it raised."""

    def __init__(self, resolver: Resolver, model_name: str, alias: str, started: float) -> None:
        self.started = started
        self.version: str | None = None
        self.error: Exception | None = None
        self._done = threading.Event()
        threading.Thread(target=self._run, args=(resolver, model_name, alias), name="anomaly-alias-check",
                         daemon=True).start()

    def _run(self, resolver: Resolver, model_name: str, alias: str) -> None:
        try:
            self.version = resolver(model_name, alias)
        except Exception as exc:  # the registry adapter raises what mlflow raises
            self.error = exc
        finally:
            self._done.set()

    def wait(self, seconds: float) -> bool:
        """Whether it has answered, waiting up to ``seconds``."""
        return self._done.wait(seconds)


class ModelFollower:
    """The model that ``model_name@alias`` points to, re-checked at most every ``check_interval_s``.

    The constructor loads the current version; it raises ``RegistryError`` when the alias points
    nowhere or its version cannot be loaded (a worker with no model must not start).

    ``loader(name, version)`` returns ``(detector, version)`` (``registry.load_detector``);
    ``resolver(name, alias)`` returns the version holding the alias or ``None`` (``registry.alias_version``,
    which also answers ``None`` when the registry cannot be reached); ``clock`` is monotonic seconds.
    ``on_failure(reason)``, when given, is called for each failed check or load (e.g. to count it in
    the worker's metrics); ``failures`` counts them too.
    """

    def __init__(self, model_name: str, alias: str = "champion", check_interval_s: float = DEFAULT_CHECK_INTERVAL_S,
                 loader: Loader = registry.load_detector, *, resolver: Resolver = registry.alias_version,
                 clock: Callable[[], float] = time.monotonic,
                 on_failure: Callable[[str], None] | None = None, check_wait_s: float = CHECK_WAIT_S) -> None:
        if check_interval_s < 0:
            raise ValueError(f"check_interval_s must be >= 0, got {check_interval_s}")
        self.model_name, self.alias = model_name, alias
        self.check_interval_s = float(check_interval_s)
        self._loader, self._resolver, self._clock, self._on_failure = loader, resolver, clock, on_failure
        self.failures = 0
        self.swaps = 0
        self._bad: dict[str, _Failure] = {}
        self._unresolved = False  # the last check could not resolve the alias (logged once per outage)
        self._trouble: str | None = None  # why the last check failed; None once the alias is followed again
        self._check_wait_s = float(check_wait_s)
        self._check: _Check | None = None  # a check of the alias still waiting for the registry

        try:
            version = self._resolver(model_name, alias)
        except Exception as exc:  # the registry adapter raises what mlflow raises
            raise RegistryError(f"cannot resolve {self.ref}: {exc}") from exc
        if version is None:
            raise RegistryError(f"{self.ref} points to no version (or the registry cannot be reached) in the "
                                f"registry at {_registry_uri()}: promote one with `anomaly models promote VERSION` "
                                f"(or check mlflow.tracking_uri: a relative sqlite path is read from the folder "
                                f"the worker runs in)")
        try:
            detector, loaded = self._loader(model_name, version)
        except Exception as exc:
            raise RegistryError(f"cannot load {model_name} v{version} ({self.ref}): {exc}") from exc
        self._current: tuple[Detector, str] = (detector, str(loaded))
        self._next_check = self._clock() + self.check_interval_s
        log.info("serving %s v%s", self.ref, loaded)

    @property
    def ref(self) -> str:
        """``name@alias``, for messages."""
        return f"{self.model_name}@{self.alias}"

    def current(self) -> tuple[Detector, str]:
        """The model in use and its version."""
        return self._current

    @property
    def version(self) -> str:
        return self._current[1]

    @property
    def trouble(self) -> str | None:
        """Why the last check of the alias failed (registry unreachable, alias gone, the new version
        does not load), while the current model keeps serving; None when it is followed normally."""
        return self._trouble

    def poll(self) -> tuple[Detector, str] | None:
        """A newly promoted model and its version when the alias moved since the last load; else ``None``.

        Cheap between checks (no registry call before ``check_interval_s`` has passed since the last
        answer). Never raises for registry or load problems: they are logged and counted, and the current
        model stays. The check runs on its own thread, waited for up to ``check_wait_s``: a registry
        slower than that is left to answer by a later ``poll``, which only looks (a hung one no longer
        holds the caller).
        A load runs here, on the caller's thread, once the registry has just answered (a download plus
        ``torch.load``: well under a second for our models from a local store, seconds from a remote
        one; far below Kafka's 300 s ``max_poll_interval_ms``). Whether the new model fits the window
        state (same sensors, window size) is the caller's decision.
        """
        now = self._clock()
        wait_s = 0.0  # a check already under way: only whether it has answered, no waiting
        if self._check is None:
            if now < self._next_check:
                return None
            self._check, wait_s = _Check(self._resolver, self.model_name, self.alias, now), self._check_wait_s
        check = self._check
        if not check.wait(wait_s):
            waited = self._clock() - check.started
            if waited >= SLOW_CHECK_S:
                self._trouble = masked(f"{self.ref}: the registry at {_registry_uri()} has not answered a check "
                                       f"for {waited:.0f} s; keeping v{self.version}")
                log.debug("%s", self._trouble)
            return None
        self._check = None
        now = self._clock()
        self._next_check = now + self.check_interval_s  # from the answer: a slow registry is not asked back to back

        version = check.version
        if check.error is not None:
            self._fail(f"cannot check {self.ref}: {check.error}; keeping v{self.version}", once=True)
            return None
        if version is None:
            self._fail(f"{self.ref} resolves to no version (alias removed, or registry unreachable); "
                       f"keeping v{self.version}", once=True)
            return None
        if self._unresolved:
            log.info("%s resolves again (v%s)", self.ref, version)
            self._unresolved = False
        version = str(version)
        if version == self.version:
            self._trouble = None
            return None

        bad = self._bad.get(version)
        if bad is not None and now < bad.retry_at:
            # Not served, and not tried again yet: still trouble (the alias may have left it and come back,
            # which cleared it), but no new failure to count.
            self._trouble = masked(f"{self.ref} is at v{version}, which {bad.what} ({bad.count} time(s); next try "
                                   f"in {bad.retry_at - now:.0f} s): {bad.error}; keeping v{self.version}")
            log.debug("%s", self._trouble)
            return None
        try:
            detector, loaded = self._loader(self.model_name, version)
        except Exception as exc:
            self._mark_bad(version, "failed to load", str(exc))
            return None
        self._bad.pop(version, None)
        self._trouble = None
        previous = self.version
        self._current = (detector, str(loaded))
        self.swaps += 1
        log.info("%s moved v%s -> v%s; new model loaded", self.ref, previous, loaded)
        return self._current

    def unusable(self, version: str, reason: str, keep: tuple[Detector, str]) -> None:
        """The caller could not serve ``version``, which ``poll`` just returned (building it on the worker's
        device failed: CUDA out of memory, say): ``keep`` (what ``current()`` gave before that poll, the
        model still serving) is current again, and ``version`` is tried again after the backoff a failed
        load gets. (The follower keeps no reference to a swapped-out model itself: it would stay in memory.)"""
        if self._current[1] != str(version):
            raise ValueError(f"v{version} is not the version poll() just returned (v{self._current[1]})")
        self._current = (keep[0], str(keep[1]))
        self.swaps -= 1
        self._mark_bad(str(version), "cannot be served", reason)

    def _mark_bad(self, version: str, what: str, reason: str) -> None:
        bad = self._bad.get(version)
        count = 1 if bad is None else bad.count + 1
        # (the exponent bounded: 2.0 ** 1023 overflows a float, after 10.7 days of tries at the cap)
        backoff = min(MAX_BACKOFF_S, max(self.check_interval_s, MIN_BACKOFF_S) * 2.0 ** min(count, 64))
        self._bad[version] = _Failure(count, self._clock() + backoff, reason, what)
        self._fail(f"{self.ref} moved to v{version}, which {what} (attempt {count}, next in "
                   f"{backoff:.0f} s): {reason}; keeping v{self.version}")

    def _fail(self, reason: str, once: bool = False) -> None:
        """Count a failure and log it (an unresolvable alias is logged as a warning once per outage)."""
        reason = masked(reason)  # mlflow's errors quote the tracking URI, user info included
        self.failures += 1
        self._trouble = reason
        if once and self._unresolved:
            log.debug("%s", reason)
        else:
            log.warning("%s", reason)
        self._unresolved = once
        if self._on_failure is not None:
            try:
                self._on_failure(reason)
            except Exception:  # a metrics hook must never take the worker down
                log.exception("on_failure hook raised")


def wait_for_follower(make: Callable[[], "ModelFollower"], timeout_s: float, *, retry_s: float = 5.0,
                      clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                      on_wait: Callable[[str], None] | None = None,
                      stopped: Callable[[], bool] = lambda: False) -> "ModelFollower | None":
    """``make()``, retried every ``retry_s`` while it raises ``RegistryError`` (no version behind the
    alias yet, or the registry unreachable), for up to ``timeout_s`` seconds (-1: forever; 0: once).
    ``on_wait(reason)`` is told of each failed try (health "starting"). The last error is raised. None
    once ``stopped()`` (SIGTERM while waiting: nothing to finish)."""
    deadline = None if timeout_s < 0 else clock() + timeout_s
    while True:
        try:
            return make()
        except RegistryError as exc:
            if deadline is not None and clock() + retry_s > deadline:
                raise
            log.info("waiting for a model: %s (retry in %.0f s)", exc, retry_s)
            if on_wait is not None:
                on_wait(str(exc))
            sleep(retry_s)
            if stopped():
                return None


def _registry_uri() -> str:
    """The registry URI in use, a relative ``sqlite:///`` path made absolute (where it was looked for)."""
    try:
        from anomaly import tracking

        return tracking.registry_uri()
    except Exception:  # only for a message
        return "(unknown)"
