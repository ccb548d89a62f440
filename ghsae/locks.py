"""Advisory locks on files under RUN/.locks (fcntl.flock), so two processes never do one unit twice.

Locks taken (names from RunLayout.lock):
  run          shared by every command that writes into the run, exclusive for --overwrite
  plan         the plan step (tokenise, probe, partition)
  shard-NNNNN  one harvest shard, from its forward pass to its completion record
  sae-<group>  one group's SAE training

The kernel releases a flock when the process holding it dies, however it dies, so a lock left
by a killed process never blocks anyone: there is no stale-lock cleanup to get wrong. A lock file
is never deleted (deleting it while held would let a second process lock a new file of the same
name). flock works on local file systems and on NFSv4; on a file system without it (some FUSE
mounts) ghsae warns once and runs unlocked.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

_UNWRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


class FileLock:
    """A held flock; release() (or leaving the `with` block) lets the next process in."""

    def __init__(self, fd: int | None, path: Path):
        self.fd = fd
        self.path = path

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None

    def __enter__(self) -> FileLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _open(path: Path) -> int | None:
    """A descriptor to lock, or None where the folder cannot be written (then nobody can write there
    either, so a command that only reads needs no lock)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        if e.errno not in _UNWRITABLE:
            raise
    try:
        return os.open(path, os.O_RDONLY)  # flock works on a read-only descriptor
    except OSError:
        log.debug("%s cannot be created (read-only folder); going on without this lock", path)
        return None


def try_lock(path: Path, shared: bool = False) -> FileLock | None:
    """Take the lock without waiting; None when another process holds it."""
    fd = _open(path)
    if fd is None:
        return FileLock(None, path)
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        log.warning("%s: this file system has no flock (%s); running without locks", path, e.strerror)
        return FileLock(fd, path)
    return FileLock(fd, path)


def wait_lock(path: Path, what: str, shared: bool = False) -> FileLock:
    """Take the lock, waiting (and saying so) while another process holds it."""
    held = try_lock(path, shared)
    if held is not None:
        return held
    # nothing is written into the lock file (not even a pid): a command that only reads writes nothing
    log.warning("%s is held by another process (%s); waiting for it", what, path)
    fd = _open(path)
    assert fd is not None  # try_lock opened it a moment ago
    fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
    log.warning("%s: the other process is done; going on", what)
    return FileLock(fd, path)


def hold_run(layout) -> FileLock:
    """The shared run lock, held by every command working in an existing run (an --overwrite needs it
    exclusively, so it cannot delete a run under a running harvest or fit)."""
    return wait_lock(layout.lock("run"), f"run folder {layout.root} (an --overwrite)", shared=True)
