"""A flag a signal handler sets and a foreground loop polls (the CLI's daemons, ``anomaly up``'s stop)."""

from __future__ import annotations

import signal
import time
from typing import Any

# What stops a command in order (finish the work in hand): Ctrl-C, SIGTERM (docker stop, Kubernetes), and
# SIGHUP (its terminal closed, an SSH session dropped), which killed a worker or scheduler outright; but
# not SIGHUP where the command was started with it ignored (`nohup anomaly worker &`: that is what the
# user asked for). Read once, at import, before any handler of ours is in.
HUP_IGNORED = signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM) + (() if HUP_IGNORED else (signal.SIGHUP,))
TERMINATING_SIGNALS = tuple(sig for sig in STOP_SIGNALS if sig != signal.SIGINT)  # (Ctrl-C: KeyboardInterrupt)
NAP_S = 0.2  # StopFlag.wait's longest sleep between two looks at the flag


class StopFlag:
    """Set by SIGINT/SIGTERM (install it with ``signal.signal``), polled by a foreground loop.

    A plain attribute, not a ``threading.Event``: Python runs a signal handler in the main thread
    between two bytecodes, and ``Event.set()`` there deadlocks when it interrupts the main thread inside
    ``Event.wait()`` at a moment it holds the Event's lock (not reentrant). Rare, likelier on a loaded
    machine; seen as ``anomaly broker`` not exiting on SIGTERM. ``wait`` sleeps instead (a signal wakes
    the handler at once; the loop notices within ``seconds``)."""

    def __init__(self) -> None:
        self.is_set = False

    def __call__(self, signum: int, frame: Any) -> None:
        self.is_set = True

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``, in naps of at most ``NAP_S`` so that a flag set meanwhile ends it soon
        (a sleep resumes after a signal's handler); whether it is set."""
        deadline = time.monotonic() + seconds
        while not self.is_set:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(left, NAP_S))
        return self.is_set
