"""The sidecar launcher (``chatterbox_sidecar.process``) that tests, benchmarks and scripts use."""

from __future__ import annotations

from pathlib import Path

import pytest
from chatterbox_sidecar.process import SidecarProcess


def test_a_sidecar_that_cannot_start_is_reported_with_its_message(tmp_path: Path):
    sidecar = SidecarProcess(tmp_path, {"TTS_CHUNK_SIZE": "lots"})
    with pytest.raises(RuntimeError, match="TTS_CHUNK_SIZE"):
        sidecar.start(timeout=60)


def test_started_sidecar_is_healthy_and_stops_cleanly(tmp_path: Path):
    sidecar = SidecarProcess(tmp_path, {}).start()
    try:
        status, health = sidecar.get_json("/health")
        assert status == 200 and health["engine"] == "piper"
    finally:
        assert sidecar.stop() == 0
    assert sidecar.stop() is None  # already stopped
