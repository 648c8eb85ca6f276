"""File locks between processes: one holder at a time, a waiting acquire, the holder named."""

from __future__ import annotations

import multiprocessing
import os
import time

import pytest

from anomaly.locks import FileLock, Locked


def _hold(path: str, seconds: float, ready) -> None:
    with FileLock(path, what="test"):
        ready.set()
        time.sleep(seconds)


def _holder(path, seconds: float):
    ready = multiprocessing.get_context("fork").Event()
    process = multiprocessing.get_context("fork").Process(target=_hold, args=(str(path), seconds, ready))
    process.start()
    assert ready.wait(10)
    return process


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks a holder")
def test_a_waiting_acquire_gets_the_lock_once_its_holder_lets_go(tmp_path):
    path = tmp_path / "x.lock"
    holder = _holder(path, 0.6)
    try:
        with pytest.raises(Locked) as info:
            FileLock(path, what="move of pump@champion").acquire(wait_s=0.2)
        assert info.value.pid == holder.pid and "another move of pump@champion holds" in str(info.value)
        started = time.monotonic()
        lock = FileLock(path).acquire(wait_s=10)
        assert 0.1 < time.monotonic() - started < 5  # it waited for the holder, then took it
        assert lock.held and path.read_text() == f"{os.getpid()}\n"
        lock.release()
        assert not lock.held and path.read_text() == ""
    finally:
        holder.join(10)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks a holder")
def test_a_holder_that_dies_leaves_no_stale_lock(tmp_path):
    path = tmp_path / "x.lock"
    holder = _holder(path, 60)
    holder.kill()
    holder.join(10)
    with FileLock(path) as lock:
        assert lock.held
