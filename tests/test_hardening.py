"""Issue 19: each failure the adversarial pass found, replayed against a real sidecar (piper).

Every test reproduces the attack as it was made (raw sockets where a library would not send
such bytes) and asserts the fixed behaviour.
"""

from __future__ import annotations

import asyncio
import http.client
import io
import json
import socket
import struct
import time
import urllib.parse

import numpy as np
import pytest
import soundfile as sf
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.client import TTSClient

UPGRADE = (
    "GET /v1/stream/tts HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
    "Connection: Upgrade\r\nSec-WebSocket-Version: {version}\r\n{key}\r\n"
)
KEY = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"


def _metric(sidecar, name: str) -> float:
    _, body, _ = sidecar.get("/metrics")
    for line in body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def _raw_request(port: int, request: str, rst: bool = False) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request.encode())
        if rst:  # close at once with a reset, before reading the answer
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return b""
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        return data


def _wav(seconds: float, rate: int = 16000, samples: np.ndarray | None = None) -> bytes:
    if samples is None:
        samples = np.random.default_rng(0).uniform(-0.3, 0.3, int(seconds * rate))
    buf = io.BytesIO()
    sf.write(buf, samples.astype(np.float32), rate, format="WAV", subtype="FLOAT")
    return buf.getvalue()


# 1. failed handshakes never hold a connection slot -----------------------------------------


async def test_failed_handshakes_do_not_leak_connection_slots(sidecar_factory):
    sidecar = sidecar_factory(TTS_MAX_CONNECTIONS="2")
    for _ in range(5):
        status, _, _ = sidecar.get("/v1/stream/tts")  # a plain GET: no upgrade
        assert status == 426
    for _ in range(3):
        assert b" 101 " not in _raw_request(sidecar.port, UPGRADE.format(version=13, key=""))
        _raw_request(sidecar.port, UPGRADE.format(version=8, key=KEY))  # answered, then dropped
        _raw_request(sidecar.port, UPGRADE.format(version=13, key=KEY), rst=True)
    await asyncio.sleep(0.5)
    async with await TTSClient.connect(sidecar.url) as a, await TTSClient.connect(sidecar.url):
        assert (await a.synthesize("Still open.")).end["type"] == "done"
        with pytest.raises(InvalidStatus) as info:  # the limit itself still holds
            await TTSClient.connect(sidecar.url)
        assert info.value.response.status_code == 503
    await asyncio.sleep(0.3)
    assert _metric(sidecar, "tts_connections_open") == 0


# 2. one connection cannot take every context; idle contexts end ----------------------------


async def test_one_connection_cannot_starve_the_others(sidecar_factory):
    sidecar = sidecar_factory(
        TTS_ENGINE_CONCURRENCY="1", TTS_MAX_STREAMS="8", TTS_CONTEXT_IDLE_SECONDS="2"
    )
    async with (
        await TTSClient.connect(sidecar.url) as hog,
        await TTSClient.connect(sidecar.url) as other,
    ):
        refused = []
        for i in range(16):
            await hog.send(
                {"type": "synthesize", "text": "", "continue": True, "context_id": f"hog-{i}"}
            )
        for _ in range(12):  # the share is half the capacity: 4 held, 12 refused
            reply = await hog.recv_json()
            assert reply["type"] == "error" and reply["code"] == "busy", reply
            assert "connection" in reply["message"]
            refused.append(reply["context_id"])
        assert len(refused) == 12
        result = await other.synthesize("Another caller is served.")
        assert result.end["type"] == "done"
        t0 = time.monotonic()
        timed_out = await hog.collect(4, timeout=30)  # no text, no flush: ended after ~2 s
        assert all(r.end["code"] == "timeout" for r in timed_out.values())
        assert time.monotonic() - t0 < 10


# 3. a client that reads nothing is cut off, replies or audio --------------------------------


def _masked_text_frame(payload: bytes) -> bytes:
    mask = b"\x01\x02\x03\x04"
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    assert len(payload) < 126
    return bytes([0x81, 0x80 | len(payload)]) + mask + body


async def test_client_that_never_reads_replies_is_cut_off(sidecar_factory):
    sidecar = sidecar_factory(TTS_MAX_CONNECTIONS="1", TTS_STALL_SECONDS="2", TTS_IDLE_SECONDS="60")

    def flood() -> float:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", sidecar.port))
        s.sendall(UPGRADE.format(version=13, key=KEY).encode())
        frame = _masked_text_frame(b'{"type":"cancel","context_id":"x"}')
        s.setblocking(False)
        t0 = time.monotonic()
        pending = b""  # the rest of a frame the socket took only in part
        checked = t0
        # send cancels and never read the replies, until the server cuts the connection off
        while time.monotonic() - t0 < 90:
            if time.monotonic() - checked > 0.5:
                checked = time.monotonic()
                # The server counts the cut as it aborts the connection; this socket, whose
                # receive buffer is full, may not see the reset for a minute more.
                if _metric(sidecar, "tts_stalled_clients_total") >= 1:
                    break
            try:
                if s.recv(1, socket.MSG_PEEK) == b"":
                    break  # closed (FIN)
            except BlockingIOError:
                pass
            except OSError:
                break  # reset: the server cut us off
            try:
                pending = pending or frame
                pending = pending[s.send(pending) :]
            except BlockingIOError:
                time.sleep(0.05)  # our own send is blocked: the server stopped reading us
            except OSError:
                break
        s.close()
        return time.monotonic() - t0

    assert await asyncio.to_thread(flood) < 90  # cut off, not given up on
    async with await TTSClient.connect(sidecar.url) as client:  # the slot is free again
        assert (await client.synthesize("Hello again.")).end["type"] == "done"
    assert _metric(sidecar, "tts_stalled_clients_total") >= 1


# 4. HTTP synthesis is not cut at 10 s and counts against capacity ---------------------------


async def test_long_http_synthesis_returns_whole(sidecar_factory):
    sidecar = sidecar_factory()
    text = " ".join(f"Line {i} of the long document is read aloud here." for i in range(84))
    assert len(text) > 4000
    query = urllib.parse.urlencode({"text": text, "sample_rate": 8000})
    t0 = time.monotonic()
    status, body, _ = await asyncio.to_thread(sidecar.get, f"/v1/synthesize?{query}")
    took = time.monotonic() - t0
    assert status == 200, body[:300]
    audio, rate = sf.read(io.BytesIO(body))
    assert rate == 8000 and len(audio) / rate > 120
    assert took > 10  # it outlived the old handshake deadline


async def test_http_synthesis_counts_against_capacity(sidecar_factory):
    sidecar = sidecar_factory(TTS_MAX_STREAMS="1")
    text = " ".join(f"Sentence {i} of an answer." for i in range(40))
    query = urllib.parse.urlencode({"text": text})
    long_call = asyncio.create_task(asyncio.to_thread(sidecar.get, f"/v1/synthesize?{query}"))
    deadline = time.monotonic() + 20
    while sidecar.get_json("/health")[1]["active_streams"] == 0:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    status, health = sidecar.get_json("/health/ready")
    assert status == 503 and health["status"] == "at_capacity"
    assert _metric(sidecar, "tts_capacity") == 1
    assert _metric(sidecar, "tts_active_streams") == 1
    assert sidecar.get_json("/health/live")[0] == 200
    status, err = sidecar.get_json("/v1/synthesize?text=Hi")
    assert status == 503 and err["code"] == "busy"
    async with await TTSClient.connect(sidecar.url) as client:
        reply = await client.request(
            {"type": "synthesize", "text": "Hi.", "context_id": "a"}, "error"
        )
        assert reply["code"] == "busy" and "capacity" in reply["message"]
    assert (await long_call)[0] == 200
    assert sidecar.get_json("/health/ready")[0] == 200


# 5. ids are matched whole: a trailing newline does not pass ----------------------------------


async def test_ids_with_a_trailing_newline_are_rejected(sidecar):
    async with await TTSClient.connect(sidecar.url) as client:
        for voice_id in ("default\n", "bob\n"):
            reply = await client.register_voice(voice_id, _wav(4))
            assert reply["type"] == "error" and reply["code"] == "invalid_request"
        reply = await client.request(
            {"type": "synthesize", "text": "Hi.", "context_id": "a\n"}, "error"
        )
        assert reply["code"] == "invalid_request" and "context_id" in reply["message"]
    assert not any("\n" in p.name for p in sidecar.voices_dir.iterdir())


# 6. bad text is the client's error, not the engine's -----------------------------------------


async def test_control_characters_do_not_flip_readiness(sidecar):
    async with await TTSClient.connect(sidecar.url) as client:
        for i in range(3):
            for text in ("Hi\u0000 there.", "Hi \ud800 there."):
                raw = json.dumps({"type": "synthesize", "text": text, "context_id": f"c{i}"})
                reply = await client.request(raw, "error")
                assert reply["code"] == "invalid_request" and "U+" in reply["message"]
        result = await client.synthesize("Bell\u0007 and escape\u001b are spaces.")
        assert result.end["type"] == "done"
    status, health = sidecar.get_json("/health")
    assert status == 200 and health["status"] == "ready"


# 7. duplicate Authorization headers are a bad request, not a crash ---------------------------


async def test_duplicate_authorization_is_400(sidecar_factory):
    sidecar = sidecar_factory(TTS_API_KEY="secret")
    conn = http.client.HTTPConnection("127.0.0.1", sidecar.port, timeout=10)
    conn.putrequest("GET", "/v1/voices")
    conn.putheader("Authorization", "Bearer secret")
    conn.putheader("Authorization", "Bearer other")
    conn.endheaders()
    response = conn.getresponse()
    body = json.loads(response.read())
    assert response.status == 400 and body["code"] == "invalid_request"
    assert "Traceback" not in sidecar.stderr_text()
    assert sidecar.get("/v1/voices", {"Authorization": "Bearer secret"})[0] == 200


# 8. the smaller ones ------------------------------------------------------------------------


async def test_error_messages_and_health_hold_no_internals(sidecar):
    async with await TTSClient.connect(sidecar.url) as client:
        reply = await client.register_voice("junk", b"RIFF not a wav at all")
        assert reply["code"] == "invalid_audio"
        assert "0x" not in reply["message"] and "object at" not in reply["message"]
    _, health = sidecar.get_json("/health")
    assert "error" not in health and "message" not in json.dumps(health)


async def test_voice_quota_and_reserved_names(sidecar_factory):
    sidecar = sidecar_factory(TTS_MAX_VOICES="2")
    wav = _wav(4)

    async with await TTSClient.connect(sidecar.url) as client:
        for voice_id in ("DEFAULT", "Default", "NUL", "con", "com1", "LPT9"):
            reply = await client.register_voice(voice_id, wav)
            assert reply["type"] == "error" and reply["code"] == "invalid_request", voice_id
            assert "reserved" in reply["message"]
        assert (await client.register_voice("bob", wav))["type"] == "voice_registered"
        reply = await client.register_voice("Bob", wav)
        assert reply["code"] == "invalid_request" and "case" in reply["message"]
        assert (await client.register_voice("alice", wav))["type"] == "voice_registered"
        reply = await client.register_voice("carol", wav)
        assert reply["code"] == "quota_exceeded"
        assert (await client.register_voice("bob", wav))[
            "type"
        ] == "voice_registered"  # replacing is fine
    assert sorted(p.name for p in sidecar.voices_dir.iterdir() if not p.name.startswith(".")) == [
        "alice",
        "bob",
    ]


@pytest.mark.parametrize(
    "wav",
    [
        pytest.param(_wav(4, rate=1), id="1 Hz"),
        pytest.param(_wav(4, rate=384_000), id="384 kHz"),
        pytest.param(_wav(4, samples=np.full(64000, np.nan)), id="all NaN"),
        pytest.param(_wav(4, samples=np.r_[np.zeros(63999), np.inf]), id="one inf"),
    ],
)
async def test_unusable_reference_audio_is_refused(sidecar, wav):
    async with await TTSClient.connect(sidecar.url) as client:
        reply = await client.register_voice("odd", wav)
        assert reply["type"] == "error" and reply["code"] == "invalid_audio", reply


async def test_audio_per_context_is_capped(sidecar_factory):
    sidecar = sidecar_factory(TTS_MAX_AUDIO_SECONDS="120")
    async with await TTSClient.connect(sidecar.url) as client:
        result = await client.synthesize("7" * 20_000)  # was read digit by digit for 891 s
        assert result.end["type"] == "error" and result.end["code"] == "text_too_long"
        assert "120" in result.end["message"]
        assert (await client.synthesize("Two hundred digits is fine.")).end["type"] == "done"
    status, err = sidecar.get_json("/v1/synthesize?text=" + "7" * 5000)
    assert status == 400 and err["code"] == "text_too_long"


async def test_keepalive_keeps_an_idle_connection_open(sidecar_factory):
    sidecar = sidecar_factory(TTS_IDLE_SECONDS="2")
    async with await TTSClient.connect(sidecar.url) as client:
        for _ in range(5):
            await client.send({"type": "keepalive"})
            await asyncio.sleep(0.8)
        assert (await client.synthesize("Still connected.")).end["type"] == "done"
        with pytest.raises(ConnectionClosed):
            await client.recv(timeout=6)  # no keepalive now: closed for idleness
    assert client.ws.close_code == 1000 and client.ws.close_reason == "idle timeout"


async def test_keepalive_has_no_reply(sidecar):
    async with connect(sidecar.url) as ws:
        assert json.loads(await ws.recv())["type"] == "ready"
        await ws.send(json.dumps({"type": "keepalive"}))
        await ws.send(json.dumps({"type": "list_voices"}))
        assert json.loads(await ws.recv())["type"] == "voices"  # keepalive had no reply
