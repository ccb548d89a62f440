"""Where a table of results came from: date, ghsae's commit, and the machine that measured it.

Every page and summary that quotes measured figures carries this line, so a number copied out of
it can be traced back (and so two tables measured on different machines are not compared blindly).
"""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import torch

_SOURCE = Path(__file__).resolve().parents[1]  # the checkout (or site-packages) ghsae runs from


def _git(*args: str) -> str:
    """What `git -C <checkout> ARGS` prints (raises where git or the checkout is missing)."""
    done = subprocess.run(["git", "-C", str(_SOURCE), *args], capture_output=True, text=True, timeout=10, check=True)
    return done.stdout.strip()


def commit() -> str:
    """The short commit of the checkout ghsae runs from, `+dirty` when it has uncommitted changes;
    the installed version when ghsae is not a git checkout."""
    try:
        head = _git("rev-parse", "--short=10", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no")
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"ghsae {version('ghsae')}"
        except PackageNotFoundError:
            return "unknown"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """CPU model and the cores this process may use; the GPU when torch sees one."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    text = f"{cpu_name()}, {cores} cores"
    if torch.cuda.is_available():
        text += f", {torch.cuda.get_device_name(0)}"
    return text + f"; torch {torch.__version__}"


def stamp() -> str:
    """`2026-12-02 08:10 UTC · commit 1a2b3c4d5e · AMD EPYC ..., 2 cores; torch 2.13.0`"""
    return f"{datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} · commit {commit()} · {machine()}"
