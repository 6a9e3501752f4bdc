"""Issue 14, item 1: the HTTP routes beside the websocket, against a real sidecar (piper).

The OpenAI route is driven by the official ``openai`` package; audio is checked by ear
(Whisper tiny.en) or decoded with PyAV; bad bodies are sent as they would arrive.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
from pathlib import Path

import aiohttp
import av
import numpy as np
import openai
import pytest
import soundfile as sf
from websockets.asyncio.client import connect

from tests.asr import transcribe, word_error_rate
from tests.engine_faults import FaultInjectingPiperEngine, inprocess_sidecar

TEXT = "The quick brown fox jumps over the lazy dog."
STREAM_TEXT = " ".join(f"This is sentence number {n} of the answer." for n in range(1, 7))
LONG_TEXT = " ".join(
    f"Sentence number {n} of a long answer that is read out to the caller." for n in range(1, 25)
)


def _reference_wav(seconds: float = 4.0, rate: int = 16000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    audio = 0.3 * np.sin(2 * np.pi * 180 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
    buf = io.BytesIO()
    sf.write(buf, audio.astype(np.float32), rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


async def _ws_synthesize(ws, text: str) -> dict:
    """Synthesize over an open websocket; returns the context's last message (done or error)."""
    await ws.send(json.dumps({"type": "synthesize", "text": text}))
    while True:
        message = await asyncio.wait_for(ws.recv(), 60)
        if isinstance(message, str) and json.loads(message)["type"] in ("done", "error"):
            return json.loads(message)


async def _ws_connect(sidecar):
    ws = await connect(sidecar.url, max_size=None)
    assert json.loads(await ws.recv())["type"] == "ready"
    return ws


def _metric(sidecar, name: str) -> float:
    _, body, _ = sidecar.get("/metrics")
    total = 0.0
    for line in body.decode().splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _decode(data: bytes) -> tuple[np.ndarray, int]:
    """Decode any container with PyAV (ffmpeg): mono float32 samples and their rate."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        rate = stream.codec_context.sample_rate
        frames = [f.to_ndarray().reshape(-1) for f in container.decode(stream)]
    audio = np.concatenate(frames).astype(np.float32)
    if np.issubdtype(frames[0].dtype, np.integer):
        audio /= 32768.0
    return audio, rate


async def _post(session, sidecar, path: str, body, headers=None):
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    headers = {"Content-Type": "application/json", **(headers or {})}
    async with session.post(f"{sidecar.http_url}{path}", data=data, headers=headers) as r:
        return r.status, dict(r.headers), await r.read()


async def _wait_streams(sidecar, value: int, timeout: float = 15.0) -> int:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        _, health = await asyncio.to_thread(sidecar.get_json, "/health")
        if health["active_streams"] == value or asyncio.get_running_loop().time() > deadline:
            return health["active_streams"]
        await asyncio.sleep(0.05)


# --- OpenAI's SDK -------------------------------------------------------------------------


def _openai_client(sidecar, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{sidecar.http_url}/v1", api_key=api_key, max_retries=0)


@pytest.mark.slow
def test_openai_sdk_create_speaks_the_words(sidecar):
    client = _openai_client(sidecar)
    reply = client.audio.speech.create(
        model="tts-1", voice="alloy", input=TEXT, response_format="wav"
    )
    audio, rate = sf.read(io.BytesIO(reply.content), dtype="float32")
    assert rate == 24000
    heard = transcribe(audio, rate)
    assert word_error_rate(TEXT, heard) <= 0.25, heard


@pytest.mark.slow
def test_openai_sdk_streaming_response_speaks_the_words(sidecar):
    client = _openai_client(sidecar)
    chunks = []
    with client.audio.speech.with_streaming_response.create(
        model="piper", voice="default", input=STREAM_TEXT, response_format="pcm"
    ) as response:
        assert response.headers["content-type"] == "application/octet-stream"
        assert response.headers["x-sample-rate"] == "24000"
        assert "content-length" not in response.headers  # chunked, as generated
        for chunk in response.iter_bytes():
            chunks.append(chunk)
    assert len(chunks) > 1
    pcm = np.frombuffer(b"".join(chunks), dtype="<i2")
    heard = transcribe(pcm, 24000)
    assert word_error_rate(STREAM_TEXT, heard) <= 0.25, heard


def test_openai_sdk_errors_in_openai_shape(sidecar):
    client = _openai_client(sidecar)
    with pytest.raises(openai.NotFoundError) as e:
        client.audio.speech.create(model="no-such-model", voice="alloy", input="Hi.")
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        client.audio.speech.create(model="tts-1", voice="alloy", input="Hi.", speed=1.5)
    assert e.value.body["param"] == "speed" and "1.0" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.audio.speech.create(model="tts-1", voice="alloy", input="Hi.", speed=9)
    assert "between 0.25 and 4" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.audio.speech.create(model="tts-1", voice="alloy", input="Hi.", response_format="aac")
    assert e.value.body["param"] == "response_format"
    assert "wav, pcm, flac, mp3, opus" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError) as e:
        client.audio.speech.create(model="tts-1", voice="nobody", input="Hi.")
    assert e.value.body["code"] == "voice_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.audio.speech.create(model="tts-1", voice="alloy", input="   ")
    assert e.value.body["param"] == "input"
    assert client.audio.speech.create(model="tts-1-hd", voice={"id": "default"}, input="Hi.")


def test_models_and_voices_are_discoverable(sidecar):
    client = _openai_client(sidecar)
    ids = [m.id for m in client.models.list()]
    assert ids[0] == "piper"
    assert {"tts-1", "tts-1-hd", "gpt-4o-mini-tts"} <= set(ids)
    status, voices = sidecar.get_json("/v1/audio/voices")
    assert status == 200 and "default" in voices["voices"]
    assert voices["data"][0]["object"] == "audio.voice"


@pytest.mark.parametrize("fmt", ["mp3", "opus", "flac", "wav"])
@pytest.mark.parametrize("stream", [True, False])
async def test_speech_formats_decode_to_the_same_speech(sidecar, fmt, stream):
    async with aiohttp.ClientSession() as session:
        body = {"model": "tts-1", "voice": "alloy", "input": TEXT, "response_format": fmt}
        status, headers, data = await _post(
            session, sidecar, "/v1/audio/speech", {**body, "stream": stream}
        )
        _, _, wav = await _post(session, sidecar, "/v1/synthesize", {"text": TEXT, "format": "wav"})
    assert status == 200, data
    assert ("Content-Length" in headers) != stream
    reference, _ = sf.read(io.BytesIO(wav), dtype="float32")
    audio, rate = _decode(data)
    assert rate in (24000, 48000)  # Opus decodes at 48 kHz
    seconds = len(audio) / rate
    assert seconds == pytest.approx(len(reference) / 24000, rel=0.15)  # piper's timing varies
    assert np.sqrt(np.mean(audio**2)) > 0.01  # speech, not silence


async def test_speech_sse_stream(sidecar):
    async with aiohttp.ClientSession() as session:
        body = {
            "model": "tts-1",
            "voice": "alloy",
            "input": TEXT,
            "response_format": "pcm",
            "stream_format": "sse",
        }
        status, headers, data = await _post(session, sidecar, "/v1/audio/speech", body)
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = [json.loads(line[6:]) for line in data.decode().splitlines() if line]
    assert [e["type"] for e in events[:-1]] == ["speech.audio.delta"] * (len(events) - 1)
    assert events[-1]["type"] == "speech.audio.done"
    pcm = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    assert events[-1]["audio_seconds"] == pytest.approx(len(pcm) / 2 / 24000, abs=1e-3)


# --- POST /v1/synthesize ------------------------------------------------------------------


async def test_synthesize_streams_before_generation_ends(sidecar):
    audio_before = _metric(sidecar, "tts_audio_seconds_total")
    async with aiohttp.ClientSession() as session:
        body = {"text": LONG_TEXT, "streaming": True, "sample_rate": 16000}
        async with session.post(f"{sidecar.http_url}/v1/synthesize", json=body) as r:
            assert r.status == 200
            assert r.headers["X-Sample-Rate"] == "16000"
            assert r.headers["X-Encoding"] == "pcm_s16le"
            assert r.headers["Transfer-Encoding"] == "chunked"
            first = await r.content.readany()
            # the first audio is here while the synthesis is still running: it holds a stream
            # and has not been counted as finished audio yet
            _, health = await asyncio.to_thread(sidecar.get_json, "/health")
            assert health["active_streams"] == 1
            assert _metric(sidecar, "tts_audio_seconds_total") == audio_before
            rest = await r.read()
    data = first + rest
    audio, rate = sf.read(io.BytesIO(data), dtype="int16")
    assert rate == 16000 and len(audio) / rate > 20
    assert await _wait_streams(sidecar, 0) == 0
    assert _metric(sidecar, "tts_audio_seconds_total") > audio_before + 20


async def test_synthesize_whole_file_and_encodings(sidecar):
    async with aiohttp.ClientSession() as session:
        status, headers, data = await _post(session, sidecar, "/v1/synthesize", {"text": TEXT})
        assert status == 200 and headers["Content-Type"] == "audio/wav"
        assert int(headers["Content-Length"]) == len(data)
        with sf.SoundFile(io.BytesIO(data)) as f:
            assert (f.samplerate, f.subtype) == (24000, "PCM_16")
            assert f.frames * 2 + 44 == len(data)  # exact header
        body = {"text": TEXT, "format": "pcm", "encoding": "pcm_mulaw", "sample_rate": 8000}
        status, headers, mulaw = await _post(session, sidecar, "/v1/synthesize", body)
        assert status == 200 and headers["X-Encoding"] == "pcm_mulaw"
        assert len(mulaw) / 8000 == pytest.approx(f.frames / 24000, rel=0.15)  # piper varies
        body = {"text": TEXT, "encoding": "pcm_f32le", "streaming": True}
        status, _, f32 = await _post(session, sidecar, "/v1/synthesize", body)
        audio, rate = sf.read(io.BytesIO(f32), dtype="float32")
        assert status == 200 and rate == 24000
        assert len(audio) == pytest.approx(f.frames, rel=0.15)


async def test_client_disconnect_stops_the_synthesis(sidecar):
    audio_before = _metric(sidecar, "tts_audio_seconds_total")
    async with aiohttp.ClientSession() as session:
        body = {"text": LONG_TEXT * 3, "streaming": True}
        async with session.post(f"{sidecar.http_url}/v1/synthesize", json=body) as r:
            await r.content.readany()
            r.close()  # hang up mid-stream
    assert await _wait_streams(sidecar, 0) == 0
    # the synthesis ended without finishing: its audio was never counted as delivered
    assert _metric(sidecar, "tts_audio_seconds_total") == audio_before
    async with aiohttp.ClientSession() as session:
        status, _, _ = await _post(session, sidecar, "/v1/synthesize", {"text": "Still here."})
    assert status == 200


# --- voices over HTTP ---------------------------------------------------------------------


async def test_voice_upload_list_delete(sidecar):
    wav = _reference_wav()
    base = sidecar.http_url
    async with aiohttp.ClientSession() as session:
        body = {"voice_id": "alice", "reference_audio": base64.b64encode(wav).decode()}
        status, _, data = await _post(session, sidecar, "/v1/voices", body)
        assert status == 201, data
        reply = json.loads(data)
        assert reply["voice_id"] == "alice" and reply["voice"]["duration_s"] == 4.0
        status, _, _ = await _post(session, sidecar, "/v1/voices", body)
        assert status == 200  # replaced
        form = aiohttp.FormData()
        form.add_field("voice_id", "bob")
        form.add_field("file", wav, filename="bob.wav", content_type="audio/wav")
        async with session.post(f"{base}/v1/voices", data=form) as r:
            assert r.status == 201, await r.text()
        listed = {v["voice_id"] for v in sidecar.get_json("/v1/voices")[1]["voices"]}
        assert {"default", "alice", "bob"} <= listed
        assert "bob" in sidecar.get_json("/v1/audio/voices")[1]["voices"]
        # piper stores cloned voices but cannot speak them
        status, _, data = await _post(
            session, sidecar, "/v1/synthesize", {"text": "Hi.", "voice_id": "alice"}
        )
        assert status == 400 and json.loads(data)["code"] == "unsupported"
        async with session.delete(f"{base}/v1/voices/alice") as r:
            assert r.status == 200 and (await r.json())["voice_id"] == "alice"
        async with session.delete(f"{base}/v1/voices/alice") as r:
            assert r.status == 404 and (await r.json())["code"] == "voice_not_found"
        async with session.delete(f"{base}/v1/voices/default") as r:
            assert r.status == 400
        async with session.delete(f"{base}/v1/voices/bad%20id") as r:
            assert r.status == 400 and (await r.json())["code"] == "invalid_request"
        async with session.delete(f"{base}/v1/voices/bob") as r:
            assert r.status == 200
        # an OpenAI voice name is the default voice, unless a voice of that name is registered
        speech = {"model": "tts-1", "voice": "nova", "input": "Hi.", "response_format": "pcm"}
        status, _, _ = await _post(session, sidecar, "/v1/audio/speech", speech)
        assert status == 200
        body = {"voice_id": "nova", "reference_audio": _b64(wav)}
        assert (await _post(session, sidecar, "/v1/voices", body))[0] == 201
        status, _, data = await _post(session, sidecar, "/v1/audio/speech", speech)
        assert status == 400 and json.loads(data)["error"]["code"] == "unsupported"
        async with session.delete(f"{base}/v1/voices/nova") as r:
            assert r.status == 200
    listed = {v["voice_id"] for v in sidecar.get_json("/v1/voices")[1]["voices"]}
    assert listed == {"default"}
    assert not (sidecar.voices_dir / "alice").exists()


async def test_bad_voice_uploads_store_nothing(sidecar):
    async with aiohttp.ClientSession() as session:
        cases = [
            ({"voice_id": "x", "reference_audio": "not base64!"}, "invalid_audio"),
            ({"voice_id": "x", "reference_audio": base64.b64encode(b"RIFFjunk").decode()}, None),
            (
                {"voice_id": "x", "reference_audio": base64.b64encode(_reference_wav(1)).decode()},
                None,
            ),
            ({"voice_id": "../x", "reference_audio": ""}, "invalid_request"),
            ({"reference_audio": ""}, "invalid_request"),
        ]
        for body, code in cases:
            status, _, data = await _post(session, sidecar, "/v1/voices", body)
            reply = json.loads(data)
            assert status == 400, reply
            assert reply["code"] == (code or "invalid_audio"), reply
        form = aiohttp.FormData()
        form.add_field("voice_id", "x")
        async with session.post(f"{sidecar.http_url}/v1/voices", data=form) as r:
            assert r.status == 415  # urlencoded, not multipart
        form = aiohttp.FormData()
        form.add_field("voice_id", "x")
        form.add_field("file", b"not a wav", filename="x.wav", content_type="audio/wav")
        async with session.post(f"{sidecar.http_url}/v1/voices", data=form) as r:
            assert r.status == 400 and (await r.json())["code"] == "invalid_audio"
    assert [v["voice_id"] for v in sidecar.get_json("/v1/voices")[1]["voices"]] == ["default"]


# --- bad bodies ---------------------------------------------------------------------------


def _raw_request(port: int, head: str, body: bytes = b"", timeout: float = 10.0) -> tuple[int, str]:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head.encode() + body)
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            data = s.recv(65536)
            if not data:
                break
            reply += data
    status = int(reply.split(b" ", 2)[1])
    return status, reply.split(b"\r\n\r\n", 1)[1].decode(errors="replace")


async def test_bad_bodies_get_their_status_and_the_server_goes_on(sidecar_factory):
    sidecar = sidecar_factory(TTS_MAX_FRAME_BYTES=4096, TTS_MAX_TEXT_CHARS=1000)
    port = sidecar.port
    for path in ("/v1/synthesize", "/v1/audio/speech", "/v1/voices"):
        # a Content-Length over the limit is refused at once, the body never sent
        head = (
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Content-Length: 100000000\r\n\r\n"
        )
        status, body = await asyncio.to_thread(_raw_request, port, head)
        assert status == 413, body
        assert ("error" in json.loads(body)) == (path == "/v1/audio/speech")
    # a chunked body is cut off once it passes the limit
    head = (
        "POST /v1/synthesize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"1000\r\n" + b" " * 4096 + b"\r\n"
    status, _ = await asyncio.to_thread(_raw_request, port, head, chunk * 3)
    assert status == 413
    async with aiohttp.ClientSession() as session:
        for path in ("/v1/synthesize", "/v1/audio/speech"):
            status, _, data = await _post(
                session, sidecar, path, b"text=hi", {"Content-Type": "text/plain"}
            )
            assert status == 415, data
            status, _, data = await _post(session, sidecar, path, b'{"text": "hi"')
            assert status == 400, data
            code = json.loads(data).get("code") or json.loads(data)["error"]["code"]
            assert code == "invalid_json"
            status, _, data = await _post(session, sidecar, path, b"[1, 2]")
            assert status == 400, data
        for body in (
            {"text": "hi", "format": "ogg"},
            {"text": "hi", "sample_rate": 100},
            {"text": "hi", "encoding": "alaw"},
            {"text": "a\u0000b"},
            {"text": "hi", "continue": True},
            {"text": "x" * 2000},
        ):
            status, _, data = await _post(session, sidecar, "/v1/synthesize", body)
            assert status == 400, (body, data)
        body = {"voice_id": "x", "reference_audio": base64.b64encode(b"\0" * 5000).decode()}
        status, _, _ = await _post(session, sidecar, "/v1/voices", body)
        assert status == 413
        status, _, data = await _post(session, sidecar, "/v1/synthesize", {"text": TEXT})
        assert status == 200 and data[:4] == b"RIFF"
    async with await _ws_connect(sidecar) as ws:
        assert (await _ws_synthesize(ws, "The websocket is fine too."))["type"] == "done"


# --- auth, capacity and limits ------------------------------------------------------------


NEW_ROUTES = [
    ("POST", "/v1/synthesize"),
    ("POST", "/v1/audio/speech"),
    ("GET", "/v1/models"),
    ("GET", "/v1/audio/voices"),
    ("POST", "/v1/voices"),
    ("DELETE", "/v1/voices/alice"),
]


async def test_auth_on_every_new_route(sidecar_factory):
    sidecar = sidecar_factory(TTS_API_KEY="secret")
    async with aiohttp.ClientSession() as session:
        for method, path in NEW_ROUTES:
            url = f"{sidecar.http_url}{path}"
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                async with session.request(method, url, json={}, headers=headers) as r:
                    assert r.status == 401, (method, path)
                    body = await r.json()
                    if path.startswith(("/v1/audio/", "/v1/models")):
                        assert body["error"]["code"] == "invalid_api_key"
                    else:
                        assert body["code"] == "unauthorized"
            good = {"Authorization": "Bearer secret"}
            async with session.request(method, url, json={}, headers=good) as r:
                assert r.status != 401, (method, path)
    client = _openai_client(sidecar, api_key="wrong")
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    reply = _openai_client(sidecar, api_key="secret").audio.speech.create(
        model="tts-1", voice="alloy", input="Hi.", response_format="wav"
    )
    assert reply.content[:4] == b"RIFF"


async def test_http_synthesis_counts_as_a_stream_and_not_a_connection(sidecar_factory):
    sidecar = sidecar_factory(TTS_MAX_STREAMS=1, TTS_MAX_CONNECTIONS=1)
    async with await _ws_connect(sidecar) as ws:  # the one websocket connection allowed
        async with aiohttp.ClientSession() as session:
            # HTTP is not counted as a connection: it is served beside the websocket
            status, _, _ = await _post(session, sidecar, "/v1/synthesize", {"text": "Hi."})
            assert status == 200
            body = {"text": LONG_TEXT, "streaming": True}
            async with session.post(f"{sidecar.http_url}/v1/synthesize", json=body) as r:
                await r.content.readany()
                # the streamed synthesis holds the one stream: everything else is busy
                status, _, data = await _post(session, sidecar, "/v1/synthesize", {"text": "Hi."})
                assert status == 503 and json.loads(data)["code"] == "busy"
                speech = {"model": "tts-1", "voice": "alloy", "input": "Hi."}
                status, _, data = await _post(session, sidecar, "/v1/audio/speech", speech)
                assert status == 503 and json.loads(data)["error"]["code"] == "busy"
                reply = await _ws_synthesize(ws, "Hi.")
                assert reply["code"] == "busy"
                await r.read()
        assert await _wait_streams(sidecar, 0) == 0
        assert (await _ws_synthesize(ws, "My turn now."))["type"] == "done"


async def test_audio_limit_mid_stream_cuts_the_body(sidecar_factory):
    # 1 s of audio allowed; the text's estimate (under 1 s) lets it in, its speech does not
    sidecar = sidecar_factory(TTS_MAX_AUDIO_SECONDS=1)
    text = "Oh. Ah. Uh. Eh."
    async with aiohttp.ClientSession() as session:
        body = {"text": text, "streaming": True}
        with pytest.raises(aiohttp.ClientPayloadError):
            async with session.post(f"{sidecar.http_url}/v1/synthesize", json=body) as r:
                assert r.status == 200
                await r.read()
        speech = {
            "model": "tts-1",
            "voice": "alloy",
            "input": text,
            "response_format": "pcm",
            "stream_format": "sse",
        }
        status, _, data = await _post(session, sidecar, "/v1/audio/speech", speech)
        assert status == 200
        last = json.loads(data.decode().strip().splitlines()[-1][6:])
        assert last["type"] == "error" and last["error"]["code"] == "text_too_long"
        status, _, data = await _post(session, sidecar, "/v1/synthesize", {"text": "Hi."})
        assert status == 200


# --- engine failures ----------------------------------------------------------------------


def _cuda_fault(segment: str) -> BaseException | None:
    """A CUDA-style device fault for a segment holding FAULT (the runtime's wording is what
    marks an exception as a device fault)."""
    if "FAULT" in segment.upper():
        return RuntimeError("CUDA error: device-side assert triggered")
    return None


@pytest.fixture
async def faulting_server(tmp_path: Path):
    engine = FaultInjectingPiperEngine(_cuda_fault, max_concurrency=2)
    async with inprocess_sidecar(engine, tmp_path) as (app, port):
        yield app, f"http://127.0.0.1:{port}"


async def test_device_fault_in_a_streamed_synthesis(faulting_server):
    app, url = faulting_server
    async with aiohttp.ClientSession() as session:
        body = {"text": "This sentence is fine. This one hits a fault.", "streaming": True}
        with pytest.raises(aiohttp.ClientPayloadError):  # cut off, not a short "whole" file
            async with session.post(f"{url}/v1/synthesize", json=body) as r:
                assert r.status == 200
                await r.read()
        async with session.get(f"{url}/health/live") as r:
            assert r.status == 503
        assert app.active_streams == 0
        # new work is refused from now on, in each route's shape
        async with session.post(f"{url}/v1/synthesize", json={"text": "Hi."}) as r:
            assert r.status == 500 and (await r.json())["code"] == "engine_error"
        speech = {"model": "tts-1", "voice": "alloy", "input": "Hi."}
        async with session.post(f"{url}/v1/audio/speech", json=speech) as r:
            error = (await r.json())["error"]
            assert r.status == 500 and error["type"] == "server_error"
            assert "restarted" in error["message"]


async def test_device_fault_before_the_first_audio_is_an_error_status(faulting_server):
    app, url = faulting_server
    async with aiohttp.ClientSession() as session:
        speech = {"model": "tts-1", "voice": "alloy", "input": "A fault at once."}
        async with session.post(f"{url}/v1/audio/speech", json=speech) as r:
            assert r.status == 500 and (await r.json())["error"]["code"] == "engine_error"
    assert app.device_fault is not None and app.active_streams == 0
