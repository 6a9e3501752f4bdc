"""Shared fixtures: a real sidecar in a subprocess on a free loopback port."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from chatterbox_sidecar.process import SidecarProcess

ROOT = Path(__file__).resolve().parents[1]

# One compute thread per process (torch, and the sidecars and bots the tests start, which
# inherit it). With a thread per core, torch's threads spin waiting for each other whenever
# another process holds a core: on a 2-core machine shared with sidecars and a second test
# worker, the S3Gen tests ran ~5x slower than with one thread. Set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def sidecar_factory(tmp_path: Path) -> Iterator[Callable[..., SidecarProcess]]:
    """Start sidecars with extra environment: ``start(**env)``; all are stopped afterwards."""
    started: list[SidecarProcess] = []

    def start(**env: str) -> SidecarProcess:
        workdir = tmp_path / f"sidecar{len(started)}"
        workdir.mkdir()
        sidecar = SidecarProcess(workdir, {k: str(v) for k, v in env.items()})
        started.append(sidecar)
        # A chatterbox sidecar on CPU loads full-size S3Gen and warms it up: minutes when the
        # tests run in parallel on a small machine.
        return sidecar.start(timeout=300 if env.get("TTS_ENGINE") == "chatterbox" else 120)

    yield start
    for sidecar in started:
        sidecar.stop()


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SidecarProcess]:
    """One piper sidecar shared by a test module."""
    workdir = tmp_path_factory.mktemp("sidecar")
    proc = SidecarProcess(workdir, {}).start()
    yield proc
    proc.stop()
