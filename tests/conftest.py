"""Shared fixtures: a real sidecar in a subprocess on a free loopback port."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float, describe) -> bool:
    """Poll ``url`` until it answers 200; False on timeout.

    Raises:
        RuntimeError: If the process exits first (with ``describe()`` in the message).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited ({proc.returncode}):\n{describe()}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return True
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.1)
    return False


class SidecarProcess:
    """A sidecar (``python -m chatterbox_sidecar``) running in a subprocess."""

    def __init__(self, workdir: Path, env: dict[str, str]):
        self.workdir = workdir
        self.port = free_port()
        self.voices_dir = workdir / "voices"
        self.log_dir = workdir / "logs"
        self.env = {
            **os.environ,
            "TTS_HOST": "127.0.0.1",
            "TTS_PORT": str(self.port),
            "TTS_ENGINE": "piper",
            "TTS_VOICES_DIR": str(self.voices_dir),
            "TTS_LOG_DIR": str(self.log_dir),
            "TTS_LOG_LEVEL": "DEBUG",
            **env,
        }
        self.proc: subprocess.Popen | None = None
        self._stderr = workdir / "stderr.log"

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/stream/tts"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> SidecarProcess:
        with open(self._stderr, "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "chatterbox_sidecar"],
                cwd=self.workdir,
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        if wait_healthy(f"{self.http_url}/health", self.proc, timeout, self.stderr_text):
            return self
        self.stop()
        raise TimeoutError(f"sidecar not healthy after {timeout} s:\n{self.stderr_text()}")

    def stop(self, sig: int | None = None) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            if sig is None:
                self.proc.terminate()
            else:
                self.proc.send_signal(sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code = self.proc.returncode
        self.proc = None
        return code

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def stderr_text(self) -> str:
        return self._stderr.read_text(errors="replace") if self._stderr.exists() else ""

    def log_text(self) -> str:
        log = self.log_dir / "tts.log"
        return log.read_text(errors="replace") if log.exists() else ""

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes, dict]:
        req = urllib.request.Request(f"{self.http_url}{path}", headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, r.read(), dict(r.headers)
        except urllib.error.HTTPError as e:
            return e.code, e.read(), dict(e.headers)

    def get_json(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict]:
        status, body, _ = self.get(path, headers)
        return status, json.loads(body)


@pytest.fixture
def sidecar_factory(tmp_path: Path) -> Iterator[Callable[..., SidecarProcess]]:
    """Start sidecars with extra environment: ``start(**env)``; all are stopped afterwards."""
    started: list[SidecarProcess] = []

    def start(**env: str) -> SidecarProcess:
        workdir = tmp_path / f"sidecar{len(started)}"
        workdir.mkdir()
        sidecar = SidecarProcess(workdir, {k: str(v) for k, v in env.items()})
        started.append(sidecar)
        return sidecar.start()

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
