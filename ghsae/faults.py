"""Fault injection at named points, for tests that must kill or starve a run at an exact moment.

`GHSAE_FAULT=ACTION@POINT` (several separated by commas) makes the process, on reaching POINT:
  kill    SIGKILL itself (as an OOM killer or a cluster's hard limit would)
  int     send itself SIGINT;  term: SIGTERM
  stop    SIGSTOP itself (a test then runs a second process against a live, paused one)
  enospc  raise OSError(ENOSPC) (a full disk);  erofs: raise OSError(EROFS) (a read-only folder)

Points are strings such as `shard-00003/before-record` (see harvest/shards.py and
train/trainer.py). Timing-based kills are flaky on a loaded machine (issue 9, item 11); a named
point is reached on every run, so a test built on one is deterministic. Unset, this costs one
dictionary lookup per point.
"""

from __future__ import annotations

import errno
import os
import signal

FAULT_ENV = "GHSAE_FAULT"


def _parse(spec: str) -> dict[str, str]:
    out = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        action, _, point = item.partition("@")
        out[point] = action
    return out


_FAULTS = _parse(os.environ.get(FAULT_ENV, ""))


def reload() -> None:
    """Re-read GHSAE_FAULT (for in-process tests that set it after import)."""
    _FAULTS.clear()
    _FAULTS.update(_parse(os.environ.get(FAULT_ENV, "")))


def point(name: str, path: object = None) -> None:
    action = _FAULTS.get(name)
    if action is None:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "int":
        os.kill(os.getpid(), signal.SIGINT)
    elif action == "term":
        os.kill(os.getpid(), signal.SIGTERM)
    elif action == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    elif action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), None if path is None else str(path))
    elif action == "erofs":
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), None if path is None else str(path))
    else:
        raise ValueError(f"{FAULT_ENV}: unknown action {action!r} at {name}")
