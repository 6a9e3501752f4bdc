"""The GPU smoke script's checks, run against the CPU engine (only the engine differs on a GPU)."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def test_smoke_script_passes_on_the_piper_engine():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "smoke_gpu.py"), "--engine", "piper"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "SMOKE TEST PASSED" in proc.stdout
    assert proc.stdout.count("ok   streaming=") == 6
