"""The suite's own settings: a hung test fails instead of blocking CI."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_a_hung_test_fails_at_the_configured_timeout(tmp_path):
    assert tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["timeout"] == 600
    (tmp_path / "test_hang.py").write_text("import time\n\ndef test_hangs():\n    time.sleep(60)\n")
    # the project's config, with the timeout shortened for this check
    cmd = [sys.executable, "-m", "pytest", "-q", "-c", str(REPO / "pyproject.toml"), "-o", "timeout=2", "-p", "no:cacheprovider"]
    proc = subprocess.run(
        [*cmd, "--rootdir", str(tmp_path), str(tmp_path / "test_hang.py")], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1, proc.stdout[-2000:]
    assert "Timeout (>2.0s)" in proc.stdout, proc.stdout[-2000:]
