"""A sidecar in a child process: started on a free loopback port, ready once healthy.

For scripts, benchmarks and tests that need a real server beside them: ``python -m
chatterbox_sidecar`` in a subprocess, configured by ``TTS_*`` variables, its voices and logs in
a working folder of its own.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path


def free_port() -> int:
    """Returns: a loopback port that nothing listens on (at the time of asking)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(
    url: str, proc: subprocess.Popen, timeout: float, describe: Callable[[], str] = lambda: ""
) -> bool:
    """Poll ``url`` until it answers 200.

    Args:
        url: The health endpoint.
        proc: The server's process.
        timeout: Seconds to wait.
        describe: Text for the error if the process exits first (its log, say).

    Returns:
        True once healthy; False on timeout.

    Raises:
        RuntimeError: If the process exits first.
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


def stop_process(proc: subprocess.Popen, sig: int | None = None, grace: float = 20.0) -> int:
    """Ask a process to stop (SIGTERM, or ``sig``) and wait; kill it after ``grace`` seconds.

    Returns:
        Its exit status.
    """
    if proc.poll() is None:
        if sig is None:
            proc.terminate()
        else:
            proc.send_signal(sig)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


class SidecarProcess:
    """A sidecar (``python -m chatterbox_sidecar``) running in a subprocess.

    Defaults: the piper engine, DEBUG logs, voices and logs under ``workdir``; ``env`` overrides
    any of them and adds to the caller's environment.

    Args:
        workdir: Folder for the sidecar's voices, logs and stderr.
        env: ``TTS_*`` settings.
        echo: Let the sidecar write to this process's terminal (progress of a long load)
            instead of ``workdir/stderr.log``.
    """

    def __init__(self, workdir: Path, env: dict[str, str], *, echo: bool = False):
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
        self.echo = echo
        self.proc: subprocess.Popen | None = None
        self._stderr = workdir / "stderr.log"

    @property
    def url(self) -> str:
        """The websocket endpoint."""
        return f"ws://127.0.0.1:{self.port}/v1/stream/tts"

    @property
    def http_url(self) -> str:
        """The HTTP root (health, voices, metrics)."""
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> SidecarProcess:
        """Start the process and wait until ``/health`` answers.

        Raises:
            RuntimeError: If the sidecar exits while starting.
            TimeoutError: If it is not healthy within ``timeout`` seconds (it is stopped).
        """
        command = [sys.executable, "-m", "chatterbox_sidecar"]
        if self.echo:
            self.proc = subprocess.Popen(command, cwd=self.workdir, env=self.env)
        else:
            with open(self._stderr, "ab") as err:
                self.proc = subprocess.Popen(
                    command,
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
        """Stop the sidecar (SIGTERM, or ``sig``), killing it after 20 s.

        Returns:
            Its exit status, or None if it was not running.
        """
        if self.proc is None:
            return None
        code = stop_process(self.proc, sig)
        self.proc = None
        return code

    def kill(self) -> None:
        """Kill the sidecar at once (SIGKILL)."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def stderr_text(self) -> str:
        """Returns: what the sidecar wrote to stderr (empty with ``echo``)."""
        return self._stderr.read_text(errors="replace") if self._stderr.exists() else ""

    def log_text(self) -> str:
        """Returns: the sidecar's log file."""
        log = self.log_dir / "tts.log"
        return log.read_text(errors="replace") if log.exists() else ""

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes, dict]:
        """GET ``path`` on the sidecar's HTTP port.

        Returns:
            The status, body and headers (also for error statuses).
        """
        req = urllib.request.Request(f"{self.http_url}{path}", headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, r.read(), dict(r.headers)
        except urllib.error.HTTPError as e:
            return e.code, e.read(), dict(e.headers)

    def get_json(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict]:
        """GET ``path`` and decode its JSON body."""
        status, body, _ = self.get(path, headers)
        return status, json.loads(body)
