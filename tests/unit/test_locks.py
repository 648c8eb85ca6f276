"""File locks between processes: one holder at a time, a waiting acquire, the holder named."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time

import pytest

from anomaly.locks import FileLock, Locked


def _hold(path: str, seconds: float, ready, release) -> None:
    with FileLock(path, what="test"):
        ready.set()
        release.wait(seconds)


def _holder(path, seconds: float):
    """A process holding the lock at ``path`` for ``seconds``, or until its ``release`` event is set."""
    context = multiprocessing.get_context("fork")
    ready, release = context.Event(), context.Event()
    process = context.Process(target=_hold, args=(str(path), seconds, ready, release))
    process.release = release
    process.start()
    assert ready.wait(10)
    return process


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks a holder")
def test_a_waiting_acquire_gets_the_lock_once_its_holder_lets_go(tmp_path):
    path = tmp_path / "x.lock"
    holder = _holder(path, 60)
    try:
        with pytest.raises(Locked) as info:
            FileLock(path, what="move of pump@champion").acquire(wait_s=0.2)
        assert info.value.pid == holder.pid and "another move of pump@champion holds" in str(info.value)
        released = []
        timer = threading.Timer(0.5, lambda: (released.append(time.monotonic()), holder.release.set()))
        timer.start()
        lock = FileLock(path).acquire(wait_s=60)
        assert released and time.monotonic() >= released[0]  # it waited for the holder to let go, then took it
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


def test_a_lock_that_cannot_write_its_pid_lets_go(tmp_path, monkeypatch):
    # disk full after the flock: the descriptor stayed open and held the lock for the process's life, so
    # every later retrain was skipped as "already running"
    from anomaly.errors import ConfigError

    path = tmp_path / "x.lock"
    real_write = os.write

    def full(fd, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(ConfigError, match="cannot write the lock file .*No space left on device"):
        FileLock(path, what="test").acquire()
    monkeypatch.setattr(os, "write", real_write)
    with FileLock(path, what="test") as lock:
        assert lock.held


def test_a_shared_lock_file_is_made_with_its_mode_whatever_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with FileLock(tmp_path / "shared.lock", what="test", mode=0o666):
            pass
        with FileLock(tmp_path / "own.lock", what="test"):
            pass
    finally:
        os.umask(old)
    assert (tmp_path / "shared.lock").stat().st_mode & 0o777 == 0o666  # was 0o644: a second user was refused
    assert (tmp_path / "own.lock").stat().st_mode & 0o777 == 0o644
    with FileLock(tmp_path / "shared.lock", what="test", mode=0o666) as lock:  # an existing file opens too
        assert lock.held


def test_a_lock_does_not_write_through_a_planted_symbolic_link_or_into_a_fifo(tmp_path):
    """The lock's name is predictable and its folder is /tmp by default: a link planted there had the
    lock truncate the file it pointed to and write a pid into it."""
    from anomaly.errors import AnomalyError

    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    link = tmp_path / "model.lock"
    link.symlink_to(victim)
    with pytest.raises(AnomalyError, match="symbolic link"):
        FileLock(link).acquire()
    assert victim.read_text() == "precious\n"
    fifo = tmp_path / "fifo.lock"
    os.mkfifo(fifo)
    with pytest.raises(AnomalyError, match="not a plain file"):
        FileLock(fifo).acquire()
    other = tmp_path / "other.txt"
    other.write_text("precious\n")
    os.link(other, tmp_path / "hard.lock")
    with pytest.raises(AnomalyError, match="hard link"):
        FileLock(tmp_path / "hard.lock").acquire()
    assert other.read_text() == "precious\n"
    with FileLock(tmp_path / "plain.lock"):  # a plain file, new or existing, still locks
        pass
    with FileLock(tmp_path / "plain.lock"):
        pass
