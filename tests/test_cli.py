"""The command line itself: `fedge --help` stays light, and bad input gets a clear message."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration  # each test starts a fedge process


def test_help_imports_no_torch():
    code = "import sys; from fedge.cli.main import app; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_demo_with_a_missing_dataset_says_how_to_fix_it(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "fedge.cli.main", "demo", "--dataset", "nosuchmnist", "--data-dir", str(tmp_path), "--workdir", str(tmp_path / "w")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 3  # not found (fedge.errors.EXIT_CODES)
    assert "--data-dir" in out.stdout + out.stderr
