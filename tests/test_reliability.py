"""Issue 7: stalls, admission, drain, idle timeout, engine faults, crash safety of voices."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import soundfile as sf
from chatterbox_sidecar.voices import VoiceStore
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.client import TTSClient
from tests.engine_faults import FaultInjectingPiperEngine, inprocess_sidecar

LONG_TEXT = " ".join(
    f"Sentence {i} of a very long answer that takes a good while to speak out loud."
    for i in range(1, 61)
)


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


async def test_stalled_client_is_cut_off_and_others_are_served(sidecar_factory):
    sidecar = sidecar_factory(TTS_STALL_SECONDS="1")
    # a client that reads nothing: its library queue (2 frames) and the socket buffers fill up
    stalled = await connect(sidecar.url, max_queue=2)
    await stalled.send(json.dumps({"type": "synthesize", "text": LONG_TEXT, "context_id": "s"}))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        _, body, _ = sidecar.get("/metrics")
        queued = _metric(body.decode(), "tts_queued_audio_chunks")
        assert queued <= 64  # bounded per context, whatever the client does
        if _metric(body.decode(), "tts_stalled_clients_total") >= 1:
            break
        await asyncio.sleep(0.2)
    else:
        pytest.fail("the stalled client was never cut off")
    async with await TTSClient.connect(sidecar.url) as other:
        result = await other.synthesize("Other callers are still served.", context_id="o")
    assert result.end["type"] == "done"
    with pytest.raises(ConnectionClosed):
        while True:
            await asyncio.wait_for(stalled.recv(), 10)
    assert stalled.close_code in (1008, 1006)
    _, body, _ = sidecar.get("/metrics")
    assert _metric(body.decode(), "tts_contexts_open") == 0


async def test_idle_connection_is_closed_but_a_busy_one_is_not(sidecar_factory):
    sidecar = sidecar_factory(TTS_IDLE_SECONDS="1")
    idle = await TTSClient.connect(sidecar.url)
    assert idle.ready["limits"]["idle_timeout_seconds"] == 1
    with pytest.raises(ConnectionClosed):
        await idle.recv(timeout=10)
    assert idle.ws.close_code == 1000 and idle.ws.close_reason == "idle timeout"
    async with await TTSClient.connect(sidecar.url) as busy:
        result = await busy.synthesize(LONG_TEXT[:900], context_id="long")
        assert result.end["type"] == "done"  # took longer than the idle timeout, not cut


async def test_per_connection_context_limit_answers_busy(sidecar_factory):
    sidecar = sidecar_factory(TTS_MAX_CONTEXTS="2")
    async with await TTSClient.connect(sidecar.url) as client:
        assert client.ready["limits"]["max_contexts_per_connection"] == 2
        for cid in ("a", "b"):
            await client.send(
                {"type": "synthesize", "text": "Hi. ", "context_id": cid, "continue": True}
            )
        reply = await client.request(
            {"type": "synthesize", "text": "Hi.", "context_id": "c"}, "error"
        )
        assert reply["code"] == "busy" and reply["context_id"] == "c"
        await client.send({"type": "flush", "context_id": "a"})
        await client.send({"type": "flush", "context_id": "b"})
        ended = await client.collect(2)
        assert {r.end["type"] for r in ended.values()} == {"done"}
        assert (await client.synthesize("Room again.", context_id="d")).end["type"] == "done"


async def test_sigterm_drains_in_flight_contexts_then_exits(sidecar_factory):
    sidecar = sidecar_factory(TTS_DRAIN_SECONDS="60")
    client = await TTSClient.connect(sidecar.url)
    await client.send({"type": "synthesize", "text": LONG_TEXT[:700], "context_id": "inflight"})
    assert (await client.recv_json())["type"] == "started"
    sidecar.proc.send_signal(signal.SIGTERM)
    await asyncio.sleep(0.3)
    status, health = sidecar.get_json("/health")
    assert status == 503 and health["status"] == "draining"
    with pytest.raises(InvalidStatus) as info:
        await connect(sidecar.url)
    assert info.value.response.status_code == 503
    reply = await client.request({"type": "synthesize", "text": "New.", "context_id": "n"}, "error")
    assert reply["code"] == "busy"
    ended = await client.collect(1)
    assert ended["inflight"].end["type"] == "done"
    with pytest.raises(ConnectionClosed):
        await client.recv(timeout=10)
    assert client.ws.close_code == 1001
    assert sidecar.proc.wait(20) == 0


async def test_drain_deadline_and_second_sigterm(sidecar_factory):
    sidecar = sidecar_factory(TTS_DRAIN_SECONDS="1")
    client = await TTSClient.connect(sidecar.url)
    await client.send({"type": "synthesize", "text": LONG_TEXT, "context_id": "endless"})
    t0 = time.monotonic()
    sidecar.proc.send_signal(signal.SIGTERM)
    assert sidecar.proc.wait(20) == 0
    assert time.monotonic() - t0 < 10
    with pytest.raises(ConnectionClosed):
        while True:
            await client.recv(timeout=10)
    assert client.ws.close_code == 1001

    sidecar = sidecar_factory(TTS_DRAIN_SECONDS="600")
    client = await TTSClient.connect(sidecar.url)
    await client.send({"type": "synthesize", "text": LONG_TEXT, "context_id": "endless"})
    await client.recv()
    sidecar.proc.send_signal(signal.SIGTERM)
    await asyncio.sleep(0.5)
    assert sidecar.proc.poll() is None  # still draining
    sidecar.proc.send_signal(signal.SIGTERM)
    assert sidecar.proc.wait(20) == 0


# --- engine faults, with the real piper engine and injected failures ---------------------------


def _fail_on_marker(segment: str) -> BaseException | None:
    return RuntimeError("injected fault") if "FAIL" in segment.upper() else None


@pytest.fixture
async def inprocess_server(tmp_path: Path):
    engine = FaultInjectingPiperEngine(_fail_on_marker)
    async with inprocess_sidecar(engine, tmp_path) as (app, port):
        yield app, f"ws://127.0.0.1:{port}/v1/stream/tts"


async def test_engine_fault_ends_only_its_context_and_health_follows(inprocess_server):
    app, url = inprocess_server
    async with await TTSClient.connect(url) as client:
        await client.send({"type": "synthesize", "text": "This one is fine.", "context_id": "a"})
        await client.send({"type": "synthesize", "text": "Please fail now.", "context_id": "b"})
        await client.send({"type": "synthesize", "text": "And so is this.", "context_id": "c"})
        ended = await client.collect(3)
        assert ended["a"].end["type"] == "done" and ended["c"].end["type"] == "done"
        assert ended["b"].end["type"] == "error" and ended["b"].end["code"] == "engine_error"
        assert app.healthy
        for n in range(3):
            await client.send({"type": "synthesize", "text": "FAIL again.", "context_id": f"f{n}"})
        await client.collect(3)
        assert not app.healthy and app.health()["status"] == "degraded"
        assert (await client.synthesize("Recovered.", context_id="ok")).end["type"] == "done"
        assert app.healthy


# --- crash safety of the voice store -------------------------------------------------------------

_WORKER = r"""
import asyncio, io, sys, numpy as np, soundfile as sf
from pathlib import Path
from chatterbox_sidecar.voices import VoiceStore, validate_reference_wav

def wav(seconds, seed):
    data = np.random.default_rng(seed).uniform(-.3, .3, int(seconds * 16000)).astype("float32")
    buf = io.BytesIO(); sf.write(buf, data, 16000, format="WAV"); return buf.getvalue()

async def main():
    store = VoiceStore(Path(sys.argv[1]))
    print("ready", flush=True)
    i = 0
    while True:
        i += 1
        vid = f"v{i % 4}"
        if i % 3 == 0 and store.get(vid):
            await store.delete(vid)
        else:
            await store.register(vid, validate_reference_wav(wav(3 + i % 5, i)))

asyncio.run(main())
"""


def test_kill_9_never_leaves_a_half_written_voice(tmp_path):
    voices = tmp_path / "voices"
    rng = random.Random(1234)
    for _ in range(25):
        proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(voices)], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.01, 0.3))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        store = VoiceStore(voices)  # recovery runs here, as at server start
        for voice in store.list():
            meta = json.loads((voice.path / "meta.json").read_text())
            data = voice.reference_path.read_bytes()
            assert hashlib.sha256(data).hexdigest() == meta["sha256"], voice.voice_id
            info = sf.info(io.BytesIO(data))
            assert info.frames / info.samplerate == pytest.approx(meta["duration_s"])
        leftovers = [p.name for p in voices.iterdir() if p.name not in (".staging", ".trash")]
        assert all(store.get(name) is not None for name in leftovers), leftovers
        assert not any((voices / ".staging").iterdir())
        assert not any((voices / ".trash").iterdir())


async def test_server_starts_cleanly_on_a_crashed_store(sidecar_factory, tmp_path):
    sidecar = sidecar_factory()
    sidecar.stop()
    voices = sidecar.voices_dir
    (voices / ".staging" / "half-1").mkdir(parents=True)
    (voices / ".staging" / "half-1" / "reference.wav").write_bytes(b"RIFF")
    sidecar.start()
    async with await TTSClient.connect(sidecar.url) as client:
        assert client.ready["voices"] == ["default"]
    assert not any((voices / ".staging").iterdir())
