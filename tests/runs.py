"""Small harvested and fitted runs shared by the safety tests (issue 9), built once and copied per test."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import tiny_config
from ghsae.config import to_toml

SMALL = {
    "grouping.groups": [[0, 2], [3, 5]],
    "fit.expansion": 2,
    "fit.k": 4,
    "fit.batch_size": 64,
    "fit.tokens": 512,
    "fit.checkpoint_tokens": 128,
    "fit.device": "cpu",
}


def small_config(model: Path, dataset: Path, **overrides):
    """The tiny config with two fixed groups and a fit of a few steps, checkpointing every 2 steps."""
    return tiny_config(model, dataset, **{**SMALL, **overrides})


def write_config(folder: Path, cfg) -> Path:
    path = folder / "pipeline.toml"
    path.write_text(to_toml(cfg))
    return path


def cli(args: list[str]):
    from ghsae.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def default_sigint() -> None:
    """In a child about to exec: SIGINT back to its default, so Python turns it into KeyboardInterrupt.

    A shell without job control starts background commands with SIGINT ignored, and an ignored
    signal stays ignored across exec: a test suite run with `&` would otherwise see ghsae shrug off
    the SIGINT its fault point sends."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def ghsae(args: list, **kwargs) -> subprocess.CompletedProcess:
    """`ghsae ARGS` in a process of its own."""
    cmd = [sys.executable, "-m", "ghsae", *[str(a) for a in args]]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, preexec_fn=default_sigint, **kwargs)


def assert_one_line_error(output: str, message: str) -> None:
    """The user-facing failure: no traceback, and the error itself on one line containing `message`."""
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.startswith("ghsae: ")]
    assert len(lines) == 1 and message in lines[0], output


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def store_bytes(run: Path) -> dict[str, bytes]:
    return files(run / "acts.zarr")


@pytest.fixture(scope="session")
def small_cfg(tiny_llama, text_dataset):
    return small_config(tiny_llama, text_dataset)


@pytest.fixture(scope="session")
def harvested_template(small_cfg, tiny_lm, tmp_path_factory) -> Path:
    from ghsae.pipeline import harvest

    run = tmp_path_factory.mktemp("harvested") / "run"
    harvest(small_cfg, run, progress=False, lm=tiny_lm)
    return run


@pytest.fixture(scope="session")
def fitted_template(small_cfg, harvested_template, tmp_path_factory) -> Path:
    from ghsae.pipeline import fit

    run = tmp_path_factory.mktemp("fitted") / "run"
    shutil.copytree(harvested_template, run)
    fit(small_cfg, run, progress=False)
    return run


@pytest.fixture
def harvested_run(harvested_template, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(harvested_template, run)
    return run


@pytest.fixture
def fitted_run(fitted_template, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(fitted_template, run)
    return run
