"""A fleet for tests: ``scripts/start_multi_gpu.sh`` running piper sidecars behind real HAProxy.

Everything listens on 127.0.0.1 only. The script renders the shipped ``deploy/haproxy/haproxy.cfg``
with the sidecars as its servers, so the tests exercise both.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from chatterbox_sidecar.process import free_port

from tests.client import TTSClient

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "start_multi_gpu.sh"
API_KEY = "fleet-test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def require_haproxy() -> str:
    """Returns: the haproxy binary; skips the test (or fails it on CI) when there is none."""
    path = shutil.which("haproxy")
    if path is not None:
        return path
    if os.environ.get("CI") and not os.environ.get("HAPROXY_INSTALL_FAILED"):
        pytest.fail("haproxy is not installed: .ci/run installs it (apt-get install haproxy)")
    pytest.skip("haproxy is not installed (apt-get install haproxy); .ci/run installs it on CI")


def consecutive_free_ports(n: int) -> int:
    """Returns: the first of ``n`` consecutive loopback ports nothing listens on."""
    for _ in range(200):
        base = random.randint(20_000, 60_000 - n)
        socks = []
        try:
            for port in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no run of free ports")


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` every 50 ms; fail the test with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout:g} s waiting for: {what}")


async def async_wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Like :func:`wait_until`, without blocking the event loop."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await asyncio.to_thread(predicate):
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"timed out after {timeout:g} s waiting for: {what}")


def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """Returns: the status and body of a GET (error statuses included)."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class Fleet:
    """``scripts/start_multi_gpu.sh`` with ``count`` piper sidecars of ``TTS_MAX_STREAMS=2``.

    Args:
        workdir: Folder for the run directory, logs and voices.
        count: Sidecars (``NUM_SIDECARS``).
        check_inter: HAProxy's readiness check interval (``TTS_LB_CHECK_INTER``).
        env: More environment for the script and the sidecars.
    """

    def __init__(self, workdir: Path, count: int = 3, check_inter: str = "200ms", **env: str):
        self.count = count
        self.run_dir = workdir / "run"
        self.port = free_port()
        self.stats_port = free_port()
        self.port_base = consecutive_free_ports(count)
        self.output = workdir / "start_multi_gpu.out"
        self.env = {
            **os.environ,
            "NUM_SIDECARS": str(count),
            "TTS_ENGINE": "piper",
            "TTS_ENGINE_CONCURRENCY": "1",
            "TTS_MAX_STREAMS": "2",
            "TTS_API_KEY": API_KEY,
            "TTS_LOG_LEVEL": "DEBUG",
            "TTS_HOST": "127.0.0.1",
            "TTS_PORT": str(self.port),
            "TTS_PORT_BASE": str(self.port_base),
            "TTS_LB_STATS_BIND": f"127.0.0.1:{self.stats_port}",
            "TTS_LB_CHECK_INTER": check_inter,
            "TTS_RUN_DIR": str(self.run_dir),
            "TTS_LOG_DIR": str(workdir / "logs"),
            "TTS_VOICES_DIR": str(workdir / "voices"),
            "TTS_PYTHON": sys.executable,
            "TTS_RESTART": "0",
            **env,
        }
        self.env.pop("CUDA_VISIBLE_DEVICES", None)  # CPU sidecars; no GPU is counted
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """The public websocket endpoint (HAProxy)."""
        return f"ws://127.0.0.1:{self.port}/v1/stream/tts"

    @property
    def http_url(self) -> str:
        """HAProxy's public HTTP root."""
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> Fleet:
        """Start the script and wait until HAProxy sees every sidecar UP."""
        with open(self.output, "ab") as out:
            self.proc = subprocess.Popen(
                ["bash", str(SCRIPT)], cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT
            )
        wait_until(
            lambda: self._running() and self.states() == {n: "UP" for n in self.names},
            timeout,
            f"every sidecar UP in HAProxy\n{self.log()}",
        )
        return self

    def _running(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            pytest.fail(f"start_multi_gpu.sh exited ({self.proc.returncode}):\n{self.log()}")
        return True

    @property
    def names(self) -> list[str]:
        """HAProxy's names of the sidecars."""
        return [f"sidecar{i}" for i in range(self.count)]

    def log(self) -> str:
        """Returns: the script's output and HAProxy's log."""
        text = self.output.read_text(errors="replace") if self.output.exists() else ""
        haproxy_log = self.run_dir / "haproxy.log"
        if haproxy_log.exists():
            text += (
                "\n--- haproxy.log (end) ---\n" + haproxy_log.read_text(errors="replace")[-4000:]
            )
        return text

    def stats(self) -> dict[str, dict[str, str]]:
        """Returns: HAProxy's CSV stats for the sidecars, by server name ({} while it is down)."""
        try:
            status, body = http_get(f"http://127.0.0.1:{self.stats_port}/stats;csv")
        except OSError:
            return {}
        if status != 200:
            return {}
        rows = csv.DictReader(io.StringIO(body.decode().lstrip("# ")))
        return {
            r["svname"]: r for r in rows if r["pxname"] == "sidecars" and r["svname"] in self.names
        }

    def states(self) -> dict[str, str]:
        """Returns: each sidecar's state in HAProxy (``UP``, ``DOWN``, ...)."""
        return {name: row["status"] for name, row in self.stats().items()}

    def health(self, name: str) -> dict:
        """Returns: a sidecar's own ``/health/ready`` document, read directly (not via HAProxy)."""
        i = self.names.index(name)
        try:
            _, body = http_get(f"http://127.0.0.1:{self.port_base + i}/health/ready")
        except OSError:
            return {"status": "unreachable"}
        return json.loads(body)

    def admin(self, command: str) -> str:
        """Send one command to HAProxy's runtime API (its admin socket).

        Returns:
            HAProxy's answer.
        """
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(self.run_dir / "haproxy.sock"))
            s.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def pid(self, name: str) -> int:
        """Returns: a sidecar's process id, from the script's pid file (0 while it has none)."""
        try:
            return int((self.run_dir / f"{name}.pid").read_text())
        except (FileNotFoundError, ValueError):
            return 0

    def stop(self, timeout: float = 90.0) -> int:
        """SIGTERM the script and wait for it.

        Returns:
            Its exit status.
        """
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def cleanup(self) -> None:
        """Stop the script, and anything of it left running (by the pids it recorded)."""
        pids = [int(p.read_text()) for p in self.run_dir.glob("*.pid") if p.read_text().strip()]
        if self.proc is not None:
            self.stop()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


async def connect_call(url: str) -> tuple[TTSClient, str]:
    """Connect through HAProxy with the API key.

    Returns:
        The client and the name of the sidecar HAProxy chose for it.
    """
    client = await TTSClient.connect(url, additional_headers=AUTH)
    return client, client.ws.response.headers["X-TTS-Server"]


async def start_turn(client: TTSClient, context_id: str) -> None:
    """Open a context that is still taking text (a call in progress: the LLM has sent its first
    words); it holds one of the sidecar's streams until the turn ends."""
    await client.send(
        {"type": "synthesize", "text": "Hello", "continue": True, "context_id": context_id}
    )


async def open_call(url: str, context_id: str) -> tuple[TTSClient, str]:
    """Connect through HAProxy and start a turn (:func:`start_turn`).

    Returns:
        The client and the name of the sidecar HAProxy chose for it.
    """
    client, server = await connect_call(url)
    await start_turn(client, context_id)
    return client, server


async def finish_call(client: TTSClient, context_id: str) -> dict:
    """Send the rest of the turn, then collect the context's end.

    Returns:
        Its ``done`` (or whatever ended it).
    """
    await client.send(
        {"type": "synthesize", "text": " there, how can I help?", "context_id": context_id}
    )
    results = await client.collect(1)
    return results[context_id].end
