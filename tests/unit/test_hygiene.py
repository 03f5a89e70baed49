"""The suite cleans up after itself: processes that import the test modules (spawned
ranks, Ray workers unpickling a test's function) leave nothing in the temp dir."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import ROOT


def test_importing_the_root_conftest_outside_pytest_leaves_no_folder(tmp_path):
    """Only a pytest session makes (and removes) its folder; a child process that imports
    tests.conftest for a constant never removes anything, so it must make nothing."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", "import tests.conftest"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []
