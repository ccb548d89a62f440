"""Two real processes on one run folder: each unit (shard, SAE) is done once, the result equals one
process's, and --overwrite under a live harvest is refused. A process pauses itself at a named point
(ghsae/faults.py) so the overlap happens on every run, whatever the machine's speed."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import torch
from runs import assert_one_line_error, ghsae, store_bytes, write_config
from safetensors.torch import load_file

from ghsae.faults import FAULT_ENV


def start(args: list, fault: str | None, log) -> subprocess.Popen:
    env = {**os.environ, FAULT_ENV: fault} if fault else dict(os.environ)
    env.pop(FAULT_ENV, None) if fault is None else None
    cmd = [sys.executable, "-m", "ghsae", *[str(a) for a in args]]
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)


def wait_stopped(proc: subprocess.Popen) -> None:
    _, status = os.waitpid(proc.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status), "the process ended before reaching its pause point"


def wait_for(predicate, proc: subprocess.Popen, limit_s: float = 240) -> None:
    """Poll until predicate() or the process ends; the limit only bounds a hung test, it decides nothing."""
    deadline = time.monotonic() + limit_s
    while not predicate() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)


def finish(proc: subprocess.Popen) -> int:
    """Reap a process that may have been stopped and continued (waitpid already took its stop status)."""
    return proc.wait(timeout=300)


def race(args: list, pause_at: str, tmp_path) -> tuple[str, str]:
    """Process a runs `args` until its pause point; process b runs the same, writes what a does not
    hold and waits for the rest; a goes on once b got that far. Returns both outputs, both exited 0."""
    with open(tmp_path / "a.log", "w") as la, open(tmp_path / "b.log", "w") as lb:
        a = start(args, pause_at, la)
        wait_stopped(a)
        b = start(args, None, lb)
        wait_for(lambda: "waiting for it" in (tmp_path / "b.log").read_text(), b)
        os.kill(a.pid, signal.SIGCONT)
        assert finish(a) == 0 and finish(b) == 0
    return (tmp_path / "a.log").read_text(), (tmp_path / "b.log").read_text()


def test_two_concurrent_harvests_write_each_shard_once_and_equal_one_process(tmp_path, small_cfg, harvested_template):
    config, run = write_config(tmp_path, small_cfg), tmp_path / "run"
    args = ["harvest", "--config", config, "--run-dir", run, "--no-progress"]
    out_a, out_b = race(args, "stop@shard-00001/claimed", tmp_path)  # a pauses holding shard 1, shard 0 being committed
    written = [int(re.search(r"in (\d+) shards", out).group(1)) for out in (out_a, out_b)]
    assert written == [2, 2], (out_a, out_b)  # b wrote 2 and 3; a, once continued, 0 and 1
    assert "is being written by another process; skipping it" in out_b
    assert store_bytes(run) == store_bytes(harvested_template)


def test_two_concurrent_fits_of_one_group_train_it_once(tmp_path, small_cfg, harvested_run, fitted_template):
    config = write_config(tmp_path, small_cfg)
    args = ["fit", "--config", config, "--run-dir", harvested_run, "--group", "group_00", "--no-progress"]
    out_a, out_b = race(args, "stop@fit/step-3", tmp_path)
    assert "the SAE of group_00 is held by another process" in out_b
    assert "nothing to do" in out_b and "final batch FVU" in out_a, (out_a, out_b)
    got = load_file(str(harvested_run / "saes" / "group_00" / "sae.safetensors"))
    for name, tensor in load_file(str(fitted_template / "saes" / "group_00" / "sae.safetensors")).items():
        assert torch.equal(tensor, got[name]), name


def test_overwrite_during_a_harvest_is_refused_and_the_harvest_completes(tmp_path, small_cfg, harvested_template):
    config, run = write_config(tmp_path, small_cfg), tmp_path / "run"
    args = ["harvest", "--config", config, "--run-dir", run, "--no-progress"]
    with open(tmp_path / "a.log", "w") as la:
        a = start(args, "stop@shard-00001/after-record", la)
        wait_stopped(a)
        r = ghsae([*args, "--seed", "7", "--overwrite"])
        assert r.returncode == 2
        assert_one_line_error(r.stderr, "--overwrite refused: another ghsae process is working in")
        os.kill(a.pid, signal.SIGCONT)
        assert finish(a) == 0
    assert store_bytes(run) == store_bytes(harvested_template)
    assert ghsae(["verify", run]).returncode == 0
    # with the harvest done, the same --overwrite goes ahead
    r = ghsae([*args, "--seed", "7", "--overwrite"])
    assert r.returncode == 0, r.stderr
