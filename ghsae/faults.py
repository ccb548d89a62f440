"""Fault injection at named points, for tests that must kill or starve a run at an exact moment.

`GHSAE_FAULT=ACTION@POINT` (several separated by commas) makes the process, on reaching POINT:
  kill    SIGKILL itself (as an OOM killer or a cluster's hard limit would)
  int     send itself SIGINT;  term: SIGTERM
  stop    SIGSTOP itself (a test then runs a second process against a live, paused one)
  enospc  raise OSError(ENOSPC) (a full disk);  erofs: raise OSError(EROFS) (a read-only folder)

Points are strings such as `shard-00003/before-record` (see harvest/shards.py and
train/trainer.py). Timing-based kills are flaky on a loaded machine; a named
point is reached on every run, so a test built on one is deterministic. Unset, this costs one
dictionary lookup per point.
"""

from __future__ import annotations

import errno
import os
import signal

from ghsae.errors import ConfigError

FAULT_ENV = "GHSAE_FAULT"
ACTIONS = ("kill", "int", "term", "stop", "enospc", "erofs")


def _parse(spec: str) -> dict[str, str]:
    out = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        action, at, point = item.partition("@")
        if action not in ACTIONS or not at or not point:
            raise ConfigError(
                f"{FAULT_ENV} holds {item!r}; expected ACTION@POINT with ACTION one of {', '.join(ACTIONS)} "
                f"(e.g. kill@shard-00001/before-record); unset {FAULT_ENV} outside fault tests"
            )
        out[point] = action
    return out


_FAULTS: dict[str, str] = {}
_ERROR: list[ConfigError] = []  # a bad spec, raised by check() and at every point, never at import


def reload() -> None:
    """Re-read GHSAE_FAULT (for in-process tests that set it after import)."""
    _FAULTS.clear()
    _ERROR.clear()
    try:
        _FAULTS.update(_parse(os.environ.get(FAULT_ENV, "")))
    except ConfigError as e:
        _ERROR.append(e)


def check() -> None:
    """Refuse a malformed GHSAE_FAULT up front: a fault test whose fault never fires passes for nothing."""
    if _ERROR:
        raise _ERROR[0]


reload()


def point(name: str, path: object = None) -> None:
    check()
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
