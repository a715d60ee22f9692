"""Runs the frontend's JavaScript unit tests (tests/web/*.test.js) with Node's built-in test runner.

So the plain `python -m pytest` also checks web/lib; skipped with the reason when `node` (>= 18) is absent.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TEST_FILES = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "tests" / "web").glob("*.test.js"))


def _node() -> str | None:
    exe = shutil.which("node")
    if exe is None:
        return None
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    m = re.match(r"v(\d+)\.", out)
    return exe if m and int(m.group(1)) >= 18 else None


def test_js_unit_tests_exist():
    assert len(TEST_FILES) >= 4, TEST_FILES


@pytest.mark.skipif(_node() is None, reason="node >= 18 is not installed (needed for the web/ unit tests)")
def test_node_test_runner_passes():
    proc = subprocess.run([_node(), "--test", *TEST_FILES], cwd=REPO, capture_output=True, text=True, timeout=120)
    summary = "\n".join(line for line in proc.stdout.splitlines() if line.startswith("# "))
    failures = "\n".join(line for line in proc.stdout.splitlines() if line.startswith("not ok"))
    assert proc.returncode == 0, f"node --test failed:\n{failures}\n{summary}\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
    m = re.search(r"^# pass (\d+)$", proc.stdout, re.M)
    assert m and int(m.group(1)) >= 40, summary
