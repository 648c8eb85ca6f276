"""Exclusive file locks between processes of one host: an ``flock`` on a file holding the owner's pid.

The kernel drops the lock when its process dies, so a crash never leaves a stale lock. Used for the
one scheduler per job store, the one retrain at a time (``anomaly.scheduler``) and the moves of one
registry alias (``anomaly.registry.alias_lock``). Nothing here knows what it guards.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time
from pathlib import Path
from typing import Any

from anomaly.errors import AnomalyError, ConfigError

RETRY_S = 0.05  # how often a waiting ``acquire`` tries again


class Locked(AnomalyError):
    """Another process holds the lock (another scheduler, a retrain in progress, an alias being moved)."""

    def __init__(self, path: Path, pid: int | None, what: str = "scheduler") -> None:
        self.path, self.pid = path, pid
        super().__init__(f"another {what} holds {path} (pid {pid if pid is not None else '?'})")


def lock_folder(setting: str | None) -> Path:
    """The folder of the registry's lock files (alias moves, a model's retrains) for an ``mlflow.lock_dir``
    value; unset: the temp folder."""
    import tempfile

    return Path(setting or tempfile.gettempdir())


def require_folder(folder: str | Path, field: str) -> Path:
    """``folder``, made if missing; a ``ConfigError`` naming ``field`` where lock files cannot be made there
    (checked before work whose end takes a lock: a training registered, then not promoted)."""
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(field, f"cannot make the folder {path} for lock files: {exc.strerror or exc}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(field, f"cannot make lock files in {path}: not writable by this user")
    return path


class FileLock:
    """An exclusive ``flock`` on ``path`` holding the owner's pid; ``acquire`` fails at once or after a wait."""

    def __init__(self, path: str | Path, what: str = "scheduler", field: str | None = "scheduler.job_store",
                 mode: int = 0o644) -> None:
        """``what`` names the holder in ``Locked``'s message; ``field``: the setting the lock file's path
        derives from, named when the file cannot be made (None: an ``AnomalyError``); ``mode``: of a new
        lock file (0o666 for one in a folder every user shares)."""
        self.path, self.what, self.field, self.mode = Path(path), what, field, mode
        self._fd: int | None = None

    def acquire(self, wait_s: float = 0.0) -> "FileLock":
        """Take the lock, trying again for up to ``wait_s`` seconds while another process holds it;
        ``Locked`` if it is still held then."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = self._open()
        except OSError as exc:  # a folder that is a file, no permission
            raise self._error(f"cannot make the lock file {self.path}: {exc.strerror or exc}") from None
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    os.close(fd)
                    raise
                if time.monotonic() >= deadline:
                    pid = _read_pid(fd)
                    os.close(fd)
                    raise Locked(self.path, pid, self.what) from None
                time.sleep(RETRY_S)
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            os.fsync(fd)
        except OSError as exc:  # disk full, I/O error: let go, or the lock stays held for this process's life
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            raise self._error(f"cannot write the lock file {self.path}: {exc.strerror or exc}") from None
        self._fd = fd
        return self

    def _error(self, said: str) -> AnomalyError:
        """The lock file's trouble, naming the setting its path derives from when there is one."""
        return ConfigError(self.field, said) if self.field else AnomalyError(said)

    def _open(self) -> int:
        """The lock file, opened for writing; made with ``mode`` (whatever the umask) if it is new. An
        existing file is opened without ``O_CREAT``, which a sticky shared folder (``/tmp`` with
        ``fs.protected_regular``) refuses for another user's file."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, self.mode)
        except FileExistsError:
            try:
                # not through a symbolic link: one planted at the predictable name in a shared /tmp would
                # have the lock truncate and write whatever file it points to
                fd = os.open(self.path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK)
            except FileNotFoundError:  # removed in between: make it
                return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, self.mode)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise OSError(exc.errno, "a symbolic link; a lock file must be a plain file") from None
                raise
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):  # a FIFO, a device
                os.close(fd)
                raise OSError(errno.EINVAL, "not a plain file; a lock file must be one")
            if info.st_nlink > 1:  # a hard link planted at the name: writing the pid would write the other file
                os.close(fd)
                raise OSError(errno.EMLINK, "a file with other names (a hard link); a lock file must have one")
            return fd
        try:
            os.fchmod(fd, self.mode)  # the umask took bits off (0o666 came out 0o644: no second user)
        except OSError:
            pass
        return fd

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "FileLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None
