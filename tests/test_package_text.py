"""The package's docstrings and comments say the reason itself: no pointer to an issue tracker's
number, which a reader of the code cannot follow and which goes stale."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ghsae", "harvest", "cache", "train", "analysis")
ISSUE = re.compile(r"issue [0-9]", re.IGNORECASE)


def issue_references() -> list[str]:
    hits = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if ISSUE.search(line):
                    hits.append(f"{rel}:{n}: {line.strip()}")
    return hits


def test_no_docstring_or_comment_in_the_package_refers_to_an_issue_number():
    assert issue_references() == []


def test_the_check_finds_an_issue_reference():
    assert ISSUE.search('"""Refused since Issue 9."""') and not ISSUE.search("an issue that says why")
