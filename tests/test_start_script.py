"""A new user's first minutes: ``scripts/start_tts.sh``, then the README's try-it line.

The script runs as written, from a copy of the repository's scripts whose ``.venv`` sees this
interpreter's packages (so nothing is installed), on a free port.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import site
import subprocess
import venv
from pathlib import Path
from urllib.parse import unquote

import pytest
import soundfile as sf
from chatterbox_sidecar.process import free_port, stop_process

from tests.asr import transcribe, word_error_rate
from tests.conftest import ROOT

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")


def try_it_line() -> str:
    """The README's one-line check after ``scripts/start_tts.sh``."""
    readme = (ROOT / "README.md").read_text()
    lines = [ln for ln in readme.splitlines() if ln.startswith("curl ") and "/health/ready" in ln]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture
def clone(tmp_path: Path) -> Path:
    """A copy of the scripts with a ``.venv`` that uses this interpreter's packages."""
    root = tmp_path / "clone"
    shutil.copytree(ROOT / "scripts", root / "scripts")
    shutil.copy(ROOT / "pyproject.toml", root)
    venv.create(root / ".venv", with_pip=False)
    (purelib,) = (root / ".venv" / "lib").glob("python3*/site-packages")
    paths = [*site.getsitepackages(), *filter(None, os.environ.get("PYTHONPATH", "").split(":"))]
    (purelib / "_outer.pth").write_text(
        "import site; " + "; ".join(f"site.addsitedir({p!r})" for p in paths) + "\n"
    )
    # What scripts/test.sh leaves behind once it has installed the test extras.
    stamp = subprocess.run(
        [
            "bash",
            "-c",
            "source scripts/_venv.sh && "
            "venv_stamp test pyproject.toml scripts/test.sh scripts/_venv.sh",
        ],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (root / stamp).touch()
    return root


def start(clone: Path, port: int, **extra: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "TTS_HOST": "127.0.0.1",
        "TTS_PORT": str(port),
        "TTS_ENGINE": "piper",
        "TTS_LOG_DIR": str(clone / "logs"),
        **extra,
    }
    return subprocess.Popen(
        ["scripts/start_tts.sh"],
        cwd=clone,
        env=env,
        stdout=subprocess.PIPE,
        stderr=open(clone / "stderr.log", "w"),  # noqa: SIM115 - closed with the process
        text=True,
    )


def test_start_script_then_readme_try_it_line_gives_speech(clone: Path, tmp_path: Path):
    port = free_port()
    line = try_it_line().replace("localhost:8002", f"127.0.0.1:{port}")
    spoken = unquote(re.search(r"text=([^\"]+)", line).group(1))
    assert f"127.0.0.1:{port}/health/ready" in line and f"127.0.0.1:{port}/v1/synthesize" in line
    server = start(clone, port)
    try:
        # At once, with no wait: the line itself waits until the engine is ready.
        user = tmp_path / "user"
        user.mkdir()
        tried = subprocess.run(
            ["bash", "-c", line], cwd=user, capture_output=True, text=True, timeout=120
        )
        assert tried.returncode == 0, tried.stderr
        audio, rate = sf.read(user / "hello.wav", dtype="float32")
        heard = transcribe(audio, rate)
        # a few words, so that Whisper tiny mishearing one ("Hello" as "below") does not fail it
        assert len(spoken.split()) >= 5, spoken
        assert word_error_rate(spoken, heard) <= 0.2, heard

        # An error status fails loudly and writes no file.
        bad = re.sub(r"text=[^\"]+", "text=", line).replace("hello.wav", "empty.wav")
        failed = subprocess.run(
            ["bash", "-c", bad], cwd=user, capture_output=True, text=True, timeout=60
        )
        assert failed.returncode != 0 and "400" in failed.stderr, failed.stderr
        assert not (user / "empty.wav").exists()
    finally:
        status = stop_process(server, signal.SIGTERM)
    stdout = server.stdout.read()
    server.stdout.close()
    stderr = (clone / "stderr.log").read_text()
    assert status == 0, stderr[-3000:]
    assert "==> start_tts.sh: using .venv" in stderr
    ready = [ln for ln in stdout.splitlines() if ln.startswith("ready: ")]
    assert len(ready) == 1, stdout
    assert re.match(rf"ready: ws://127\.0\.0\.1:{port}/v1/stream/tts \(engine piper,", ready[0])


def test_no_ready_line_when_the_server_cannot_start(clone: Path):
    server = start(clone, free_port(), TTS_CHUNK_SIZE="lots")
    # The watcher ends with the server, so stdout closes.
    stdout, _ = server.communicate(timeout=60)
    assert server.returncode != 0
    assert "ready" not in stdout
    assert "TTS_CHUNK_SIZE" in (clone / "stderr.log").read_text()
