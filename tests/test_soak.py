"""A CI-sized soak: 32 clients for 60 s on the CPU engine, random cancels and disconnects."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def test_soak_loses_no_context(sidecar_factory, tmp_path):
    sidecar = sidecar_factory(TTS_LOG_LEVEL="INFO")
    out = tmp_path / "soak.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "bench_tts.py"),
            "--url",
            sidecar.url,
            "--soak-clients",
            "32",
            "--soak-seconds",
            "60",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    stats = json.loads(out.read_text())["soak"]
    assert stats["lost"] == 0 and stats["unaccounted"] == 0
    assert stats["length_mismatches"] == 0
    assert stats["connection_errors"] == []
    assert stats["outcomes"].get("done", 0) > 20  # real work was done, not only refusals
    assert stats["outcomes"].get("cancelled", 0) > 0 and stats["abandoned"] > 0
    assert set(stats["outcomes"]) <= {"done", "cancelled", "error:busy"}, stats["outcomes"]
    _, body, _ = sidecar.get("/metrics")
    assert "tts_contexts_open 0.0" in body.decode()  # nothing left behind
    assert sidecar.proc.poll() is None
