"""A stuck worker ends: the watchdog fires once on the first 'stalled' health, and the command's handler
kills the scoring child and exits with EXIT_STALLED (a real subprocess; no Kafka)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

from anomaly.cli import EXIT_STALLED
from anomaly.worker import StallWatchdog
from tests.unit.test_metrics import stalling_metrics


def test_the_watchdog_fires_once_when_the_health_turns_stalled():
    metrics, now = stalling_metrics("ok", 120)
    fired: list[str] = []
    done = threading.Event()
    watchdog = StallWatchdog(metrics.health, lambda detail: (fired.append(detail), done.set()),
                             check_every_s=0.02).start()
    try:
        assert not done.wait(0.2)  # healthy: nothing
        now[0] = 1121.0
        assert done.wait(5)
    finally:
        watchdog.stop()
    assert len(fired) == 1 and "121 s (worker.stall_s 120)" in fired[0]


def test_a_stopping_worker_is_not_stalled_however_long_it_drains():
    metrics, now = stalling_metrics("stopping", 120, detail="finishing the batch in hand")
    now[0] = 5000.0
    fired: list[str] = []
    watchdog = StallWatchdog(metrics.health, fired.append, check_every_s=0.02).start()
    threading.Event().wait(0.2)
    watchdog.stop()
    assert fired == []


def test_a_stuck_worker_kills_its_scoring_child_and_exits_with_the_stalled_code(tmp_path):
    script = textwrap.dedent("""
        import logging, subprocess, sys, threading
        from anomaly.cli import exit_stuck
        logging.basicConfig(level=logging.INFO)
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        print(child.pid, flush=True)
        threading.Thread(target=lambda: threading.Event().wait(), daemon=False).start()  # a thread that never ends
        exit_stuck(child.pid, "no loop round has finished for 301 s")
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert run.returncode == EXIT_STALLED, run.stderr
    assert "worker stuck: no loop round has finished for 301 s; exiting with code 70" in run.stderr
    pid = int(run.stdout.split()[0])
    state = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()
    assert state in ("", "Z"), f"the scoring child {pid} outlived the worker: {state}"
