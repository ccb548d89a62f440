"""Free space checked before a stage writes, so a full disk is named up front instead of mid-write."""

from __future__ import annotations

import shutil
from pathlib import Path

from ghsae.errors import DiskError


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def free_bytes(path: Path) -> int:
    """Free bytes on the file system `path` is (or would be) on."""
    return shutil.disk_usage(_existing(path)).free


def require_free(path: Path, needed: int, what: str) -> None:
    """Refuse to start writing `needed` bytes under `path` when its file system has less free."""
    free = free_bytes(path)
    if needed > free:
        raise DiskError(
            f"{what} need up to {human(needed)} ({needed:,} bytes) but {_existing(path)} has {human(free)} "
            f"({free:,} bytes) free; free some space or use a --run-dir on a larger disk, then re-run the same command"
        )
